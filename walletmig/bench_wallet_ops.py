"""`walletmig bench wallet-ops`: wallet operations through Temporal, next to a bare baseline.

Three runs in one process, same servers, same concurrency, same wallet count:
  bare        Update-with-Start on BareEntityWorkflow (no activity): what Temporal alone costs
  legacy      WalletClient on a pair in phase legacy (MongoDB write in a local activity)
  dual_write  WalletClient on a pair in phase dual_write (+ TigerBeetle backlog activity)
Each prints ops/s and p50/p95/p99 latency; ratios compare against the goals (legacy >= 80 % of
bare throughput, dual_write <= 15 % over legacy). A worker runs in-process on a task queue of
its own, and the stores use a database of their own (phases set here touch nothing else).
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import os
import pstats
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from pydantic import BaseModel
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy

from activities.wallet import WalletActivities
from stores.bundle import Stores, make_stores
from walletclient.wallet_client import WalletClient
from walletconfig.settings import Settings
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, SubtractCredit, WalletOperation
from walletcore.phases import MigrationState, Phase
from walletmig.devstack import read_records
from walletmig.processes import PROC_ROOT, ProcessRecord, is_alive
from workers.wallet_worker import build_worker, connect_temporal
from workers.wiring import make_importer
from workflows.bare import BareEntityWorkflow

OPS_MAX = 1_000_000
CONCURRENCY_MAX = 2000
LEGACY_PAIR = ("USD", "USA")
DUAL_PAIR = ("MXN", "MEX")
GOAL_LEGACY_OF_BARE = 0.80
GOAL_DUAL_OVER_LEGACY = 0.15
DRAIN_TIMEOUT_S = 300.0


class RunFigures(BaseModel):
    name: str
    ops: int
    concurrency: int
    wallets: int
    seconds: float
    ops_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cpu_s: float  # CPU of this process (client + in-process worker) during the run
    # CPU seconds of each server of the `dev up` stack during the run (empty: no stack state).
    # On a shared machine these, not wall-clock ops/s, say what one operation costs.
    server_cpu_s: dict[str, float] = {}
    drain_s: float | None = None  # dual_write: until every backlog was applied after the run
    drain_cpu_s: float | None = None  # every process's CPU during drain_s

    def cpu_ms_per_op(self) -> float:
        """Every process's CPU (this one and the stack's servers) per operation."""
        return (self.cpu_s + sum(self.server_cpu_s.values())) * 1000 / max(self.ops, 1)


class BenchReport(BaseModel):
    runs: list[RunFigures]
    legacy_of_bare_throughput: float
    dual_write_over_legacy_p50: float
    dual_write_over_legacy_throughput: float
    goals: dict[str, bool]
    host_cpus: int


@dataclass
class BenchConfig:
    ops: int = 2000
    concurrency: int = 100
    wallets: int | None = None  # default: one wallet per caller
    profile: Path | None = None

    def __post_init__(self) -> None:
        assert 0 < self.ops <= OPS_MAX, f"--ops must be 1..{OPS_MAX}"
        assert 0 < self.concurrency <= CONCURRENCY_MAX, f"--concurrency 1..{CONCURRENCY_MAX}"


class ServerCpu:
    """CPU time of the stack's recorded server processes (walletmig dev up), via /proc."""

    def __init__(self, state_dir: Path) -> None:
        self._records: dict[str, ProcessRecord] = {
            name: record for name, record in read_records(state_dir).items() if is_alive(record)
        }
        self._ticks_per_s = os.sysconf("SC_CLK_TCK") if PROC_ROOT.is_dir() else 100

    def sample(self) -> dict[str, float]:
        """name -> CPU seconds (user + system) so far; a vanished process is left out."""
        out: dict[str, float] = {}
        for name, record in self._records.items():
            try:
                text = (PROC_ROOT / str(record.pid) / "stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            out[name] = (int(fields[11]) + int(fields[12])) / self._ticks_per_s
        return out

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: round(after[name] - before[name], 2) for name in after if name in before}


