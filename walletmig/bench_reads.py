"""`walletmig bench reads`: balance reads through the read router, MongoDB vs TigerBeetle, next to
the raw reads under them, at 1 and at 100 concurrent readers, in one run.

Paths (each at every reader count, same wallets, same process):
  balance       router mongodb     ReadRouter.get_balance, the pair in phase legacy
                router tigerbeetle ReadRouter.get_balance, tb_primary (breaker, fallback, metrics)
                raw find_one       the wallets collection's find_one by _id: MongoDB's floor
                raw lookup         lookup_accounts of the account id on the bare client
  all-balances  router mongodb / router tigerbeetle: ReadRouter.get_multi_balance
                raw find           find by client_id;  raw lookup: lookup_accounts of its ids
The routers are the production ones (a ReadMetricsStore with its flusher, as the gateway and
the workers build them): phases come from two migration-state databases of the bench's own,
one empty (legacy everywhere), one with '*' in tb_primary, so no phase switches mid-run.
Every path is warmed up on every wallet first (the TigerBeetle read remembers account ids:
registries.account_registry.read_account), then timed; paths run in `rounds`, the order rotated
each round, and the medians are compared. CPU per read: this process (client side) and each
server of the `dev up` stack. On a shared 2-core machine CPU per read is the steady figure.

Goals (issue 18, the wallet plan's GetBalance target): TigerBeetle balance read p50 <= 2 ms at
1 reader; at 100 readers its p95 <= 50 % of MongoDB's (the read-cutover gate's criterion).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal

from prometheus_client import REGISTRY
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from stores.bundle import Stores, make_stores
from stores.legacy_store import WALLETS
from stores.migration_state import GLOBAL_SCOPE, MigrationStateStore
from stores.read_metrics import ReadMetricsStore
from walletclient.read_path import ReadRouter
from walletconfig.settings import Settings
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit
from walletcore.phases import MigrationState, Phase
from walletmig.bench_wallet_ops import ServerCpu, percentile

PAIRS = (("USD", "USA"), ("MXN", "MEX"))  # every client has one wallet in each
PATHS = (
    "balance router mongodb", "balance router tigerbeetle",
    "balance raw find_one", "balance raw lookup_accounts",
    "all-balances router mongodb", "all-balances router tigerbeetle",
    "all-balances raw find", "all-balances raw lookup_accounts",
)  # fmt: skip
GOAL_TB_P50_MS_1 = 2.0
GOAL_TB_OF_MONGO_P95_100 = 0.50
SEED_CONCURRENCY = 32  # also the warm-up's reads in flight (a herd of cold reads would time out)
READ_SERVERS = ("mongo", "redis", "tigerbeetle")  # the servers a read touches (table columns)
TABLE_WIDTH_MIN = 140  # piped output: rich would cut the table to 80 columns
READERS_MAX = 1000

Read = Callable[[int], Awaitable[object]]  # read number -> one read


class ReadsConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    clients: int = Field(default=100, ge=1, le=10_000)  # wallets: clients x len(PAIRS)
    reads: int = Field(default=2000, ge=10, le=1_000_000)  # per path, reader count and round
    readers: tuple[int, ...] = Field(default=(1, 100), min_length=1, max_length=4)
    rounds: int = Field(default=2, ge=1, le=10)


class PathFigures(BaseModel):
    path: str
    readers: int
    round: int | None = None  # None: the median over the rounds
    reads: int
    seconds: float
    reads_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cpu_ms_per_read: float  # this process (the client side: router, drivers)
    server_cpu_ms_per_read: dict[str, float] = {}  # each server of the dev stack


class ReadsReport(BaseModel):
    config: ReadsConfig
    runs: list[PathFigures]
    medians: list[PathFigures]
    tb_balance_p50_ms_1: float | None
    tb_of_mongo_balance_p95_100: float | None
    # Reads the TigerBeetle router answered from MongoDB (timeout, error, open breaker) during
    # the timed runs: above 0, part of its figures are MongoDB's.
    tb_router_fallbacks: int = 0
    goals: dict[str, bool]
    host_cpus: int


async def _drive(path: str, readers: int, round_no: int, reads: int, read: Read,
                 servers: ServerCpu) -> PathFigures:
    """`reads` reads from `readers` concurrent readers; latencies and CPU of the window."""
    assert 1 <= readers <= READERS_MAX and reads >= 1
    latencies: list[float] = []
    next_read = 0

    async def reader() -> None:
        nonlocal next_read
        while next_read < reads:
            i = next_read
            next_read += 1
            started = time.perf_counter()
            await read(i)
            latencies.append(time.perf_counter() - started)

    server0 = servers.sample()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(reader() for _ in range(readers)))
    seconds = time.perf_counter() - wall0
    cpu_s = time.process_time() - cpu0
    spent = ServerCpu.spent(server0, servers.sample())
    latencies.sort()
    return PathFigures(
        path=path, readers=readers, round=round_no, reads=len(latencies),
        seconds=round(seconds, 3), reads_per_s=round(len(latencies) / seconds, 1),
        p50_ms=round(percentile(latencies, 0.50) * 1000, 3),
        p95_ms=round(percentile(latencies, 0.95) * 1000, 3),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 3),
        cpu_ms_per_read=round(cpu_s * 1000 / len(latencies), 4),
        server_cpu_ms_per_read={n: round(s * 1000 / len(latencies), 4) for n, s in spent.items()},
    )


class _Reads:
    """The eight paths' read functions over the seeded wallets."""

    def __init__(self, stores: Stores, mongo_router: ReadRouter, tb_router: ReadRouter,
                 wallets: list[WalletKey], ids: dict[str, int]) -> None:
        self.stores = stores
        self.wallets = wallets
        self.clients = sorted({w.client_id for w in wallets})
        self.ids = ids  # canonical -> account id
        self.ids_of_client = {c: [ids[w.canonical] for w in wallets if w.client_id == c]
                              for c in self.clients}
        raw_tb = getattr(stores.tb_client, "client", stores.tb_client)  # under the batching
        wallets_col = stores.db[WALLETS]

        def wallet(i: int) -> WalletKey:
            return wallets[(i * 7919) % len(wallets)]  # spread over every wallet

        def client(i: int) -> str:
            return self.clients[(i * 7919) % len(self.clients)]

        async def find_many(i: int) -> object:
            return await wallets_col.find({"client_id": client(i)}).to_list(None)

        self.by_path: dict[str, Read] = {
            PATHS[0]: lambda i: mongo_router.get_balance(wallet(i)),
            PATHS[1]: lambda i: tb_router.get_balance(wallet(i)),
            PATHS[2]: lambda i: wallets_col.find_one({"_id": wallet(i).canonical}),
            PATHS[3]: lambda i: raw_tb.lookup_accounts([ids[wallet(i).canonical]]),
            PATHS[4]: lambda i: mongo_router.get_multi_balance(client(i)),
            PATHS[5]: lambda i: tb_router.get_multi_balance(client(i)),
            PATHS[6]: find_many,
            PATHS[7]: lambda i: raw_tb.lookup_accounts(self.ids_of_client[client(i)]),
        }

    def count(self, path: str) -> int:
        """Reads that touch every wallet (or client) once: the warm-up."""
        return len(self.clients) if path.startswith("all-") else len(self.wallets)


