"""`walletmig bench metrics`: what the store and TigerBeetle timers cost per wallet operation.

Why not the wallet-ops throughput: on a shared 2-core machine its rounds differ by +-10-20 %,
far above the 3 % goal, so an on/off throughput ratio cannot show it. This measures the cost
where it is spent, in two parts:

1. the timers' CPU per call: an instrumented no-op store method (observability.metrics'
   `_timed`, the wrapper every store operation goes through) and `timed_tigerbeetle` around a
   no-op request, with metrics on and off in interleaved rounds (on, off, on, ...), CPU time
   (time.process_time) per call, median of the rounds; on - off = the timers' cost per call;
   plus `observe_migration_state` as every wallet write calls it (state unchanged);
2. how many timed calls one wallet operation makes, and what one costs: a real
   `bench wallet-ops` run (one round, metrics on) on the running stack; the Prometheus
   counters' deltas (store operations per store, TigerBeetle requests) over its operations, and
   its CPU per operation (this process = client + in-process worker, and every process).

cost per wallet operation = calls per operation x cost per call, printed as a % of that
operation's measured CPU (goal: <= 3 %).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import REGISTRY
from pydantic import BaseModel

from observability.metrics import (
    instrument_methods,
    observe_migration_state,
    set_enabled,
    timed_tigerbeetle,
)
from walletconfig.settings import Settings
from walletmig.bench_wallet_ops import BenchConfig, BenchReport, run_bench

CALLS_MAX = 10_000_000
ROUNDS_MAX = 100
GOAL_COST = 0.03
SCOPE = "BENCH:MET"


class _NoOpStore:
    """A store whose operation does nothing: what is timed is the wrapper alone."""

    async def credit(self, _operation: object) -> None:
        return None


instrument_methods(_NoOpStore, "bench_noop", {"credit": "credit"}, lambda _exc: False)


async def _no_request() -> None:
    return None


class CallCost(BaseModel):
    name: str
    on_ns: float  # median CPU per call over the rounds, metrics on
    off_ns: float
    cost_ns: float  # on - off


class ModeCost(BaseModel):
    mode: str
    ops: int
    store_calls_per_op: float
    tb_requests_per_op: float
    cpu_us_per_op_this: float  # this process (client + in-process worker)
    cpu_us_per_op_all: float  # this process + the stack's servers
    metrics_us_per_op: float
    of_this_cpu: float  # metrics_us_per_op / cpu_us_per_op_this
    of_all_cpu: float


class MetricsBenchReport(BaseModel):
    calls: int
    rounds: int
    per_call: list[CallCost]
    modes: list[ModeCost]
    goal_met: bool


@dataclass
class MetricsBenchConfig:
    calls: int = 200_000  # per round and kind
    rounds: int = 10  # on/off pairs
    ops: int = 400  # wallet operations per mode of the real run
    concurrency: int = 50

    def __post_init__(self) -> None:
        assert 0 < self.calls <= CALLS_MAX, f"--calls must be 1..{CALLS_MAX}"
        assert 0 < self.rounds <= ROUNDS_MAX, f"--rounds must be 1..{ROUNDS_MAX}"
        assert self.ops > 0 and self.concurrency > 0


async def _cpu_ns_per_call(call: Callable[[], Awaitable[None]], calls: int) -> float:
    started = time.process_time_ns()
    for _ in range(calls):
        await call()
    return (time.process_time_ns() - started) / calls


async def per_call_costs(calls: int, rounds: int) -> list[CallCost]:
    """Each kind's CPU per call with the timers on and off, rounds interleaved."""
    store = _NoOpStore()

    async def store_call() -> None:
        await store.credit(None)

    async def tb_call() -> None:
        await timed_tigerbeetle("bench_noop", _no_request(), ())

    async def state_call() -> None:  # every wallet write publishes the state it acts on
        observe_migration_state(SCOPE, "legacy", 0, 1)

    kinds: dict[str, Callable[[], Awaitable[None]]] = {
        "store operation timer": store_call, "tigerbeetle request timer": tb_call,
        "migration state gauge": state_call,
    }  # fmt: skip
    samples: dict[str, dict[bool, list[float]]] = {k: {True: [], False: []} for k in kinds}
    try:
        for round_no in range(2 * rounds):
            enabled = round_no % 2 == 0
            set_enabled(enabled)
            for name, call in kinds.items():
                if name == "migration state gauge" and not enabled:
                    samples[name][False].append(await _cpu_ns_per_call(_nothing, calls))
                    continue
                samples[name][enabled].append(await _cpu_ns_per_call(call, calls))
    finally:
        set_enabled(True)
    out = []
    for name, by_mode in samples.items():
        on, off = statistics.median(by_mode[True]), statistics.median(by_mode[False])
        out.append(CallCost(name=name, on_ns=round(on, 1), off_ns=round(off, 1),
                            cost_ns=round(max(on - off, 0.0), 1)))
    return out


