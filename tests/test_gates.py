"""The reconciliation gates on report evidence (pure): which report speaks for a migration's
scope, and why a report that compared nothing, found something, lost money or still had
wallets in flight keeps a gate shut. The same cases through the real workflows:
tests/test_gates_evidence.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from walletcore.gates import (
    EVIDENCE_VERSION,
    Evidence,
    GateThresholds,
    ReconciliationFacts,
    choose_report,
    gate_full_reconciliation,
    gate_reconciliation,
)
from walletcore.reconcile import IssueKind

NOW = datetime(2025, 1, 1, 12, tzinfo=UTC)
T = GateThresholds(window_s=300)
SINCE = NOW - timedelta(seconds=T.window_s)


def report(run_id: str = "rc-1", **kw: object) -> ReconciliationFacts:
    fields: dict[str, object] = dict(
        run_id=run_id, finished_at=NOW, scope=["USD:USA", "MXN:MEX"], kind="check", full=True,
        wallets=10_000, real=0, in_flight=0, conservation_ok=True)
    fields.update(kw)
    return ReconciliationFacts.model_validate(fields)


def evidence(r: ReconciliationFacts | None, note: str | None = None) -> Evidence:
    return Evidence(evidence_version=EVIDENCE_VERSION, reconciliation=r,
                    reconciliation_note=note)


def test_clean_full_covering_report_passes_both_gates() -> None:
    ev = evidence(report())
    assert gate_reconciliation(ev, T).passed
    assert gate_full_reconciliation(ev, T).passed
    assert "100% over 10000 wallets (report rc-1)" in gate_reconciliation(ev, T).reason


def test_choose_report_takes_the_newest_full_covering_one_in_the_window() -> None:
    other_pair = report("rc-other", scope=["EUR:ESP"], finished_at=NOW)
    partial = report("rc-partial", full=False, finished_at=NOW - timedelta(seconds=1))
    old = report("rc-old", finished_at=SINCE - timedelta(seconds=1))
    good = report("rc-good", finished_at=NOW - timedelta(seconds=2))
    chosen, note = choose_report([old, good, partial, other_pair], ["USD:USA"], SINCE)
    assert chosen == good and note is None
    chosen, note = choose_report([old, partial, other_pair], ["USD:USA"], SINCE)
    assert chosen is None
    assert note == ("rc-other: covers EUR:ESP only; rc-partial: partial; "
                    "rc-old: finished before the window")


def test_a_newer_report_with_findings_is_not_skipped_for_an_older_clean_one() -> None:
    bad = report("rc-bad", findings={IssueKind.MISSING_TRANSFER: 1})
    clean = report("rc-clean", finished_at=NOW - timedelta(seconds=5))
    chosen, _ = choose_report([clean, bad], ["USD:USA"], SINCE)
    assert chosen == bad


def test_global_scope_needs_a_report_over_every_pair() -> None:
    assert not report().covers(["*"])
    assert report(covers_all_pairs=True).covers(["*"])
    assert report().covers(["MXN:MEX"]) and not report().covers(["MXN:MEX", "EUR:ESP"])


def test_no_report_keeps_the_gate_shut_with_the_reports_passed_over() -> None:
    result = gate_reconciliation(evidence(None, "rc-other: covers EUR:ESP only"), T)
    assert not result.passed
    assert "measured no report in the last 300s (rc-other: covers EUR:ESP only)" in result.reason


def test_nothing_compared_is_no_data_never_100_percent() -> None:
    for gate in (gate_reconciliation, gate_full_reconciliation):
        result = gate(evidence(report(wallets=0)), T)
        assert not result.passed
        assert "no data: report rc-1 compared 0 wallets" in result.reason


def test_findings_of_any_other_class_fail_with_their_class() -> None:
    for kind in (IssueKind.MISSING_TRANSFER, IssueKind.TRANSFER_MISMATCH,
                 IssueKind.UNREGISTERED_TB_ACCOUNT, IssueKind.REGISTRY_WITHOUT_WALLET,
                 IssueKind.MALFORMED_REGISTRY):
        result = gate_reconciliation(evidence(report(findings={kind: 2})), T)
        assert not result.passed and f"findings: {kind} 2" in result.reason


def test_money_not_conserved_fails() -> None:
    r = report(conservation_ok=False, findings={IssueKind.CONSERVATION: 1})
    result = gate_reconciliation(evidence(r), T)
    assert not result.passed and "findings: conservation 1" in result.reason
    result = gate_reconciliation(evidence(report(conservation_ok=False)), T)
    assert not result.passed and "money not conserved" in result.reason


def test_in_flight_must_clear_on_the_recheck() -> None:
    result = gate_reconciliation(evidence(report(in_flight=1)), T)
    assert not result.passed
    assert "1 wallet(s) still in flight after the re-check" in result.reason


def test_wallet_differences_are_judged_by_the_rate() -> None:
    one_in_10k = report(real=1, findings={IssueKind.BALANCE_MISMATCH: 1})
    assert gate_reconciliation(evidence(one_in_10k), T).passed  # 99.99 %: the plan's bar
    assert not gate_full_reconciliation(evidence(one_in_10k), T).passed  # tb_primary: 100 %
    two = report(real=2, findings={IssueKind.BALANCE_MISMATCH: 2})
    assert not gate_reconciliation(evidence(two), T).passed


def test_version_1_evidence_is_judged_as_it_was_recorded() -> None:
    """Histories recorded before report evidence carried only the rates: replay decides
    their updates as they were decided (walletcore.gates.EVIDENCE_VERSION)."""
    old = Evidence(reconciliation_match_rate=1.0, last_full_reconciliation_match_rate=1.0)
    assert old.evidence_version == 1
    assert gate_reconciliation(old, T).passed and gate_full_reconciliation(old, T).passed
    assert not gate_reconciliation(Evidence(), T).passed
