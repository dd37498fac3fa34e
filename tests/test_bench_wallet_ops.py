"""bench wallet-ops' goals (issue 18) from a run's figures: pure, no servers."""

from __future__ import annotations

from walletmig.bench_wallet_ops import MODES, BenchConfig, RunFigures, _report


def figures(name: str, ops_per_s: float, p95_ms: float) -> RunFigures:
    return RunFigures(name=name, round=0, ops=100, concurrency=1, wallets=1, seconds=1.0,
                      ops_per_s=ops_per_s, p50_ms=p95_ms / 2, p95_ms=p95_ms, p99_ms=p95_ms,
                      cpu_s=0.1)


def test_goals_of_the_four_modes_at_one_caller() -> None:
    runs = [figures("bare", 100, 10), figures("legacy", 80, 15), figures("dual_write", 74, 14),
            figures("tb_primary", 76, 16)]
    report = _report(runs, BenchConfig(ops=100, concurrency=1, rounds=1))
    assert [m.name for m in report.medians] == list(MODES)
    assert report.of_bare_throughput == {"legacy": 0.8, "dual_write": 0.74, "tb_primary": 0.76}
    assert report.goals == {
        "legacy >= 80% of bare throughput": True,
        "dual_write >= 75% of bare throughput": False,
        "tb_primary >= 75% of bare throughput": True,
        "legacy p95 <= 1.5x bare p95 at 1 caller": True,
        "dual_write p95 <= 1.5x bare p95 at 1 caller": True,
        "tb_primary p95 <= 1.5x bare p95 at 1 caller": False,
    }


def test_latency_goal_only_at_one_caller_and_modes_may_be_left_out() -> None:
    runs = [figures("bare", 100, 10), figures("legacy", 90, 30)]
    report = _report(runs, BenchConfig(ops=100, concurrency=8, rounds=1,
                                       modes=("bare", "legacy")))
    assert report.goals == {"legacy >= 80% of bare throughput": True}
