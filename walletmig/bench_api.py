"""`walletmig bench api`: the same balance read and credit through the HTTP API gateway and
through the Python client directly, in one run, on a running stack (`walletmig dev up`).

    read    GET /v1/wallets/{client}/{country}/{currency}/balance   vs  ReadRouter.get_balance
    credit  POST /v1/wallets/credit (Idempotency-Key)                vs  WalletClient.apply

Both paths reach the same servers and the same worker (the stack's `walletmig worker` on
WALLET_TASK_QUEUE): the direct path is what a Python service embedding walletclient pays, the
API path adds HTTP, the API key, the rate limiter and the Idempotency-Key record. The API is
driven by a load generator process of its own (walletmig.bench_http_load: pre-built HTTP/1.1
requests over keep-alive connections, one per concurrent caller), so its CPU is measured apart
(`load`) and does not compete with the direct path's client inside this process (`bench`).

Fair by construction: every round runs the four (kind, path) runs with the paths' order
swapped each round, on wallets seeded and warmed up through both paths first; the ratios
judged are the median over the rounds of each round's API / direct ratio (the two runs of a
round are side by side: a host whose load moves between rounds moves both). CPU per request
comes from /proc for every process of the stack (`pids.json`: the API with its worker
processes, the worker, the servers), for this process (the direct path's client) and for the
load generator (its own process_time). A run's CPU is sampled once its deferred work is
stored: the read observations both read paths buffer (flushed every 0.5 s, as the gate
evidence) are flushed by the direct path, and waited for one flush interval after an API run,
so no run is charged for the previous one's (its throughput window still ends at its last
answer, for both paths alike). The report names how many API processes served, and every
scheduled workflow of the stack (reconciliation, ledger sync: every 300 s on a dev stack) whose
run overlapped a timed run, with the runs it overlapped: its load lands in one path's window.

Reads run on two pairs, so both stores that can answer a balance are measured in the same
run: the `--pair` (USD:USA, legacy or dual_write on a dev stack: MongoDB answers) and the pair
bench wallet-ops uses for tb_primary (walletmig.bench_wallet_ops.TB_PRIMARY_PAIR, EUR:ESP:
TigerBeetle answers, MongoDB follows). The read goals are judged per store; credits run on
`--pair` only. Which store answered is checked on the warm-up reads (WalletBalance.source).

It writes into the stack's own database: wallets `bench-api-<run>-<n>` of both pairs, an API
key that is revoked at the end, and, when EUR:ESP has no migration state yet, that pair's
state set to tb_primary (left so: later runs reuse it; a pair in another phase is refused).
Meant for a dev stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table
from temporalio.client import Client
from temporalio.service import RPCError

from stores.api_keys import ApiKeyStore
from stores.bundle import Stores, make_stores
from stores.read_metrics import ReadMetricsStore
from walletclient.read_path import ReadRouter
from walletclient.wallet_client import WalletClient
from walletconfig.settings import Settings
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit
from walletcore.phases import MigrationState, Phase
from walletmig.bench_http_load import LoadPlan, LoadRequest, LoadResult
from walletmig.bench_wallet_ops import TB_PRIMARY_PAIR, ServerCpu, percentile
from walletmig.processes import process_cpu_s
from workers.wallet_worker import connect_temporal

REQUESTS_MAX = 1_000_000
CONCURRENCY_MAX = 1000
WALLETS_MAX = 10_000
ROUNDS_MAX = 20
GOAL_READ_RATIO = 0.70  # API reads/s >= 70 % of the direct read path's
GOAL_CREDIT_RATIO = 0.80  # API credits/s >= 80 % of the direct client's
GOAL_API_READS_PER_S = 1000.0
LOAD_START_TIMEOUT_S = 60.0  # the load generator's start and connections
LOAD_RESULT_BYTES_MAX = 64 * 1024 * 1024  # its result line (every latency)
CREDIT_AMOUNT = Decimal("0.01")
SEED_AMOUNT = Decimal("100.00")
METRICS_FLUSH_INTERVAL_S = 0.5  # as the gateway's (gateway/state.py)
PHASE_VISIBLE_S = 1.5  # a published phase reaches the API process within its cache TTL (1 s)
API_SETTLE_S = METRICS_FLUSH_INTERVAL_S + 0.2  # the API's observation flush after a run
CHILDREN_MAX = 64  # the API's worker processes counted
TABLE_WIDTH = 200  # rich would cut a piped table to 80 columns
SCHEDULED_MAX = 100  # scheduled workflows looked at (a bench of minutes meets a handful)
SCHEDULED_LOOKBACK = timedelta(hours=1)  # started this long before the first timed run

Kind = Literal["read", "credit"]
PathName = Literal["api", "direct"]
KINDS: tuple[Kind, ...] = ("read", "credit")


class ApiBenchConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    api_url: str = Field(min_length=1)
    reads: int = Field(default=5000, ge=1, le=REQUESTS_MAX)
    credits: int = Field(default=1000, ge=1, le=REQUESTS_MAX)
    concurrency: int = Field(default=32, ge=1, le=CONCURRENCY_MAX)
    wallets: int = Field(default=32, ge=1, le=WALLETS_MAX)
    rounds: int = Field(default=4, ge=1, le=ROUNDS_MAX)
    country: str = "USA"
    currency: str = "USD"
    tb_currency: str = TB_PRIMARY_PAIR[0]  # the pair set to tb_primary (TigerBeetle answers)
    tb_country: str = TB_PRIMARY_PAIR[1]
    verify_tls: bool = True

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """(currency, country) of the reads' pairs: `--pair` first (credits run on it)."""
        return (self.currency, self.country), (self.tb_currency, self.tb_country)


