"""Operation inputs and results: one pydantic model per operation.

Inputs validate everything that can be checked without I/O (field names appear in the errors);
`validated()` converts the Decimal amount to exact minor units or raises a domain error.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from walletcore.errors import InvalidInputError
from walletcore.keys import FREE_TEXT_PATTERN, ID_MAX, Identifier, WalletKey
from walletcore.money import to_minor
from walletcore.tb_limits import QUERY_LIMIT_MAX

ModelT = TypeVar("ModelT", bound=BaseModel)
# Entries of one history answer: one TigerBeetle get_account_transfers reply (bound by the
# reply, not by the request limit, so the same at any cluster); both stores accept it.
HISTORY_LIMIT_MAX = QUERY_LIMIT_MAX

TRANSACTION_ID_MAX = ID_MAX
TransactionId = Identifier
DESCRIPTION_MAX = 512
Description = Annotated[str, Field(max_length=DESCRIPTION_MAX, pattern=FREE_TEXT_PATTERN)]


class OperationType(StrEnum):
    CREDIT = "credit"
    DEBIT = "debit"
    VOID = "void"


class _Input(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class AddCredit(_Input):
    wallet: WalletKey
    transaction_id: TransactionId
    amount: Decimal = Field(description="positive, at most the currency's decimals")
    reference_id: Identifier | None = None
    description: Description | None = None
    allow_overdraft: bool = Field(
        default=False, description="wallet policy, applied when this creates the wallet"
    )

    @property
    def amount_minor(self) -> int:
        return to_minor(self.amount, self.wallet.currency)


class SubtractCredit(AddCredit):
    pass


class Void(_Input):
    wallet: WalletKey
    transaction_id: TransactionId = Field(description="idempotency key of this void request")
    original_transaction_id: TransactionId
    reference_id: Identifier | None = None


WalletOperation = AddCredit | SubtractCredit | Void


def operation_type(op: WalletOperation) -> OperationType:
    if isinstance(op, Void):
        return OperationType.VOID
    if isinstance(op, SubtractCredit):
        return OperationType.DEBIT
    return OperationType.CREDIT


def validate_operation(op: WalletOperation) -> int:
    """Check what the model cannot (amount against currency precision); return amount_minor.

    Voids carry no amount (the original's) and return 0.
    """
    if isinstance(op, Void):
        if op.original_transaction_id == op.transaction_id:
            raise InvalidInputError(
                "must differ from transaction_id", field="original_transaction_id"
            )
        return 0
    return op.amount_minor


class OperationResult(BaseModel):
    """What a write answers: the applied (or replayed) operation and the balance after it."""

    model_config = ConfigDict(frozen=True)

    transaction_id: str
    type: OperationType
    wallet: WalletKey
    amount: Decimal
    credit: Decimal
    debit: Decimal
    historical_credit: Decimal
    replayed: bool = False  # True when the transaction id had already been applied
    created_at: datetime | None = None


class GetBalance(_Input):
    wallet: WalletKey


class GetMultiBalance(_Input):
    client_id: Identifier


class HistoryQuery(_Input):
    wallet: WalletKey
    limit: int = Field(default=50, ge=1, le=HISTORY_LIMIT_MAX)


class HistoryEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    transaction_id: str | None
    type: str
    amount: Decimal
    reference_id: str | None = None
    created_at: datetime | None = None
    voided: bool = False


def parse_input(model: type[ModelT], data: object) -> ModelT:
    """Validate `data` as `model`; pydantic's errors become one InvalidInputError naming fields."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidInputError(first["msg"], field=field) from None
