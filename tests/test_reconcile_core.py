"""Property tests of walletcore.reconcile: the I/O-free comparison and classification logic."""

from __future__ import annotations

from decimal import Decimal

from bson.decimal128 import Decimal128
from hypothesis import given, settings
from hypothesis import strategies as st

from mongobase.mongo import decimal128_to_minor, decimal_to_minor_exact
from walletcore.balances import MinorBalance
from walletcore.codes import CUSTOMER_ACCOUNT_CODE, TransferCode
from walletcore.currencies import precision_of
from walletcore.errors import ConflictError
from walletcore.ids import hash_u128, transfer_id, void_transfer_id
from walletcore.phases import Phase
from walletcore.reconcile import (
    FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS,
    FLAG_HISTORY,
    PHASE_CLOCK_SKEW_S,
    PHASE_SWITCH_SLACK_S,
    WALLET_ISSUES,
    AccountView,
    ExpectedTransfer,
    IssueKind,
    OpEffect,
    PhaseWindow,
    RegisteredOperation,
    RegistryView,
    TransferView,
    Verdict,
    alerts,
    apply_effects,
    backlog_may_carry,
    check_absent_transfer,
    check_conservation,
    check_transfer,
    check_wallet_account,
    classify,
    covered_by_opening,
    diff_balances,
    gate_findings,
    made_by_platform,
    match_rate,
    opening_plan,
    plan_to_reach,
    reverse_projection_may_carry,
    still_pending,
    wallet_agrees,
)
from walletcore.transfer_map import operation_leg

AMOUNT = st.integers(min_value=1, max_value=10**15)
effects = st.lists(
    st.builds(OpEffect, kind=st.sampled_from(["credit", "debit"]), amount_minor=AMOUNT),
    max_size=12,
)


@st.composite
def balances(draw: st.DrawFn) -> MinorBalance:
    credits = draw(st.integers(min_value=0, max_value=10**16))
    debits = draw(st.integers(min_value=0, max_value=10**16))
    return MinorBalance.from_posted(credits, debits)


@given(balances())
def test_opening_plan_reaches_the_balance(balance: MinorBalance) -> None:
    plan = opening_plan(balance)
    assert plan.credit_minor == balance.historical_credit_minor
    assert MinorBalance.from_posted(plan.credit_minor, plan.debit_minor) == balance


@given(st.integers(0, 10**12), st.integers(0, 10**12), balances())
def test_plan_to_reach_is_exact_or_none(credits: int, debits: int, target: MinorBalance) -> None:
    plan = plan_to_reach(credits, debits, target)
    target_debits = target.historical_credit_minor - target.net_minor
    if credits > target.historical_credit_minor or debits > target_debits:
        assert plan is None
    else:
        assert plan is not None
        reached = MinorBalance.from_posted(credits + plan.credit_minor, debits + plan.debit_minor)
        assert reached == target


@given(balances(), effects, effects)
def test_apply_effects_is_order_free(
    start: MinorBalance, a: list[OpEffect], b: list[OpEffect]
) -> None:
    assert apply_effects(apply_effects(start, a), b) == apply_effects(start, b + a)


@given(balances(), effects)
def test_backlog_explains_a_lagging_tigerbeetle(tb: MinorBalance, pending: list[OpEffect]) -> None:
    legacy = apply_effects(tb, pending)
    result = classify(legacy, tb, legacy_only=pending)
    if legacy == tb:
        assert result.verdict == Verdict.MATCH
    else:
        assert result.verdict == Verdict.IN_FLIGHT
        assert result.explained_by == "backlog"


@given(balances(), effects)
def test_reverse_projection_explains_a_lagging_legacy(legacy: MinorBalance,
                                                      pending: list[OpEffect]) -> None:
    tb = apply_effects(legacy, pending)
    result = classify(legacy, tb, tigerbeetle_only=pending)
    assert result.verdict == (Verdict.MATCH if legacy == tb else Verdict.IN_FLIGHT)