async def _seed(stores: Stores, bench_id: str, clients: int) -> tuple[list[WalletKey],
                                                                     dict[str, int]]:
    """Every wallet in both stores with the same credit; returns the wallets and account ids."""
    wallets = [WalletKey(client_id=f"bench-reads-{bench_id}-{c}", currency=cur, country=cty)
               for c in range(clients) for cur, cty in PAIRS]
    gate = asyncio.Semaphore(SEED_CONCURRENCY)

    async def one(index: int, w: WalletKey) -> None:
        op = AddCredit(wallet=w, transaction_id=f"bench-reads-{bench_id}-seed-{index}",
                       amount=Decimal("100.00"))
        async with gate:
            await stores.legacy.add_credit(op)
            await stores.tigerbeetle.add_credit(op)

    await asyncio.gather(*(one(i, w) for i, w in enumerate(wallets)))
    records = await stores.accounts.get_many(wallets)
    assert len(records) == len(wallets), "every seeded wallet is registered"
    return wallets, {k: r.account_id for k, r in records.items()}


async def run_reads_bench(settings: Settings, config: ReadsConfig) -> ReadsReport:
    bench_id = uuid.uuid4().hex[:8]
    database = f"walletmig_bench_reads_{bench_id}"
    isolated = settings.model_copy(update={"mongodb_database": database})
    stores = await make_stores(isolated)
    tb_phase_db = stores.mongo_client[f"{database}_tb"]
    metrics = ReadMetricsStore(stores.db)
    flusher = asyncio.create_task(metrics.run_flusher())
    try:
        tb_state = MigrationStateStore(tb_phase_db)
        await tb_state.set(MigrationState(scope=GLOBAL_SCOPE, phase=Phase.TB_PRIMARY,
                                          rollout_percent=100, epoch=1))
        mongo_router = ReadRouter(stores.legacy, stores.tigerbeetle, stores.migration, metrics)
        tb_router = ReadRouter(stores.legacy, stores.tigerbeetle, tb_state, metrics)
        wallets, ids = await _seed(stores, bench_id, config.clients)
        reads = _Reads(stores, mongo_router, tb_router, wallets, ids)
        await _warm_up(reads)
        fallbacks0 = primary_fallbacks()
        runs = await _run_paths(reads, config, ServerCpu(isolated.state_dir))
        fallbacks = primary_fallbacks() - fallbacks0
    finally:
        flusher.cancel()
        with contextlib.suppress(BaseException):
            await flusher
        with contextlib.suppress(Exception):
            await stores.mongo_client.drop_database(f"{database}_tb")
            await stores.mongo_client.drop_database(database)
        await stores.close()
    return _report(config, runs).model_copy(update={"tb_router_fallbacks": fallbacks})