class PathFigures(BaseModel):
    kind: Kind
    path: PathName
    pair: str  # CURRENCY:COUNTRY of the wallets
    source: str  # the store that answered the pair's reads: mongodb or tigerbeetle
    round: int | None = None  # None: the median over the rounds
    # The timed window (UTC): a scheduled workflow overlapping it is named in the report.
    started_at: datetime | None = None
    ended_at: datetime | None = None
    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    # CPU ms per request: `bench` is this process (load generator, and the direct client);
    # the others are the stack's processes by component name (api, worker, mongo, ...).
    cpu_ms_per_request: dict[str, float] = {}


class ScheduledRun(BaseModel):
    """A scheduled workflow of the stack (reconciliation, ledger sync) that ran during a timed
    run: its CPU is in the servers' columns and its load in both paths' throughput."""

    workflow_id: str
    workflow_type: str
    started_at: datetime
    closed_at: datetime | None
    runs: list[str]  # "round R kind pair path" of each timed run it overlapped


class ApiBenchReport(BaseModel):
    api_url: str
    pair: str  # the credits' pair (and the first reads' pair)
    sources: dict[str, str]  # pair -> the store that answered its reads
    concurrency: int
    wallets: int
    rounds: int
    runs: list[PathFigures]
    medians: list[PathFigures]
    # Per store: the median over the rounds of API reads/s over direct reads/s in that round.
    read_ratios: dict[str, float]
    api_reads_per_s: dict[str, float]  # per store: the API's reads/s (median)
    credit_ratio: float  # the median over the rounds, as the reads'
    round_ratios: dict[str, list[float]] = {}  # "read via <store>" / "credit" -> each round's
    api_processes: int = 1  # uvicorn processes serving the API (`walletmig api --workers`)
    goals: dict[str, bool]
    host_cpus: int
    # The host's 1-minute load average at the start and at the end: the
    # throughput goals are judged on a host others may share, so the report says how busy.
    load_avg: tuple[float, float] = (0.0, 0.0)
    # Scheduled workflows that overlapped a timed run; None: the visibility query failed.
    scheduled: list[ScheduledRun] | None = None


class StackCpu(ServerCpu):
    """ServerCpu, the API counted with its worker processes (`walletmig api --workers N`:
    the recorded pid is uvicorn's supervisor, the requests are served by its children)."""

    def sample(self) -> dict[str, float]:
        out = super().sample()
        record = self._records.get("api")
        if record is not None and "api" in out:
            out["api"] += sum(process_cpu_s(pid) or 0.0 for pid in _children(record.pid))
        return out

    def api_processes(self) -> int:
        """The processes that serve requests: uvicorn's spawned workers (not multiprocessing's
        resource tracker, its other child), or the one process."""
        record = self._records.get("api")
        if record is None:
            return 0
        return max(1, sum(_is_spawned_worker(pid) for pid in _children(record.pid)))