@given(balances(), st.integers(1, 10**6))
def test_unexplained_difference_is_real(balance: MinorBalance, extra: int) -> None:
    edited = apply_effects(balance, [OpEffect(kind="credit", amount_minor=extra)])
    result = classify(edited, balance)
    assert result.verdict == Verdict.REAL
    assert result.max_diff_minor >= extra
    # a backlog that does not close the gap does not excuse it either
    wrong = [OpEffect(kind="debit", amount_minor=extra)]
    assert classify(edited, balance, legacy_only=wrong).verdict == Verdict.REAL


def test_stuck_backlog_is_real() -> None:
    tb = MinorBalance.from_posted(100, 0)
    pending = [OpEffect(kind="credit", amount_minor=5, age_s=3600)]
    legacy = apply_effects(tb, pending)
    result = classify(legacy, tb, legacy_only=pending, in_flight_max_age_s=300)
    assert result.verdict == Verdict.REAL
    assert "stuck" in result.reason


def test_missing_account_with_backlog_is_in_flight_and_without_is_real() -> None:
    legacy = MinorBalance.from_posted(500, 200)
    ops = [OpEffect(kind="credit", amount_minor=500), OpEffect(kind="debit", amount_minor=200)]
    assert classify(legacy, None, legacy_only=ops).verdict == Verdict.IN_FLIGHT
    assert classify(legacy, None).verdict == Verdict.REAL
    zero = MinorBalance.from_posted(0, 0)
    assert classify(zero, None).verdict == Verdict.REAL  # the account itself is missing


@given(balances(), effects, effects)
def test_both_directions_on_one_cut_are_in_flight(base: MinorBalance, behind: list[OpEffect],
                                                   ahead: list[OpEffect]) -> None:
    """Legacy lacks what TigerBeetle applied after the legacy snapshot, TigerBeetle lacks the
    backlog: the difference is in flight when exactly both sets close it."""
    legacy = apply_effects(base, behind)
    tb = apply_effects(base, ahead)
    result = classify(legacy, tb, legacy_only=behind, tigerbeetle_only=ahead)
    assert result.verdict in (Verdict.MATCH, Verdict.IN_FLIGHT)
    if result.verdict == Verdict.IN_FLIGHT and behind and ahead:
        assert result.explained_by == "both"
    # Only one side of the explanation: not enough.
    if behind and ahead and legacy != tb and apply_effects(tb, behind) != legacy:
        assert classify(legacy, tb, legacy_only=behind).verdict == Verdict.REAL


@given(balances(), balances())
def test_diff_balances_is_empty_iff_equal(a: MinorBalance, b: MinorBalance) -> None:
    assert (diff_balances(a, b) == []) == (a == b)


def test_covered_by_opening() -> None:
    assert covered_by_opening(3, 5) and covered_by_opening(5, 5)
    assert not covered_by_opening(6, 5) and not covered_by_opening(1, None)


def test_wallet_account_checks() -> None:
    good_registry = RegistryView(account_id=7, ledger=1, allow_overdraft=False)
    good_account = AccountView(id=7, ledger=1, code=CUSTOMER_ACCOUNT_CODE,
                               flags=FLAG_HISTORY | FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS,
                               credits_posted=0, debits_posted=0)
    assert check_wallet_account("w", expected_ledger=1, allow_overdraft=False,
                                registry=good_registry, account=good_account) == []
    kinds = {f.kind for f in check_wallet_account("w", expected_ledger=1, allow_overdraft=False,
                                                   registry=None, account=None)}
    assert kinds == {IssueKind.MISSING_REGISTRY}
    kinds = {f.kind for f in check_wallet_account("w", expected_ledger=1, allow_overdraft=True,
                                                   registry=good_registry, account=None)}
    assert kinds == {IssueKind.REGISTRY_MISMATCH, IssueKind.MISSING_TB_ACCOUNT}
    found = check_wallet_account("w", expected_ledger=1, allow_overdraft=True,
                                 registry=RegistryView(account_id=7, ledger=1,
                                                       allow_overdraft=True),
                                 account=good_account)
    assert [f.kind for f in found] == [IssueKind.ACCOUNT_MISMATCH]


