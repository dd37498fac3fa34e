"""The credit terminal's clearing domain: external transactions, the routing table, the
TigerBeetle transfers a transaction becomes and the journal entry it settles into. Pure.

Flow of one external transaction (every step idempotent by its `external_id`):
received (recorded in MongoDB, the system of reference) -> pending (a TigerBeetle pending
transfer reserving the amount, with the kind's timeout) -> checks -> posted or voided (or
expired when no decision came in time) -> settled (one journal entry) or rejected (a reason).

Ids: the pending, post and void transfers each derive their id from the external id with
their own hash prefix ("clearing-pending:", "clearing-post:", "clearing-void:"), distinct
from the wallet prefixes in walletcore.ids, so every retry of every layer lands on the same
TigerBeetle transfer, and a transaction can be posted or voided once.

Transfer codes: one per kind (the `code` of its route), carried by the pending transfer and
inherited by its post/void, so a TigerBeetle transfer says which kind it clears. They live in
the routing table (ClearingCode holds the defaults), not in walletcore.codes: the table is
configurable and terminal ledgers never carry wallet transfers, so the two cannot be confused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import IntEnum, StrEnum
from functools import cached_property
from types import MappingProxyType
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from walletcore.errors import ConflictError, InvalidAmountError, InvalidInputError
from walletcore.gl_chart import (
    CURRENCY_PATTERN,
    DEFAULT_CHART,
    GL_NUMBER_MAX,
    ChartOfAccounts,
    GLNumber,
    MirrorAccount,
)
from walletcore.ids import hash_u128
from walletcore.journal import INT64_MAX, JournalEntry, JournalLine
from walletcore.keys import ID_PATTERN
from walletcore.money import parse_decimal, to_minor
from walletcore.operations import parse_input

EXTERNAL_ID_MAX = 128
COUNTERPARTY_MAX = 128
REFERENCE_MAX = 128
KIND_MAX = 64
ROUTES_MAX = 256
PENDING_TIMEOUT_S_MAX = 2**32 - 1  # TigerBeetle's `timeout` is u32 seconds
VELOCITY_WINDOW_S_MAX = 31 * 24 * 3600
VELOCITY_COUNT_MAX = 1_000_000
# Amounts are kept as BSON int64 minor units in the ledger; one transaction never exceeds it.
AMOUNT_MINOR_MAX = INT64_MAX

# TigerBeetle 0.17.9 TransferFlags values the clearing transfers use (tests compare them with
# the client's enum; walletcore stays free of the client library).
TRANSFER_FLAG_PENDING = 2
TRANSFER_FLAG_POST_PENDING = 4
TRANSFER_FLAG_VOID_PENDING = 8

ExternalId = Annotated[str, Field(min_length=1, max_length=EXTERNAL_ID_MAX, pattern=ID_PATTERN)]
KindName = Annotated[str, Field(min_length=1, max_length=KIND_MAX, pattern=r"^[a-z][a-z0-9_]*$")]


class ClearingState(StrEnum):
    RECEIVED = "received"
    PENDING = "pending"
    POSTED = "posted"
    VOIDED = "voided"
    EXPIRED = "expired"
    SETTLED = "settled"
    REJECTED = "rejected"


# The only moves a transaction may make; never backward. `received -> rejected`: TigerBeetle
# refused the pending transfer (e.g. the reservation exceeds a balance limit).
TRANSITIONS: Mapping[ClearingState, frozenset[ClearingState]] = MappingProxyType({
    ClearingState.RECEIVED: frozenset({ClearingState.PENDING, ClearingState.REJECTED}),
    ClearingState.PENDING: frozenset(
        {ClearingState.POSTED, ClearingState.VOIDED, ClearingState.EXPIRED}
    ),
    ClearingState.POSTED: frozenset({ClearingState.SETTLED}),
    ClearingState.VOIDED: frozenset({ClearingState.REJECTED}),
    ClearingState.EXPIRED: frozenset({ClearingState.REJECTED}),
    ClearingState.SETTLED: frozenset(),
    ClearingState.REJECTED: frozenset(),
})
FINAL_STATES = frozenset({ClearingState.SETTLED, ClearingState.REJECTED})
# Transactions that still count for velocity and duplicate references (not refused ones).
LIVE_STATES = frozenset({
    ClearingState.RECEIVED, ClearingState.PENDING, ClearingState.POSTED, ClearingState.SETTLED,
})


def sources_of(target: ClearingState) -> frozenset[ClearingState]:
    """States one step before `target`."""
    return frozenset(state for state, nexts in TRANSITIONS.items() if target in nexts)


def ancestors_of(target: ClearingState) -> frozenset[ClearingState]:
    """States with a forward path to `target`. A writer may jump along such a path in one
    write (e.g. received -> settled when the steps between live in a workflow's history):
    still never backward and never across branches (a voided transaction cannot settle)."""
    found: set[ClearingState] = set()
    frontier = set(sources_of(target))
    while frontier:
        state = frontier.pop()
        if state not in found:
            found.add(state)
            frontier |= sources_of(state)
    assert target not in found, "the state graph has no cycles"
    return frozenset(found)


def check_transition(external_id: str, current: ClearingState, target: ClearingState) -> None:
    """Raise ConflictError (naming external_id) unless `target` lies ahead of `current`."""
    if current not in ancestors_of(target):
        raise ConflictError(
            f"{external_id!r} is {current}; cannot become {target}", field="external_id"
        )


class RejectReason(StrEnum):
    """Reasons that do not come from a check (clearing_checks.CheckReason holds those)."""

    EXPIRED = "expired"  # no post/void before the pending timeout: TigerBeetle released it
    PENDING_REFUSED = "pending_refused"  # TigerBeetle refused the reservation (suffix: result)


class CheckName(StrEnum):
    AMOUNT_LIMITS = "amount_limits"
    VELOCITY = "velocity"
    BLOCKED_COUNTERPARTY = "blocked_counterparty"
    ACCOUNT_STATUS = "account_status"
    DUPLICATE_REFERENCE = "duplicate_reference"


ALL_CHECKS: tuple[CheckName, ...] = (
    CheckName.AMOUNT_LIMITS,
    CheckName.BLOCKED_COUNTERPARTY,
    CheckName.ACCOUNT_STATUS,
    CheckName.DUPLICATE_REFERENCE,
    CheckName.VELOCITY,  # last: a transaction refused by another check consumes no velocity
)


class DefaultKind(StrEnum):
    ACH_CREDIT_IN = "ach_credit_in"
    ACH_SETTLEMENT_IN = "ach_settlement_in"
    ACH_DEBIT_OUT = "ach_debit_out"
    ACH_SETTLEMENT_OUT = "ach_settlement_out"
    STRIPE_SETTLEMENT = "stripe_settlement"
    USDC_VAULT_DEPOSIT = "usdc_vault_deposit"
    USDC_VAULT_WITHDRAWAL = "usdc_vault_withdrawal"
    PAYROLL_RUN = "payroll_run"
    OPS_EXPENSE = "ops_expense"
    CAPITAL_CONTRIBUTION = "capital_contribution"


class ClearingCode(IntEnum):
    """Default TigerBeetle transfer codes of the default kinds (2000+, apart from the wallet
    codes 1-11)."""

    ACH_CREDIT_IN = 2001
    ACH_SETTLEMENT_IN = 2002
    ACH_DEBIT_OUT = 2003
    ACH_SETTLEMENT_OUT = 2004
    STRIPE_SETTLEMENT = 2010
    USDC_VAULT_DEPOSIT = 2020
    USDC_VAULT_WITHDRAWAL = 2021
    PAYROLL_RUN = 2030
    OPS_EXPENSE = 2031
    CAPITAL_CONTRIBUTION = 2040


# ---- the routing table ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitsMinor:
    """KindLimits in one currency's minor units."""

    amount_min: int
    amount_max: int
    velocity_count_max: int
    velocity_amount_max: int


class KindLimits(BaseModel):
    """Per currency of a kind, in major units (exact for the currency, never rounded)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    amount_min: Decimal
    amount_max: Decimal
    velocity_count_max: int = Field(ge=1, le=VELOCITY_COUNT_MAX)
    velocity_amount_max: Decimal

    def minor(self, currency: str) -> LimitsMinor:
        limits = LimitsMinor(
            amount_min=to_minor(self.amount_min, currency, field="amount_min"),
            amount_max=to_minor(self.amount_max, currency, field="amount_max"),
            velocity_count_max=self.velocity_count_max,
            velocity_amount_max=to_minor(
                self.velocity_amount_max, currency, field="velocity_amount_max"
            ),
        )
        if not limits.amount_min <= limits.amount_max <= AMOUNT_MINOR_MAX:
            raise InvalidAmountError(
                f"need amount_min <= amount_max <= {AMOUNT_MINOR_MAX} minor units",
                field="amount_max",
            )
        return limits


class Route(BaseModel):
    """Where a kind moves money, what it must pass and how long its reservation holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: KindName
    code: int = Field(ge=1, le=2**16 - 1)
    debit_account: GLNumber
    credit_account: GLNumber
    checks: tuple[CheckName, ...] = ALL_CHECKS
    pending_timeout_s: int = Field(ge=1, le=PENDING_TIMEOUT_S_MAX)
    velocity_window_s: int = Field(default=3600, ge=1, le=VELOCITY_WINDOW_S_MAX)
    limits: dict[Annotated[str, Field(pattern=CURRENCY_PATTERN)], KindLimits] = Field(
        min_length=1, description="currency -> limits; the kind accepts exactly these"
    )

    @property
    def currencies(self) -> tuple[str, ...]:
        return tuple(sorted(self.limits))


class ClearingTable(BaseModel):
    """The routes over a chart of accounts, validated against it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chart: ChartOfAccounts = DEFAULT_CHART
    routes: tuple[Route, ...] = Field(min_length=1, max_length=ROUTES_MAX)

    _by_kind: dict[str, Route] = PrivateAttr(default_factory=dict)
    _by_code: dict[int, Route] = PrivateAttr(default_factory=dict)
    _limits: dict[tuple[str, str], LimitsMinor] = PrivateAttr(default_factory=dict)
    # (kind, currency) -> the debit and credit mirrors: looked up once, not per transfer
    # (chart.mirror hashes the mirror id; it was ~10 % of the pipeline's own CPU).
    _legs: dict[tuple[str, str], tuple[MirrorAccount, MirrorAccount]] = PrivateAttr(
        default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ClearingTable:
        kinds = {r.kind for r in self.routes}
        codes = {r.code for r in self.routes}
        if len(kinds) != len(self.routes) or len(codes) != len(self.routes):
            raise ValueError("every route needs its own kind and its own code")
        for route in self.routes:
            _check_route(self.chart, route)
        self._index()
        return self

    def _index(self) -> None:
        """Lookup tables (private attributes), built once the model is valid."""
        self._by_kind = {r.kind: r for r in self.routes}
        self._by_code = {r.code: r for r in self.routes}
        self._limits = {
            (r.kind, cur): limits.minor(cur)
            for r in self.routes
            for cur, limits in r.limits.items()
        }
        self._legs = {}
        for r in self.routes:
            for cur in r.limits:
                with contextlib.suppress(InvalidInputError):  # refused at use, field named
                    self._legs[(r.kind, cur)] = (self.chart.mirror(r.debit_account, cur),
                                                 self.chart.mirror(r.credit_account, cur))

    def legs(self, route: Route, currency: str) -> tuple[MirrorAccount, MirrorAccount]:
        """The debit and credit mirrors of `route` in `currency`."""
        found = self._legs.get((route.kind, currency))
        if found is not None:
            return found
        return (self.chart.mirror(route.debit_account, currency, field="debit_account"),
                self.chart.mirror(route.credit_account, currency, field="credit_account"))

    def route(self, kind: str, *, field: str = "kind") -> Route:
        try:
            return self._by_kind[kind]
        except KeyError:
            raise InvalidInputError(
                f"unknown kind {kind!r}; known: {', '.join(sorted(self._by_kind))}", field=field
            ) from None

    def route_by_code(self, code: int) -> Route | None:
        return self._by_code.get(code)

    def route_for(self, txn: ExternalTransaction) -> Route:
        """The route of `txn`, refusing a kind it does not know or a currency the kind does not
        carry (each error names its field)."""
        route = self.route(txn.kind)
        if txn.currency not in route.limits:
            self.chart.ledger_of(txn.currency)  # an unknown currency says so first
            raise InvalidInputError(
                f"kind {txn.kind} accepts {list(route.currencies)}, not {txn.currency}",
                field="currency",
            )
        return route

    def limits(self, kind: str, currency: str) -> LimitsMinor:
        self.route(kind)
        try:
            return self._limits[(kind, currency)]
        except KeyError:
            raise InvalidInputError(
                f"kind {kind} has no limits for {currency}", field="currency"
            ) from None


def _check_route(chart: ChartOfAccounts, route: Route) -> None:
    if route.debit_account == route.credit_account:
        raise ValueError(f"route {route.kind}: debit and credit account are the same")
    if len(set(route.checks)) != len(route.checks):
        raise ValueError(f"route {route.kind}: a check appears twice")
    for currency, limits in route.limits.items():
        chart.mirror(route.debit_account, currency, field="debit_account")
        chart.mirror(route.credit_account, currency, field="credit_account")
        limits.minor(currency)  # exact in the currency, min <= max


def _limits(
    amount_max: str, velocity_amount_max: str, *, count: int = 50, usdc: bool = False
) -> dict[str, KindLimits]:
    """Default limits in USD (or USDC): the smallest unit up to `amount_max` per transaction,
    `count` transactions and `velocity_amount_max` per counterparty and window."""
    currency, amount_min = ("USDC", "0.000001") if usdc else ("USD", "0.01")
    return {currency: KindLimits(
        amount_min=Decimal(amount_min), amount_max=Decimal(amount_max),
        velocity_count_max=count, velocity_amount_max=Decimal(velocity_amount_max),
    )}


def _default_routes() -> tuple[Route, ...]:
    kinds = DefaultKind
    rows: list[tuple[DefaultKind, int, int, int, dict[str, KindLimits]]] = [
        # kind, debit, credit, pending timeout (s), limits
        (kinds.ACH_CREDIT_IN, 1050, 2180, 300, _limits("25000", "100000")),
        (kinds.ACH_SETTLEMENT_IN, 1000, 1050, 300, _limits("10000000", "100000000", count=1000)),
        (kinds.ACH_DEBIT_OUT, 2180, 2100, 300, _limits("25000", "50000", count=20)),
        (kinds.ACH_SETTLEMENT_OUT, 2100, 1000, 300, _limits("10000000", "100000000", count=1000)),
        (kinds.STRIPE_SETTLEMENT, 1060, 2180, 120, _limits("50000", "500000", count=500)),
        (kinds.USDC_VAULT_DEPOSIT, 1010, 2180, 600, _limits("1000000", "5000000", usdc=True)),
        (kinds.USDC_VAULT_WITHDRAWAL, 2180, 1010, 600, _limits("250000", "500000", usdc=True)),
        (kinds.PAYROLL_RUN, 6000, 1000, 900, _limits("500000", "5000000", count=5000)),
        (kinds.OPS_EXPENSE, 6100, 2300, 300, {
            **_limits("100000", "1000000", count=200),
            **_limits("100000", "1000000", count=200, usdc=True),
        }),
        (kinds.CAPITAL_CONTRIBUTION, 1000, 3000, 300, _limits("100000000", "1000000000", count=10)),
    ]
    return tuple(
        Route(kind=kind.value, code=ClearingCode[kind.name].value, debit_account=debit,
              credit_account=credit, pending_timeout_s=timeout_s, limits=limits)
        for kind, debit, credit, timeout_s, limits in rows
    )


# ---- external transactions ------------------------------------------------------------------


class ExternalTransaction(BaseModel):
    """What an external system sends. Validation without the table: shapes and the amount's
    exactness for its currency (a domain error naming `amount` or `currency`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    external_id: ExternalId
    kind: KindName
    amount: Decimal = Field(description="positive, at most the currency's decimals")
    currency: str = Field(pattern=CURRENCY_PATTERN)
    counterparty: str = Field(min_length=1, max_length=COUNTERPARTY_MAX, pattern=ID_PATTERN)
    reference: str | None = Field(default=None, min_length=1, max_length=REFERENCE_MAX)
    occurred_at: datetime | None = None
    memo: str | None = Field(default=None, max_length=256)

    @field_validator("amount", mode="before")
    @classmethod
    def _no_float(cls, value: object) -> Decimal:
        """The money rules (walletcore.money.parse_decimal): Decimal, int or str, never a
        binary float; NaN and infinities refused. Errors name `amount`."""
        return parse_decimal(value, field="amount")

    @field_validator("occurred_at")
    @classmethod
    def _bson_time(cls, value: datetime | None) -> datetime | None:
        """UTC at millisecond resolution (what BSON keeps), so a re-read transaction has the
        same content and fingerprint; a naive time is taken as UTC."""
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(microsecond=value.microsecond // 1000 * 1000)

    @model_validator(mode="after")
    def _exact_amount(self) -> ExternalTransaction:
        if self.amount_minor > AMOUNT_MINOR_MAX:
            raise InvalidAmountError(
                f"{self.amount} {self.currency} exceeds the ledger's int64 range", field="amount"
            )
        return self

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy is validated again: amount_minor and fingerprint are cached per instance and
        pydantic's copy would carry the original's."""
        del deep  # immutable all the way down
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return self.model_validate({**fields, **(update or {})})

    @cached_property
    def amount_minor(self) -> int:
        return to_minor(self.amount, self.currency)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the content; the same external id with another fingerprint is a conflict.
        The amount counts as minor units (1.5 and 1.50 USD are the same transaction)."""
        body = {
            "external_id": self.external_id, "kind": self.kind, "currency": self.currency,
            "amount_minor": self.amount_minor, "counterparty": self.counterparty,
            "reference": self.reference, "memo": self.memo,
            "occurred_at": None if self.occurred_at is None else self.occurred_at.isoformat(),
        }
        encoded = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(encoded).hexdigest()


def parse_external(data: object) -> ExternalTransaction:
    """Validate untrusted input; every error is a walletcore error naming the field."""
    return parse_input(ExternalTransaction, data)


class ClearingRecord(BaseModel):
    """The system of reference's record of one transaction (stores.clearing_store)."""

    model_config = ConfigDict(frozen=True)

    transaction: ExternalTransaction
    batch_id: str = Field(min_length=1, max_length=EXTERNAL_ID_MAX)
    state: ClearingState
    reason: str | None = Field(default=None, max_length=256)
    received_at: datetime
    updated_at: datetime
    entry_id: str | None = None  # set when settled
    tb_timestamp: int | None = Field(default=None, ge=0)  # the post transfer's timestamp

    @property
    def external_id(self) -> str:
        return self.transaction.external_id


# ---- TigerBeetle transfers ------------------------------------------------------------------


def pending_transfer_id(external_id: str) -> int:
    return hash_u128(f"clearing-pending:{external_id}")


def post_transfer_id(external_id: str) -> int:
    return hash_u128(f"clearing-post:{external_id}")


def void_transfer_id(external_id: str) -> int:
    return hash_u128(f"clearing-void:{external_id}")


def external_ref(external_id: str) -> int:
    """`user_data_128` of the clearing transfers: finds them from the external id."""
    return hash_u128(f"clearing-external:{external_id}")


@dataclass(frozen=True, slots=True)
class TransferSpec:
    """A TigerBeetle transfer to create, in plain ints (the activity maps it to the client)."""

    id: int
    debit_account_id: int
    credit_account_id: int
    amount: int
    pending_id: int
    ledger: int
    code: int
    flags: int
    timeout_s: int
    user_data_128: int


def pending_spec(txn: ExternalTransaction, table: ClearingTable) -> TransferSpec:
    """The reservation: a pending transfer with the kind's timeout."""
    route = table.route_for(txn)
    debit, credit = table.legs(route, txn.currency)
    return TransferSpec(
        id=pending_transfer_id(txn.external_id), debit_account_id=debit.id,
        credit_account_id=credit.id, amount=txn.amount_minor, pending_id=0, ledger=debit.ledger,
        code=route.code, flags=TRANSFER_FLAG_PENDING, timeout_s=route.pending_timeout_s,
        user_data_128=external_ref(txn.external_id),
    )


def post_spec(txn: ExternalTransaction, table: ClearingTable) -> TransferSpec:
    """Post the full pending amount (stated exactly, not TigerBeetle's AMOUNT_MAX shorthand)."""
    pending = pending_spec(txn, table)
    return _resolve(pending, post_transfer_id(txn.external_id), TRANSFER_FLAG_POST_PENDING)


def void_spec(txn: ExternalTransaction, table: ClearingTable) -> TransferSpec:
    pending = pending_spec(txn, table)
    return _resolve(pending, void_transfer_id(txn.external_id), TRANSFER_FLAG_VOID_PENDING)


def _resolve(pending: TransferSpec, transfer_id: int, flags: int) -> TransferSpec:
    return TransferSpec(
        id=transfer_id, debit_account_id=pending.debit_account_id,
        credit_account_id=pending.credit_account_id, amount=pending.amount,
        pending_id=pending.id, ledger=pending.ledger, code=pending.code, flags=flags,
        timeout_s=0, user_data_128=pending.user_data_128,
    )


# ---- settlement -----------------------------------------------------------------------------


def settlement_entry(
    txn: ExternalTransaction, table: ClearingTable, tb_timestamp: int
) -> JournalEntry:
    """The journal entry of a posted transaction: debit and credit of its route, the post
    transfer's id and timestamp."""
    route = table.route_for(txn)
    amount = txn.amount_minor
    assert 0 < amount <= AMOUNT_MINOR_MAX and route.debit_account <= GL_NUMBER_MAX
    return JournalEntry(
        transfer_id=post_transfer_id(txn.external_id), tb_timestamp=tb_timestamp,
        code=route.code, kind=route.kind, external_id=txn.external_id,
        lines=(
            JournalLine(account=route.debit_account, currency=txn.currency, debit_minor=amount),
            JournalLine(account=route.credit_account, currency=txn.currency, credit_minor=amount),
        ),
        memo=txn.memo,
    )


DEFAULT_CLEARING_TABLE = ClearingTable(chart=DEFAULT_CHART, routes=_default_routes())