def percentile(sorted_values: list[float], q: float) -> float:
    assert sorted_values and 0 <= q <= 1
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def _drive(
    name: str,
    config: BenchConfig,
    wallets: int,
    call: Callable[[int, int], Awaitable[object]],
    servers: ServerCpu | None = None,
) -> RunFigures:
    """`config.ops` calls from `config.concurrency` callers; caller c uses wallet c % wallets."""
    latencies: list[float] = []
    next_op = 0

    async def caller(c: int) -> None:
        nonlocal next_op
        while next_op < config.ops:
            i = next_op
            next_op += 1
            started = time.perf_counter()
            await call(c % wallets, i)
            latencies.append(time.perf_counter() - started)

    server0 = servers.sample() if servers else {}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(config.concurrency)))
    seconds = time.perf_counter() - wall0
    server_cpu = ServerCpu.spent(server0, servers.sample()) if servers else {}
    latencies.sort()
    return RunFigures(
        name=name,
        ops=len(latencies),
        concurrency=config.concurrency,
        wallets=wallets,
        seconds=round(seconds, 3),
        ops_per_s=round(len(latencies) / seconds, 1),
        p50_ms=round(percentile(latencies, 0.50) * 1000, 2),
        p95_ms=round(percentile(latencies, 0.95) * 1000, 2),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 2),
        cpu_s=round(time.process_time() - cpu0, 2),
        server_cpu_s=server_cpu,
    )


async def run_bench(settings: Settings, config: BenchConfig) -> BenchReport:
    bench_id = uuid.uuid4().hex[:8]
    isolated = settings.model_copy(update={"mongodb_database": f"walletmig_bench_{bench_id}"})
    stores = await make_stores(isolated)
    temporal = await connect_temporal(isolated)
    task_queue = f"wallet-bench-{bench_id}"
    activities = WalletActivities(
        legacy=stores.legacy, tigerbeetle=stores.tigerbeetle, migration=stores.migration,
        importer=make_importer(stores),
    )
    worker = build_worker(
        temporal, isolated, activities, task_queue=task_queue,
        extra_workflows=[BareEntityWorkflow],
    )  # fmt: skip
    wallets = config.wallets or config.concurrency
    servers = ServerCpu(isolated.state_dir)
    profiler = cProfile.Profile() if config.profile else None
    try:
        async with worker:
            await stores.migration.set(
                MigrationState(scope=f"{DUAL_PAIR[0]}:{DUAL_PAIR[1]}", phase=Phase.DUAL_WRITE,
                               epoch=1)
            )  # fmt: skip
            client = WalletClient(temporal, task_queue, idle_timeout_s=120)
            if profiler:
                profiler.enable()
            runs = [
                await _bare_run(temporal, task_queue, config, wallets, bench_id, servers),
                await _wallet_run(
                    "legacy", client, config, wallets, bench_id, LEGACY_PAIR, servers
                ),
                await _wallet_run(
                    "dual_write", client, config, wallets, bench_id, DUAL_PAIR, servers
                ),
            ]
            server0, cpu0 = servers.sample(), time.process_time()
            runs[2].drain_s = await _drain_time(client, stores, wallets, bench_id)
            drained = ServerCpu.spent(server0, servers.sample())
            runs[2].drain_cpu_s = round(time.process_time() - cpu0 + sum(drained.values()), 2)
            if profiler:
                profiler.disable()
    finally:
        await stores.close()
    if profiler and config.profile:
        profiler.dump_stats(config.profile)
    bare, legacy, dual = runs
    legacy_of_bare = legacy.ops_per_s / bare.ops_per_s
    dual_over_p50 = dual.p50_ms / legacy.p50_ms - 1
    dual_over_tput = legacy.ops_per_s / dual.ops_per_s - 1
    return BenchReport(
        runs=runs,
        legacy_of_bare_throughput=round(legacy_of_bare, 3),
        dual_write_over_legacy_p50=round(dual_over_p50, 3),
        dual_write_over_legacy_throughput=round(dual_over_tput, 3),
        goals={
            "legacy >= 80% of bare throughput": legacy_of_bare >= GOAL_LEGACY_OF_BARE,
            "dual_write <= 15% over legacy (p50)": dual_over_p50 <= GOAL_DUAL_OVER_LEGACY,
            "dual_write <= 15% over legacy (throughput)": dual_over_tput <= GOAL_DUAL_OVER_LEGACY,
        },
        host_cpus=os.cpu_count() or 0,
    )