def test_transfer_checks() -> None:
    expected = ExpectedTransfer(transaction_id="t1", id=9, debit_account_id=1,
                                credit_account_id=2, amount=100, code=1)
    same = TransferView(id=9, debit_account_id=1, credit_account_id=2, amount=100, code=1)
    assert check_transfer(expected, same) == []
    assert check_transfer(expected, None)[0].kind == IssueKind.MISSING_TRANSFER
    bad = same.model_copy(update={"amount": 101})
    (finding,) = check_transfer(expected, bad)
    assert finding.kind == IssueKind.TRANSFER_MISMATCH and "amount" in finding.detail
    # A transaction held by the opening balance must have no transfer of its own.
    assert check_absent_transfer(expected, None) == []
    (twice,) = check_absent_transfer(expected, same)
    assert twice.kind == IssueKind.TRANSFER_MISMATCH and "counted twice" in twice.detail


@given(st.lists(st.integers(-10**12, 10**12), max_size=20), st.integers(0, 10**6))
def test_conservation(customer_nets: list[int], drift: int) -> None:
    total = sum(customer_nets)
    system = {"RESERVE": -total - 7, "SPEND": 7}
    assert check_conservation(1, customer_net_minor=total, system_nets_minor=system).ok
    off = check_conservation(1, customer_net_minor=total + drift + 1, system_nets_minor=system,
                             activity_minor=drift)
    assert not off.ok and off.imbalance_minor == drift + 1


def test_rates_and_alerts() -> None:
    assert match_rate(0, 0) is None  # nothing compared: no data, never 100 %
    assert match_rate(10_000, 1) == 0.9999
    assert alerts(rate=None) == []  # an empty scope is not an alert (the gates say "no data")
    assert alerts(rate=0.9999) == []
    assert len(alerts(rate=0.9998)) == 1
    assert alerts(rate=1.0, max_real_diff_minor=1) == []
    assert len(alerts(rate=1.0, max_real_diff_minor=2, findings=1,
                      conservation_failures=1)) == 3


def test_gate_findings_leave_wallet_classes_to_the_rate() -> None:
    found: dict[str, int] = {
        IssueKind.BALANCE_MISMATCH: 3, IssueKind.MISSING_REGISTRY: 1,
        IssueKind.MISSING_TRANSFER: 2, IssueKind.CONSERVATION: 1,
        IssueKind.UNREGISTERED_TB_ACCOUNT: 0}
    assert gate_findings(found) == {IssueKind.CONSERVATION: 1, IssueKind.MISSING_TRANSFER: 2}
    assert all(kind in WALLET_ISSUES or gate_findings({kind: 1}) for kind in IssueKind)


# ---- the fast paths agree with the exact ones ----------------------------------------------------

SMALL = st.integers(0, 5)


@st.composite
def _balances(draw: st.DrawFn) -> MinorBalance:
    return MinorBalance.from_posted(draw(SMALL), draw(SMALL))


@settings(max_examples=500)
@given(legacy=_balances(), expected=st.sampled_from([1, 2]), overdraft=st.booleans(),
       registry=st.none() | st.tuples(st.sampled_from([1, 2]), st.booleans()),
       account=st.none() | st.tuples(st.sampled_from([1, 2]),
                                     st.sampled_from([CUSTOMER_ACCOUNT_CODE, 99]),
                                     st.sampled_from([0, 2, 8, 10]), SMALL, SMALL))
def test_wallet_agrees_is_exactly_the_full_check(
    legacy: MinorBalance, expected: int, overdraft: bool,
    registry: tuple[int, bool] | None, account: tuple[int, int, int, int, int] | None,
) -> None:
    reg = None if registry is None else RegistryView(account_id=7, ledger=registry[0],
                                                     allow_overdraft=registry[1])
    acc = None if account is None else AccountView(
        id=7, ledger=account[0], code=account[1], flags=account[2], credits_posted=account[3],
        debits_posted=account[4])
    full = (classify(legacy, None if acc is None else acc.balance).verdict is Verdict.MATCH
            and not check_wallet_account("w", expected_ledger=expected,
                                         allow_overdraft=overdraft, registry=reg, account=acc))
    fast = wallet_agrees(legacy, expected_ledger=expected, allow_overdraft=overdraft,
                         registry_ledger=None if reg is None else reg.ledger,
                         registry_allow_overdraft=None if reg is None else reg.allow_overdraft,
                         account=acc)
    assert fast == full


