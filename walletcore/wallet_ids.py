"""Keyed-hash identifiers: what Temporal sees instead of a customer's client id.

A wallet workflow's id is `wallet/<HMAC-SHA256(id_key, "wallet|" + canonical key), first 32 hex>`,
the multi-balance read workflow of a client uses `HMAC(id_key, "client|" + client_id)` and a write's
Update id `HMAC(id_key, "transaction|" + transaction_id)`. The
id key is a deployment secret (WALLETMIG_ID_HASH_KEY_FILE / WALLETMIG_ID_HASH_KEY, walletconfig):
without it nobody can link a workflow id, a Web UI row or a log line to a client, while every
process holding it (WalletClient in the gateway, CLI, demo, benchmarks) computes the same ids.
`walletmig wallet workflow-id` prints a wallet's id for engineers.

Pure: the key is passed in, never read here. Changing the key changes every id: running wallet
workflows are then unreachable under their old ids (drain them first; see the README).
"""

from __future__ import annotations

import hashlib
import hmac

from walletcore.keys import WalletKey

# 32 bytes = SHA-256's output, the least RFC 2104 recommends for an HMAC key; shorter keys are
# refused. Bounded above so a wrong file (a PEM, a dump) is refused rather than used.
ID_KEY_BYTES_MIN = 32
ID_KEY_BYTES_MAX = 1024
# 128 bits of the MAC: a collision between two wallets needs ~2^64 wallets.
ID_HASH_HEX_CHARS = 32
# Domain separation: one key, distinct id spaces that can never collide with each other.
_WALLET_CONTEXT = b"wallet|"
_CLIENT_CONTEXT = b"client|"
_TRANSACTION_CONTEXT = b"transaction|"
WALLET_WORKFLOW_PREFIX = "wallet/"


class IdKeyError(ValueError):
    """The id key is missing or malformed (a configuration error, shown at process start)."""


def check_id_key(key: bytes) -> bytes:
    """`key` if it is a usable id key, else IdKeyError saying why (never showing the key)."""
    if not isinstance(key, bytes):
        raise IdKeyError(f"the id key must be bytes, not {type(key).__name__}")
    if not ID_KEY_BYTES_MIN <= len(key) <= ID_KEY_BYTES_MAX:
        raise IdKeyError(
            f"the id key has {len(key)} bytes; {ID_KEY_BYTES_MIN}..{ID_KEY_BYTES_MAX} are needed"
        )
    return key


def _mac_hex(key: bytes, context: bytes, text: str) -> str:
    check_id_key(key)
    digest = hmac.new(key, context + text.encode(), hashlib.sha256).hexdigest()
    return digest[:ID_HASH_HEX_CHARS]


def wallet_ref(key: bytes, wallet: WalletKey) -> str:
    """A wallet's pseudonym (32 hex): its workflow id's hash, also used by its read workflows."""
    return _mac_hex(key, _WALLET_CONTEXT, wallet.canonical)


def wallet_workflow_id(key: bytes, wallet: WalletKey) -> str:
    """The wallet entity workflow's id: `wallet/<32 hex>` (no client id in it)."""
    return WALLET_WORKFLOW_PREFIX + wallet_ref(key, wallet)


def client_ref(key: bytes, client_id: str) -> str:
    """A client's pseudonym (32 hex) for ids naming a client, e.g. the multi-balance read."""
    assert client_id, "client_id is required"
    return _mac_hex(key, _CLIENT_CONTEXT, client_id)


def transaction_ref(key: bytes, transaction_id: str) -> str:
    """A transaction id's pseudonym (32 hex) for Update ids: a caller's transaction id may embed
    customer data, and Update ids are stored in the clear; attempts of one transaction share it."""
    assert transaction_id, "transaction_id is required"
    return _mac_hex(key, _TRANSACTION_CONTEXT, transaction_id)
