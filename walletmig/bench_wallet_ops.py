"""`walletmig bench wallet-ops`: wallet operations through Temporal, next to a bare baseline.

Four runs in one process, same servers, same concurrency, same wallet count:
  bare        Update-with-Start on BareEntityWorkflow (no activity): what Temporal alone costs
  legacy      WalletClient on a pair in phase legacy (MongoDB write in a local activity)
  dual_write  WalletClient on a pair in phase dual_write (MongoDB answers, TigerBeetle follows)
  tb_primary  WalletClient on a pair in phase tb_primary (TigerBeetle answers, MongoDB follows
              by reverse projection)
Each prints ops/s and p50/p95/p99 latency; ratios compare against issue 18's goals: legacy >=
80 % of bare throughput, dual_write and tb_primary >= 75 %, and at one caller (--concurrency 1)
every wallet mode's p95 <= 1.5x bare's. A worker runs in-process on a task queue of its own,
and the stores use a database of their own (phases set here touch nothing else).

Fair by construction: dual_write's and tb_primary's timed windows end only when the follower
store has applied every operation of the run (the wallets' backlogs are empty), not when the
last caller got its answer; and the modes run in `rounds`, each round in a rotated order (bare,
legacy, dual_write, tb_primary; then legacy, dual_write, tb_primary, bare; ...), so no mode
always runs first on a cold stack or last on a warm one.

Honest on a shared, noisy host (session 8): bare's own throughput moved 5x between two rounds
of one run, so a ratio of two medians taken minutes apart measures the host. Each wallet run's
throughput is divided by the bare runs bracketing it in time (the last bare run before it and
the first after it, averaged; one at an edge), the ratio is printed next to the run, and the
goals are judged on each mode's MEDIAN of those per-run ratios: several short rounds (e.g.
`--rounds 6 --ops 300`) beat two long ones. CPU per operation, per process (this one and each
server of the stack), is printed per run and as medians: it does not move with the host's load
the way wall-clock throughput does, so it is the figure to compare changes by.

`metrics`: `on` (default; what production runs), `off` (the store and TigerBeetle timers call
straight through: observability.metrics.set_enabled), or `both`: rounds alternate on, off, on,
... and the report adds each mode's throughput with metrics off over on (goal: metrics cost
<= 3 %).

`group_commit`: the legacy store's group commit (stores.group_commit) `on`, `off`
(WALLETMIG_LEGACY_GROUP_COMMIT=off's path: one transaction per write; the default is that
variable's), or `both`: rounds
alternate on, off, on, ... (the runs of one period, each with its own bare runs around it) and
the report splits each wallet mode's of-bare ratio and CPU per operation per process by it.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import os
import pstats
import statistics
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
from observability.metrics import set_enabled
from stores.bundle import make_stores
from stores.outbox import Outbox
from walletclient.wallet_client import WalletClient
from walletconfig.settings import Settings
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, SubtractCredit, WalletOperation
from walletcore.phases import MigrationState, Phase
from walletmig.devstack import read_records
from walletmig.processes import ProcessRecord, is_alive, process_cpu_s
from workers.wallet_worker import build_worker, connect_temporal
from workers.wiring import make_importer
from workflows.bare import BareEntityWorkflow

OPS_MAX = 1_000_000
CONCURRENCY_MAX = 2000
ROUNDS_MAX = 20
IDLE_SAMPLE_S = 2.0  # how long the servers' idle CPU is sampled before the first run
MODES: tuple[str, ...] = ("bare", "legacy", "dual_write", "tb_primary")
LEGACY_PAIR = ("USD", "USA")
DUAL_PAIR = ("MXN", "MEX")
TB_PRIMARY_PAIR = ("EUR", "ESP")
PAIR_OF_MODE = {"legacy": LEGACY_PAIR, "dual_write": DUAL_PAIR, "tb_primary": TB_PRIMARY_PAIR}
FOLLOWED_MODES = ("dual_write", "tb_primary")  # timed until the follower store has applied all
GOAL_LEGACY_OF_BARE = 0.80
GOAL_FOLLOWED_OF_BARE = 0.75  # dual_write and tb_primary throughput over bare's
GOAL_P95_OVER_BARE_AT_1 = 1.5  # at --concurrency 1: every wallet mode's p95 over bare's
GOAL_METRICS_COST = 0.03  # throughput lost to metrics (off over on), per mode
METRICS_CHOICES = ("on", "off", "both")
DRAIN_TIMEOUT_S = 300.0


class RunFigures(BaseModel):
    name: str
    round: int | None = None  # None: the median over the rounds
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
    # dual_write: seconds from the last answer until TigerBeetle had applied every operation;
    # part of `seconds` (and of ops_per_s and the CPU figures).
    drain_s: float | None = None
    metrics: bool = True  # the store and TigerBeetle timers were on
    group_commit: bool = True  # the legacy store's group commit was on
    # Wallet modes: ops/s over the mean of the bare runs bracketing this run in time (a round's
    # run); on a median row, the median of those ratios. None for bare.
    of_bare: float | None = None

    def cpu_ms_per_op_by_process(self) -> dict[str, float]:
        """CPU ms per operation: `this` (client + in-process worker and drainers), each stack
        server by name, and `all` (their sum)."""
        ops = max(self.ops, 1)
        out = {"this": round(self.cpu_s * 1000 / ops, 2)}
        out.update((n, round(v * 1000 / ops, 2)) for n, v in sorted(self.server_cpu_s.items()))
        out["all"] = round(self.cpu_ms_per_op(), 2)
        return out

    def cpu_ms_per_op(self) -> float:
        """Every process's CPU (this one and the stack's servers) per operation."""
        return (self.cpu_s + sum(self.server_cpu_s.values())) * 1000 / max(self.ops, 1)


class BenchReport(BaseModel):
    runs: list[RunFigures]  # every round's runs, in the order they ran
    medians: list[RunFigures]  # per mode: median ops/s and latencies over the rounds
    rounds: int
    legacy_of_bare_throughput: float
    dual_write_over_legacy_p50: float
    dual_write_over_legacy_throughput: float
    # Per wallet mode: the median over its runs of (run ops/s over the bare runs bracketing it
    # in time); the goals are judged on these. And median p95 over bare's.
    of_bare_throughput: dict[str, float] = {}
    # Per wallet mode: each run's ratio to the bare runs bracketing it, in run order.
    of_bare_by_round: dict[str, list[float]] = {}
    # Per mode: median CPU ms per operation per process (`this`, each server, `all`).
    cpu_ms_per_op: dict[str, dict[str, float]] = {}
    p95_over_bare: dict[str, float] = {}
    goals: dict[str, bool]
    host_cpus: int
    metrics: str = "on"
    # `both`: per mode, median ops/s with metrics off / with metrics on - 1 (what they cost).
    metrics_cost: dict[str, float] = {}
    # `both`: per mode, this process's median CPU per operation with metrics on / off - 1 (on a
    # shared machine wall-clock ops/s is noisy; the CPU the timers add is what they cost).
    metrics_cpu_cost: dict[str, float] = {}
    # The legacy store's group commit over the whole bench (stores.group_commit): on, writes
    # that went alone, groups committed and the writes they carried, groups that failed.
    group_commit: dict[str, int] = {}
    group_commit_mode: str = "on"  # on, off, or both (rounds alternated)
    # `--group-commit both`: per wallet mode, "on"/"off" -> the median of-bare ratio ("of_bare")
    # and median CPU ms per operation per process, over the runs with it on / off.
    group_commit_split: dict[str, dict[str, dict[str, float]]] = {}
    # Each server's CPU ms per second while no operation runs (sampled before the first run).
    # Every run is charged its servers' whole CPU, idle included, so a slower run carries more
    # idle time per operation (the Temporal dev server idles at ~45 ms/s): `_cpu_lines` prints
    # each mode's median net of it too.
    server_idle_cpu_ms_per_s: dict[str, float] = {}


@dataclass
class BenchConfig:
    ops: int = 2000
    concurrency: int = 100
    wallets: int | None = None  # default: one wallet per caller
    profile: Path | None = None
    rounds: int = 2  # every mode once per round, the order rotated each round
    metrics: str = "on"  # on, off, or both (rounds alternate: on, off, on, ...)
    modes: tuple[str, ...] = MODES  # bare and legacy always; the others may be left out
    # on, off, or both (rounds alternate: on, off, on, ...); None: as the process's
    # WALLETMIG_LEGACY_GROUP_COMMIT (the store's default)
    group_commit: str | None = None

    def __post_init__(self) -> None:
        assert set(self.modes) <= set(MODES) and {"bare", "legacy"} <= set(self.modes), (
            f"modes: bare, legacy and any of {MODES[2:]}")
        assert self.metrics in METRICS_CHOICES, f"--metrics must be one of {METRICS_CHOICES}"
        assert self.metrics != "both" or self.rounds >= 2, "--metrics both needs --rounds >= 2"
        assert self.group_commit in (None, *METRICS_CHOICES), (
            f"--group-commit must be one of {METRICS_CHOICES}")
        assert self.group_commit != "both" or self.rounds >= 2, (
            "--group-commit both needs --rounds >= 2")
        assert 0 < self.ops <= OPS_MAX, f"--ops must be 1..{OPS_MAX}"
        assert 0 < self.concurrency <= CONCURRENCY_MAX, f"--concurrency 1..{CONCURRENCY_MAX}"
        assert 0 < self.rounds <= ROUNDS_MAX, f"--rounds must be 1..{ROUNDS_MAX}"


class ServerCpu:
    """CPU time of the stack's recorded server processes (walletmig dev up), via /proc."""

    def __init__(self, state_dir: Path) -> None:
        self._records: dict[str, ProcessRecord] = {
            name: record for name, record in read_records(state_dir).items() if is_alive(record)
        }

    def sample(self) -> dict[str, float]:
        """name -> CPU seconds (user + system) so far; a vanished process is left out."""
        out: dict[str, float] = {}
        for name, record in self._records.items():
            cpu_s = process_cpu_s(record.pid)
            if cpu_s is not None:
                out[name] = cpu_s
        return out

    async def idle_ms_per_s(self, sample_s: float = IDLE_SAMPLE_S) -> dict[str, float]:
        """Each server's CPU ms per second over `sample_s` with nothing sent (bounded)."""
        assert 0 < sample_s <= IDLE_SAMPLE_S
        before = self.sample()
        await asyncio.sleep(sample_s)
        after = self.sample()
        return {name: round((after[name] - before[name]) * 1000 / sample_s, 1)
                for name in after if name in before}

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: round(after[name] - before[name], 2) for name in after if name in before}