def _is_spawned_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()][:CHILDREN_MAX]


class RequestFailed(Exception):
    """A request of a timed run failed: the run's figure would be meaningless."""


@dataclass
class _Paths:
    """The two ways to the same operations, on the same wallets (per pair)."""

    api: ApiTarget
    reader: ReadRouter
    metrics: ReadMetricsStore  # the direct reads' observations (buffered, as the API's)
    wallets: WalletClient
    keys: dict[str, list[WalletKey]]  # pair -> its wallets; the first pair takes the credits
    run_id: str

    @property
    def credit_pair(self) -> str:
        return next(iter(self.keys))

    async def read(self, pair: str, wallet: int) -> str:
        """The read's answering store (mongodb or tigerbeetle)."""
        return (await self.reader.get_balance(self.keys[pair][wallet])).source

    async def credit(self, pair: str, wallet: int, name: str) -> None:
        await self.wallets.apply(AddCredit(
            wallet=self.keys[pair][wallet], transaction_id=f"{self.run_id}-{name}",
            amount=CREDIT_AMOUNT))  # fmt: skip

    def api_read(self, pair: str, wallet: int) -> LoadRequest:
        key = self.keys[pair][wallet]
        return LoadRequest(
            method="GET", path=f"/v1/wallets/{key.client_id}/{key.country}/{key.currency}/balance"
        )

    def api_credit(self, pair: str, wallet: int, name: str) -> LoadRequest:
        key = self.keys[pair][wallet]
        body = {"wallet": {"client_id": key.client_id, "country": key.country,
                           "currency": key.currency}, "amount": str(CREDIT_AMOUNT)}  # fmt: skip
        return LoadRequest(method="POST", path="/v1/wallets/credit", body=json.dumps(body),
                           headers={"Idempotency-Key": f"{self.run_id}-{name}"})  # fmt: skip


@dataclass(frozen=True)
class ApiTarget:
    base_url: str
    key: str  # the run's API key (revoked at the end)
    verify_tls: bool
    concurrency: int


async def run_load(
    target: ApiTarget, requests: list[LoadRequest], servers: ServerCpu, settle_s: float = 0.0
) -> tuple[LoadResult, dict[str, float]]:
    """`requests` sent by the load generator process (walletmig.bench_http_load); answers its
    result and the stack's processes' CPU seconds from its start to `settle_s` after its last
    answer (the API's deferred writes)."""
    plan = LoadPlan(
        base_url=target.base_url, concurrency=min(target.concurrency, len(requests)),
        headers={"Authorization": f"Bearer {target.key}"}, requests=requests,
        verify_tls=target.verify_tls,
    )  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".json") as plan_file:
        plan_file.write(plan.model_dump_json())
        plan_file.flush()
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "walletmig.bench_http_load", plan_file.name,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=LOAD_RESULT_BYTES_MAX,
        )  # fmt: skip
        assert child.stdin is not None and child.stdout is not None
        try:
            ready = await asyncio.wait_for(child.stdout.readline(), LOAD_START_TIMEOUT_S)
            if ready != b"ready\n":
                raise RequestFailed(f"the load generator did not start: {ready[:300]!r}")
            server0 = servers.sample()
            child.stdin.write(b"go\n")
            await child.stdin.drain()
            line = await child.stdout.readline()
            await asyncio.sleep(settle_s)
            spent = ServerCpu.spent(server0, servers.sample())
            await child.wait()
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
    if child.returncode != 0 or not line:
        raise RequestFailed(f"the load generator exited with {child.returncode}")
    result = LoadResult.model_validate_json(line)
    _check(result)
    return result, spent


def _check(result: LoadResult) -> None:
    if "429" in result.statuses:
        raise RequestFailed(
            "429 from the API's rate limiter: start the API with higher "
            "WALLETMIG_API_RATE_LIMIT_READ / _MONEY for a benchmark (`walletmig dev down --only "
            "api`, then `WALLETMIG_API_RATE_LIMIT_MONEY=100000/second "
            "WALLETMIG_API_RATE_LIMIT_READ=100000/second walletmig dev up`)")  # fmt: skip
    if set(result.statuses) != {"200"}:
        raise RequestFailed(f"answers {result.statuses}: {result.failures}")


