"""Deterministic 128-bit ids: accounts from wallet keys, transfers from transaction ids.

Every retry of every layer derives the same id, which is what makes writes idempotent.
"""

from __future__ import annotations

import hashlib

from walletcore.codes import SystemAccount
from walletcore.keys import WalletKey

U128_MAX = 2**128 - 1
NONCE_MAX = 16  # the registry re-hashes on collision; more than a few nonces means a bug


def hash_u128(text: str) -> int:
    """First 128 bits of SHA-256 of `text`, never 0 or 2^128-1 (both reserved by TigerBeetle)."""
    digest = hashlib.sha256(text.encode()).digest()
    value = int.from_bytes(digest[:16], "big")
    if value in (0, U128_MAX):  # astronomically rare; keep the id valid and deterministic
        value = int.from_bytes(hashlib.sha256(b"reserved:" + digest).digest()[:16], "big")
    assert 0 < value < U128_MAX
    return value


def account_id(key: WalletKey, nonce: int = 0) -> int:
    assert 0 <= nonce <= NONCE_MAX
    suffix = "" if nonce == 0 else f"#{nonce}"
    return hash_u128(f"account:{key.canonical}{suffix}")


def wallet_log_name(key: WalletKey) -> str:
    """How logs and errors outside payloads name a wallet: its (nonce-0) account id, never the
    client id (issue 12: no customer identifier in the clear outside encrypted payloads)."""
    return f"account {account_id(key):032x}"


def system_account_id(ledger: int, account: SystemAccount) -> int:
    return hash_u128(f"system:{ledger}:{account.name}")


def transfer_id(transaction_id: str) -> int:
    """Id of the credit/debit transfer of a caller's transaction."""
    return hash_u128(f"transfer:{transaction_id}")


def void_transfer_id(original_transaction_id: str) -> int:
    """A void is derived from the transaction it voids, so a transaction can be voided once."""
    return hash_u128(f"void:{original_transaction_id}")


def opening_transfer_id(key: WalletKey, version: int, part: str) -> int:
    """Backfill's opening transfers: one per wallet version and part (credit/debit)."""
    return hash_u128(f"opening:{key.canonical}:{version}:{part}")


def reference_hash(reference_id: str | None) -> int:
    """`user_data_128` of a transfer: the hashed reference id (0 when there is none)."""
    return 0 if not reference_id else hash_u128(f"reference:{reference_id}")