def primary_fallbacks() -> int:
    """Reads answered by MongoDB in tb_primary so far (walletmig_reads_total of this process)."""
    return int(sum(sample.value for family in REGISTRY.collect()
                   for sample in family.samples
                   if sample.name == "walletmig_reads_total"
                   and sample.labels.get("mode") == "primary"
                   and sample.labels.get("outcome", "").startswith("fallback")))


async def _warm_up(reads: _Reads) -> None:
    """Every wallet once per path (pools, caches, remembered ids), SEED_CONCURRENCY at a time."""
    gate = asyncio.Semaphore(SEED_CONCURRENCY)

    async def one(path: str, i: int) -> None:
        async with gate:
            await reads.by_path[path](i)

    for path in PATHS:
        await asyncio.gather(*(one(path, i) for i in range(reads.count(path))))


async def _run_paths(reads: _Reads, config: ReadsConfig, servers: ServerCpu) -> list[PathFigures]:
    runs: list[PathFigures] = []
    for round_no in range(config.rounds):
        shift = round_no % len(PATHS)
        for readers in config.readers:
            for path in PATHS[shift:] + PATHS[:shift]:
                runs.append(await _drive(path, readers, round_no, config.reads,
                                         reads.by_path[path], servers))
    return runs


def _median(runs: list[PathFigures]) -> PathFigures:
    first = runs[0]
    assert all(r.path == first.path and r.readers == first.readers for r in runs)

    def mid(values: list[float]) -> float:
        return round(statistics.median(values), 4)

    names = sorted({n for r in runs for n in r.server_cpu_ms_per_read})
    return PathFigures(
        path=first.path, readers=first.readers, round=None, reads=first.reads,
        seconds=mid([r.seconds for r in runs]), reads_per_s=mid([r.reads_per_s for r in runs]),
        p50_ms=mid([r.p50_ms for r in runs]), p95_ms=mid([r.p95_ms for r in runs]),
        p99_ms=mid([r.p99_ms for r in runs]),
        cpu_ms_per_read=mid([r.cpu_ms_per_read for r in runs]),
        server_cpu_ms_per_read={n: mid([r.server_cpu_ms_per_read.get(n, 0.0) for r in runs])
                                for n in names},
    )