def _exact_minor(value: Decimal128, currency: str) -> int | str:
    """The reference: Decimal digits, no bit tricks; "error" where the store must refuse."""
    minor = decimal_to_minor_exact(value.to_decimal(), precision_of(currency))
    return "error" if minor is None or minor < 0 else minor


def _stored_minor(value: Decimal128, currency: str) -> int | str:
    try:
        return decimal128_to_minor(value, currency, field="credit")
    except ConflictError:
        return "error"


@settings(max_examples=2000)
@given(coefficient=st.integers(0, 10**34 - 1), exponent=st.integers(-40, 40),
       negative=st.booleans(), currency=st.sampled_from(["USD", "JPY", "BHD", "BTC"]))
def test_decimal128_fast_path_is_exact(
    coefficient: int, exponent: int, negative: bool, currency: str
) -> None:
    value = Decimal128(Decimal(-coefficient if negative else coefficient).scaleb(exponent))
    assert _stored_minor(value, currency) == _exact_minor(value, currency)


@settings(max_examples=2000)
@given(raw=st.binary(min_size=16, max_size=16), currency=st.sampled_from(["USD", "JPY"]))
def test_decimal128_fast_path_on_any_bits(raw: bytes, currency: str) -> None:
    value = Decimal128.from_bid(raw)  # NaN, infinities, non-canonical encodings included
    assert _stored_minor(value, currency) == _exact_minor(value, currency)


def test_walletcore_flag_copies_equal_the_clients_enums() -> None:
    """walletcore stays free of the client library, so it copies two flag values."""
    from tigerbeetle import AccountFlags

    assert AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS == FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS
    assert AccountFlags.HISTORY == FLAG_HISTORY


# --------------------------------------------------------------------------- which write path


def test_a_stray_operation_makes_the_difference_real_even_when_it_closes_it() -> None:
    """A young pending operation that closes the difference exactly is in flight only if a
    write path carries it: with `real_kind` set (no write path does) it is real."""
    tb = MinorBalance.from_posted(1000, 0)
    legacy = MinorBalance.from_posted(1007 - 7, 0)
    carried = OpEffect(kind="credit", amount_minor=7, transaction_id="t1")
    assert classify(legacy, MinorBalance.from_posted(1007, 0),
                    tigerbeetle_only=[carried]).verdict is Verdict.IN_FLIGHT
    for kind in (IssueKind.UNKNOWN_TRANSFER, IssueKind.LOST_LEGACY_WRITE):
        stray = carried.model_copy(update={"real_kind": kind})
        result = classify(legacy, MinorBalance.from_posted(1007, 0), tigerbeetle_only=[stray])
        assert result.verdict is Verdict.REAL and kind in result.reason
    unapplied = carried.model_copy(update={"real_kind": IssueKind.UNAPPLIED_LEGACY_OPERATION})
    result = classify(MinorBalance.from_posted(1007, 0), tb, legacy_only=[unapplied])
    assert result.verdict is Verdict.REAL and result.max_diff_minor == 7
    assert {IssueKind.UNKNOWN_TRANSFER, IssueKind.LOST_LEGACY_WRITE,
            IssueKind.UNAPPLIED_LEGACY_OPERATION, IssueKind.NOT_CLEARED}.isdisjoint(WALLET_ISSUES)