async def _nothing() -> None:
    return None


def _counter_sums() -> dict[str, float]:
    """Timed store calls per store and TigerBeetle requests, from this process's registry."""
    sums = {"mongodb": 0.0, "tigerbeetle": 0.0, "tb_requests": 0.0}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == "walletmig_store_operation_seconds_count":
                store = sample.labels.get("store", "")
                if store in sums:
                    sums[store] += sample.value
            elif sample.name == "walletmig_tigerbeetle_request_seconds_count":
                sums["tb_requests"] += sample.value
    return sums


def mode_costs(report: BenchReport, moved: dict[str, float], ops_per_mode: int,
               per_call: list[CallCost]) -> list[ModeCost]:
    """legacy: one MongoDB store call per write; dual_write: the rest of the MongoDB calls
    plus every TigerBeetle store call and request (the legacy pair never touches TigerBeetle).
    Each mode's MongoDB calls are taken as half of the run's (both modes send as many)."""
    cost = {c.name: c.cost_ns for c in per_call}
    medians = {r.name: r for r in report.medians}
    mongodb_each = moved["mongodb"] / 2
    calls = {
        "legacy": (mongodb_each, 0.0),
        "dual_write": (mongodb_each + moved["tigerbeetle"], moved["tb_requests"]),
    }
    out = []
    for mode, (store_calls, tb_requests) in calls.items():
        run = medians[mode]
        per_op_store, per_op_tb = store_calls / ops_per_mode, tb_requests / ops_per_mode
        metrics_ns = (per_op_store * cost["store operation timer"]
                      + per_op_tb * cost["tigerbeetle request timer"]
                      + cost["migration state gauge"])
        this_us = run.cpu_s * 1e6 / run.ops
        all_us = run.cpu_ms_per_op() * 1000
        out.append(ModeCost(
            mode=mode, ops=run.ops, store_calls_per_op=round(per_op_store, 2),
            tb_requests_per_op=round(per_op_tb, 2), cpu_us_per_op_this=round(this_us, 1),
            cpu_us_per_op_all=round(all_us, 1), metrics_us_per_op=round(metrics_ns / 1000, 2),
            of_this_cpu=metrics_ns / 1000 / this_us, of_all_cpu=metrics_ns / 1000 / all_us,
        ))  # fmt: skip
    return out


async def run_metrics_bench(settings: Settings, config: MetricsBenchConfig) -> MetricsBenchReport:
    per_call = await per_call_costs(config.calls, config.rounds)
    before = _counter_sums()
    wallets = config.concurrency  # bench wallet-ops' default: one wallet per caller
    report = await run_bench(settings, BenchConfig(
        ops=config.ops, concurrency=config.concurrency, rounds=1, metrics="on",
        modes=("bare", "legacy", "dual_write")))  # mode_costs splits the calls of these two
    after = _counter_sums()
    moved = {k: after[k] - before[k] for k in after}
    # Each mode also warms up one operation per wallet before its timed run.
    modes = mode_costs(report, moved, config.ops + wallets, per_call)
    return MetricsBenchReport(
        calls=config.calls, rounds=config.rounds, per_call=per_call, modes=modes,
        goal_met=all(m.of_this_cpu <= GOAL_COST for m in modes),
    )


def format_report(report: MetricsBenchReport) -> str:
    lines = [f"timer CPU per call ({report.rounds} on/off round pairs of {report.calls} calls, "
             "medians):",
             f"  {'kind':<28} {'on ns':>9} {'off ns':>9} {'cost ns':>9}"]
    lines += [f"  {c.name:<28} {c.on_ns:>9.1f} {c.off_ns:>9.1f} {c.cost_ns:>9.1f}"
              for c in report.per_call]
    lines.append("per wallet operation (a real `bench wallet-ops` round, metrics on):")
    lines.append(f"  {'mode':<11} {'store calls':>11} {'tb requests':>11} {'cpu us this':>11} "
                 f"{'cpu us all':>10} {'metrics us':>10} {'% this':>7} {'% all':>6}")
    for m in report.modes:
        lines.append(
            f"  {m.mode:<11} {m.store_calls_per_op:>11.2f} {m.tb_requests_per_op:>11.2f} "
            f"{m.cpu_us_per_op_this:>11.1f} {m.cpu_us_per_op_all:>10.1f} "
            f"{m.metrics_us_per_op:>10.2f} {m.of_this_cpu:>7.2%} {m.of_all_cpu:>6.2%}")
    verdict = "met " if report.goal_met else "MISSED"
    lines.append(f"  {verdict} metrics cost <= {GOAL_COST:.0%} of a wallet operation's CPU "
                 "(this process)")
    return "\n".join(lines)
