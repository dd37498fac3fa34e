"""One error hierarchy for the wallet domain.

Each error knows whether retrying can help. Temporal turns a non-retryable error into an
`ApplicationError(non_retryable=True, type=<class name>)` at the activity/workflow boundary.
"""

from __future__ import annotations


class WalletError(Exception):
    """Base of every domain error. `field` names the input field at fault, when there is one."""

    retryable: bool = False

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    @property
    def type_name(self) -> str:
        return type(self).__name__

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidInputError(WalletError):
    """The request is malformed; nothing was written."""


class InvalidAmountError(InvalidInputError):
    """Zero, negative, NaN, too many decimals for the currency, or above the u64 range."""


class UnknownCurrencyError(InvalidInputError):
    """The currency has no precision entry."""


class UnknownLedgerError(InvalidInputError):
    """The (currency, country) pair maps to no TigerBeetle ledger."""


class InsufficientFundsError(WalletError):
    """The wallet's policy forbids the overdraft this debit (or void) would cause."""


class DuplicateTransactionError(WalletError):
    """The transaction id was already used with different content (wallet, type or amount)."""


class NotFoundError(WalletError):
    """The wallet or transaction does not exist."""


class AlreadyVoidedError(WalletError):
    """The original transaction was already voided by another void request."""


class NotVoidableError(WalletError):
    """Voids apply to credits and debits only (not to voids, openings or corrections)."""


class ConflictError(WalletError):
    """A store holds state that contradicts the request (e.g. an id collision it cannot resolve)."""


class ConfigurationError(WalletError):
    """The deployment's configuration does not fit the servers it talks to (e.g. batches cut for
    a larger TigerBeetle request limit than the cluster's). An operator must fix the setting
    the message names; retrying the same request cannot succeed."""


class StoreUnavailableError(WalletError):
    """A store did not answer in time; retrying later can succeed."""

    retryable = True


class OutcomeUnknownError(StoreUnavailableError):
    """No answer came within the caller's bound (Temporal unreachable, or the answer late): the
    operation may or may not have been applied. Resending the same transaction id is safe:
    every layer is idempotent by it, so the resend is applied once or answered as a replay."""


ALL_ERRORS: tuple[type[WalletError], ...] = (
    WalletError,
    InvalidInputError,
    InvalidAmountError,
    UnknownCurrencyError,
    UnknownLedgerError,
    InsufficientFundsError,
    DuplicateTransactionError,
    NotFoundError,
    AlreadyVoidedError,
    NotVoidableError,
    ConflictError,
    ConfigurationError,
    StoreUnavailableError,
    OutcomeUnknownError,
)

ERRORS_BY_NAME: dict[str, type[WalletError]] = {cls.__name__: cls for cls in ALL_ERRORS}

NON_RETRYABLE_ERROR_TYPES: tuple[str, ...] = tuple(
    cls.__name__ for cls in ALL_ERRORS if not cls.retryable
)