def _report(config: ReadsConfig, runs: list[PathFigures]) -> ReadsReport:
    medians = [_median([r for r in runs if r.path == path and r.readers == readers])
               for readers in config.readers for path in PATHS]
    by = {(m.path, m.readers): m for m in medians}
    goals: dict[str, bool] = {}
    tb_p50: float | None = None
    ratio: float | None = None
    if (PATHS[1], 1) in by:
        tb_p50 = by[(PATHS[1], 1)].p50_ms
        goals[f"TigerBeetle balance read p50 <= {GOAL_TB_P50_MS_1:g} ms at 1 reader"] = (
            tb_p50 <= GOAL_TB_P50_MS_1)
    if (PATHS[1], 100) in by:
        ratio = round(by[(PATHS[1], 100)].p95_ms / by[(PATHS[0], 100)].p95_ms, 3)
        goals[f"TigerBeetle balance p95 <= {GOAL_TB_OF_MONGO_P95_100:.0%} of MongoDB's at 100 "
              "readers"] = ratio <= GOAL_TB_OF_MONGO_P95_100
    return ReadsReport(config=config, runs=runs, medians=medians, tb_balance_p50_ms_1=tb_p50,
                       tb_of_mongo_balance_p95_100=ratio, goals=goals,
                       host_cpus=os.cpu_count() or 0)


def print_report(report: ReadsReport, console: Console | None = None) -> None:
    """Rich tables: the medians per reader count, then the goals met or missed."""
    out = console or Console(width=max(Console().width, TABLE_WIDTH_MIN))
    names = [n for n in READ_SERVERS
             if any(n in m.server_cpu_ms_per_read for m in report.medians)]
    for readers in report.config.readers:
        table = Table(title=f"{readers} reader(s): medians of {report.config.rounds} round(s), "
                            f"{report.config.reads} reads each")
        for column in ("path", "reads/s", "p50 ms", "p95 ms", "p99 ms", "CPU ms/read this",
                       *(f"{n} CPU ms/read" for n in names)):
            path = column == "path"
            table.add_column(column, justify="left" if path else "right", no_wrap=path)
        for m in (m for m in report.medians if m.readers == readers):
            table.add_row(m.path, f"{m.reads_per_s:.0f}", f"{m.p50_ms:.2f}", f"{m.p95_ms:.2f}",
                          f"{m.p99_ms:.2f}", f"{m.cpu_ms_per_read:.3f}",
                          *(f"{m.server_cpu_ms_per_read.get(n, 0.0):.3f}" for n in names))
        out.print(table)
    if report.tb_of_mongo_balance_p95_100 is not None:
        out.print(f"TigerBeetle / MongoDB balance p95 at 100 readers (router): "
                  f"{report.tb_of_mongo_balance_p95_100:.0%}")
    if report.tb_router_fallbacks:
        out.print(f"[yellow]{report.tb_router_fallbacks} TigerBeetle router reads fell back to "
                  "MongoDB (timeout or open breaker): part of its figures are MongoDB's[/yellow]")
    for goal, met in report.goals.items():
        out.print(f"  {'[green]met[/green]   ' if met else '[red]MISSED[/red]'} {goal}")
