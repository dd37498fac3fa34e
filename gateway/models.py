"""The HTTP API's request and response models.

They reuse the domain's (walletcore.keys.WalletKey, the transaction id rule, OperationType)
and differ only where JSON needs it: amounts travel as decimal strings, never JSON numbers (a
binary float cannot hold money exactly), both in requests and in answers; request models are
strict (no coercion of "true" into a boolean or of 10 into "10"), so what the OpenAPI
document says is exactly what is accepted.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, JsonValue, PlainSerializer, WithJsonSchema

from messages.clearing import INTAKE_BATCH_MAX, RefusedItem, TransactionOutcome
from stores.general_ledger import PAGE_MAX as LEDGER_PAGE_MAX
from stores.general_ledger import Statement
from walletcore.balances import WalletBalance
from walletcore.clearing import (
    COUNTERPARTY_MAX,
    REFERENCE_MAX,
    ClearingState,
    ExternalId,
    ExternalTransaction,
    KindName,
    parse_external,
)
from walletcore.gl_chart import CURRENCY_PATTERN
from walletcore.journal import CurrencyTotals, TrialBalance
from walletcore.keys import FREE_TEXT_PATTERN, ID_PATTERN, Identifier, WalletKey
from walletcore.money import from_minor, signed_from_minor
from walletcore.operations import (
    HISTORY_LIMIT_MAX,
    Description,
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
    reference_id: Identifier | None = None  # the domain's id rule: no `$`, no control chars
    description: Description | None = None  # printable text only (walletcore.operations)
    allow_overdraft: bool = Field(
        default=False, description="wallet policy, applied when this operation creates it"
    )


class VoidBody(_Body):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"wallet": _WALLET_EXAMPLE, "original_transaction_id": "pay-1"}]})  # fmt: skip

    wallet: WalletRef
    original_transaction_id: TransactionId
    transaction_id: TransactionId | None = None
    reference_id: Identifier | None = None


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

    @classmethod
    def json_of(cls, balance: WalletBalance) -> bytes:
        """`of(balance).model_dump_json()`, byte for byte (tests/test_api.py), without building
        models: the read path's hot answer. Two `model_construct`s and the dump cost ~40 us
        per read (a sixth of the API process's CPU per TigerBeetle-answered read, session 9);
        the C JSON encoder over a dict in the model's field order costs ~3 us. Amounts as
        `Money` writes them (plain notation); ids are ASCII by WalletKey's patterns, so
        json's escaping and pydantic's agree."""
        key = balance.wallet
        issuer = "null" if key.issuer_type is None else _json_str(key.issuer_type)
        # json's own string encoder (the one JSONEncoder(ensure_ascii=False) calls) on each
        # value, in one f-string: JSONEncoder.encode built its C encoder per call (~5 us).
        return (
            f'{{"wallet":{{"client_id":{_json_str(key.client_id)},'
            f'"country":{_json_str(key.country)},"currency":{_json_str(key.currency)},'
            f'"issuer_type":{issuer}}},"credit":"{balance.credit:f}",'
            f'"debit":"{balance.debit:f}","historical_credit":"{balance.historical_credit:f}",'
            f'"source":{_json_str(balance.source)}}}'
        ).encode()


# json_of writes BalanceOut's fields in this order: a new field must be added there too.
assert tuple(BalanceOut.model_fields) == ("wallet", "credit", "debit", "historical_credit",
                                          "source")  # fmt: skip
assert tuple(WalletOut.model_fields) == ("client_id", "country", "currency", "issuer_type")
_json_str = json.encoder.encode_basestring  # a str as a JSON string, ensure_ascii=False


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


# ---- the credit terminal ---------------------------------------------------------------------

# One batch's transactions, below the intake's own bound (INTAKE_BATCH_MAX) and sized to the
# default body limit (WALLETMIG_API_BODY_MAX_BYTES, 64 KiB: ~250 items of ~256 bytes), so a
# batch one item too long is answered 422 naming `transactions`, not 413. Items with long
# memos may still meet the body limit first (413).
SUBMIT_BATCH_MAX = 250
assert SUBMIT_BATCH_MAX <= INTAKE_BATCH_MAX
# The longest a submit waits for the outcome (the gateway's write timeout clips it further).
SUBMIT_WAIT_S_MAX = 30.0
# One statement page: walletcore's PAGE_MAX bounds one store read.
STATEMENT_PAGE_MAX = 1000
assert STATEMENT_PAGE_MAX <= LEDGER_PAGE_MAX
MEMO_MAX = 256  # walletcore.clearing.ExternalTransaction's

_TXN_EXAMPLE: dict[str, JsonValue] = {
    "kind": "ach_credit_in", "amount": "125.00", "currency": "USD", "counterparty": "acme-llc",
}  # fmt: skip


class TransactionFields(_Body):
    """An external transaction as walletcore.clearing.ExternalTransaction takes it; the kind,
    currency and amount are checked against the routing table (422 naming the field)."""

    kind: KindName = Field(description="a kind of the routing table, e.g. `ach_credit_in`")
    amount: Amount
    currency: str = Field(pattern=CURRENCY_PATTERN, examples=["USD"])
    counterparty: str = Field(
        min_length=1, max_length=COUNTERPARTY_MAX, pattern=ID_PATTERN, examples=["acme-llc"]
    )
    # Free text, printable only (walletcore.keys.FREE_TEXT_PATTERN): a control character is
    # refused with a 422 naming the field, as for a wallet operation's description.
    reference: str | None = Field(
        default=None, min_length=1, max_length=REFERENCE_MAX, pattern=FREE_TEXT_PATTERN
    )
    occurred_at: datetime | None = Field(default=None, strict=False)  # ISO 8601 in JSON
    memo: str | None = Field(default=None, max_length=MEMO_MAX, pattern=FREE_TEXT_PATTERN)

    def transaction(self, external_id: str) -> ExternalTransaction:
        """The domain's transaction (its errors name the field: amount precision, ...)."""
        return parse_external({**self.model_dump(exclude_none=True), "external_id": external_id})


class TransactionBody(TransactionFields):
    """Submit one transaction. `external_id` is optional: without it the transaction's id is
    derived from your Idempotency-Key (and your key's owner)."""

    model_config = ConfigDict(json_schema_extra={"examples": [_TXN_EXAMPLE]})

    external_id: ExternalId | None = None


class BatchItem(TransactionFields):
    external_id: ExternalId


class BatchBody(_Body):
    """Submit a batch: every item carries its own external id (one Idempotency-Key covers the
    batch; the batch id is derived from it)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"transactions": [{**_TXN_EXAMPLE, "external_id": "ach-2026-0001"}]}]})  # fmt: skip

    transactions: list[BatchItem] = Field(min_length=1, max_length=SUBMIT_BATCH_MAX)


class TransactionOut(BaseModel):
    """A transaction's state: `settled` with its journal entry, `rejected` with the reason, or
    the state it is in while clearing."""

    external_id: str
    state: ClearingState
    entry_id: str | None = None
    reason: str | None = None
    batch_id: str | None = None

    @classmethod
    def of(cls, outcome: TransactionOutcome) -> TransactionOut:
        return cls(**outcome.model_dump())


class RefusedOut(BaseModel):
    external_id: str
    error: str = Field(description="the domain error's class name, e.g. `ConflictError`")
    field: str | None = None
    detail: str

    @classmethod
    def of(cls, item: RefusedItem) -> RefusedOut:
        return cls(external_id=item.external_id, error=item.error, field=item.field,
                   detail=item.message)  # fmt: skip


class BatchOut(BaseModel):
    batch_id: str
    accepted: list[str] = Field(description="external ids recorded by this batch")
    replayed: list[str] = Field(description="external ids recorded before with the same content")
    refused: list[RefusedOut] = Field(
        description="external ids recorded before with other content (not recorded again)"
    )
    transactions: list[TransactionOut] = Field(
        description="the accepted and replayed transactions' states (after `wait_s`)"
    )


# ---- the general ledger ----------------------------------------------------------------------


class CurrencyTotalsOut(BaseModel):
    currency: str
    debits: Money
    credits: Money
    difference: Money = Field(description="debits - credits (zero when the ledger balances)")

    @classmethod
    def of(cls, totals: CurrencyTotals) -> CurrencyTotalsOut:
        cur = totals.currency
        return cls(currency=cur, debits=from_minor(totals.debits_minor, cur),
                   credits=from_minor(totals.credits_minor, cur),
                   difference=signed_from_minor(totals.difference_minor, cur))  # fmt: skip


class TrialBalanceOut(BaseModel):
    zero: bool = Field(description="every currency's debits equal its credits")
    accounts: int = Field(ge=0, description="(account, currency) balances summed")
    currencies: list[CurrencyTotalsOut]

    @classmethod
    def of(cls, trial: TrialBalance) -> TrialBalanceOut:
        return cls(zero=trial.zero, accounts=trial.accounts,
                   currencies=[CurrencyTotalsOut.of(t) for t in trial.currencies])  # fmt: skip


class StatementLineOut(BaseModel):
    seq: int = Field(description="the entry's place in the ledger's hash chain")
    entry_id: str
    posted_at: datetime
    kind: str | None = None
    external_id: str | None = None
    debit: Money
    credit: Money
    memo: str | None = None


class StatementOut(BaseModel):
    account: int
    currency: str
    balance_debits: Money
    balance_credits: Money
    lines: list[StatementLineOut] = Field(description="chain order")
    next_after_seq: int | None = Field(
        description="pass as `after_seq` for the next page; null: no more"
    )

    @classmethod
    def of(cls, statement: Statement) -> StatementOut:
        cur = statement.currency
        lines = [
            StatementLineOut(
                seq=ln.seq, entry_id=ln.entry_id, posted_at=ln.posted_at, kind=ln.kind,
                external_id=ln.external_id, debit=from_minor(ln.debit_minor, cur),
                credit=from_minor(ln.credit_minor, cur), memo=ln.memo,
            )
            for ln in statement.lines
        ]  # fmt: skip
        return cls(
            account=statement.account, currency=cur, lines=lines,
            balance_debits=from_minor(statement.balance_debits_minor, cur),
            balance_credits=from_minor(statement.balance_credits_minor, cur),
            next_after_seq=statement.next_after_seq,
        )  # fmt: skip
