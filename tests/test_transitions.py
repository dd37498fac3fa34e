"""Transition table, gates, sticky rollout hash and circuit breaker (pure, property-tested)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walletcore.breaker import BreakerConfig, BreakerState, CircuitBreaker
from walletcore.gates import EVIDENCE_VERSION, Evidence, GateThresholds, ReconciliationFacts
from walletcore.phases import PHASE_ORDER, Phase
from walletcore.rollout import in_rollout, rollout_bucket
from walletcore.transitions import (
    ROLLOUT_STEPS,
    ActionKind,
    Position,
    TransitionRejectedError,
    decide_advance,
    decide_auto_rollback,
    decide_pause,
    decide_rollback,
    decide_set_rollout,
    next_position,
    phase_index,
    require,
)

T = GateThresholds(tb_primary_stable_s=10)
CLEAN_REPORT = ReconciliationFacts(
    run_id="rc-1", finished_at=datetime(2025, 1, 1, tzinfo=UTC), scope=["USD:USA"],
    kind="check", full=True, wallets=10_000, real=0, in_flight=0, conservation_ok=True)
GOOD = Evidence(
    evidence_version=EVIDENCE_VERSION, backfill_complete=True, unapplied_writes=0,
    reconciliation=CLEAN_REPORT, reconciliation_match_rate=1.0,
    last_full_reconciliation_match_rate=1.0, shadow_matches=10_000, shadow_mismatches=0,
    tb_reads=10_000, tb_errors=0, tb_read_p95_ms=1.0, mongo_read_p95_ms=5.0,
    cutover_reads=10_000, cutover_fallbacks=0, phase_age_s=60,
)
EMPTY = Evidence(evidence_version=EVIDENCE_VERSION)

positions = st.builds(
    lambda phase, rollout, paused: Position(
        phase=phase,
        rollout_percent=rollout if phase == Phase.READ_CUTOVER
        else (100 if phase_index(phase) > 3 else 0),
        paused=paused,
    ),
    st.sampled_from(PHASE_ORDER), st.integers(0, 100), st.booleans(),
)


def test_full_advance_path_with_good_evidence() -> None:
    pos = Position()
    seen = []
    while True:
        d = decide_advance(pos, GOOD, T, confirm=True)
        if not d.allowed:
            assert "complete" in d.reason
            break
        seen.append((d.target.phase, d.target.rollout_percent))
        pos = d.target
    assert seen == [
        (Phase.DUAL_WRITE, 0), (Phase.SHADOW_READ, 0),
        *[(Phase.READ_CUTOVER, s) for s in ROLLOUT_STEPS],
        (Phase.TB_PRIMARY, 100), (Phase.COMPLETE, 100),
    ]


@pytest.mark.parametrize(
    ("phase", "rollout", "gate"),
    [
        (Phase.DUAL_WRITE, 0, "gate backfill_complete: measured not complete, threshold complete"),
        (Phase.DUAL_WRITE, 0, "gate unapplied_tb_writes: measured unknown, threshold <= 0"),
        (Phase.DUAL_WRITE, 0, "gate reconciliation_match_rate: measured no report"),
        (Phase.SHADOW_READ, 0, "gate shadow_match_rate: measured no data over 0 samples, "
                               "threshold >= 99.99% with >= 100 samples"),
        (Phase.SHADOW_READ, 0, "gate tb_read_p95_ratio: measured no data, threshold < 0.5"),
        (Phase.READ_CUTOVER, 10, "gate fallback_rate: measured no data over 0 cutover reads"),
        (Phase.READ_CUTOVER, 100, "gate last_full_reconciliation: measured no report in "
                                  "the last 300s, threshold >= 100% in a finished full report"),
        (Phase.TB_PRIMARY, 100, "gate tb_primary_stable: measured 0s in tb_primary"),
    ],
)
def test_advance_without_evidence_names_gate(phase: Phase, rollout: int, gate: str) -> None:
    d = decide_advance(Position(phase=phase, rollout_percent=rollout), EMPTY, T, confirm=True)
    assert not d.allowed
    assert gate in d.reason
    assert d.target == d.source
    with pytest.raises(TransitionRejectedError, match="gate"):
        require(d)


def test_measured_values_in_reasons() -> None:
    ev = GOOD.model_copy(update={"shadow_matches": 9_990, "shadow_mismatches": 10})
    d = decide_advance(Position(phase=Phase.SHADOW_READ), ev, T)
    assert "gate shadow_match_rate: measured 99.9% over 10000 samples, threshold >= 99.99%" \
        in d.reason
    ev = GOOD.model_copy(update={"tb_read_p95_ms": 4.0})
    d = decide_advance(Position(phase=Phase.SHADOW_READ), ev, T)
    assert "TB p95 4.00ms / MongoDB p95 5.00ms = 0.800, threshold < 0.5" in d.reason
    ev = GOOD.model_copy(update={"cutover_fallbacks": 20})
    d = decide_set_rollout(Position(phase=Phase.READ_CUTOVER, rollout_percent=10), 50, ev, T)
    assert "gate fallback_rate: measured 0.2% over 10000 cutover reads" in d.reason


def test_exact_threshold_passes() -> None:
    ev = GOOD.model_copy(update={"shadow_matches": 9_999, "shadow_mismatches": 1})
    assert decide_advance(Position(phase=Phase.SHADOW_READ), ev, T).allowed


def test_in_flight_not_counted_as_mismatch() -> None:
    ev = GOOD.model_copy(update={"shadow_matches": 200, "shadow_in_flight": 50})
    assert ev.shadow_match_rate == 1.0


def test_tb_primary_needs_full_rollout() -> None:
    d = decide_advance(Position(phase=Phase.READ_CUTOVER, rollout_percent=90), GOOD, T)
    assert d.target.rollout_percent == 100  # advance = next rollout step first
    d = decide_advance(Position(phase=Phase.READ_CUTOVER, rollout_percent=100), GOOD, T)
    assert d.allowed and d.target.phase == Phase.TB_PRIMARY


def test_complete_needs_confirmation() -> None:
    d = decide_advance(Position(phase=Phase.TB_PRIMARY, rollout_percent=100), GOOD, T)
    assert not d.allowed and "confirm" in d.reason
    d = decide_advance(Position(phase=Phase.TB_PRIMARY, rollout_percent=100), GOOD, T,
                       confirm=True)
    assert d.allowed and d.target.phase == Phase.COMPLETE


def test_force_advance_needs_reason_and_skips_gates() -> None:
    pos = Position(phase=Phase.DUAL_WRITE)
    assert not decide_advance(pos, EMPTY, T, force=True).allowed
    d = decide_advance(pos, EMPTY, T, force=True, reason="backfill verified by hand")
    assert d.allowed and d.action == ActionKind.FORCE_ADVANCE
    assert d.target.phase == Phase.SHADOW_READ and "forced past 3 failed gate" in d.reason


def test_paused_rejects_advance_but_allows_rollback() -> None:
    pos = Position(phase=Phase.SHADOW_READ, paused=True)
    assert "paused" in decide_advance(pos, GOOD, T).reason
    assert decide_rollback(pos, Phase.DUAL_WRITE).allowed
    assert not decide_pause(pos, True).allowed
    assert decide_pause(pos, False).target.paused is False


def test_rollback_rules() -> None:
    pos = Position(phase=Phase.TB_PRIMARY, rollout_percent=100)
    d = decide_rollback(pos, Phase.READ_CUTOVER)
    assert d.allowed and d.target.rollout_percent == 100
    assert decide_rollback(pos, Phase.READ_CUTOVER, 50).target.rollout_percent == 50
    assert decide_rollback(pos, Phase.LEGACY).target == Position(phase=Phase.LEGACY)
    assert "not earlier" in decide_rollback(pos, Phase.TB_PRIMARY).reason
    assert "only applies" in decide_rollback(pos, Phase.LEGACY, 10).reason
    done = Position(phase=Phase.COMPLETE, rollout_percent=100)
    assert "no longer possible" in decide_rollback(done, Phase.TB_PRIMARY).reason


def test_set_rollout_rules() -> None:
    pos = Position(phase=Phase.READ_CUTOVER, rollout_percent=50)
    assert decide_set_rollout(pos, 10, EMPTY, T).allowed  # lowering needs no evidence
    assert not decide_set_rollout(pos, 60, EMPTY, T).allowed
    assert decide_set_rollout(pos, 60, GOOD, T).allowed
    assert "read_cutover only" in decide_set_rollout(Position(), 10, GOOD, T).reason
    assert "already" in decide_set_rollout(pos, 50, GOOD, T).reason
    assert "outside" in decide_set_rollout(pos, 101, GOOD, T).reason


def test_auto_rollback() -> None:
    pos = Position(phase=Phase.READ_CUTOVER, rollout_percent=50)
    assert decide_auto_rollback(pos, GOOD, T) is None
    bad = GOOD.model_copy(update={"tb_errors": 200})
    d = decide_auto_rollback(pos, bad, T)
    assert d is not None and d.target == Position(phase=Phase.SHADOW_READ)
    assert "error rate 2% over 10000 reads >= 1%" in d.reason
    few = Evidence(tb_reads=10, tb_errors=10)
    assert decide_auto_rollback(pos, few, T) is None  # not enough samples
    mism = GOOD.model_copy(update={"shadow_mismatches": 500})
    d = decide_auto_rollback(Position(phase=Phase.SHADOW_READ), mism, T)
    assert d is not None and d.target.phase == Phase.DUAL_WRITE
    d = decide_auto_rollback(Position(phase=Phase.TB_PRIMARY, rollout_percent=100), bad, T)
    assert d is not None and d.target == Position(phase=Phase.READ_CUTOVER, rollout_percent=100)
    assert decide_auto_rollback(pos.model_copy(update={"paused": True}), bad, T) is None
    off = T.model_copy(update={"auto_rollback_enabled": False})
    assert decide_auto_rollback(pos, bad, off) is None


@given(positions, st.sampled_from(PHASE_ORDER), st.booleans())
@settings(max_examples=300)
def test_property_decisions_are_consistent(pos: Position, to: Phase, good: bool) -> None:
    ev = GOOD if good else EMPTY
    for d in (decide_advance(pos, ev, T, confirm=True), decide_rollback(pos, to),
              decide_advance(pos, ev, T, force=True, reason="x")):
        if not d.allowed:
            assert d.reason and d.target == d.source  # rejected = nothing changes
            continue
        tgt = d.target
        assert 0 <= tgt.rollout_percent <= 100
        if tgt.phase != Phase.READ_CUTOVER:
            assert tgt.rollout_percent == (100 if phase_index(tgt.phase) > 3 else 0)
        if d.action == ActionKind.ROLLBACK:
            assert phase_index(tgt.phase) < phase_index(pos.phase)
            assert pos.phase != Phase.COMPLETE
        else:
            assert not pos.paused
            assert tgt == next_position(pos)
            # advance moves exactly one step: next phase or a higher rollout in read cutover
            assert (phase_index(tgt.phase) == phase_index(pos.phase) + 1) or (
                tgt.phase == pos.phase == Phase.READ_CUTOVER
                and tgt.rollout_percent > pos.rollout_percent)
    if not good and pos.phase in (Phase.DUAL_WRITE, Phase.SHADOW_READ, Phase.TB_PRIMARY):
        assert not decide_advance(pos, EMPTY, T, confirm=True).allowed


@given(st.text(min_size=1, max_size=40), st.integers(0, 100), st.integers(0, 100))
@settings(max_examples=300)
def test_property_rollout_sticky_and_monotone(client: str, a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert in_rollout(client, low) == in_rollout(client, low)  # deterministic
    if in_rollout(client, low):
        assert in_rollout(client, high)  # raising never drops a client
    assert not in_rollout(client, 0)
    assert in_rollout(client, 100)


def test_rollout_fraction_close_to_percent() -> None:
    clients = [f"client-{i}" for i in range(20_000)]
    for percent in (10, 50, 90):
        share = sum(in_rollout(c, percent) for c in clients) / len(clients)
        assert abs(share - percent / 100) < 0.02
    assert rollout_bucket("a") != rollout_bucket("a", salt="other") or True


def test_breaker_state_machine() -> None:
    b = CircuitBreaker(BreakerConfig(failure_threshold=3, open_ms=100, half_open_probes=1))
    assert b.allow(0)
    for t in range(2):
        b.record_failure(t)
    assert b.state == BreakerState.CLOSED
    b.record_success(2)
    assert b.consecutive_failures == 0
    for t in range(3):
        b.record_failure(t)
    assert b.state == BreakerState.OPEN and not b.allow(50)
    assert b.allow(103) and b.state == BreakerState.HALF_OPEN
    assert not b.allow(104)  # one probe at a time
    b.record_failure(105)
    assert b.state == BreakerState.OPEN and not b.allow(150)
    assert b.allow(206)
    b.record_success(207)
    assert b.state == BreakerState.CLOSED and b.allow(208)
    assert b.times_opened == 2


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 500)), max_size=200))
def test_property_breaker_closed_while_open(events: list[tuple[bool, int]]) -> None:
    b = CircuitBreaker(BreakerConfig(failure_threshold=2, open_ms=100))
    now = 0
    for ok, step in events:
        now += step
        was_open_recently = b.state == BreakerState.OPEN and now - b.opened_at_ms < 100
        allowed = b.allow(now)
        if was_open_recently:
            assert not allowed
        if allowed:
            (b.record_success if ok else b.record_failure)(now)
