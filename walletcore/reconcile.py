"""Reconciliation and backfill logic with no I/O: compare, classify, plan postings, check money.

The activities read both stores and hand plain values here; everything that decides "equal?",
"in flight or real?", "which transfers reach this balance?" and "is money conserved?" lives in
pure functions so it can be property-tested without servers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from walletcore.balances import MinorBalance
from walletcore.codes import CUSTOMER_ACCOUNT_CODE, TransferCode
from walletcore.ids import hash_u128, transfer_id, void_transfer_id
from walletcore.phases import MONGO_PRIMARY_DUAL_WRITE, Phase
from walletcore.transfer_map import operation_leg

IN_FLIGHT_MAX_AGE_S_DEFAULT = 300.0  # an operation missing on one side longer than this is stuck
# The write path creates a TigerBeetle transfer, then registers it in the Transfer Registry:
# a read between the two sees an unregistered transfer. Younger than this, it is in flight
# (the re-check must see it registered); older, a transfer the platform did not make is real.
REGISTRATION_GRACE_S = 3.0
UNIT_MINOR = 1  # "more than the currency's smallest unit" means a difference above 1 minor unit
MATCH_RATE_THRESHOLD_DEFAULT = 0.9999

# TigerBeetle account flags (walletcore stays free of the client library; values from 0.17.9).
FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS = 2
FLAG_HISTORY = 8

# Codes that mirror a legacy operation; openings and corrections have no legacy counterpart.
OPERATION_CODES = frozenset(
    {TransferCode.CREDIT, TransferCode.DEBIT, TransferCode.CREDIT_VOID, TransferCode.DEBIT_VOID}
)


class Verdict(StrEnum):
    MATCH = "match"
    IN_FLIGHT = "in_flight"  # explained by operations still travelling to the other store
    REAL = "real"


class IssueKind(StrEnum):
    BALANCE_MISMATCH = "balance_mismatch"
    MISSING_TB_ACCOUNT = "missing_tb_account"
    MISSING_REGISTRY = "missing_registry"
    REGISTRY_MISMATCH = "registry_mismatch"
    ACCOUNT_MISMATCH = "account_mismatch"
    UNREGISTERED_TB_ACCOUNT = "unregistered_tb_account"
    REGISTRY_WITHOUT_WALLET = "registry_without_wallet"
    MISSING_TRANSFER = "missing_transfer"
    TRANSFER_MISMATCH = "transfer_mismatch"
    MALFORMED_REGISTRY = "malformed_registry"
    CONSERVATION = "conservation"
    # A wallet's pending operation that no write path can be carrying (see classify):
    UNKNOWN_TRANSFER = "unknown_transfer"  # on the account, not made by the platform
    LOST_LEGACY_WRITE = "lost_legacy_write"  # registered, TigerBeetle has it, MongoDB lost it
    UNAPPLIED_LEGACY_OPERATION = "unapplied_legacy_operation"  # no backlog can carry it now
    NOT_CLEARED = "in_flight_not_cleared"  # in flight at the first read, still at the re-check


# Findings about one legacy wallet: such a wallet counts as `real`, so these classes are judged
# through the match rate. Every other class (the TigerBeetle account scan, the Transfer
# Registry, money conservation) is a finding no rate can absorb: it fails a gate by itself.
WALLET_ISSUES = frozenset({
    IssueKind.BALANCE_MISMATCH, IssueKind.MISSING_TB_ACCOUNT, IssueKind.MISSING_REGISTRY,
    IssueKind.REGISTRY_MISMATCH, IssueKind.ACCOUNT_MISMATCH,
})


class ReportKind(StrEnum):
    """What a reconciliation run did: only compare, or also post corrections (dual_write)."""

    CHECK = "check"
    REPAIR = "repair"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class FieldDiff(_Frozen):
    field: str
    legacy_minor: int
    tigerbeetle_minor: int

    @property
    def diff_minor(self) -> int:
        return self.tigerbeetle_minor - self.legacy_minor


BALANCE_FIELDS: tuple[str, ...] = ("credit_minor", "debit_minor", "historical_credit_minor")


def diff_balances(legacy: MinorBalance, tigerbeetle: MinorBalance) -> list[FieldDiff]:
    """Field-by-field differences (empty when equal)."""
    diffs = []
    for name in BALANCE_FIELDS:
        left, right = getattr(legacy, name), getattr(tigerbeetle, name)
        if left != right:
            diffs.append(FieldDiff(field=name, legacy_minor=left, tigerbeetle_minor=right))
    return diffs


class OpEffect(_Frozen):
    """What one operation does to a customer's balance: a credit or a debit of an amount."""

    kind: Literal["credit", "debit"]
    amount_minor: int = Field(gt=0)
    age_s: float = Field(default=0.0, ge=0.0)  # how long ago it was written on its side
    transaction_id: str | None = None  # or "transfer:<hex id>" for a transfer of no record
    # Set when no write path can be carrying it (see backlog_may_carry and
    # reverse_projection_may_carry): the difference it makes is real, never in flight.
    real_kind: IssueKind | None = None