def percentile(sorted_values: list[float], q: float) -> float:
    assert sorted_values and 0 <= q <= 1
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


Call = Callable[[int, int], Awaitable[object]]


async def _drive(
    name: str,
    round_no: int,
    config: BenchConfig,
    wallets: int,
    call: Call,
    servers: ServerCpu,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> RunFigures:
    """`config.ops` calls from `config.concurrency` callers; caller c uses wallet c % wallets.
    `settle` runs inside the timed window after the last answer: the run is done only when it
    returns (dual_write: when TigerBeetle has applied everything)."""
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

    server0 = servers.sample()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(config.concurrency)))
    answered = time.perf_counter()
    if settle is not None:
        await settle()
    seconds = time.perf_counter() - wall0
    latencies.sort()
    return RunFigures(
        name=name,
        round=round_no,
        ops=len(latencies),
        concurrency=config.concurrency,
        wallets=wallets,
        seconds=round(seconds, 3),
        ops_per_s=round(len(latencies) / seconds, 1),
        p50_ms=round(percentile(latencies, 0.50) * 1000, 2),
        p95_ms=round(percentile(latencies, 0.95) * 1000, 2),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 2),
        cpu_s=round(time.process_time() - cpu0, 2),
        server_cpu_s=ServerCpu.spent(server0, servers.sample()),
        drain_s=None if settle is None else round(time.perf_counter() - answered, 3),
    )


