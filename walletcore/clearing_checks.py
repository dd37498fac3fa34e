"""The business checks between a transaction's pending and its post or void. Pure.

Each check is a function answering None (pass) or a CheckReason. `run_checks` runs each
transaction's route checks in the route's order over a whole batch, from a CheckContext the
activity fills from the stores (`needs_of` says what to read). A batch is checked in order:
a transaction that passes counts toward the velocity of the ones after it, and one that fails
no longer holds its reference, exactly as if they had arrived one by one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from walletcore.clearing import (
    CheckName,
    ClearingTable,
    ExternalTransaction,
    LimitsMinor,
    Route,
)
from walletcore.gl_chart import AccountStatus
from walletcore.journal import INT64_MAX

CHECK_BATCH_MAX = 8189  # one TigerBeetle request of post/void transfers
BLOCKED_MAX = 100_000
REFERENCE_HOLDERS_MAX = 64  # holders of one reference the context carries (oldest first)


class CheckReason(StrEnum):
    AMOUNT_BELOW_MIN = "amount_below_min"
    AMOUNT_ABOVE_MAX = "amount_above_max"
    VELOCITY_COUNT = "velocity_count_exceeded"
    VELOCITY_AMOUNT = "velocity_amount_exceeded"
    BLOCKED_COUNTERPARTY = "blocked_counterparty"
    ACCOUNT_FROZEN = "account_frozen"
    ACCOUNT_CLOSED = "account_closed"
    DUPLICATE_REFERENCE = "duplicate_reference"


class VelocityWindow(BaseModel):
    """A counterparty's live transactions of one kind and currency inside the window."""

    model_config = ConfigDict(frozen=True)

    count: int = Field(default=0, ge=0)
    amount_minor: int = Field(default=0, ge=0)

    def plus(self, amount_minor: int) -> VelocityWindow:
        return VelocityWindow(count=self.count + 1, amount_minor=self.amount_minor + amount_minor)


def velocity_key(kind: str, counterparty: str, currency: str) -> str:
    return f"{kind}|{counterparty}|{currency}"


def reference_key(counterparty: str, reference: str) -> str:
    """A reference is unique per counterparty (e.g. an ACH trace number from one bank)."""
    return f"{counterparty}|{reference}"


def normalized_party(counterparty: str) -> str:
    """Blocked lists match case-insensitively (ids arrive in whatever case a partner uses)."""
    return counterparty.strip().casefold()


# ---- the checks -----------------------------------------------------------------------------


def check_amount_limits(amount_minor: int, limits: LimitsMinor) -> CheckReason | None:
    assert 0 < amount_minor <= INT64_MAX
    if amount_minor < limits.amount_min:
        return CheckReason.AMOUNT_BELOW_MIN
    if amount_minor > limits.amount_max:
        return CheckReason.AMOUNT_ABOVE_MAX
    return None


def check_velocity(
    amount_minor: int, window: VelocityWindow, limits: LimitsMinor
) -> CheckReason | None:
    """Would this transaction push the window over the count or amount limit?"""
    if window.count + 1 > limits.velocity_count_max:
        return CheckReason.VELOCITY_COUNT
    if window.amount_minor + amount_minor > limits.velocity_amount_max:
        return CheckReason.VELOCITY_AMOUNT
    return None


def check_blocked_counterparty(
    counterparty: str, blocked: AbstractSet[str]
) -> CheckReason | None:
    """`blocked` holds normalized_party() forms."""
    return CheckReason.BLOCKED_COUNTERPARTY if normalized_party(counterparty) in blocked else None


def check_account_status(
    route: Route, statuses: Mapping[int, AccountStatus]
) -> CheckReason | None:
    """Both accounts of the route must be open (an account missing from `statuses` is open:
    the chart's default)."""
    accounts = (route.debit_account, route.credit_account)
    found = {statuses.get(number, AccountStatus.OPEN) for number in accounts}
    if AccountStatus.CLOSED in found:
        return CheckReason.ACCOUNT_CLOSED
    if AccountStatus.FROZEN in found:
        return CheckReason.ACCOUNT_FROZEN
    return None


def check_duplicate_reference(
    external_id: str, holders: Sequence[str], refused: AbstractSet[str]
) -> CheckReason | None:
    """`holders`: live transactions with the same reference, oldest first (this one included).
    A duplicate is a transaction with an older live holder that was not refused meanwhile."""
    for holder in holders:
        if holder == external_id:
            return None
        if holder not in refused:
            return CheckReason.DUPLICATE_REFERENCE
    return None  # not among the holders read: nothing older is known


# ---- a batch --------------------------------------------------------------------------------