def legacy_op_effect(
    op_type: str,
    amount_minor: int,
    *,
    original_type: str | None = None,
    age_s: float = 0.0,
    transaction_id: str | None = None,
    real_kind: IssueKind | None = None,
) -> OpEffect:
    """A legacy operation's effect; a void reverses its original (credit -> debit and back)."""
    if op_type == "void":
        assert original_type in ("credit", "debit"), f"void of {original_type!r}"
        kind: Literal["credit", "debit"] = "debit" if original_type == "credit" else "credit"
    else:
        assert op_type in ("credit", "debit"), f"unknown operation type {op_type!r}"
        kind = "credit" if op_type == "credit" else "debit"
    return OpEffect(kind=kind, amount_minor=amount_minor, age_s=age_s,
                    transaction_id=transaction_id, real_kind=real_kind)


def transfer_effect(
    *, customer_id: int, debit_account_id: int, credit_account_id: int, amount: int,
    age_s: float = 0.0, transaction_id: str | None = None, real_kind: IssueKind | None = None,
) -> OpEffect:
    """A TigerBeetle transfer's effect on the customer account it touches."""
    assert customer_id in (debit_account_id, credit_account_id)
    assert debit_account_id != credit_account_id
    kind: Literal["credit", "debit"] = "credit" if credit_account_id == customer_id else "debit"
    return OpEffect(kind=kind, amount_minor=amount, age_s=age_s, transaction_id=transaction_id,
                    real_kind=real_kind)


# Workers follow a newly published phase within the state cache's TTL (at most 60 s), and the
# publisher's clock and TigerBeetle's may differ by a little.
PHASE_SWITCH_SLACK_S = 60.0
PHASE_CLOCK_SKEW_S = 5.0


class PhaseWindow(_Frozen):
    """The phase a wallet's migration scope is in, and when it was published (Unix seconds;
    None: never published, i.e. the default legacy)."""

    phase: Phase
    since_s: float | None = None


def backlog_may_carry(window: PhaseWindow, written_s: float) -> bool:
    """May a legacy operation written at `written_s` (Unix s), not in TigerBeetle yet, be on the
    dual-write backlog? In the dual-write phases, yes. In tb_primary only if MongoDB answered it
    before the switch took effect (the backlog drains before TigerBeetle answers, and a replay
    of such an operation is queued to TigerBeetle). In legacy nothing writes TigerBeetle and in
    complete nothing is owed to it."""
    if window.phase in MONGO_PRIMARY_DUAL_WRITE:
        return True
    if window.phase is Phase.TB_PRIMARY:
        return window.since_s is None or written_s < window.since_s + PHASE_SWITCH_SLACK_S
    return False


def legacy_op_may_be_in_flight(
    window: PhaseWindow, written_s: float, *, outbox_state: str | None, in_tigerbeetle: bool
) -> bool:
    """May a legacy operation TigerBeetle did not hold at the cut be on its way there?
    With a transactional outbox record (written with the legacy operation, stores.outbox) the
    record says it: in flight iff still `pending` (an `applied` one that TigerBeetle lacks is
    real). The record must be read before TigerBeetle is: a record applied in between is then
    seen in TigerBeetle (`in_tigerbeetle`: applied after the cut, in flight by the usual rule).
    Without a record (written through the workflow backlog, or before the outbox existed):
    backlog_may_carry."""
    if outbox_state is None or in_tigerbeetle:
        return backlog_may_carry(window, written_s)
    return outbox_state == "pending"


def reverse_projection_may_carry(window: PhaseWindow, written_s: float) -> bool:
    """May an operation TigerBeetle applied at `written_s` (Unix s), registered but not in
    MongoDB yet, be on the reverse projection? Only if TigerBeetle answered it: in tb_primary
    from the moment that state was published (nobody acts on a state before it is written),
    and in complete those answered before complete was published (complete's drain)."""
    if window.phase is Phase.TB_PRIMARY:
        return window.since_s is None or written_s >= window.since_s - PHASE_CLOCK_SKEW_S
    if window.phase is Phase.COMPLETE:
        return window.since_s is None or written_s < window.since_s + PHASE_SWITCH_SLACK_S
    return False


