"""The wallet stores' public operations, timed in one place (observability.metrics):
`walletmig_store_operation_seconds{store,operation}` (the wallet plan's MongoDB vs TigerBeetle
table), `walletmig_wallet_operations_total{store,operation,outcome}` and
`walletmig_wallet_errors_total{store,operation,error}`.

Each store module calls `instrument_wallet_store` once, below its class: adding a public
operation means adding it here (or to the store's `extra`), not editing the method."""

from __future__ import annotations

from collections.abc import Mapping

from observability.metrics import Operation, instrument_methods
from walletcore.errors import ConfigurationError, WalletError
from walletcore.operations import WalletOperation, operation_type

# Method -> operation label, the same for both stores (walletcore.ports.WalletStore).
WALLET_STORE_OPERATIONS: dict[str, Operation] = {
    "add_credit": "credit",
    "subtract_credit": "debit",
    "void": "void",
    "get_balance": "balance",
    "get_multi_balance": "balances",
    "history": "history",
}


def operation_label(op: WalletOperation) -> str:
    """credit, debit or void: for methods that take any operation (apply, replicate)."""
    return operation_type(op).value


def is_refusal(exc: BaseException) -> bool:
    """The caller's error (insufficient funds, duplicate id, unknown wallet, ...): a domain
    error retrying cannot fix, other than a configuration error (an operator must act)."""
    return (isinstance(exc, WalletError) and not exc.retryable
            and not isinstance(exc, ConfigurationError))


def instrument_wallet_store(cls: type, store: str, extra: Mapping[str, Operation]) -> None:
    instrument_methods(cls, store, {**WALLET_STORE_OPERATIONS, **extra}, is_refusal)