async def _bare_run(
    temporal: Client,
    task_queue: str,
    config: BenchConfig,
    wallets: int,
    bench_id: str,
    servers: ServerCpu,
) -> RunFigures:
    async def call(wallet: int, i: int) -> object:
        start = WithStartWorkflowOperation(
            BareEntityWorkflow.run,
            120.0,
            id=f"bench-bare/{bench_id}/{wallet}",
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        return await temporal.execute_update_with_start_workflow(
            BareEntityWorkflow.touch, f"op-{i}", start_workflow_operation=start
        )

    await _warm_up(call, wallets)
    return await _drive("bare", config, wallets, call, servers)


async def _wallet_run(
    name: str,
    client: WalletClient,
    config: BenchConfig,
    wallets: int,
    bench_id: str,
    pair: tuple[str, str],
    servers: ServerCpu,
) -> RunFigures:
    keys = [
        WalletKey(client_id=f"bench-{bench_id}-{name}-{w}", country=pair[1], currency=pair[0])
        for w in range(wallets)
    ]

    async def call(wallet: int, i: int) -> object:
        key = keys[wallet]
        txn = f"bench-{bench_id}-{name}-{i}"
        op: WalletOperation = (
            SubtractCredit(wallet=key, transaction_id=txn, amount=Decimal("0.01"))
            if i % 3 == 2
            else AddCredit(wallet=key, transaction_id=txn, amount=Decimal("0.02"))
        )
        return await client.apply(op)

    async def seed(wallet: int, i: int) -> object:
        key = keys[wallet]
        return await client.apply(
            AddCredit(wallet=key, transaction_id=f"bench-{bench_id}-{name}-seed-{wallet}",
                      amount=Decimal("1000.00"))
        )  # fmt: skip

    await _warm_up(seed, wallets)
    return await _drive(name, config, wallets, call, servers)


async def _warm_up(call: Callable[[int, int], Awaitable[object]], wallets: int) -> None:
    """Start every entity workflow (and its worker cache entry) before timing."""
    await asyncio.gather(*(call(w, -1 - w) for w in range(wallets)))


async def _drain_time(client: WalletClient, stores: Stores, wallets: int, bench_id: str) -> float:
    """Seconds after the dual_write run until every wallet's backlog is empty."""
    started = time.perf_counter()
    keys = [
        WalletKey(client_id=f"bench-{bench_id}-dual_write-{w}", country=DUAL_PAIR[1],
                  currency=DUAL_PAIR[0])
        for w in range(wallets)
    ]  # fmt: skip
    pending = set(range(wallets))
    while pending and time.perf_counter() - started < DRAIN_TIMEOUT_S:
        for w in list(pending):
            status = await client.status(keys[w])
            if status is None or status.backlog_length == 0:
                pending.discard(w)
        if pending:
            await asyncio.sleep(0.1)
    del stores
    return round(time.perf_counter() - started, 3)


def format_report(report: BenchReport, profile: Path | None = None) -> str:
    lines = [
        f"{'run':<11} {'ops':>6} {'conc':>5} {'ops/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'cpu s':>7}  drain s",
    ]
    for r in report.runs:
        drain = "" if r.drain_s is None else f"{r.drain_s:.2f}"
        lines.append(
            f"{r.name:<11} {r.ops:>6} {r.concurrency:>5} {r.ops_per_s:>8.1f} {r.p50_ms:>8.1f} "
            f"{r.p95_ms:>8.1f} {r.p99_ms:>8.1f} {r.cpu_s:>7.1f}  {drain}"
        )
    lines.append(
        f"legacy / bare throughput: {report.legacy_of_bare_throughput:.0%}   "
        f"dual_write over legacy: p50 {report.dual_write_over_legacy_p50:+.0%}, "
        f"throughput {report.dual_write_over_legacy_throughput:+.0%}"
    )
    for goal, met in report.goals.items():
        lines.append(f"  {'met ' if met else 'MISSED'} {goal}")
    if any(r.server_cpu_s for r in report.runs):
        names = sorted({name for r in report.runs for name in r.server_cpu_s})
        lines.append(
            "CPU ms per operation (this process = client + worker; the stack's servers):"
        )
        lines.append(f"  {'run':<11} {'all':>6} {'this':>6} " + " ".join(f"{n:>11}" for n in names))
        for r in report.runs:
            per_op = [r.server_cpu_s.get(n, 0.0) * 1000 / r.ops for n in names]
            lines.append(
                f"  {r.name:<11} {r.cpu_ms_per_op():>6.1f} {r.cpu_s * 1000 / r.ops:>6.1f} "
                + " ".join(f"{v:>11.1f}" for v in per_op)
            )
        dual = report.runs[-1]
        if dual.drain_cpu_s is not None:
            lines.append(
                f"  {dual.name} backlog drain after the run: {dual.drain_cpu_s:.1f} CPU s "
                f"({dual.drain_cpu_s * 1000 / dual.ops:.1f} ms per operation)"
            )
    if profile is not None:
        buffer = io.StringIO()
        pstats.Stats(str(profile), stream=buffer).sort_stats("cumulative").print_stats(20)
        lines.append(buffer.getvalue())
    return "\n".join(lines)