def tb_op_may_be_in_flight(
    window: PhaseWindow, written_s: float, *, reverse_state: str | None
) -> bool:
    """May a registered TigerBeetle transfer applied at `written_s`, whose legacy operation
    MongoDB lacks, be on its way to MongoDB? With a reverse outbox record (tb_primary's intent,
    recorded before the TigerBeetle write: stores.outbox) the record says it: in flight iff
    still `pending` (applied or abandoned and MongoDB lacks it: real). The record must be read
    before MongoDB is: a record applied in between is then seen in MongoDB. Without a record
    (the workflow backlog, or before the reverse outbox existed): reverse_projection_may_carry."""
    if reverse_state is None:
        return reverse_projection_may_carry(window, written_s)
    return reverse_state == "pending"


def still_pending(first_pending: frozenset[str] | None, pending: Iterable[str]) -> bool:
    """At the re-check: is an operation that was pending at the first read pending still? Then
    the difference did not clear: real. Without the first read's record (another worker read
    it) nothing shows it cleared, so it did not."""
    return first_pending is None or not first_pending.isdisjoint(pending)


ZERO_BALANCE = MinorBalance(credit_minor=0, debit_minor=0, historical_credit_minor=0)


def apply_effects(balance: MinorBalance, effects: Iterable[OpEffect]) -> MinorBalance:
    """The balance after `effects` (order-free: credits and debits only add to posted totals)."""
    credits = balance.historical_credit_minor
    debits = credits - balance.net_minor
    for effect in effects:
        if effect.kind == "credit":
            credits += effect.amount_minor
        else:
            debits += effect.amount_minor
    return MinorBalance.from_posted(credits, debits)


Explanation = Literal["none", "backlog", "reverse_projection", "both"]


class Classification(_Frozen):
    verdict: Verdict
    diffs: list[FieldDiff] = Field(default_factory=list)
    explained_by: Explanation = "none"
    pending_ops: int = 0
    reason: str = ""

    @property
    def max_diff_minor(self) -> int:
        return max((abs(d.diff_minor) for d in self.diffs), default=0)


def classify(
    legacy: MinorBalance,
    tigerbeetle: MinorBalance | None,
    *,
    legacy_only: Sequence[OpEffect] = (),
    tigerbeetle_only: Sequence[OpEffect] = (),
    in_flight_max_age_s: float = IN_FLIGHT_MAX_AGE_S_DEFAULT,
) -> Classification:
    """Is the difference between the stores explained by operations in flight?

    `legacy_only`: operations MongoDB has applied and TigerBeetle has not (the dual-write
    backlog); `tigerbeetle_only`: the reverse (the tb_primary reverse projection, or operations
    TigerBeetle applied after the legacy balance was read). Both are taken on the same cut as
    the balances (see activities.reconciliation). A difference is in flight only when exactly
    those operations close it (legacy + tigerbeetle_only == tigerbeetle + legacy_only) and none
    of them is older than `in_flight_max_age_s` (older means a stuck backlog: a real problem).
    A missing TigerBeetle account counts as a zero balance (the backlog may create it).
    An operation with `real_kind` set is one no write path can be carrying (a transfer the
    platform did not make, a lost MongoDB write, a backlog item outside the dual-write phases):
    its difference is real whatever else closes it.
    """
    assert in_flight_max_age_s > 0
    tb = ZERO_BALANCE if tigerbeetle is None else tigerbeetle
    diffs = diff_balances(legacy, tb)
    if not diffs and tigerbeetle is not None:
        return Classification(verdict=Verdict.MATCH)
    ops = [*legacy_only, *tigerbeetle_only]
    stray = sorted({str(op.real_kind) for op in ops if op.real_kind is not None})
    if stray:
        return Classification(
            verdict=Verdict.REAL, diffs=diffs, pending_ops=len(ops),
            reason=f"operation(s) no write path carries: {', '.join(stray)}")
    if ops and apply_effects(tb, legacy_only) == apply_effects(legacy, tigerbeetle_only):
        explained_by: Explanation = (
            "both" if legacy_only and tigerbeetle_only
            else "backlog" if legacy_only else "reverse_projection")
        oldest_s = max(op.age_s for op in ops)
        if oldest_s > in_flight_max_age_s:
            return Classification(
                verdict=Verdict.REAL, diffs=diffs, pending_ops=len(ops),
                reason=f"{len(ops)} operation(s) unapplied for {oldest_s:.0f}s "
                f"(> {in_flight_max_age_s:.0f}s): stuck {explained_by}",
            )
        return Classification(
            verdict=Verdict.IN_FLIGHT, diffs=diffs, explained_by=explained_by,
            pending_ops=len(ops), reason=f"{len(ops)} operation(s) in the {explained_by}",
        )
    reason = "no TigerBeetle account" if tigerbeetle is None else "balances differ"
    if tigerbeetle is None and not diffs:
        reason = "no TigerBeetle account (zero legacy balance)"
    return Classification(verdict=Verdict.REAL, diffs=diffs, reason=reason)


