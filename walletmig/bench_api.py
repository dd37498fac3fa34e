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
swapped each round, on wallets seeded and warmed up through both paths first; the figures
compared are each run's median over the rounds. CPU per request comes from /proc for every
process of the stack (`pids.json`: the API, the worker, the servers), for this process (the
direct path's client) and for the load generator (its own process_time).

It writes into the stack's own database: wallets `bench-api-<run>-<n>` of one pair (in the
pair's current phase), and an API key that is revoked at the end. Meant for a dev stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stores.api_keys import ApiKeyStore
from stores.bundle import Stores, make_stores
from stores.read_metrics import ReadMetricsStore
from walletclient.read_path import ReadRouter
from walletclient.wallet_client import WalletClient
from walletconfig.settings import Settings
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit
from walletmig.bench_http_load import LoadPlan, LoadRequest, LoadResult
from walletmig.bench_wallet_ops import ServerCpu, percentile
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
    rounds: int = Field(default=2, ge=1, le=ROUNDS_MAX)
    country: str = "USA"
    currency: str = "USD"
    verify_tls: bool = True


class PathFigures(BaseModel):
    kind: Kind
    path: PathName
    round: int | None = None  # None: the median over the rounds
    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    # CPU ms per request: `bench` is this process (load generator, and the direct client);
    # the others are the stack's processes by component name (api, worker, mongo, ...).
    cpu_ms_per_request: dict[str, float] = {}


class ApiBenchReport(BaseModel):
    api_url: str
    pair: str
    concurrency: int
    wallets: int
    rounds: int
    runs: list[PathFigures]
    medians: list[PathFigures]
    read_ratio: float  # API reads/s over direct reads/s (medians)
    credit_ratio: float
    goals: dict[str, bool]
    host_cpus: int


class RequestFailed(Exception):
    """A request of a timed run failed: the run's figure would be meaningless."""


@dataclass
class _Paths:
    """The two ways to the same operations, on the same wallets."""

    api: ApiTarget
    reader: ReadRouter
    wallets: WalletClient
    keys: list[WalletKey]
    run_id: str

    async def read(self, wallet: int) -> None:
        await self.reader.get_balance(self.keys[wallet])

    async def credit(self, wallet: int, name: str) -> None:
        await self.wallets.apply(AddCredit(
            wallet=self.keys[wallet], transaction_id=f"{self.run_id}-{name}",
            amount=CREDIT_AMOUNT))  # fmt: skip

    def api_read(self, wallet: int) -> LoadRequest:
        key = self.keys[wallet]
        return LoadRequest(
            method="GET", path=f"/v1/wallets/{key.client_id}/{key.country}/{key.currency}/balance"
        )

    def api_credit(self, wallet: int, name: str) -> LoadRequest:
        key = self.keys[wallet]
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
    target: ApiTarget, requests: list[LoadRequest], servers: ServerCpu
) -> tuple[LoadResult, dict[str, float]]:
    """`requests` sent by the load generator process (walletmig.bench_http_load); answers its
    result and the stack's processes' CPU seconds over its timed window."""
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


async def _drive(paths: _Paths, kind: Kind, path: PathName, round_no: int, count: int,
                 concurrency: int, servers: ServerCpu) -> PathFigures:
    """`count` requests from `concurrency` callers; caller c uses wallet c % wallets (the
    API path: request i goes to wallet i % wallets, the same spread)."""
    wallets = len(paths.keys)
    if path == "api":
        requests = [paths.api_read(i % wallets) if kind == "read"
                    else paths.api_credit(i % wallets, f"api-r{round_no}-{i}")
                    for i in range(count)]  # fmt: skip
        bench0 = time.process_time()
        result, spent = await run_load(paths.api, requests, servers)
        cpu_s = {"bench": time.process_time() - bench0, "load": result.cpu_s, **spent}
        return _figures(kind, path, round_no, result.latencies_s, result.seconds, cpu_s)
    latencies: list[float] = []
    next_request = 0

    async def caller(c: int) -> None:
        nonlocal next_request
        while next_request < count:
            i = next_request
            next_request += 1
            started = time.perf_counter()
            if kind == "read":
                await paths.read(c % wallets)
            else:
                await paths.credit(c % wallets, f"direct-r{round_no}-{i}")
            latencies.append(time.perf_counter() - started)

    server0, cpu0 = servers.sample(), time.process_time()
    wall0 = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(concurrency)))
    seconds = time.perf_counter() - wall0
    cpu_s = {"bench": time.process_time() - cpu0, **ServerCpu.spent(server0, servers.sample())}
    latencies.sort()
    return _figures(kind, path, round_no, latencies, seconds, cpu_s)


