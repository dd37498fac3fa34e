"""TigerBeetle transfer codes (u16) and the system accounts each ledger has."""

from __future__ import annotations

from enum import IntEnum


class TransferCode(IntEnum):
    CREDIT = 1
    DEBIT = 2
    CREDIT_VOID = 3
    DEBIT_VOID = 4
    OPENING = 10
    CORRECTION = 11


class SystemAccount(IntEnum):
    """Per-ledger accounts on the other side of every customer transfer (value = account code)."""

    RESERVE = 901  # source of credits
    SPEND = 902  # sink of debits
    OPENING = 903  # source of migrated balances
    CORRECTION = 904  # reconciliation repairs


CUSTOMER_ACCOUNT_CODE = 100