def _median(name: str, runs: list[RunFigures]) -> RunFigures:
    """One mode's figures as the median over its rounds (each figure on its own)."""
    assert runs and all(r.name == name for r in runs)

    def mid(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    servers = sorted({n for r in runs for n in r.server_cpu_s})
    drains = [r.drain_s for r in runs if r.drain_s is not None]
    return RunFigures(
        name=name, round=None, ops=runs[0].ops, concurrency=runs[0].concurrency,
        wallets=runs[0].wallets, seconds=mid([r.seconds for r in runs]),
        ops_per_s=mid([r.ops_per_s for r in runs]), p50_ms=mid([r.p50_ms for r in runs]),
        p95_ms=mid([r.p95_ms for r in runs]), p99_ms=mid([r.p99_ms for r in runs]),
        cpu_s=mid([r.cpu_s for r in runs]),
        server_cpu_s={n: mid([r.server_cpu_s.get(n, 0.0) for r in runs]) for n in servers},
        drain_s=mid(drains) if drains else None,
        of_bare=mid(ratios) if (ratios := [r.of_bare for r in runs if r.of_bare is not None])
        else None,
    )


def bracketed_by_bare(runs: list[RunFigures]) -> list[RunFigures]:
    """Each wallet run with `of_bare`: its ops/s over the mean of the bare runs bracketing it
    in run order (the last before, the first after; one at an edge). The host's load drifts
    over minutes: the bare runs nearest in time are the fairest yardstick."""
    bare_at = [i for i, r in enumerate(runs) if r.name == "bare"]
    assert bare_at, "every run has bare runs to compare with"
    out: list[RunFigures] = []
    for i, run in enumerate(runs):
        if run.name == "bare":
            out.append(run)
            continue
        before = [j for j in bare_at if j < i][-1:]
        after = [j for j in bare_at if j > i][:1]
        yardstick = statistics.mean(runs[j].ops_per_s for j in before + after)
        assert yardstick > 0
        out.append(run.model_copy(update={"of_bare": round(run.ops_per_s / yardstick, 3)}))
    return out


def rotated(round_no: int, modes: tuple[str, ...] = MODES) -> tuple[str, ...]:
    """The modes in round `round_no`'s order: each mode takes every place in turn."""
    shift = round_no % len(modes)
    return modes[shift:] + modes[:shift]


async def run_bench(settings: Settings, config: BenchConfig) -> BenchReport:
    bench_id = uuid.uuid4().hex[:8]
    isolated = settings.model_copy(update={"mongodb_database": f"walletmig_bench_{bench_id}"})
    stores = await make_stores(isolated)
    _OUTBOX[:] = [stores.legacy.outbox]  # dual_write's drain: the outbox too (H7, issue 18)
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
    profiler = cProfile.Profile() if config.profile else None
    runs: list[RunFigures] = []
    try:
        async with worker:
            for phase, (currency, country) in ((Phase.DUAL_WRITE, DUAL_PAIR),
                                               (Phase.TB_PRIMARY, TB_PRIMARY_PAIR)):
                await stores.migration.set(MigrationState(
                    scope=f"{currency}:{country}", phase=phase, epoch=1,
                    rollout_percent=100 if phase == Phase.TB_PRIMARY else 0))
            modes = _Modes(temporal, WalletClient(temporal, task_queue, id_key=settings.id_key(),
                                                        idle_timeout_s=120),
                           task_queue, config, bench_id, ServerCpu(isolated.state_dir))
            idle_ms_per_s = await modes.servers.idle_ms_per_s()
            if profiler:
                profiler.enable()
            for round_no in range(config.rounds):
                enabled = metrics_on(config.metrics, round_no)
                set_enabled(enabled)
                if config.group_commit is not None:  # the same alternation as metrics
                    stores.legacy.group_commit.enabled = metrics_on(config.group_commit,
                                                                    round_no)
                grouping = stores.legacy.group_commit.enabled
                for mode in rotated(round_no, config.modes):
                    run = await modes.run(mode, round_no)
                    runs.append(run.model_copy(update={"metrics": enabled,
                                                       "group_commit": grouping}))
            if profiler:
                profiler.disable()
    finally:
        set_enabled(True)
        await stores.close()
    if profiler and config.profile:
        profiler.dump_stats(config.profile)
    committer = stores.legacy.group_commit
    report = _report(runs, config).model_copy(update={"group_commit": {
        "alone": committer.alone, "groups": committer.groups,
        "grouped": committer.grouped, "groups_failed": committer.groups_failed},
        "server_idle_cpu_ms_per_s": idle_ms_per_s,
        "group_commit_mode": config.group_commit or ("on" if committer.enabled else "off")})
    if config.group_commit == "both":
        report = report.model_copy(update={"group_commit_split": _group_commit_split(report)})
    return _with_metrics_cost(report, config.metrics) if config.metrics == "both" else report


def metrics_on(choice: str, round_no: int) -> bool:
    """`both`: even rounds on, odd rounds off (alternating, so neither is always first)."""
    return choice == "on" or (choice == "both" and round_no % 2 == 0)


def _group_commit_split(report: BenchReport) -> dict[str, dict[str, dict[str, float]]]:
    """Per wallet mode, its runs with the group commit on and off: median of-bare ratio and
    median CPU ms per operation per process."""
    split: dict[str, dict[str, dict[str, float]]] = {}
    for mode in [m.name for m in report.medians if m.name != "bare"]:
        split[mode] = {}
        for label, on in (("on", True), ("off", False)):
            runs = [r for r in report.runs if r.name == mode and r.group_commit == on]
            assert runs, "both: every mode ran with the group commit on and off"
            median = _median(mode, runs)
            split[mode][label] = {"of_bare": median.of_bare or 0.0,
                                  **median.cpu_ms_per_op_by_process()}
    return split


def _with_metrics_cost(report: BenchReport, choice: str) -> BenchReport:
    """Each mode's median ops/s with metrics off over on, and the goal per mode."""
    cost: dict[str, float] = {}
    cpu_cost: dict[str, float] = {}
    goals = dict(report.goals)
    for mode in [m.name for m in report.medians]:
        on = [r for r in report.runs if r.name == mode and r.metrics]
        off = [r for r in report.runs if r.name == mode and not r.metrics]
        assert on and off, "both: every mode ran with metrics on and off"
        cost[mode] = round(statistics.median(r.ops_per_s for r in off)
                           / statistics.median(r.ops_per_s for r in on) - 1, 4)
        cpu_cost[mode] = round(statistics.median(r.cpu_s / r.ops for r in on)
                               / statistics.median(r.cpu_s / r.ops for r in off) - 1, 4)
        goals[f"metrics cost <= {GOAL_METRICS_COST:.0%} throughput ({mode})"] = (
            cost[mode] <= GOAL_METRICS_COST)
    return report.model_copy(update={"metrics": choice, "metrics_cost": cost,
                                     "metrics_cpu_cost": cpu_cost, "goals": goals})


def _report(runs: list[RunFigures], config: BenchConfig) -> BenchReport:
    runs = bracketed_by_bare(runs)
    medians = [_median(mode, [r for r in runs if r.name == mode]) for mode in config.modes]
    by = {m.name: m for m in medians}
    bare, legacy = by["bare"], by["legacy"]
    dual = by.get("dual_write", legacy)
    of_bare = {m.name: m.of_bare for m in medians if m.of_bare is not None}
    p95_over = {m.name: round(m.p95_ms / bare.p95_ms, 3) for m in medians if m is not bare}
    return BenchReport(
        runs=runs,
        medians=medians,
        rounds=config.rounds,
        legacy_of_bare_throughput=of_bare["legacy"],
        dual_write_over_legacy_p50=round(dual.p50_ms / legacy.p50_ms - 1, 3),
        dual_write_over_legacy_throughput=round(legacy.ops_per_s / dual.ops_per_s - 1, 3),
        of_bare_throughput=of_bare,
        of_bare_by_round={mode: [r.of_bare for r in runs if r.name == mode and r.of_bare]
                          for mode in of_bare},
        cpu_ms_per_op={m.name: m.cpu_ms_per_op_by_process() for m in medians},
        p95_over_bare=p95_over,
        goals=_goals(of_bare, p95_over, config.concurrency),
        host_cpus=os.cpu_count() or 0,
    )


def _goals(of_bare: dict[str, float], p95_over: dict[str, float],
           concurrency: int) -> dict[str, bool]:
    """Issue 18's goals for the modes that ran; the latency one only at one caller."""
    goals: dict[str, bool] = {}
    for mode, ratio in of_bare.items():
        floor = GOAL_LEGACY_OF_BARE if mode == "legacy" else GOAL_FOLLOWED_OF_BARE
        goals[f"{mode} >= {floor:.0%} of bare throughput"] = ratio >= floor
    if concurrency == 1:
        for mode, ratio in p95_over.items():
            goals[f"{mode} p95 <= {GOAL_P95_OVER_BARE_AT_1:g}x bare p95 at 1 caller"] = (
                ratio <= GOAL_P95_OVER_BARE_AT_1)
    return goals


@dataclass
class _Modes:
    """The modes' runs on one worker; every run warms its wallets up first."""

    temporal: Client
    client: WalletClient
    task_queue: str
    config: BenchConfig
    bench_id: str
    servers: ServerCpu

    @property
    def wallets(self) -> int:
        return self.config.wallets or self.config.concurrency

    async def run(self, mode: str, round_no: int) -> RunFigures:
        if mode == "bare":
            return await self._bare(round_no)
        return await self._wallet(mode, PAIR_OF_MODE[mode], round_no)

    async def _bare(self, round_no: int) -> RunFigures:
        async def call(wallet: int, i: int) -> object:
            start = WithStartWorkflowOperation(
                BareEntityWorkflow.run,
                120.0,
                id=f"bench-bare/{self.bench_id}/{wallet}",
                task_queue=self.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            )
            return await self.temporal.execute_update_with_start_workflow(
                BareEntityWorkflow.touch, f"op-{round_no}-{i}", start_workflow_operation=start
            )

        await _warm_up(call, self.wallets)
        return await _drive("bare", round_no, self.config, self.wallets, call, self.servers)

    async def _wallet(self, name: str, pair: tuple[str, str], round_no: int) -> RunFigures:
        keys = [
            WalletKey(client_id=f"bench-{self.bench_id}-{name}-{w}", country=pair[1],
                      currency=pair[0])
            for w in range(self.wallets)
        ]  # fmt: skip
        prefix = f"bench-{self.bench_id}-{name}-r{round_no}"

        async def call(wallet: int, i: int) -> object:
            txn = f"{prefix}-{i}"
            op: WalletOperation = (
                SubtractCredit(wallet=keys[wallet], transaction_id=txn, amount=Decimal("0.01"))
                if i % 3 == 2
                else AddCredit(wallet=keys[wallet], transaction_id=txn, amount=Decimal("0.02"))
            )
            return await self.client.apply(op)

        async def seed(wallet: int, i: int) -> object:
            return await self.client.apply(AddCredit(
                wallet=keys[wallet], transaction_id=f"{prefix}-seed-{wallet}",
                amount=Decimal("1000.00")))

        async def applied() -> None:
            await _until_applied(self.client, keys)

        await _warm_up(seed, self.wallets)
        followed = name in FOLLOWED_MODES
        if followed:
            await applied()  # the warm-up's own backlog stays out of the timed window
        return await _drive(name, round_no, self.config, self.wallets, call, self.servers,
                            settle=applied if followed else None)


async def _warm_up(call: Call, wallets: int) -> None:
    """Start every entity workflow (and its worker cache entry) before timing."""
    await asyncio.gather(*(call(w, -1 - w) for w in range(wallets)))


_OUTBOX: list[Outbox] = []


async def _until_applied(client: WalletClient, keys: list[WalletKey]) -> None:
    """Until every wallet's backlog and the outbox (both directions) are empty: dual_write's
    operations are in TigerBeetle, tb_primary's in MongoDB (the reverse projection). The
    outbox first (two counts a turn), then each wallet's status query (one Temporal query a
    wallet) only once it is empty: asked every turn, the queries cost the stack more CPU per
    operation than what they wait for, inside the timed window."""
    deadline = time.perf_counter() + DRAIN_TIMEOUT_S
    pending = list(keys)
    while True:
        outbox_empty = not any([await o.pending_total() for o in _OUTBOX])
        if outbox_empty:
            statuses = await asyncio.gather(*(client.status(k) for k in pending))
            pending = [k for k, s in zip(pending, statuses, strict=True)
                       if s is not None and s.backlog_length > 0]
            if not pending:
                return
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{len(pending)} backlogs or the outbox not applied in "
                               f"{DRAIN_TIMEOUT_S:.0f} s: the figure would be meaningless")
        await asyncio.sleep(0.05)