def _figures(kind: Kind, path: PathName, round_no: int, latencies: list[float], seconds: float,
             cpu_s: dict[str, float]) -> PathFigures:
    return PathFigures(
        kind=kind, path=path, round=round_no, requests=len(latencies),
        seconds=round(seconds, 3), requests_per_s=round(len(latencies) / seconds, 1),
        p50_ms=round(percentile(latencies, 0.50) * 1000, 2),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 2),
        cpu_ms_per_request={name: round(value * 1000 / len(latencies), 3)
                            for name, value in cpu_s.items()},
    )  # fmt: skip


def _median(runs: list[PathFigures]) -> PathFigures:
    assert runs and len({(r.kind, r.path) for r in runs}) == 1

    def mid(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    names = sorted({n for r in runs for n in r.cpu_ms_per_request})
    return PathFigures(
        kind=runs[0].kind, path=runs[0].path, round=None, requests=runs[0].requests,
        seconds=mid([r.seconds for r in runs]),
        requests_per_s=mid([r.requests_per_s for r in runs]),
        p50_ms=mid([r.p50_ms for r in runs]), p99_ms=mid([r.p99_ms for r in runs]),
        cpu_ms_per_request={n: mid([r.cpu_ms_per_request.get(n, 0.0) for r in runs])
                            for n in names},
    )  # fmt: skip


def _report(config: ApiBenchConfig, runs: list[PathFigures]) -> ApiBenchReport:
    medians = {(k, p): _median([r for r in runs if (r.kind, r.path) == (k, p)])
               for k in KINDS for p in ("api", "direct")}  # fmt: skip
    read_ratio = medians["read", "api"].requests_per_s / medians["read", "direct"].requests_per_s
    credit_ratio = (medians["credit", "api"].requests_per_s
                    / medians["credit", "direct"].requests_per_s)
    api_reads = medians["read", "api"].requests_per_s
    return ApiBenchReport(
        api_url=config.api_url, pair=f"{config.currency}:{config.country}",
        concurrency=config.concurrency, wallets=config.wallets, rounds=config.rounds,
        runs=runs, medians=list(medians.values()),
        read_ratio=round(read_ratio, 3), credit_ratio=round(credit_ratio, 3),
        goals={
            f"API reads >= {GOAL_READ_RATIO:.0%} of direct reads/s": read_ratio >= GOAL_READ_RATIO,
            f"API credits >= {GOAL_CREDIT_RATIO:.0%} of direct credits/s":
                credit_ratio >= GOAL_CREDIT_RATIO,
            f"API reads >= {GOAL_API_READS_PER_S:.0f}/s": api_reads >= GOAL_API_READS_PER_S,
        },
        host_cpus=os.cpu_count() or 0,
    )  # fmt: skip


def rotated(round_no: int) -> tuple[PathName, PathName]:
    """Round 0: the API first; round 1: direct first; and so on."""
    return ("api", "direct") if round_no % 2 == 0 else ("direct", "api")


async def run_bench(settings: Settings, config: ApiBenchConfig) -> ApiBenchReport:
    run_id = f"bench-api-{uuid.uuid4().hex[:8]}"
    keys = [WalletKey(client_id=f"{run_id}-{w}", country=config.country,
                      currency=config.currency) for w in range(config.wallets)]  # fmt: skip
    servers = ServerCpu(settings.state_dir)
    runs: list[PathFigures] = []
    async with _opened(settings, config, run_id) as (stores, target, wallets):
        metrics = ReadMetricsStore(stores.db)  # the gateway records reads too (gate evidence)
        flusher = asyncio.create_task(metrics.run_flusher(METRICS_FLUSH_INTERVAL_S))
        try:
            reader = ReadRouter(stores.legacy, stores.tigerbeetle, stores.migration, metrics)
            paths = _Paths(api=target, reader=reader, wallets=wallets, keys=keys, run_id=run_id)
            await _warm_up(paths, config.concurrency, servers)
            for round_no in range(config.rounds):
                for kind in KINDS:
                    count = config.reads if kind == "read" else config.credits
                    for path in rotated(round_no):
                        runs.append(await _drive(paths, kind, path, round_no, count,
                                                 config.concurrency, servers))
        finally:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
    return _report(config, runs)


async def _warm_up(paths: _Paths, concurrency: int, servers: ServerCpu) -> None:
    """Create every wallet (a seed credit), then one read and one credit per wallet through
    each path: workflows, caches, connections and the API's key cache are warm before timing."""
    gate = asyncio.Semaphore(concurrency)

    async def each(call: Callable[[int], Awaitable[None]]) -> None:
        async def one(w: int) -> None:
            async with gate:
                await call(w)
        await asyncio.gather(*(one(w) for w in range(len(paths.keys))))

    await each(lambda w: _seed(paths, w))
    wallets = range(len(paths.keys))
    await run_load(paths.api, [paths.api_read(w) for w in wallets], servers)
    await run_load(paths.api, [paths.api_credit(w, f"api-warm-{w}") for w in wallets], servers)
    await each(paths.read)
    await each(lambda w: paths.credit(w, f"direct-warm-{w}"))


async def _seed(paths: _Paths, wallet: int) -> None:
    await paths.wallets.apply(AddCredit(
        wallet=paths.keys[wallet], transaction_id=f"{paths.run_id}-seed-{wallet}",
        amount=SEED_AMOUNT))


@contextlib.asynccontextmanager
async def _opened(settings: Settings, config: ApiBenchConfig, run_id: str
                  ) -> AsyncIterator[tuple[Stores, ApiTarget, WalletClient]]:
    """The stores, an API key for this run (revoked at the end) and the wallet client."""
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
                temporal, settings.wallet_task_queue, id_key=settings.id_key())
        finally:
            await api_keys.revoke(issued.record.key_id)
    finally:
        await stores.close()