@dataclass(frozen=True)
class _Run:
    kind: Kind
    path: PathName
    pair: str
    source: str
    round_no: int


async def _drive(paths: _Paths, run: _Run, count: int, concurrency: int, servers: ServerCpu
                 ) -> PathFigures:  # fmt: skip
    """`count` requests from `concurrency` callers; caller c uses wallet c % wallets (the
    API path: request i goes to wallet i % wallets, the same spread)."""
    wallets = len(paths.keys[run.pair])
    if run.path == "api":
        requests = [paths.api_read(run.pair, i % wallets) if run.kind == "read"
                    else paths.api_credit(run.pair, i % wallets, f"api-r{run.round_no}-{i}")
                    for i in range(count)]  # fmt: skip
        bench0 = time.process_time()
        result, spent = await run_load(paths.api, requests, servers, API_SETTLE_S)
        cpu_s = {"bench": time.process_time() - bench0, "load": result.cpu_s, **spent}
        return _figures(run, result.latencies_s, result.seconds, cpu_s)
    latencies: list[float] = []
    next_request = 0

    async def caller(c: int) -> None:
        nonlocal next_request
        while next_request < count:
            i = next_request
            next_request += 1
            started = time.perf_counter()
            if run.kind == "read":
                await paths.read(run.pair, c % wallets)
            else:
                await paths.credit(run.pair, c % wallets, f"direct-r{run.round_no}-{i}")
            latencies.append(time.perf_counter() - started)

    server0, cpu0 = servers.sample(), time.process_time()
    wall0 = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(concurrency)))
    seconds = time.perf_counter() - wall0
    await paths.metrics.flush()  # its observations, charged to this run (not the next)
    cpu_s = {"bench": time.process_time() - cpu0, **ServerCpu.spent(server0, servers.sample())}
    latencies.sort()
    return _figures(run, latencies, seconds, cpu_s)


def _figures(run: _Run, latencies: list[float], seconds: float, cpu_s: dict[str, float]
             ) -> PathFigures:  # fmt: skip
    """The run's figures; its window ends now (its throughput window is `seconds` long)."""
    ended = datetime.now(UTC)
    return PathFigures(
        kind=run.kind, path=run.path, pair=run.pair, source=run.source, round=run.round_no,
        started_at=ended - timedelta(seconds=seconds), ended_at=ended,
        requests=len(latencies), seconds=round(seconds, 3),
        requests_per_s=round(len(latencies) / seconds, 1),
        p50_ms=round(percentile(latencies, 0.50) * 1000, 2),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 2),
        cpu_ms_per_request={name: round(value * 1000 / len(latencies), 3)
                            for name, value in cpu_s.items()},
    )  # fmt: skip


