"""The HTTP API's request and response models.

They reuse the domain's (walletcore.keys.WalletKey, the transaction id rule, OperationType)
and differ only where JSON needs it: amounts travel as decimal strings, never JSON numbers (a
binary float cannot hold money exactly), both in requests and in answers; request models are
strict (no coercion of "true" into a boolean or of 10 into "10"), so what the OpenAPI
document says is exactly what is accepted.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, JsonValue, PlainSerializer, WithJsonSchema

from walletcore.balances import WalletBalance
from walletcore.keys import WalletKey
from walletcore.operations import (
    HISTORY_LIMIT_MAX,
    HistoryEntry,
    OperationResult,
    OperationType,
    TransactionId,
)
from walletcore.phases import MigrationState

# A positive decimal in plain notation; the currency's precision is checked by the domain
# (walletcore.money), which names the field when it refuses.
AMOUNT_PATTERN = r"^([1-9][0-9]{0,19}(\.[0-9]{1,18})?|0\.[0-9]{0,17}[1-9][0-9]{0,17})$"
MONEY_PATTERN = r"^-?[0-9]+(\.[0-9]+)?$"
# One HTTP answer's page of history; walletcore's HISTORY_LIMIT_MAX bounds one store read.
HISTORY_PAGE_MAX = 1000
assert HISTORY_PAGE_MAX <= HISTORY_LIMIT_MAX

Amount = Annotated[
    str,
    Field(
        pattern=AMOUNT_PATTERN, max_length=40, examples=["10.50"],
        description="decimal string with at most the currency's decimals (USD 2, JPY 0, BTC 8)",
    ),
]  # fmt: skip
# Decimals answered as plain-notation strings ("0.00000000", never "0E-8").
Money = Annotated[
    Decimal,
    PlainSerializer(lambda value: format(value, "f"), return_type=str),
    WithJsonSchema({"type": "string", "pattern": MONEY_PATTERN, "examples": ["10.50"]}),
]


class WalletRef(WalletKey):
    """A wallet as the API names it: WalletKey, strict (no whitespace trimming or coercion)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", strict=True, str_strip_whitespace=False
    )


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


_WALLET_EXAMPLE: JsonValue = {"client_id": "c-42", "country": "USA", "currency": "USD"}


class CreditBody(_Body):
    """Add or subtract credit. `transaction_id` is optional: without it the operation's id is
    derived from your Idempotency-Key (and your key's owner)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"wallet": _WALLET_EXAMPLE, "amount": "10.50"}]}
    )

    wallet: WalletRef
    amount: Amount
    transaction_id: TransactionId | None = None
    reference_id: str | None = Field(default=None, min_length=1, max_length=128)
    description: str | None = Field(default=None, max_length=512)
    allow_overdraft: bool = Field(
        default=False, description="wallet policy, applied when this operation creates it"
    )


class VoidBody(_Body):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"wallet": _WALLET_EXAMPLE, "original_transaction_id": "pay-1"}]})  # fmt: skip

    wallet: WalletRef
    original_transaction_id: TransactionId
    transaction_id: TransactionId | None = None
    reference_id: str | None = Field(default=None, min_length=1, max_length=128)


class WalletOut(BaseModel):
    client_id: str
    country: str
    currency: str
    issuer_type: str | None = None

    @classmethod
    def of(cls, key: WalletKey) -> WalletOut:
        return cls(client_id=key.client_id, country=key.country, currency=key.currency,
                   issuer_type=key.issuer_type)  # fmt: skip


class OperationOut(BaseModel):
    transaction_id: str
    type: OperationType
    wallet: WalletOut
    amount: Money
    credit: Money
    debit: Money
    historical_credit: Money
    replayed: bool = Field(description="the stores had already applied this transaction id")
    created_at: datetime | None = None

    @classmethod
    def of(cls, result: OperationResult) -> OperationOut:
        return cls(**{**result.model_dump(), "wallet": WalletOut.of(result.wallet)})


class BalanceOut(BaseModel):
    wallet: WalletOut
    credit: Money
    debit: Money
    historical_credit: Money
    source: str = Field(description="the store that answered: `mongodb` or `tigerbeetle`")

    @classmethod
    def of(cls, balance: WalletBalance) -> BalanceOut:
        return cls(**{**balance.model_dump(), "wallet": WalletOut.of(balance.wallet)})


class BalancesOut(BaseModel):
    client_id: str
    balances: list[BalanceOut]


class HistoryEntryOut(BaseModel):
    transaction_id: str | None
    type: str
    amount: Money
    reference_id: str | None = None
    created_at: datetime | None = None
    voided: bool = False

    @classmethod
    def of(cls, entry: HistoryEntry) -> HistoryEntryOut:
        return cls(**entry.model_dump())


class HistoryOut(BaseModel):
    wallet: WalletOut
    entries: list[HistoryEntryOut] = Field(description="newest first")


class PublishedState(BaseModel):
    """A scope's published migration state (what wallet workers act on)."""

    scope: str
    phase: str
    rollout_percent: int
    epoch: int
    updated_at: datetime | None = None

    @classmethod
    def of(cls, state: MigrationState) -> PublishedState:
        return cls(scope=state.scope, phase=state.phase.value,
                   rollout_percent=state.rollout_percent, epoch=state.epoch,
                   updated_at=state.updated_at)  # fmt: skip