def _run_line(r: PathFigures, names: list[str]) -> str:
    label = "median" if r.round is None else str(r.round + 1)
    cpu = " ".join(f"{r.cpu_ms_per_request.get(n, 0.0):>7.2f}" for n in names)
    return (f"{r.kind:<7} {r.path:<7} {label:>6} {r.requests:>7} {r.requests_per_s:>9.1f} "
            f"{r.p50_ms:>8.2f} {r.p99_ms:>8.2f}  {cpu}")


def format_report(report: ApiBenchReport) -> str:
    names = sorted({n for r in report.medians for n in r.cpu_ms_per_request},
                   key=lambda n: (n != "bench", n != "load", n != "api", n != "worker", n))
    lines = [
        f"API {report.api_url}, pair {report.pair}, {report.concurrency} concurrent callers on "
        f"{report.wallets} wallets, {report.rounds} rounds (paths' order swapped each round), "
        f"{report.host_cpus} CPUs",
        f"{'kind':<7} {'path':<7} {'round':>6} {'reqs':>7} {'req/s':>9} {'p50 ms':>8} "
        f"{'p99 ms':>8}  CPU ms/request: " + " ".join(f"{n:>7}" for n in names),
        *(_run_line(r, names) for r in report.runs),
        *(_run_line(r, names) for r in report.medians),
        f"API / direct throughput (medians): reads {report.read_ratio:.0%}, "
        f"credits {report.credit_ratio:.0%}",
    ]
    lines += [f"  {'met ' if met else 'MISSED'} {goal}" for goal, met in report.goals.items()]
    return "\n".join(lines)