# --------------------------------------------------------------------------- postings


class PostingPlan(_Frozen):
    """Amounts to post onto a customer account: credit (system -> customer) and debit
    (customer -> system). Applied credit first so an overdraft-free account never dips."""

    credit_minor: int = Field(ge=0)
    debit_minor: int = Field(ge=0)

    @property
    def empty(self) -> bool:
        return self.credit_minor == 0 and self.debit_minor == 0


def plan_to_reach(
    credits_posted: int, debits_posted: int, target: MinorBalance
) -> PostingPlan | None:
    """The postings that move an account from its posted totals to `target`.

    TigerBeetle never edits history, so posted totals only grow: when the account already has
    more credits than the target's historical credit (or the debit needed is negative) no
    postings can reach it and the answer is None (manual review).
    """
    assert credits_posted >= 0 and debits_posted >= 0
    credit_minor = target.historical_credit_minor - credits_posted
    debit_minor = (target.historical_credit_minor - target.net_minor) - debits_posted
    if credit_minor < 0 or debit_minor < 0:
        return None
    plan = PostingPlan(credit_minor=credit_minor, debit_minor=debit_minor)
    reached = MinorBalance.from_posted(credits_posted + credit_minor, debits_posted + debit_minor)
    assert reached == target
    return plan


def opening_plan(balance: MinorBalance) -> PostingPlan:
    """Backfill: Opening -> customer for historical credit, customer -> Opening for the rest."""
    plan = plan_to_reach(0, 0, balance)
    assert plan is not None  # from zero every valid balance is reachable
    return plan


def correction_transfer_id(wallet_canonical: str, repair_id: str, part: str) -> int:
    """Deterministic per repair run and part, so a retried repair posts once."""
    assert part in ("credit", "debit")
    return hash_u128(f"correction:{wallet_canonical}:{repair_id}:{part}")


def covered_by_opening(op_version: int, imported_version: int | None) -> bool:
    """A backlog operation whose legacy version the import already counted must be skipped."""
    assert op_version > 0
    return imported_version is not None and op_version <= imported_version


# --------------------------------------------------------------------------- accounts, transfers


class RegistryView(_Frozen):
    account_id: int
    ledger: int
    allow_overdraft: bool


class AccountView(_Frozen):
    id: int
    ledger: int
    code: int
    flags: int
    credits_posted: int
    debits_posted: int

    @property
    def balance(self) -> MinorBalance:
        return MinorBalance.from_posted(self.credits_posted, self.debits_posted)


class Finding(_Frozen):
    """One non-balance problem found by a check (registry, account, transfer, conservation)."""

    kind: IssueKind
    subject: str  # wallet canonical key, transaction id or ledger
    detail: str


