"""Gate evidence, thresholds and evaluation for the migration phases (no I/O).

A gate compares one measured value with one threshold and explains itself as
"gate NAME: measured X, threshold Y". The migration workflow collects `Evidence` through an
activity and evaluates gates here, so validators stay deterministic and replay-safe.
Missing evidence never passes a gate: "no data" is not proof of safety.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from walletcore.phases import Phase
from walletcore.reconcile import gate_findings, match_rate

GLOBAL_SCOPE = "*"  # a migration (and MigrationState) scope covering every ledger pair
WINDOW_S_MAX = 7 * 24 * 3600
RATE_EPSILON = 1e-12  # float rates: 9999/10000 must pass a 0.9999 threshold
# Evidence payloads of version 1 were recorded before reconciliation evidence was a whole
# report: recorded histories must decide their updates as they did then (replay), so the
# reconciliation gates judge a version-1 payload by its rates alone. The evidence activity
# always writes the current version.
EVIDENCE_VERSION = 2
SKIPPED_REPORTS_SHOWN_MAX = 3


class GateThresholds(BaseModel):
    """Defaults are the migration plan's criteria; windows are seconds so tests can shrink them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window_s: int = Field(default=300, ge=1, le=WINDOW_S_MAX)
    min_reconciliation_match_rate: float = Field(default=0.9999, ge=0, le=1)
    min_shadow_match_rate: float = Field(default=0.9999, ge=0, le=1)
    min_shadow_samples: int = Field(default=100, ge=1, le=10_000_000)
    max_tb_p95_ratio: float = Field(default=0.5, gt=0, le=100)
    max_fallback_rate: float = Field(default=0.001, ge=0, le=1)
    min_cutover_samples: int = Field(default=100, ge=1, le=10_000_000)
    max_unapplied_writes: int = Field(default=0, ge=0)
    tb_primary_stable_s: int = Field(default=600, ge=0, le=WINDOW_S_MAX)
    auto_rollback_enabled: bool = True
    auto_rollback_error_rate: float = Field(default=0.01, gt=0, le=1)
    auto_rollback_mismatch_rate: float = Field(default=0.01, gt=0, le=1)
    auto_rollback_min_samples: int = Field(default=50, ge=1, le=10_000_000)


class ReconciliationFacts(BaseModel):
    """What a gate reads of one finished reconciliation report (stores.reports writes it)."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    finished_at: datetime
    scope: list[str]  # the ledger pairs the run compared
    covers_all_pairs: bool = False  # the pairs were every pair of the deployment's table
    kind: str  # walletcore.reconcile.ReportKind
    full: bool  # wallets, TigerBeetle accounts, Transfer Registry and conservation all checked
    wallets: int = Field(ge=0)  # legacy wallets compared
    real: int = Field(ge=0)  # wallets with a real difference
    in_flight: int = Field(ge=0)  # still in flight after the re-check
    findings: dict[str, int] = Field(default_factory=dict)  # by class, conservation included
    conservation_ok: bool

    @property
    def match_rate(self) -> float | None:
        return match_rate(self.wallets, self.real)

    def covers(self, scopes: Sequence[str]) -> bool:
        """Every pair of a migration's scope compared ('*': every pair of the table)."""
        if GLOBAL_SCOPE in scopes:
            return self.covers_all_pairs
        return set(scopes) <= set(self.scope)

    def blockers(self) -> list[str]:
        """Why this report cannot open a gate, whatever its match rate."""
        found = [f"{kind} {n}" for kind, n in gate_findings(self.findings).items()]
        reasons = [f"findings: {', '.join(found)}"] if found else []
        if not self.conservation_ok and "conservation" not in self.findings:
            reasons.append("money not conserved")
        if self.in_flight:
            reasons.append(f"{self.in_flight} wallet(s) still in flight after the re-check")
        return reasons


