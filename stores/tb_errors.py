"""TigerBeetle create statuses -> wallet domain outcomes and errors; a refused batch size ->
the configuration error naming the setting (`too_much_data_error`).

Both tables cover every member of the client's enums (checked at import time and by a test), so
a status added by a client upgrade fails loudly instead of falling through to a vague error.
Statuses the store can never provoke (pending, linked, imported, closing transfers: it sends none
of those) still map to a clear, non-retryable error that says the store built a bad request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

import tigerbeetle as tb

from walletcore import tb_limits
from walletcore.errors import (
    ConfigurationError,
    ConflictError,
    DuplicateTransactionError,
    InsufficientFundsError,
    InvalidAmountError,
    NotFoundError,
    WalletError,
)


class Outcome(StrEnum):
    APPLIED = "applied"  # the event was created now
    EXISTS = "exists"  # an identical event already existed: idempotent success / replay
    FAILED = "failed"  # rejected: raise `error`


@dataclass(frozen=True, slots=True)
class StatusRule:
    outcome: Outcome
    error: type[WalletError] | None = None
    message: str = ""
    field: str | None = None

    def __post_init__(self) -> None:
        assert (self.outcome is Outcome.FAILED) == (self.error is not None)
        assert self.outcome is not Outcome.FAILED or self.message


_APPLIED = StatusRule(Outcome.APPLIED)
_EXISTS = StatusRule(Outcome.EXISTS)


def _fail(
    error: type[WalletError], message: str, field: str | None = None
) -> StatusRule:
    return StatusRule(Outcome.FAILED, error, message, field)


def _bug(what: str) -> StatusRule:
    """A status only a malformed request can cause: the store never sends one, so it is a bug."""
    return _fail(ConflictError, f"TigerBeetle rejected the request ({what}); store bug")


_TS = tb.CreateTransferStatus
_DUPLICATE = "transaction_id was already used for a different operation"

TRANSFER_STATUS_RULES: Mapping[tb.CreateTransferStatus, StatusRule] = MappingProxyType(
    {
        _TS.CREATED: _APPLIED,
        _TS.EXISTS: _EXISTS,
        # Same transfer id, different content: the caller reused a transaction id.
        _TS.EXISTS_WITH_DIFFERENT_FLAGS: _fail(
            DuplicateTransactionError, f"{_DUPLICATE} (flags differ)", "transaction_id"
        ),
        _TS.EXISTS_WITH_DIFFERENT_PENDING_ID: _fail(
            DuplicateTransactionError, f"{_DUPLICATE} (pending id differs)", "transaction_id"
        ),
        _TS.EXISTS_WITH_DIFFERENT_TIMEOUT: _fail(
            DuplicateTransactionError, f"{_DUPLICATE} (timeout differs)", "transaction_id"
        ),
        _TS.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID: _fail(
            DuplicateTransactionError,
            f"{_DUPLICATE} (another wallet or operation type)",
            "transaction_id",
        ),
        _TS.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID: _fail(
            DuplicateTransactionError,
            f"{_DUPLICATE} (another wallet or operation type)",
            "transaction_id",
        ),
        _TS.EXISTS_WITH_DIFFERENT_AMOUNT: _fail(
            DuplicateTransactionError, f"{_DUPLICATE} (amount differs)", "transaction_id"
        ),
        _TS.EXISTS_WITH_DIFFERENT_USER_DATA_128: _fail(
            DuplicateTransactionError, f"{_DUPLICATE} (reference_id differs)", "transaction_id"
        ),
        _TS.EXISTS_WITH_DIFFERENT_USER_DATA_64: _fail(
            DuplicateTransactionError, f"{_DUPLICATE} (user_data_64 differs)", "transaction_id"
        ),
        _TS.EXISTS_WITH_DIFFERENT_USER_DATA_32: _fail(
            DuplicateTransactionError, f"{_DUPLICATE} (user_data_32 differs)", "transaction_id"
        ),
        _TS.EXISTS_WITH_DIFFERENT_LEDGER: _fail(
            DuplicateTransactionError, f"{_DUPLICATE} (ledger differs)", "transaction_id"
        ),
        _TS.EXISTS_WITH_DIFFERENT_CODE: _fail(
            DuplicateTransactionError, f"{_DUPLICATE} (operation type differs)", "transaction_id"
        ),
        # TigerBeetle remembers transient failures: the id can never succeed afterwards.
        _TS.ID_ALREADY_FAILED: _fail(
            ConflictError,
            "transaction_id was rejected earlier by TigerBeetle (e.g. insufficient funds at "
            "that time) and cannot be reused; send the operation with a new transaction_id",
            "transaction_id",
        ),
        _TS.EXCEEDS_CREDITS: _fail(
            InsufficientFundsError,
            "insufficient funds: the wallet does not allow an overdraft",
            "amount",
        ),
        _TS.EXCEEDS_DEBITS: _bug("exceeds_debits: no account limits credits"),
        _TS.DEBIT_ACCOUNT_NOT_FOUND: _fail(
            NotFoundError, "the debited TigerBeetle account does not exist", "wallet"
        ),
        _TS.CREDIT_ACCOUNT_NOT_FOUND: _fail(
            NotFoundError, "the credited TigerBeetle account does not exist", "wallet"
        ),
        _TS.DEBIT_ACCOUNT_ALREADY_CLOSED: _fail(
            ConflictError, "the debited TigerBeetle account is closed", "wallet"
        ),
        _TS.CREDIT_ACCOUNT_ALREADY_CLOSED: _fail(
            ConflictError, "the credited TigerBeetle account is closed", "wallet"
        ),
        _TS.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER: _fail(
            ConflictError,
            "the wallet's TigerBeetle account is on another ledger than its currency:country",
            "wallet",
        ),
        _TS.TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS: _fail(
            ConflictError,
            "the wallet's TigerBeetle account is on another ledger than its currency:country",
            "wallet",
        ),
        _TS.OVERFLOWS_DEBITS_PENDING: _fail(
            InvalidAmountError, "would overflow the account's pending debits", "amount"
        ),
        _TS.OVERFLOWS_CREDITS_PENDING: _fail(
            InvalidAmountError, "would overflow the account's pending credits", "amount"
        ),
        _TS.OVERFLOWS_DEBITS_POSTED: _fail(
            InvalidAmountError, "would overflow the account's posted debits", "amount"
        ),
        _TS.OVERFLOWS_CREDITS_POSTED: _fail(
            InvalidAmountError, "would overflow the account's posted credits", "amount"
        ),
        _TS.OVERFLOWS_DEBITS: _fail(
            InvalidAmountError, "would overflow the account's debits", "amount"
        ),
        _TS.OVERFLOWS_CREDITS: _fail(
            InvalidAmountError, "would overflow the account's credits", "amount"
        ),
        _TS.OVERFLOWS_TIMEOUT: _bug("overflows_timeout"),
        # Malformed events: the store never sends linked, pending, imported or closing
        # transfers, zero/max ids or non-zero timestamps, so each of these is a store bug.
        _TS.LINKED_EVENT_FAILED: _bug("linked_event_failed"),
        _TS.LINKED_EVENT_CHAIN_OPEN: _bug("linked_event_chain_open"),
        _TS.IMPORTED_EVENT_EXPECTED: _bug("imported_event_expected"),
        _TS.IMPORTED_EVENT_NOT_EXPECTED: _bug("imported_event_not_expected"),
        _TS.TIMESTAMP_MUST_BE_ZERO: _bug("timestamp_must_be_zero"),
        _TS.IMPORTED_EVENT_TIMESTAMP_OUT_OF_RANGE: _bug("imported_event_timestamp_out_of_range"),
        _TS.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_ADVANCE: _bug(
            "imported_event_timestamp_must_not_advance"
        ),
        _TS.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS: _bug(
            "imported_event_timestamp_must_not_regress"
        ),
        _TS.IMPORTED_EVENT_TIMESTAMP_MUST_POSTDATE_DEBIT_ACCOUNT: _bug(
            "imported_event_timestamp_must_postdate_debit_account"
        ),
        _TS.IMPORTED_EVENT_TIMESTAMP_MUST_POSTDATE_CREDIT_ACCOUNT: _bug(
            "imported_event_timestamp_must_postdate_credit_account"
        ),
        _TS.IMPORTED_EVENT_TIMEOUT_MUST_BE_ZERO: _bug("imported_event_timeout_must_be_zero"),
        _TS.RESERVED_FLAG: _bug("reserved_flag"),
        _TS.ID_MUST_NOT_BE_ZERO: _bug("id_must_not_be_zero"),
        _TS.ID_MUST_NOT_BE_INT_MAX: _bug("id_must_not_be_int_max"),
        _TS.FLAGS_ARE_MUTUALLY_EXCLUSIVE: _bug("flags_are_mutually_exclusive"),
        _TS.DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO: _bug("debit_account_id_must_not_be_zero"),
        _TS.DEBIT_ACCOUNT_ID_MUST_NOT_BE_INT_MAX: _bug("debit_account_id_must_not_be_int_max"),
        _TS.CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO: _bug("credit_account_id_must_not_be_zero"),
        _TS.CREDIT_ACCOUNT_ID_MUST_NOT_BE_INT_MAX: _bug("credit_account_id_must_not_be_int_max"),
        _TS.ACCOUNTS_MUST_BE_DIFFERENT: _bug("accounts_must_be_different"),
        _TS.PENDING_ID_MUST_BE_ZERO: _bug("pending_id_must_be_zero"),
        _TS.PENDING_ID_MUST_NOT_BE_ZERO: _bug("pending_id_must_not_be_zero"),
        _TS.PENDING_ID_MUST_NOT_BE_INT_MAX: _bug("pending_id_must_not_be_int_max"),
        _TS.PENDING_ID_MUST_BE_DIFFERENT: _bug("pending_id_must_be_different"),
        _TS.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER: _bug("timeout_reserved_for_pending_transfer"),
        _TS.CLOSING_TRANSFER_MUST_BE_PENDING: _bug("closing_transfer_must_be_pending"),
        _TS.LEDGER_MUST_NOT_BE_ZERO: _bug("ledger_must_not_be_zero"),
        _TS.CODE_MUST_NOT_BE_ZERO: _bug("code_must_not_be_zero"),
        _TS.PENDING_TRANSFER_NOT_FOUND: _bug("pending_transfer_not_found"),
        _TS.PENDING_TRANSFER_NOT_PENDING: _bug("pending_transfer_not_pending"),
        _TS.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID: _bug(
            "pending_transfer_has_different_debit_account_id"
        ),
        _TS.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID: _bug(
            "pending_transfer_has_different_credit_account_id"
        ),
        _TS.PENDING_TRANSFER_HAS_DIFFERENT_LEDGER: _bug("pending_transfer_has_different_ledger"),
        _TS.PENDING_TRANSFER_HAS_DIFFERENT_CODE: _bug("pending_transfer_has_different_code"),
        _TS.EXCEEDS_PENDING_TRANSFER_AMOUNT: _bug("exceeds_pending_transfer_amount"),
        _TS.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT: _bug("pending_transfer_has_different_amount"),
        _TS.PENDING_TRANSFER_ALREADY_POSTED: _bug("pending_transfer_already_posted"),
        _TS.PENDING_TRANSFER_ALREADY_VOIDED: _bug("pending_transfer_already_voided"),
        _TS.PENDING_TRANSFER_EXPIRED: _bug("pending_transfer_expired"),
    }
)

_AS = tb.CreateAccountStatus
_ACCOUNT_CONFLICT = "a TigerBeetle account with this id already exists with a different"

ACCOUNT_STATUS_RULES: Mapping[tb.CreateAccountStatus, StatusRule] = MappingProxyType(
    {
        _AS.CREATED: _APPLIED,
        _AS.EXISTS: _EXISTS,
        # Same account id, different definition: a hash collision or a changed policy.
        _AS.EXISTS_WITH_DIFFERENT_FLAGS: _fail(
            ConflictError, f"{_ACCOUNT_CONFLICT} overdraft policy (flags)", "wallet"
        ),
        _AS.EXISTS_WITH_DIFFERENT_USER_DATA_128: _fail(
            ConflictError, f"{_ACCOUNT_CONFLICT} client (user_data_128)", "wallet"
        ),
        _AS.EXISTS_WITH_DIFFERENT_USER_DATA_64: _fail(
            ConflictError, f"{_ACCOUNT_CONFLICT} user_data_64", "wallet"
        ),
        _AS.EXISTS_WITH_DIFFERENT_USER_DATA_32: _fail(
            ConflictError, f"{_ACCOUNT_CONFLICT} user_data_32", "wallet"
        ),
        _AS.EXISTS_WITH_DIFFERENT_LEDGER: _fail(
            ConflictError, f"{_ACCOUNT_CONFLICT} ledger", "wallet"
        ),
        _AS.EXISTS_WITH_DIFFERENT_CODE: _fail(
            ConflictError, f"{_ACCOUNT_CONFLICT} account code", "wallet"
        ),
        _AS.LINKED_EVENT_FAILED: _bug("linked_event_failed"),
        _AS.LINKED_EVENT_CHAIN_OPEN: _bug("linked_event_chain_open"),
        _AS.IMPORTED_EVENT_EXPECTED: _bug("imported_event_expected"),
        _AS.IMPORTED_EVENT_NOT_EXPECTED: _bug("imported_event_not_expected"),
        _AS.TIMESTAMP_MUST_BE_ZERO: _bug("timestamp_must_be_zero"),
        _AS.IMPORTED_EVENT_TIMESTAMP_OUT_OF_RANGE: _bug("imported_event_timestamp_out_of_range"),
        _AS.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_ADVANCE: _bug(
            "imported_event_timestamp_must_not_advance"
        ),
        _AS.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS: _bug(
            "imported_event_timestamp_must_not_regress"
        ),
        _AS.RESERVED_FIELD: _bug("reserved_field"),
        _AS.RESERVED_FLAG: _bug("reserved_flag"),
        _AS.ID_MUST_NOT_BE_ZERO: _bug("id_must_not_be_zero"),
        _AS.ID_MUST_NOT_BE_INT_MAX: _bug("id_must_not_be_int_max"),
        _AS.FLAGS_ARE_MUTUALLY_EXCLUSIVE: _bug("flags_are_mutually_exclusive"),
        _AS.DEBITS_PENDING_MUST_BE_ZERO: _bug("debits_pending_must_be_zero"),
        _AS.DEBITS_POSTED_MUST_BE_ZERO: _bug("debits_posted_must_be_zero"),
        _AS.CREDITS_PENDING_MUST_BE_ZERO: _bug("credits_pending_must_be_zero"),
        _AS.CREDITS_POSTED_MUST_BE_ZERO: _bug("credits_posted_must_be_zero"),
        _AS.LEDGER_MUST_NOT_BE_ZERO: _bug("ledger_must_not_be_zero"),
        _AS.CODE_MUST_NOT_BE_ZERO: _bug("code_must_not_be_zero"),
    }
)

# Totality: a client upgrade that adds a status must extend these tables before it can run.
assert set(TRANSFER_STATUS_RULES) == set(tb.CreateTransferStatus), "transfer table not total"
assert set(ACCOUNT_STATUS_RULES) == set(tb.CreateAccountStatus), "account table not total"


def transfer_rule(status: tb.CreateTransferStatus) -> StatusRule:
    return TRANSFER_STATUS_RULES[status]


def account_rule(status: tb.CreateAccountStatus) -> StatusRule:
    return ACCOUNT_STATUS_RULES[status]


def status_error(
    rule: StatusRule, status: tb.CreateTransferStatus | tb.CreateAccountStatus, context: str
) -> WalletError:
    """The domain error for a FAILED rule; `context` names the operation for the message."""
    assert rule.outcome is Outcome.FAILED and rule.error is not None
    return rule.error(f"{context}: {rule.message} [{status.name}]", field=rule.field)


def too_much_data_error(limit_bytes: int, operation: str, events: int) -> ConfigurationError:
    """`TooMuchDataError` for a batch cut to `limit_bytes`: the cluster's request limit is
    smaller than the platform was told (TB_REQUEST_LIMIT_BYTES). Non-retryable: the same
    batch is refused every time until the setting is fixed."""
    return ConfigurationError(tb_limits.too_much_data_message(limit_bytes, operation, events))