def _median(runs: list[PathFigures]) -> PathFigures:
    assert runs and len({(r.kind, r.pair, r.path) for r in runs}) == 1

    def mid(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    names = sorted({n for r in runs for n in r.cpu_ms_per_request})
    return runs[0].model_copy(update=dict(
        round=None, started_at=None, ended_at=None, seconds=mid([r.seconds for r in runs]),
        requests_per_s=mid([r.requests_per_s for r in runs]),
        p50_ms=mid([r.p50_ms for r in runs]), p99_ms=mid([r.p99_ms for r in runs]),
        cpu_ms_per_request={n: mid([r.cpu_ms_per_request.get(n, 0.0) for r in runs])
                            for n in names},
    ))  # fmt: skip


def _report(config: ApiBenchConfig, sources: dict[str, str], runs: list[PathFigures]
            ) -> ApiBenchReport:  # fmt: skip
    groups: dict[tuple[str, str, str], list[PathFigures]] = {}
    for r in runs:
        groups.setdefault((r.kind, r.pair, r.path), []).append(r)
    medians = {key: _median(group) for key, group in groups.items()}
    credit_pair = f"{config.currency}:{config.country}"
    by_round = {(r.kind, r.pair, r.path, r.round): r for r in runs}

    def per_round(kind: Kind, pair: str) -> list[float]:
        """API / direct throughput of each round (its two runs side by side)."""
        return [round(by_round[kind, pair, "api", n].requests_per_s
                      / by_round[kind, pair, "direct", n].requests_per_s, 3)
                for n in range(config.rounds)]  # fmt: skip

    def ratio(kind: Kind, pair: str) -> float:
        return round(statistics.median(per_round(kind, pair)), 3)

    round_ratios = {f"read via {sources[pair]}": per_round("read", pair) for pair in sources}
    round_ratios["credit"] = per_round("credit", credit_pair)
    read_ratios = {sources[pair]: ratio("read", pair) for pair in sources}
    api_reads = {sources[pair]: medians["read", pair, "api"].requests_per_s for pair in sources}
    credit_ratio = ratio("credit", credit_pair)
    goals: dict[str, bool] = {}
    for source in read_ratios:
        goals[f"reads via {source}: API >= {GOAL_READ_RATIO:.0%} of direct reads/s"] = (
            read_ratios[source] >= GOAL_READ_RATIO)
        goals[f"reads via {source}: API >= {GOAL_API_READS_PER_S:.0f}/s"] = (
            api_reads[source] >= GOAL_API_READS_PER_S)
    goals[f"API credits >= {GOAL_CREDIT_RATIO:.0%} of direct credits/s"] = (
        credit_ratio >= GOAL_CREDIT_RATIO)
    return ApiBenchReport(
        api_url=config.api_url, pair=credit_pair, sources=sources,
        concurrency=config.concurrency, wallets=config.wallets, rounds=config.rounds,
        runs=runs, medians=list(medians.values()), read_ratios=read_ratios,
        api_reads_per_s=api_reads, credit_ratio=credit_ratio, round_ratios=round_ratios,
        goals=goals,
        host_cpus=os.cpu_count() or 0,
    )  # fmt: skip


def rotated(round_no: int) -> tuple[PathName, PathName]:
    """Round 0: the API first; round 1: direct first; and so on."""
    return ("api", "direct") if round_no % 2 == 0 else ("direct", "api")


async def run_bench(settings: Settings, config: ApiBenchConfig) -> ApiBenchReport:
    run_id = f"bench-api-{uuid.uuid4().hex[:8]}"
    keys = {f"{currency}:{country}": [
        WalletKey(client_id=f"{run_id}-{w}", country=country, currency=currency)
        for w in range(config.wallets)] for currency, country in config.pairs}  # fmt: skip
    servers = StackCpu(settings.state_dir)
    runs: list[PathFigures] = []
    load_start = _load_avg()
    async with _opened(settings, config, run_id) as (stores, target, wallets, temporal):
        await _tb_primary(stores, f"{config.tb_currency}:{config.tb_country}")
        metrics = ReadMetricsStore(stores.db)  # the gateway records reads too (gate evidence)
        flusher = asyncio.create_task(metrics.run_flusher(METRICS_FLUSH_INTERVAL_S))
        try:
            reader = ReadRouter(stores.legacy, stores.tigerbeetle, stores.migration, metrics)
            paths = _Paths(api=target, reader=reader, metrics=metrics, wallets=wallets,
                           keys=keys, run_id=run_id)  # fmt: skip
            sources = await _warm_up(paths, config.concurrency, servers)
            for round_no in range(config.rounds):
                for kind, pair in [*(("read", p) for p in keys), ("credit", paths.credit_pair)]:
                    count = config.reads if kind == "read" else config.credits
                    for path in rotated(round_no):
                        run = _Run(kind, path, pair, sources[pair], round_no)  # type: ignore[arg-type]
                        runs.append(await _drive(paths, run, count, config.concurrency, servers))
        finally:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
        scheduled = await scheduled_during(temporal, runs)
    report = _report(config, sources, runs)
    return report.model_copy(update={
        "load_avg": (load_start, _load_avg()), "api_processes": servers.api_processes(),
        "scheduled": scheduled})


async def scheduled_during(temporal: Client, runs: list[PathFigures]) -> list[ScheduledRun] | None:
    """The stack's scheduled workflows (any schedule) whose run overlapped a timed run: the
    bench shares the stack with its schedules (every 300 s by default), and a reconciliation
    round in one path's window is load the other path's window did not have. None when the
    visibility store cannot answer the query (it is evidence, not a reason to fail)."""
    windows = [r for r in runs if r.started_at is not None and r.ended_at is not None]
    if not windows:
        return []
    first = min(r.started_at for r in windows if r.started_at is not None)
    query = (f"TemporalScheduledById IS NOT NULL AND StartTime > "
             f"'{(first - SCHEDULED_LOOKBACK).isoformat()}'")  # fmt: skip
    found: list[ScheduledRun] = []
    try:
        async for w in temporal.list_workflows(query, limit=SCHEDULED_MAX):
            overlapped = [_run_name(r) for r in windows if _overlaps(r, w.start_time, w.close_time)]
            if overlapped:
                found.append(ScheduledRun(
                    workflow_id=w.id, workflow_type=w.workflow_type, started_at=w.start_time,
                    closed_at=w.close_time, runs=overlapped))  # fmt: skip
    except RPCError:
        return None
    return found


def _overlaps(run: PathFigures, started_at: datetime, closed_at: datetime | None) -> bool:
    assert run.started_at is not None and run.ended_at is not None
    return started_at < run.ended_at and (closed_at is None or closed_at > run.started_at)


def _run_name(run: PathFigures) -> str:
    assert run.round is not None
    return f"round {run.round + 1} {run.kind} {run.pair} {run.path}"


def _load_avg() -> float:
    return os.getloadavg()[0]


async def _tb_primary(stores: Stores, scope: str) -> None:
    """`scope` in tb_primary, as bench wallet-ops sets its TB_PRIMARY_PAIR (there on a database
    of its own; here on the stack's: only a pair without a migration state is set, and left
    so for later runs; a pair mid-migration is refused rather than moved)."""
    state = await stores.migration.find(scope, fresh=True)
    if state is None:
        await stores.migration.set(MigrationState(
            scope=scope, phase=Phase.TB_PRIMARY, epoch=1, rollout_percent=100))  # fmt: skip
        await asyncio.sleep(PHASE_VISIBLE_S)  # the API and the worker cache the phase
    elif state.phase not in (Phase.TB_PRIMARY, Phase.COMPLETE):
        raise RequestFailed(f"pair {scope} is in phase {state.phase.value}: bench api needs it "
                            "in tb_primary (or without a migration state)")  # fmt: skip


async def _warm_up(paths: _Paths, concurrency: int, servers: ServerCpu) -> dict[str, str]:
    """Create every wallet (a seed credit), then one read and one credit per wallet through
    each path: workflows, caches, connections and the API's key cache are warm before timing.
    Answers the store that answered each pair's reads (one store per pair, checked)."""
    gate = asyncio.Semaphore(concurrency)
    answered: dict[str, set[str]] = {pair: set() for pair in paths.keys}

    async def each(pair: str, call: Callable[[int], Awaitable[object]]) -> None:
        async def one(w: int) -> None:
            async with gate:
                await call(w)
        await asyncio.gather(*(one(w) for w in range(len(paths.keys[pair]))))

    async def read(pair: str, w: int) -> None:
        answered[pair].add(await paths.read(pair, w))

    for pair, keys in paths.keys.items():
        await each(pair, lambda w, pair=pair: _seed(paths, pair, w))  # type: ignore[misc]
        await run_load(paths.api, [paths.api_read(pair, w) for w in range(len(keys))], servers)
        await each(pair, lambda w, pair=pair: read(pair, w))  # type: ignore[misc]
    credit_pair, wallets = paths.credit_pair, range(len(paths.keys[paths.credit_pair]))
    await run_load(paths.api, [paths.api_credit(credit_pair, w, f"api-warm-{w}")
                               for w in wallets], servers)  # fmt: skip
    await each(credit_pair, lambda w: paths.credit(credit_pair, w, f"direct-warm-{w}"))
    for pair, stores in answered.items():
        if len(stores) != 1:
            raise RequestFailed(f"pair {pair}'s reads were answered by {sorted(stores)}")
    return {pair: stores.pop() for pair, stores in answered.items()}


async def _seed(paths: _Paths, pair: str, wallet: int) -> None:
    await paths.wallets.apply(AddCredit(
        wallet=paths.keys[pair][wallet], transaction_id=f"{paths.run_id}-seed-{pair}-{wallet}",
        amount=SEED_AMOUNT))


@contextlib.asynccontextmanager
async def _opened(settings: Settings, config: ApiBenchConfig, run_id: str
                  ) -> AsyncIterator[tuple[Stores, ApiTarget, WalletClient, Client]]:
    """The stores, an API key for this run (revoked at the end), the wallet client and its
    Temporal client."""
    stores = await make_stores(settings, ensure_indexes=False)
    try:
        api_keys = ApiKeyStore(stores.db)
        issued = await api_keys.create(name=run_id, owner=run_id,
                                       scopes=["wallets:read", "wallets:write"])
        try:
            target = ApiTarget(base_url=config.api_url, key=issued.key,
                               verify_tls=config.verify_tls, concurrency=config.concurrency)
            temporal = await connect_temporal(settings)
            yield stores, target, WalletClient(
                temporal, settings.wallet_task_queue, id_key=settings.id_key()), temporal
        finally:
            await api_keys.revoke(issued.record.key_id)
    finally:
        await stores.close()


def format_report(report: ApiBenchReport) -> str:
    """Rich tables (rendered to text): the medians per pair, then every round, then goals."""
    names = sorted({n for r in report.medians for n in r.cpu_ms_per_request},
                   key=lambda n: (n != "bench", n != "load", n != "api", n != "worker", n))
    buffer = io.StringIO()
    out = Console(file=buffer, width=TABLE_WIDTH, force_terminal=False)
    out.print(
        f"API {report.api_url} ({report.api_processes} process"
        f"{'es' if report.api_processes != 1 else ''}), {report.concurrency} concurrent "
        f"callers on {report.wallets} "
        f"wallets per pair, {report.rounds} rounds (paths' order swapped each round), "
        f"{report.host_cpus} CPUs (load average {report.load_avg[0]:.1f} at the start, "
        f"{report.load_avg[1]:.1f} at the end); reads answered by: "
        + ", ".join(f"{pair} {source}" for pair, source in report.sources.items())
    )  # fmt: skip
    for title, rows in (("medians", report.medians), ("every round", report.runs)):
        table = Table(title=f"{title} (columns after p99: CPU ms per request of each process)")
        for column in ("kind", "pair (store)", "path", "round", "reqs", "req/s", "p50 ms",
                       "p99 ms", *names):
            table.add_column(column, justify="left" if column in ("kind", "path") else "right",
                             no_wrap=True)  # fmt: skip
        for r in rows:
            table.add_row(
                r.kind, f"{r.pair} ({r.source})", r.path,
                "median" if r.round is None else str(r.round + 1), str(r.requests),
                f"{r.requests_per_s:.1f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
                *(f"{r.cpu_ms_per_request.get(n, 0.0):.3f}" for n in names),
            )  # fmt: skip
        out.print(table)
    ratios = ", ".join(f"{source} {ratio:.0%}" for source, ratio in report.read_ratios.items())
    out.print(f"API / direct throughput (median of the rounds' ratios): reads via {ratios}; "
              f"credits {report.credit_ratio:.0%}")  # fmt: skip
    for name, values in report.round_ratios.items():
        out.print(f"  {name} by round: " + ", ".join(f"{v:.0%}" for v in values))
    for goal, met in report.goals.items():
        out.print(f"  {'met   ' if met else 'MISSED'} {goal}")
    out.print(_scheduled_line(report.scheduled))
    return buffer.getvalue().rstrip("\n")


def _scheduled_line(scheduled: list[ScheduledRun] | None) -> str:
    if scheduled is None:
        return "scheduled workflows during the timed runs: unknown (the visibility query failed)"
    if not scheduled:
        return "scheduled workflows during the timed runs: none"
    lines = [f"  {w.workflow_type} {w.started_at:%H:%M:%S}-"
             f"{'running' if w.closed_at is None else f'{w.closed_at:%H:%M:%S}'} UTC: "
             + "; ".join(w.runs) for w in scheduled]  # fmt: skip
    return "\n".join(["scheduled workflows during the timed runs (their load is in those rounds):",
                      *lines])  # fmt: skip