def choose_report(
    reports: Sequence[ReconciliationFacts], scopes: Sequence[str], since: datetime
) -> tuple[ReconciliationFacts | None, str | None]:
    """The newest finished, full report covering the whole scope since `since` (the window),
    and when there is none, a note on the newest reports passed over and why. A newer report
    with findings is not skipped for an older clean one: the newest covering report speaks."""
    skipped: list[str] = []
    for report in sorted(reports, key=lambda r: r.finished_at, reverse=True):
        why = ("finished before the window" if report.finished_at < since
               else "partial" if not report.full
               else f"covers {', '.join(report.scope) or 'nothing'} only"
               if not report.covers(scopes) else None)
        if why is None:
            return report, None
        if len(skipped) < SKIPPED_REPORTS_SHOWN_MAX:
            skipped.append(f"{report.run_id}: {why}")
    return None, "; ".join(skipped) or None


class Evidence(BaseModel):
    """What the evidence activity measured over the window. `None` = could not be measured."""

    model_config = ConfigDict(frozen=True)

    evidence_version: int = Field(default=1, ge=1)  # see EVIDENCE_VERSION
    collected_at: datetime | None = None
    window_s: int = Field(default=0, ge=0)
    backfill_complete: bool = False
    # `backfill --with-history` imports still running on the scope's pairs: imported transfers
    # must be newer than every transfer, so no normal write may reach TigerBeetle before they end.
    history_imports_running: int = Field(default=0, ge=0)
    unapplied_writes: int | None = Field(default=None, ge=0)
    # The report the reconciliation gates judge (choose_report; version 2) and, when there is
    # none, which reports were passed over and why. The rates below are that report's (in
    # version 1: the latest report in the window, and the latest full one of any age).
    reconciliation: ReconciliationFacts | None = None
    reconciliation_note: str | None = None
    reconciliation_match_rate: float | None = Field(default=None, ge=0, le=1)
    reconciliation_at: datetime | None = None
    last_full_reconciliation_match_rate: float | None = Field(default=None, ge=0, le=1)
    last_full_reconciliation_at: datetime | None = None
    # Shadow reads: compared = matches + mismatches; in-flight and TB errors are apart.
    shadow_matches: int = Field(default=0, ge=0)
    shadow_mismatches: int = Field(default=0, ge=0)
    shadow_in_flight: int = Field(default=0, ge=0)
    # Every TigerBeetle read (shadow, cutover, primary) and the ones that failed or timed out.
    tb_reads: int = Field(default=0, ge=0)
    tb_errors: int = Field(default=0, ge=0)
    tb_read_p95_ms: float | None = Field(default=None, ge=0)
    mongo_read_p95_ms: float | None = Field(default=None, ge=0)
    # Read-cutover reads routed to TigerBeetle and the ones that fell back to MongoDB.
    cutover_reads: int = Field(default=0, ge=0)
    cutover_fallbacks: int = Field(default=0, ge=0)
    # Filled in by the workflow: seconds since the current phase was entered.
    phase_age_s: float = Field(default=0, ge=0)

    @property
    def shadow_compared(self) -> int:
        return self.shadow_matches + self.shadow_mismatches

    @property
    def shadow_match_rate(self) -> float | None:
        compared = self.shadow_compared
        return None if compared == 0 else self.shadow_matches / compared

    @property
    def fallback_rate(self) -> float | None:
        return None if self.cutover_reads == 0 else self.cutover_fallbacks / self.cutover_reads

    @property
    def error_rate(self) -> float | None:
        return None if self.tb_reads == 0 else self.tb_errors / self.tb_reads

    @property
    def latency_ratio(self) -> float | None:
        if self.tb_read_p95_ms is None or not self.mongo_read_p95_ms:
            return None
        return self.tb_read_p95_ms / self.mongo_read_p95_ms


class GateResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    passed: bool
    measured: str
    threshold: str

    @property
    def reason(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return f"gate {self.name}: measured {self.measured}, threshold {self.threshold} ({verdict})"


def pct(rate: float | None) -> str:
    return "no data" if rate is None else f"{rate * 100:.4g}%"


def _rate_at_least(name: str, rate: float | None, samples: int, minimum: float,
                   min_samples: int = 1) -> GateResult:
    measured = f"{pct(rate)} over {samples} samples"
    passed = rate is not None and samples >= min_samples and rate + RATE_EPSILON >= minimum
    threshold = f">= {pct(minimum)}"
    if min_samples > 1:
        threshold += f" with >= {min_samples} samples"
    return GateResult(name=name, passed=passed, measured=measured, threshold=threshold)


def gate_backfill(ev: Evidence, _t: GateThresholds) -> GateResult:
    return GateResult(name="backfill_complete", passed=ev.backfill_complete,
                      measured="complete" if ev.backfill_complete else "not complete",
                      threshold="complete")


def gate_unapplied(ev: Evidence, t: GateThresholds) -> GateResult:
    n = ev.unapplied_writes
    passed = n is not None and n <= t.max_unapplied_writes
    return GateResult(name="unapplied_tb_writes", passed=passed,
                      measured="unknown" if n is None else str(n),
                      threshold=f"<= {t.max_unapplied_writes}")


def gate_unapplied_reverse(ev: Evidence, t: GateThresholds) -> GateResult:
    """In tb_primary the evidence counts operations TigerBeetle answered that the reverse
    projection has not written to MongoDB within a short grace (stuck, not in flight):
    complete archives MongoDB, so it must be able to receive them; it drains the rest."""
    n = ev.unapplied_writes
    passed = n is not None and n <= t.max_unapplied_writes
    return GateResult(name="unapplied_mongodb_writes", passed=passed,
                      measured="unknown" if n is None else f"{n} (reverse projection backlog)",
                      threshold=f"<= {t.max_unapplied_writes}")


def _report_gate(name: str, ev: Evidence, t: GateThresholds, minimum: float) -> GateResult:
    """A reconciliation gate on the report choose_report picked: it passes only on a finished,
    full report covering the scope inside the window, which compared at least one wallet,
    whose match rate reaches `minimum`, with no other finding, money conserved and nothing
    left in flight after the re-check."""
    r = ev.reconciliation
    threshold = (f">= {pct(minimum)} in a finished full report covering the scope in the "
                 f"last {t.window_s}s, no other finding, nothing in flight")
    if r is None:
        note = f" ({ev.reconciliation_note})" if ev.reconciliation_note else ""
        return GateResult(name=name, passed=False, threshold=threshold,
                          measured=f"no report in the last {t.window_s}s{note}")
    rate = r.match_rate
    if rate is None:
        return GateResult(name=name, passed=False, threshold=threshold,
                          measured=f"no data: report {r.run_id} compared 0 wallets")
    blockers = r.blockers()
    measured = f"{pct(rate)} over {r.wallets} wallets (report {r.run_id})"
    if blockers:
        measured += "; " + "; ".join(blockers)
    return GateResult(name=name, passed=not blockers and rate + RATE_EPSILON >= minimum,
                      measured=measured, threshold=threshold)


def gate_reconciliation(ev: Evidence, t: GateThresholds) -> GateResult:
    if ev.evidence_version >= 2:
        return _report_gate("reconciliation_match_rate", ev, t, t.min_reconciliation_match_rate)
    rate = ev.reconciliation_match_rate  # version 1 (recorded histories): as it was decided
    return GateResult(
        name="reconciliation_match_rate",
        passed=rate is not None and rate + RATE_EPSILON >= t.min_reconciliation_match_rate,
        measured=f"{pct(rate)} (report in the last {t.window_s}s)" if rate is not None
        else f"no report in the last {t.window_s}s",
        threshold=f">= {pct(t.min_reconciliation_match_rate)}",
    )


def gate_history_import(ev: Evidence, _t: GateThresholds) -> GateResult:
    running = ev.history_imports_running
    return GateResult(name="history_import_finished", passed=running == 0,
                      measured=f"{running} history import(s) running" if running
                      else "none running", threshold="none running")


def gate_shadow_match(ev: Evidence, t: GateThresholds) -> GateResult:
    return _rate_at_least("shadow_match_rate", ev.shadow_match_rate, ev.shadow_compared,
                          t.min_shadow_match_rate, t.min_shadow_samples)


def gate_latency(ev: Evidence, t: GateThresholds) -> GateResult:
    ratio = ev.latency_ratio
    measured = ("no data" if ratio is None else
                f"TB p95 {ev.tb_read_p95_ms:.2f}ms / MongoDB p95 {ev.mongo_read_p95_ms:.2f}ms"
                f" = {ratio:.3f}")
    passed = ratio is not None and ratio < t.max_tb_p95_ratio
    return GateResult(name="tb_read_p95_ratio", passed=passed,
                      measured=measured, threshold=f"< {t.max_tb_p95_ratio:g}")


def gate_fallback(ev: Evidence, t: GateThresholds) -> GateResult:
    rate = ev.fallback_rate
    passed = (rate is not None and ev.cutover_reads >= t.min_cutover_samples
              and rate < t.max_fallback_rate + RATE_EPSILON)
    return GateResult(name="fallback_rate", passed=passed,
                      measured=f"{pct(rate)} over {ev.cutover_reads} cutover reads",
                      threshold=f"< {pct(t.max_fallback_rate)} with >= "
                                f"{t.min_cutover_samples} reads")


def gate_full_reconciliation(ev: Evidence, t: GateThresholds) -> GateResult:
    if ev.evidence_version >= 2:
        return _report_gate("last_full_reconciliation", ev, t, 1.0)
    rate = ev.last_full_reconciliation_match_rate  # version 1 (recorded histories)
    return GateResult(name="last_full_reconciliation", passed=rate is not None and rate >= 1.0,
                      measured=pct(rate), threshold="= 100%")


def gate_primary_stable(ev: Evidence, t: GateThresholds) -> GateResult:
    rate = ev.error_rate
    stable = ev.phase_age_s >= t.tb_primary_stable_s and (
        rate is None or rate < t.auto_rollback_error_rate)
    return GateResult(name="tb_primary_stable", passed=stable,
                      measured=f"{ev.phase_age_s:.0f}s in tb_primary, error rate {pct(rate)}",
                      threshold=f">= {t.tb_primary_stable_s}s, error rate < "
                                f"{pct(t.auto_rollback_error_rate)}")


def rollout_full(rollout_percent: int) -> GateResult:
    return GateResult(name="rollout_percent", passed=rollout_percent == 100,
                      measured=f"{rollout_percent}%", threshold="= 100%")


Gate = Callable[[Evidence, GateThresholds], GateResult]

# Gates to enter each phase (raising the read-cutover rollout uses RAISE_ROLLOUT_GATES).
ENTRY_GATES: dict[Phase, tuple[Gate, ...]] = {
    Phase.LEGACY: (),
    Phase.DUAL_WRITE: (gate_history_import,),
    Phase.SHADOW_READ: (gate_backfill, gate_unapplied, gate_reconciliation),
    Phase.READ_CUTOVER: (gate_shadow_match, gate_latency),
    Phase.TB_PRIMARY: (gate_full_reconciliation, gate_unapplied),
    Phase.COMPLETE: (gate_primary_stable, gate_unapplied_reverse),
}
RAISE_ROLLOUT_GATES: tuple[Gate, ...] = (gate_fallback,)


def evaluate(gates: tuple[Gate, ...], ev: Evidence, t: GateThresholds) -> list[GateResult]:
    return [gate(ev, t) for gate in gates]


def failed_reasons(results: list[GateResult]) -> list[str]:
    return [r.reason for r in results if not r.passed]