def _run_line(r: RunFigures) -> str:
    label = "median" if r.round is None else str(r.round + 1)
    drain = "" if r.drain_s is None else f"{r.drain_s:.2f}"
    name = r.name if r.metrics or r.round is None else f"{r.name}/off"
    name = name if r.group_commit or r.round is None or r.name == "bare" else f"{name}/gc-off"
    of_bare = "" if r.of_bare is None else f"{r.of_bare:.0%}"
    return (f"{name:<14} {label:>6} {r.ops:>6} {r.concurrency:>5} {r.ops_per_s:>8.1f} "
            f"{of_bare:>7} {r.p50_ms:>8.1f} {r.p95_ms:>8.1f} {r.p99_ms:>8.1f} "
            f"{r.cpu_ms_per_op():>9.1f} {drain:>8}")


def format_report(report: BenchReport, profile: Path | None = None) -> str:
    lines = [
        f"{'run':<14} {'round':>6} {'ops':>6} {'conc':>5} {'ops/s':>8} {'of bare':>7} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'cpu ms/op':>9} {'drain s':>8}",
        *(_run_line(r) for r in report.runs),
        *(_run_line(r) for r in report.medians),
        f"({report.rounds} rounds, the order rotated each round; `of bare`: the run's ops/s over "
        "the bare runs bracketing it in time; dual_write's and tb_primary's windows include the "
        "drain: until the follower store had applied every operation)",
        *(f"of bare throughput, {mode}: median {report.of_bare_throughput[mode]:.0%} over "
          f"runs [{', '.join(f'{v:.0%}' for v in report.of_bare_by_round.get(mode, []))}]; "
          f"p95 {report.p95_over_bare[mode]:.2f}x bare's (medians)"
          for mode in report.of_bare_throughput),
        f"dual_write over legacy: p50 {report.dual_write_over_legacy_p50:+.0%}, "
        f"throughput {report.dual_write_over_legacy_throughput:+.0%}  (medians)",
    ]
    if report.metrics_cost:
        lines.append("metrics cost (median ops/s with metrics off over on; /off rows ran "
                     "without): " + ", ".join(f"{mode} {cost:+.1%}"
                                              for mode, cost in report.metrics_cost.items()))
        lines.append("metrics CPU cost (this process's CPU per operation, on over off): "
                     + ", ".join(f"{mode} {cost:+.1%}"
                                 for mode, cost in report.metrics_cpu_cost.items()))
    if report.group_commit:
        gc = report.group_commit
        lines.append(f"legacy group commit ({report.group_commit_mode}: "
                     "WALLETMIG_LEGACY_GROUP_COMMIT): " + ", ".join(
                         f"{k} {v}" for k, v in gc.items())
                     + (f", {gc['grouped'] / gc['groups']:.1f} writes a group"
                        if gc["groups"] else ""))
    for mode, by in report.group_commit_split.items():
        lines.append(f"group commit on/off, {mode}: of bare {by['on']['of_bare']:.0%} / "
                     f"{by['off']['of_bare']:.0%}; CPU ms per op " + ", ".join(
                         f"{name} {by['on'][name]:.2f}/{by['off'].get(name, 0.0):.2f}"
                         for name in by["on"] if name != "of_bare"))
    lines.append("goals (on the medians of the per-run ratios):")
    lines += [f"  {'met ' if met else 'MISSED'} {goal}" for goal, met in report.goals.items()]
    lines += _cpu_lines(report)
    if profile is not None:
        buffer = io.StringIO()
        pstats.Stats(str(profile), stream=buffer).sort_stats("cumulative").print_stats(20)
        lines.append(buffer.getvalue())
    return "\n".join(lines)