def check_wallet_account(
    wallet: str,
    *,
    expected_ledger: int,
    allow_overdraft: bool,
    registry: RegistryView | None,
    account: AccountView | None,
) -> list[Finding]:
    """A legacy wallet must have a registry entry and a TigerBeetle account that agree."""
    found: list[Finding] = []
    if registry is None:
        found.append(Finding(kind=IssueKind.MISSING_REGISTRY, subject=wallet,
                             detail="no Account Registry entry"))
    else:
        if registry.ledger != expected_ledger:
            found.append(Finding(kind=IssueKind.REGISTRY_MISMATCH, subject=wallet,
                                 detail=f"registry ledger {registry.ledger} != {expected_ledger}"))
        if registry.allow_overdraft != allow_overdraft:
            found.append(Finding(
                kind=IssueKind.REGISTRY_MISMATCH, subject=wallet,
                detail=f"registry allow_overdraft {registry.allow_overdraft} != {allow_overdraft}"))
    if registry is not None and account is None:
        found.append(Finding(kind=IssueKind.MISSING_TB_ACCOUNT, subject=wallet,
                             detail=f"account {registry.account_id:032x} not in TigerBeetle"))
    if account is not None:
        if account.ledger != expected_ledger:
            found.append(Finding(kind=IssueKind.ACCOUNT_MISMATCH, subject=wallet,
                                 detail=f"account ledger {account.ledger} != {expected_ledger}"))
        if account.code != CUSTOMER_ACCOUNT_CODE:
            found.append(Finding(kind=IssueKind.ACCOUNT_MISMATCH, subject=wallet,
                                 detail=f"account code {account.code} != {CUSTOMER_ACCOUNT_CODE}"))
        limited = bool(account.flags & FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS)
        if limited == allow_overdraft:
            found.append(Finding(kind=IssueKind.ACCOUNT_MISMATCH, subject=wallet,
                                 detail=f"account overdraft limit flag {limited} but wallet "
                                 f"allow_overdraft {allow_overdraft}"))
    return found