def test_which_phase_carries_a_pending_operation() -> None:
    since = 1_000_000.0
    skew, slack = PHASE_CLOCK_SKEW_S, PHASE_SWITCH_SLACK_S
    for phase in (Phase.DUAL_WRITE, Phase.SHADOW_READ, Phase.READ_CUTOVER):
        window = PhaseWindow(phase=phase, since_s=since)
        assert backlog_may_carry(window, since + 10**6) and backlog_may_carry(window, 0.0)
        assert not reverse_projection_may_carry(window, since + 1)  # MongoDB answers here
    legacy = PhaseWindow(phase=Phase.LEGACY)
    assert not backlog_may_carry(legacy, since) and not reverse_projection_may_carry(legacy, since)
    primary = PhaseWindow(phase=Phase.TB_PRIMARY, since_s=since)
    # MongoDB answered it before tb_primary took effect: still draining to TigerBeetle.
    assert backlog_may_carry(primary, since + slack - 1)
    assert not backlog_may_carry(primary, since + slack + 1)
    # TigerBeetle answered it under tb_primary: the reverse projection owes it to MongoDB.
    assert reverse_projection_may_carry(primary, since - skew + 1)
    assert not reverse_projection_may_carry(primary, since - skew - 1)  # before: MongoDB lost it
    complete = PhaseWindow(phase=Phase.COMPLETE, since_s=since)
    assert not backlog_may_carry(complete, since - 1)
    assert reverse_projection_may_carry(complete, since - 100)  # complete's drain
    assert not reverse_projection_may_carry(complete, since + slack + 1)  # owes MongoDB nothing


def test_made_by_platform_is_the_registry_record_and_its_leg() -> None:
    ledger, account, wallet = 77, 12345, "c1:USA:USD:"
    credit_id = transfer_id("t1")
    record = RegisteredOperation(transaction_id="t1", transfer_id=credit_id, wallet=wallet,
                                 account_id=account, type="credit", amount_minor=700)
    leg = operation_leg(ledger, account, TransferCode.CREDIT)
    made = TransferView(id=credit_id, debit_account_id=leg.debit_account_id,
                        credit_account_id=leg.credit_account_id, amount=700,
                        code=int(TransferCode.CREDIT))
    assert made_by_platform(record, made, wallet=wallet, ledger=ledger)
    # Same money, another id (the twin), or no record at all: not the platform's.
    twin = made.model_copy(update={"id": hash_u128("twin")})
    assert not made_by_platform(record, twin, wallet=wallet, ledger=ledger)
    assert not made_by_platform(None, made, wallet=wallet, ledger=ledger)
    assert not made_by_platform(record, made, wallet="c2:USA:USD:", ledger=ledger)
    for wrong in ({"amount": 701}, {"code": int(TransferCode.DEBIT)},
                  {"debit_account_id": leg.credit_account_id,
                   "credit_account_id": leg.debit_account_id}):
        assert not made_by_platform(record, made.model_copy(update=wrong), wallet=wallet,
                                    ledger=ledger), wrong
    assert not made_by_platform(record, made, wallet=wallet, ledger=ledger + 1)  # system ids
    # Under a record whose id is not derived from its transaction: not the platform's either.
    forged = record.model_copy(update={"transfer_id": twin.id})
    assert not made_by_platform(forged, twin, wallet=wallet, ledger=ledger)
    # A void: its own record, the reversing leg, the id derived from the original.
    vid = void_transfer_id("t1")
    void = RegisteredOperation(transaction_id="v1", transfer_id=vid, wallet=wallet,
                               account_id=account, type="void", amount_minor=700)
    vleg = operation_leg(ledger, account, TransferCode.CREDIT_VOID)
    reversal = TransferView(id=vid, debit_account_id=vleg.debit_account_id,
                            credit_account_id=vleg.credit_account_id, amount=700,
                            code=int(TransferCode.CREDIT_VOID))
    assert made_by_platform(void, reversal, wallet=wallet, ledger=ledger, void_of="t1")
    assert not made_by_platform(void, reversal, wallet=wallet, ledger=ledger, void_of="t2")
    # Held by the opening balance: never a transfer of its own.
    opening = record.model_copy(update={"type": "credit_in_opening"})
    assert not made_by_platform(opening, made, wallet=wallet, ledger=ledger)


def test_a_recheck_clears_only_what_was_pending() -> None:
    first = frozenset({"t1", "t2"})
    assert still_pending(first, ["t2", "t3"])  # t2 pending at both reads: not cleared
    assert not still_pending(first, ["t3"])  # only a newer one pending: still in flight
    assert still_pending(None, ["t3"])  # the first read unknown: nothing shows it cleared