def _cpu_lines(report: BenchReport) -> list[str]:
    """CPU ms per operation per process: every run, then each mode's median and its extra over
    legacy's median (the noise-robust figure to compare code changes by)."""
    names = sorted({name for r in report.runs for name in r.server_cpu_s})
    header = f"  {'run':<14} {'round':>6} {'all':>7} {'this':>7} " + " ".join(
        f"{n:>11}" for n in names)
    lines = ["CPU ms per operation per process (this = client + in-process worker and "
             "drainers; the stack's servers):", header]

    def row(name: str, label: str, per: dict[str, float]) -> str:
        return (f"  {name:<14} {label:>6} {per.get('all', 0.0):>7.1f} {per.get('this', 0.0):>7.1f} "
                + " ".join(f"{per.get(n, 0.0):>11.1f}" for n in names))

    lines += [row(r.name, str((r.round or 0) + 1), r.cpu_ms_per_op_by_process())
              for r in report.runs]
    lines += [row(mode, "median", per) for mode, per in report.cpu_ms_per_op.items()]
    legacy = report.cpu_ms_per_op.get("legacy")
    if legacy is not None:
        lines += [row(mode, "+legacy", {k: round(v - legacy.get(k, 0.0), 2)
                                        for k, v in per.items()})
                  for mode, per in report.cpu_ms_per_op.items() if mode in FOLLOWED_MODES]
    return lines + _idle_lines(report, row)


def _idle_lines(report: BenchReport, row: Callable[[str, str, dict[str, float]], str]
                ) -> list[str]:
    """The servers' idle CPU, and each mode's median CPU per operation net of it: a run of
    `seconds` carries idle rate x seconds of each server's CPU whatever it does, so a slower
    mode is charged more of it per operation."""
    idle = report.server_idle_cpu_ms_per_s
    if not idle:
        return []
    lines = ["  idle CPU ms/s: " + ", ".join(f"{n} {v:g}" for n, v in sorted(idle.items()))]
    for median in report.medians:
        per = median.cpu_ms_per_op_by_process()
        ops = max(median.ops, 1)
        net = {n: max(0.0, v - idle.get(n, 0.0) * median.seconds / ops)
               for n, v in per.items() if n not in ("this", "all")}
        net["this"] = per["this"]
        net["all"] = net["this"] + sum(v for n, v in net.items() if n != "this")
        lines.append(row(median.name, "-idle", net))
    return lines