class PostedAccount(Protocol):
    """What wallet_agrees reads of an account: an AccountView or a client's account record."""

    @property
    def ledger(self) -> int: ...
    @property
    def code(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def credits_posted(self) -> int: ...
    @property
    def debits_posted(self) -> int: ...


class LegacyBalance(Protocol):
    """The balance fields wallet_agrees reads: a MinorBalance, or the same fields as read."""

    @property
    def credit_minor(self) -> int: ...
    @property
    def debit_minor(self) -> int: ...
    @property
    def historical_credit_minor(self) -> int: ...


def wallet_agrees(
    legacy: LegacyBalance,
    *,
    expected_ledger: int,
    allow_overdraft: bool,
    registry_ledger: int | None,
    registry_allow_overdraft: bool | None,
    account: PostedAccount | None,
) -> bool:
    """The common case, decided on plain values: True exactly when
    `classify(legacy, account.balance)` is MATCH and `check_wallet_account` finds nothing
    (same checks, field by field; the reconciliation's hot loop calls this for every wallet
    and the model-building functions above only when it is False). The balance equalities
    also imply MinorBalance's invariants for `legacy` (TigerBeetle's side has them)."""
    if registry_ledger is None or account is None:
        return False
    net = account.credits_posted - account.debits_posted
    return (
        legacy.historical_credit_minor == account.credits_posted
        and legacy.credit_minor == max(net, 0)
        and legacy.debit_minor == max(-net, 0)
        and registry_ledger == expected_ledger
        and registry_allow_overdraft == allow_overdraft
        and account.ledger == expected_ledger
        and account.code == CUSTOMER_ACCOUNT_CODE
        # int(): `&` on the client's IntFlag goes through the enum machinery
        and bool(int(account.flags) & FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS) != allow_overdraft
    )


class TransferView(_Frozen):
    id: int
    debit_account_id: int
    credit_account_id: int
    amount: int
    code: int


class RegisteredOperation(_Frozen):
    """A Transfer Registry record, as far as it says what its transfer must be."""

    transaction_id: str
    transfer_id: int
    wallet: str  # canonical key
    account_id: int
    type: str  # credit, debit, void (`<type>_in_opening`: never a transfer of its own)
    amount_minor: int


_CODES_OF_TYPE: dict[str, frozenset[TransferCode]] = {
    "credit": frozenset({TransferCode.CREDIT}),
    "debit": frozenset({TransferCode.DEBIT}),
    "void": frozenset({TransferCode.CREDIT_VOID, TransferCode.DEBIT_VOID}),
}


def made_by_platform(
    record: RegisteredOperation | None, transfer: TransferView, *, wallet: str, ledger: int,
    void_of: str | None = None,
) -> bool:
    """Is `transfer` (on `wallet`'s account) the one the platform made for `record`? Its id is
    the record's derived id (`transfer_id` of the transaction; a void's is
    `void_transfer_id` of its original, checked when `void_of` names it), and its accounts,
    code and amount are walletcore.transfer_map.operation_leg's for the record."""
    if record is None or record.wallet != wallet or record.transfer_id != transfer.id:
        return False
    codes = _CODES_OF_TYPE.get(record.type)
    if codes is None or transfer.code not in codes or transfer.amount != record.amount_minor:
        return False
    derived = (transfer_id(record.transaction_id) if record.type != "void"
               else None if void_of is None else void_transfer_id(void_of))
    if derived is not None and derived != transfer.id:
        return False
    leg = operation_leg(ledger, record.account_id, TransferCode(transfer.code))
    return (transfer.debit_account_id, transfer.credit_account_id) == (
        leg.debit_account_id, leg.credit_account_id)


class ExpectedTransfer(_Frozen):
    """What the Transfer Registry says a transfer must look like."""

    transaction_id: str
    id: int
    debit_account_id: int
    credit_account_id: int
    amount: int
    code: int


def check_transfer(expected: ExpectedTransfer, actual: TransferView | None) -> list[Finding]:
    if actual is None:
        return [Finding(kind=IssueKind.MISSING_TRANSFER, subject=expected.transaction_id,
                        detail=f"transfer {expected.id:032x} not in TigerBeetle")]
    wrong = [
        f"{name} {getattr(actual, name)} != {getattr(expected, name)}"
        for name in ("amount", "code", "debit_account_id", "credit_account_id")
        if getattr(actual, name) != getattr(expected, name)
    ]
    if not wrong:
        return []
    return [Finding(kind=IssueKind.TRANSFER_MISMATCH, subject=expected.transaction_id,
                    detail="; ".join(wrong))]


def check_absent_transfer(expected: ExpectedTransfer, actual: TransferView | None) -> list[Finding]:
    """A transaction the imported opening balance already holds must have no transfer of its
    own (it would be counted twice); its void, if any, is checked like any other transfer."""
    if actual is None:
        return []
    return [Finding(kind=IssueKind.TRANSFER_MISMATCH, subject=expected.transaction_id,
                    detail=f"transfer {expected.id:032x} exists, but the transaction is held by "
                    "the opening balance (counted twice)")]


# --------------------------------------------------------------------------- money conservation


class ConservationResult(_Frozen):
    ledger: int
    customer_net_minor: int
    system_net_minor: int
    imbalance_minor: int
    tolerance_minor: int
    ok: bool


def check_conservation(
    ledger: int,
    *,
    customer_net_minor: int,
    system_nets_minor: Mapping[str, int],
    activity_minor: int = 0,
) -> ConservationResult:
    """Every transfer stays inside its ledger, so customers' nets sum to minus the system nets.

    `customer_net_minor` is summed page by page while traffic may run; `activity_minor` is the
    amount the system accounts moved during the run (each customer transfer touches exactly one
    system account), which bounds how far the sum can drift. Quiescent: exact equality.
    """
    assert activity_minor >= 0
    system_net = sum(system_nets_minor.values())
    imbalance = customer_net_minor + system_net
    return ConservationResult(
        ledger=ledger, customer_net_minor=customer_net_minor, system_net_minor=system_net,
        imbalance_minor=imbalance, tolerance_minor=activity_minor,
        ok=abs(imbalance) <= activity_minor,
    )


# --------------------------------------------------------------------------- rates and alerts


def match_rate(compared: int, real: int) -> float | None:
    """Share of compared wallets without a real difference (in-flight ones are not failures).
    None when nothing was compared: "no data", never 100 % (an empty scope proves nothing)."""
    assert 0 <= real <= compared
    return None if compared == 0 else (compared - real) / compared


def gate_findings(findings: Mapping[str, int]) -> dict[str, int]:
    """The findings that fail a gate by themselves (see WALLET_ISSUES), by class."""
    return {kind: n for kind, n in sorted(findings.items()) if n > 0 and kind not in WALLET_ISSUES}


def alerts(
    *,
    rate: float | None,
    threshold: float = MATCH_RATE_THRESHOLD_DEFAULT,
    max_real_diff_minor: int = 0,
    findings: int = 0,
    conservation_failures: int = 0,
) -> list[str]:
    """Human-readable alert reasons (empty when healthy). No rate (nothing compared) is not an
    alert: a scope without wallets yet is normal; the gates treat it as "no data"."""
    assert rate is None or 0.0 <= rate <= 1.0
    assert 0.0 < threshold <= 1.0
    reasons = []
    if rate is not None and rate < threshold:
        reasons.append(f"match rate {rate:.4%} below {threshold:.4%}")
    if max_real_diff_minor > UNIT_MINOR:
        reasons.append(f"a real difference of {max_real_diff_minor} minor units "
                       f"exceeds the smallest unit")
    if findings:
        reasons.append(f"{findings} registry/account/transfer finding(s)")
    if conservation_failures:
        reasons.append(f"money not conserved on {conservation_failures} ledger(s)")
    return reasons