class VelocityQuery(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: str
    counterparty: str
    currency: str
    window_s: int = Field(ge=1)

    @property
    def key(self) -> str:
        return velocity_key(self.kind, self.counterparty, self.currency)


class ContextNeeds(BaseModel):
    """What the stores must answer for `run_checks` over a batch."""

    model_config = ConfigDict(frozen=True)

    velocity: tuple[VelocityQuery, ...] = ()
    references: tuple[tuple[str, str], ...] = ()  # (counterparty, reference)
    accounts: tuple[int, ...] = ()
    counterparties: tuple[str, ...] = ()  # for a blocked list kept in a store


class CheckContext(BaseModel):
    """The world as the checks see it. Velocity and reference holders exclude nothing: the
    reader must leave the batch's own transactions out of `velocity` (run_checks adds them in
    order) and keep them in `reference_holders` (ordered oldest first)."""

    model_config = ConfigDict(frozen=True)

    blocked_counterparties: frozenset[str] = Field(default=frozenset(), max_length=BLOCKED_MAX)
    account_statuses: dict[int, AccountStatus] = Field(default_factory=dict)
    velocity: dict[str, VelocityWindow] = Field(default_factory=dict)
    reference_holders: dict[str, list[str]] = Field(default_factory=dict)


class CheckOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    external_id: str
    passed: bool
    check: CheckName | None = None  # the failing check
    reason: CheckReason | None = None


def needs_of(batch: Sequence[ExternalTransaction], table: ClearingTable) -> ContextNeeds:
    """The reads a batch's checks depend on (deduplicated, in first-seen order)."""
    assert len(batch) <= CHECK_BATCH_MAX
    velocity: dict[str, VelocityQuery] = {}
    references: dict[tuple[str, str], None] = {}
    accounts: dict[int, None] = {}
    parties: dict[str, None] = {}
    for txn in batch:
        route = table.route_for(txn)
        parties[txn.counterparty] = None
        if CheckName.VELOCITY in route.checks:
            query = VelocityQuery(kind=txn.kind, counterparty=txn.counterparty,
                                  currency=txn.currency, window_s=route.velocity_window_s)
            velocity.setdefault(query.key, query)
        if CheckName.DUPLICATE_REFERENCE in route.checks and txn.reference is not None:
            references[(txn.counterparty, txn.reference)] = None
        if CheckName.ACCOUNT_STATUS in route.checks:
            accounts[route.debit_account] = None
            accounts[route.credit_account] = None
    return ContextNeeds(velocity=tuple(velocity.values()), references=tuple(references),
                        accounts=tuple(accounts), counterparties=tuple(parties))


def run_checks(
    batch: Sequence[ExternalTransaction], context: CheckContext, table: ClearingTable
) -> list[CheckOutcome]:
    """One outcome per transaction, in batch order; the first failing check decides."""
    assert len(batch) <= CHECK_BATCH_MAX
    windows = dict(context.velocity)
    refused: set[str] = set()
    outcomes: list[CheckOutcome] = []
    for txn in batch:
        route = table.route_for(txn)
        failed = _first_failure(txn, route, context, windows, refused, table)
        if failed is None:
            key = velocity_key(txn.kind, txn.counterparty, txn.currency)
            windows[key] = windows.get(key, VelocityWindow()).plus(txn.amount_minor)
            outcomes.append(CheckOutcome(external_id=txn.external_id, passed=True))
        else:
            refused.add(txn.external_id)
            outcomes.append(CheckOutcome(
                external_id=txn.external_id, passed=False, check=failed[0], reason=failed[1]
            ))
    assert len(outcomes) == len(batch)
    return outcomes


def _first_failure(
    txn: ExternalTransaction, route: Route, context: CheckContext,
    windows: Mapping[str, VelocityWindow], refused: AbstractSet[str], table: ClearingTable,
) -> tuple[CheckName, CheckReason] | None:
    limits = table.limits(txn.kind, txn.currency)
    for check in route.checks:
        reason: CheckReason | None
        if check is CheckName.AMOUNT_LIMITS:
            reason = check_amount_limits(txn.amount_minor, limits)
        elif check is CheckName.VELOCITY:
            window = windows.get(velocity_key(txn.kind, txn.counterparty, txn.currency))
            reason = check_velocity(txn.amount_minor, window or VelocityWindow(), limits)
        elif check is CheckName.BLOCKED_COUNTERPARTY:
            reason = check_blocked_counterparty(txn.counterparty, context.blocked_counterparties)
        elif check is CheckName.ACCOUNT_STATUS:
            reason = check_account_status(route, context.account_statuses)
        else:
            assert check is CheckName.DUPLICATE_REFERENCE
            holders: list[str] = []
            if txn.reference is not None:
                key = reference_key(txn.counterparty, txn.reference)
                holders = context.reference_holders.get(key, [])
            reason = check_duplicate_reference(txn.external_id, holders, refused)
        if reason is not None:
            return check, reason
    return None
