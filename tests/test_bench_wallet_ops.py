"""bench wallet-ops' goals (issue 18) from a run's figures: pure, no servers."""

from __future__ import annotations

from walletmig.bench_wallet_ops import (
    MODES,
    BenchConfig,
    RunFigures,
    _group_commit_split,
    _report,
)


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


def test_each_run_is_judged_against_the_bare_runs_bracketing_it() -> None:
    # Bare's own throughput moves 4x between rounds (a shared host): each run is divided by
    # the bare runs next to it in time, and the goal takes the median of those ratios.
    runs = [figures("bare", 100, 10), figures("legacy", 90, 10), figures("dual_write", 70, 10),
            figures("bare", 100, 10), figures("legacy", 20, 10), figures("bare", 25, 10),
            figures("dual_write", 20, 10), figures("legacy", 21, 10), figures("bare", 25, 10),
            figures("dual_write", 15, 10)]
    report = _report(runs, BenchConfig(ops=100, concurrency=8, rounds=3,
                                       modes=("bare", "legacy", "dual_write")))
    # legacy: 90/100, 20/62.5 (between bare 100 and 25), 21/25; dual_write: 70/100, 20/25,
    # 15/25 (the last bare run only: none after it).
    assert report.of_bare_by_round == {"legacy": [0.9, 0.32, 0.84],
                                       "dual_write": [0.7, 0.8, 0.6]}
    assert report.of_bare_throughput == {"legacy": 0.84, "dual_write": 0.7}
    assert report.legacy_of_bare_throughput == 0.84
    assert report.goals == {"legacy >= 80% of bare throughput": True,
                            "dual_write >= 75% of bare throughput": False}
    assert all(r.of_bare is None for r in report.runs if r.name == "bare")
    assert report.cpu_ms_per_op["legacy"] == {"this": 1.0, "all": 1.0}


def test_group_commit_both_splits_each_wallet_mode_by_it() -> None:
    # Rounds alternate on, off: each run keeps its own bare yardstick.
    runs = [figures("bare", 100, 10), figures("legacy", 80, 10).model_copy(update={
                "cpu_s": 0.5}),
            figures("bare", 100, 10).model_copy(update={"group_commit": False}),
            figures("legacy", 60, 10).model_copy(update={"group_commit": False, "cpu_s": 0.8}),
            figures("bare", 50, 10)]
    report = _report(runs, BenchConfig(ops=100, concurrency=8, rounds=2, group_commit="both",
                                       modes=("bare", "legacy")))
    split = _group_commit_split(report)
    assert split == {"legacy": {"on": {"of_bare": 0.8, "this": 5.0, "all": 5.0},
                                "off": {"of_bare": 0.8, "this": 8.0, "all": 8.0}}}
