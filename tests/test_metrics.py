"""Metrics on the real stack (issue 11): a `walletmig worker` subprocess started with
WALLETMIG_METRICS_PORT and WALLETMIG_TEMPORAL_METRICS_PORT, wallet operations sent through
the WalletClient, both endpoints scraped.

- the store counters equal the operations sent, per store, operation and outcome (a refused
  debit is `refused`, not `error`), the latency histogram counted them too;
- TigerBeetle requests were timed (dual-write pair) and nothing is left in flight;
- `walletmig_migration_phase` follows a phase change (one gauge per phase label);
- the Temporal SDK's metrics the dashboards use are exported under the names they use;
- every sample's labels are bounded: no wallet or transaction id appears in the scrape;
- a migration workflow on that worker: its next step's gates as gauges (met / not met, an
  earlier step's gates removed), an automatic rollback counted once.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import string
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import running_api
from ledger_sync_support import make_terminal, own_table
from ledger_sync_support import txn as sync_txn
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient
from recon_support import Env, backfill_all, credit, run_reconciliation
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import Worker
from wallet_support import (
    DUAL_PAIR,
    LEGACY_PAIR,
    isolated_settings,
    key,
    sandboxed_worker,
    set_phase,
    start_worker,
    stop_workers,
    wait_drained,
    wallet_harness,
    worker_env,
)

from activities.clearing import build_clearing_activities
from messages.migration import ForceAdvanceRequest, MigrationConfig, MigrationStatus
from messages.wallet import ACTIVITY_READ_BALANCE, ReadBalanceInput
from observability.exposition import serve_metrics
from observability.metrics import DEFINED, TEMPORAL_SDK_METRICS
from observability.terminal import TERMINAL_OUTCOMES, observe_sync_lag
from stores.bundle import connect_batched, open_stores
from stores.clearing_store import ClearingStore
from stores.general_ledger import GeneralLedger
from stores.read_metrics import ReadMetricsStore, ReadMode, ReadObservation, ReadOutcome
from tb_emulator.server import EmulatorProcess
from walletclient.clearing_client import ClearingClient
from walletclient.wallet_client import WalletClient
from walletconfig.settings import Settings
from walletcore.balances import WalletBalance
from walletcore.errors import InsufficientFundsError
from walletcore.gates import GateThresholds
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, GetBalance, SubtractCredit, Void
from walletcore.phases import Phase
from walletmig.commands.migration import start_migration_workflow
from walletmig.processes import free_port
from workers.wallet_worker import workflow_runner
from workflows.clearing import ClearingBatchWorkflow
from workflows.reconciliation import ReconciliationWorkflow

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
CREDITS = 6
DEBITS = 3
VOIDS = 2
READS = 4
SCRAPE_TIMEOUT_S = 5
READY_TIMEOUT_S = 60
PHASE_WAIT_S = 30
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                timeout=SCRAPE_TIMEOUT_S) as answer:
        return parse(answer.read().decode())


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over the series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and want <= lbls)


async def wait_scrapable(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the worker exited"
        try:
            await asyncio.to_thread(scrape, port)
            return
        except OSError:
            await asyncio.sleep(0.2)
    raise AssertionError(f"no metrics on port {port} after {READY_TIMEOUT_S} s")


async def wait_phase(port: int, scope: str, phase: str) -> Samples:
    deadline = time.monotonic() + PHASE_WAIT_S
    while True:
        samples = await asyncio.to_thread(scrape, port)
        if value(samples, "walletmig_migration_phase", migration=scope, phase=phase) == 1:
            return samples
        assert time.monotonic() < deadline, f"{scope} never showed {phase}"
        await asyncio.sleep(0.2)


async def test_worker_metrics_follow_the_operations_sent(
    temporal_client: Client, settings: Settings, tmp_path: Path
) -> None:
    isolated = isolated_settings(settings, "metrics")
    task_queue = f"metrics-{uuid.uuid4().hex[:8]}"
    port, sdk_port = free_port(), free_port()
    env = worker_env(isolated, task_queue)
    env["WALLETMIG_METRICS_PORT"] = str(port)
    env["WALLETMIG_TEMPORAL_METRICS_PORT"] = str(sdk_port)
    run = uuid.uuid4().hex[:8]
    legacy_wallet = key(f"metrics-{run}-legacy", LEGACY_PAIR)
    dual_wallet = key(f"metrics-{run}-dual", DUAL_PAIR)
    dual_scope = ":".join(DUAL_PAIR)
    client = WalletClient(temporal_client, task_queue, id_key=settings.id_key(), idle_timeout_s=5)

    async with open_stores(isolated) as stores:
        await set_phase(stores, DUAL_PAIR, Phase.DUAL_WRITE)
        worker = start_worker(env, tmp_path / "worker.log")
        try:
            await wait_scrapable(port, worker)
            before = await asyncio.to_thread(scrape, port)
            for wallet in (legacy_wallet, dual_wallet):
                txn = wallet.client_id
                for i in range(CREDITS):
                    await client.apply(AddCredit(
                        wallet=wallet, transaction_id=f"{txn}.c{i}", amount=Decimal("10.00")))
                for i in range(DEBITS):
                    await client.apply(SubtractCredit(
                        wallet=wallet, transaction_id=f"{txn}.d{i}",
                        amount=Decimal("1.00")))
                for i in range(VOIDS):
                    await client.apply(Void(
                        wallet=wallet, transaction_id=f"{txn}.v{i}",
                        original_transaction_id=f"{txn}.c{i}"))
            with pytest.raises(InsufficientFundsError):
                await client.apply(SubtractCredit(
                    wallet=legacy_wallet, transaction_id=f"{legacy_wallet.client_id}.big",
                    amount=Decimal("1000000.00")))
            for _ in range(READS):
                await client.get_balance(legacy_wallet)
            await wait_drained(client, dual_wallet, outbox=stores.legacy.outbox)
            after = await asyncio.to_thread(scrape, port)
            check_store_counts(before, after)
            check_tigerbeetle(after)
            assert value(after, "walletmig_migration_phase",
                         migration=dual_scope, phase="dual_write") == 1
            check_bounded(after, run)
            check_labels(after)

            # A phase change: the worker publishes it once it acts on it (next write).
            await set_phase(stores, DUAL_PAIR, Phase.SHADOW_READ)
            await asyncio.sleep(1.5)  # the worker's migration-state cache TTL (1 s)
            await client.apply(AddCredit(wallet=dual_wallet, transaction_id=f"{run}.after",
                                         amount=Decimal("1.00")))
            moved = await wait_phase(port, dual_scope, "shadow_read")
            assert value(moved, "walletmig_migration_phase",
                         migration=dual_scope, phase="dual_write") == 0
            assert sum(value(moved, "walletmig_migration_phase", migration=dual_scope, phase=p)
                       for p in ("legacy", "dual_write", "shadow_read", "read_cutover",
                                 "tb_primary", "complete")) == 1

            # The live view, once: no such migration workflow, the scope's phase from metrics.
            shown = await watch_once(["migration", "watch", "--name", f"none-{run}"],
                                     f"http://127.0.0.1:{port}/metrics", env)
            assert "status unavailable" in shown, shown
            assert any(dual_scope in line and "shadow_read" in line
                       for line in shown.splitlines()), shown
            await complete_an_activity(temporal_client, task_queue, legacy_wallet)
            await wait_temporal_sdk(sdk_port)
        finally:
            stop_workers([worker])


def check_store_counts(before: Samples, after: Samples) -> None:
    def sent(store: str, operation: str, outcome: str) -> float:
        labels = {"store": store, "operation": operation, "outcome": outcome}
        return (value(after, "walletmig_wallet_operations_total", **labels)
                - value(before, "walletmig_wallet_operations_total", **labels))

    # MongoDB answered every write of both wallets (legacy and dual_write phases).
    assert sent("mongodb", "credit", "ok") == 2 * CREDITS
    assert sent("mongodb", "debit", "ok") == 2 * DEBITS
    assert sent("mongodb", "void", "ok") == 2 * VOIDS
    assert sent("mongodb", "debit", "refused") == 1
    assert sent("mongodb", "debit", "error") == 0
    assert sent("mongodb", "balance", "ok") == READS
    # TigerBeetle applied the dual-write wallet's operations from the backlog.
    assert sent("tigerbeetle", "credit", "ok") == CREDITS
    assert sent("tigerbeetle", "debit", "ok") == DEBITS
    assert sent("tigerbeetle", "void", "ok") == VOIDS
    hist = "walletmig_store_operation_seconds_count"
    assert (value(after, hist, store="mongodb", operation="credit")
            - value(before, hist, store="mongodb", operation="credit")) == 2 * CREDITS
    assert total(after, "walletmig_wallet_errors_total", store="mongodb",
                 error="InsufficientFundsError") >= 1


def check_tigerbeetle(after: Samples) -> None:
    # The outbox drainer's batch sends a pass's credits and debits in one request: fewer
    # requests than operations (the per-operation counts are check_store_counts').
    assert total(after, "walletmig_tigerbeetle_request_seconds_count",
                 operation="create_transfers") >= 1
    assert total(after, "walletmig_tigerbeetle_requests_in_flight") == 0
    assert value(after, "walletmig_tigerbeetle_up") == 1


def check_bounded(after: Samples, run: str) -> None:
    for _, labels in after:
        for _, label_value in labels:
            assert run not in label_value, f"an id became a label value: {label_value}"


def check_labels(samples: Samples) -> None:
    """Every walletmig series carries exactly the labels observability.metrics declares."""
    seen = 0
    for name, labels in samples:
        if not name.startswith("walletmig_"):
            continue
        base = next((b for b in (name, *(name.removesuffix(s) for s in HISTOGRAM_SUFFIXES))
                     if b in DEFINED), None)
        assert base is not None, f"{name} is exported but not in DEFINED"
        assert {k for k, _ in labels} - {"le"} == set(DEFINED[base]), (name, labels)
        seen += 1
    assert seen > 0


# The SDK's activity execution latency appears once an activity completes on the worker. The
# outbox's drain activity runs a minute per attempt (activities.outbox_drain): the test has the
# worker complete a quick one of its own (ReadsOnTheWorker) rather than wait for that.
SDK_WAIT_S = 30
READ_ACTIVITY_TIMEOUT_S = 30


@workflow.defn(sandboxed=False)
class ReadsOnTheWorker:
    """The worker's read_balance activity as a regular activity (the read workflows run it
    as a local one) on the worker's task queue: it ends in milliseconds."""

    @workflow.run
    async def run(self, task_queue: str, query: GetBalance) -> None:
        await workflow.execute_activity(
            ACTIVITY_READ_BALANCE, ReadBalanceInput(query=query), task_queue=task_queue,
            result_type=WalletBalance,
            start_to_close_timeout=timedelta(seconds=READ_ACTIVITY_TIMEOUT_S))


async def complete_an_activity(temporal: Client, task_queue: str, wallet: WalletKey) -> None:
    """One activity completed by the worker serving `task_queue` (this workflow's own worker
    only schedules it)."""
    queue = f"metrics-reads-{uuid.uuid4().hex[:8]}"
    async with Worker(temporal, task_queue=queue, workflows=[ReadsOnTheWorker]):
        await temporal.execute_workflow(
            ReadsOnTheWorker.run, args=[task_queue, GetBalance(wallet=wallet)],
            id=f"{queue}-read", task_queue=queue,
            execution_timeout=timedelta(seconds=2 * READ_ACTIVITY_TIMEOUT_S))


async def wait_temporal_sdk(port: int) -> None:
    deadline = time.monotonic() + SDK_WAIT_S
    while True:
        try:
            check_temporal_sdk(await asyncio.to_thread(scrape, port))
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(1.0)


def check_temporal_sdk(samples: Samples) -> None:
    """The SDK's series carry the labels the dashboards group by (TEMPORAL_SDK_METRICS)."""
    names = {name for name, _ in samples}
    for name, labels in samples:
        base = next((b for b in (name, *(name.removesuffix(s) for s in HISTOGRAM_SUFFIXES))
                     if b in TEMPORAL_SDK_METRICS), None)
        if base is not None:
            keys = {k for k, _ in labels}
            assert set(TEMPORAL_SDK_METRICS[base]) <= keys, (name, keys)
    for wanted in ("temporal_workflow_task_schedule_to_start_latency_bucket",
                   "temporal_activity_schedule_to_start_latency_bucket",
                   "temporal_activity_execution_latency_bucket",
                   "temporal_worker_task_slots_available"):
        assert wanted in names, f"{wanted} not exported; temporal names: " + ", ".join(
            sorted(n for n in names if n.startswith("temporal_")))


FAILED_READS = 30  # cutover reads that fell back: 100 % TigerBeetle errors, >= min samples
GATE_WAIT_S = 60


async def wait_scraped(port: int, what: str, check: Callable[[Samples], bool]) -> Samples:
    deadline = time.monotonic() + GATE_WAIT_S
    while True:
        samples = await asyncio.to_thread(scrape, port)
        if check(samples):
            return samples
        assert time.monotonic() < deadline, f"never scraped {what}"
        await asyncio.sleep(0.3)


def gates_of(samples: Samples, migration: str) -> dict[str, float]:
    return {dict(labels)["gate"]: v for (name, labels), v in samples.items()
            if name == "walletmig_migration_gate_ok" and ("migration", migration) in labels}


async def test_migration_gates_and_auto_rollback_are_exported(
    temporal_client: Client, settings: Settings, tmp_path: Path
) -> None:
    """A migration workflow served by a `walletmig worker` subprocess: each evidence round
    exports its next step's gates (legacy -> dual_write: history import finished, met); forced
    to read_cutover 10 %, then TigerBeetle failing every cutover read: the automatic rollback
    to shadow_read is counted once, and the gauges are shadow_read's next gates, not
    read_cutover's (fallback_rate removed)."""
    isolated = isolated_settings(settings, "metrics_gates")
    run = uuid.uuid4().hex[:8]
    letters = "".join(random.choices(string.ascii_uppercase, k=8))
    scope = f"{letters[:5]}:{letters[5:]}"  # a scope nobody else migrates
    migration = f"metrics-gates-{run}"
    port = free_port()
    env = worker_env(isolated, f"metrics-w-{run}")
    env["MIGRATION_TASK_QUEUE"] = queue = f"metrics-m-{run}"
    env["WALLETMIG_METRICS_PORT"] = str(port)
    config = MigrationConfig(
        migration_id=migration, scopes=[scope], evidence_interval_s=0.3, state_cache_ttl_s=0,
        archive_dir=str(tmp_path / "archive"),
        thresholds=GateThresholds(window_s=120, min_shadow_samples=20, min_cutover_samples=20,
                                  auto_rollback_min_samples=20))
    worker = start_worker(env, tmp_path / "worker.log")
    async with open_stores(isolated) as stores:
        try:
            await wait_scrapable(port, worker)
            handle = await start_migration_workflow(temporal_client, config, task_queue=queue)
            first = await wait_scraped(port, "the legacy step's gate",
                                       lambda s: bool(gates_of(s, migration)))
            assert gates_of(first, migration) == {"history_import_finished": 1}
            assert value(first, "walletmig_migration_auto_rollbacks_total",
                         migration=migration) == 0  # exported before its first increment
            for _ in range(3):
                await handle.execute_update("force_advance", ForceAdvanceRequest(
                    reason="metrics test", actor="bob"))
            cutover = await wait_scraped(port, "read_cutover's gate",
                                         lambda s: "fallback_rate" in gates_of(s, migration))
            assert set(gates_of(cutover, migration)) == {"fallback_rate"}

            reads = ReadMetricsStore(stores.db)
            for _ in range(FAILED_READS):
                reads.record(ReadObservation(
                    scope=scope, mode=ReadMode.CUTOVER, outcome=ReadOutcome.FALLBACK_ERROR,
                    tb_ms=1.0, mongo_ms=2.0, at=datetime.now(UTC)))
            await reads.flush()
            after = await wait_scraped(port, "the automatic rollback", lambda s: value(
                s, "walletmig_migration_auto_rollbacks_total", migration=migration) >= 1)
            shadow = await wait_scraped(port, "shadow_read's gates", lambda s: gates_of(
                s, migration).keys() == {"shadow_match_rate", "tb_read_p95_ratio"})
            assert value(shadow, "walletmig_migration_auto_rollbacks_total",
                         migration=migration) == 1
            assert all(v in (0, 1) for v in gates_of(after, migration).values())
            status = await handle.query("status", result_type=MigrationStatus)
            assert status.phase == "shadow_read" and status.auto_rollbacks == 1
            check_labels(shadow)
            await handle.terminate("test done")
        finally:
            stop_workers([worker])


HEALTH_CHECKS = 3


async def test_gateway_counts_requests_by_operation_id(settings: Settings, tmp_path: Path) -> None:
    """The gateway's /metrics: requests by operationId and status (unauthenticated routes by
    their route's id; an unknown path as `unmatched`, never by its path)."""
    with running_api(isolated_settings(settings, "metrics_api"), tmp_path,
                     with_worker=False) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
            before = parse((await http.get("/metrics")).text)
            for _ in range(HEALTH_CHECKS):
                assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/no/such/path-123")).status_code == 404
            text = (await http.get("/metrics")).text
    after = parse(text)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("walletmig_http_requests_total", operation="healthz",
                 status="200") == HEALTH_CHECKS
    assert moved("walletmig_http_requests_total", operation="unmatched", status="404") == 1
    assert moved("walletmig_http_request_seconds_count", operation="healthz") == HEALTH_CHECKS
    assert "path-123" not in text


async def test_reconciliation_gauges_follow_the_finished_run(
    temporal_client: Client, env: Env, unique_id: Callable[..., str]
) -> None:
    """A real ReconciliationWorkflow run (worker in this process, so its gauges are this
    process's): last run time, wallets checked, match ratio and conservation of its scope."""
    wallets = 3
    for _ in range(wallets):
        wallet = env.key(unique_id("metrics-recon"), "USD")
        await credit(env, wallet, unique_id("t"), "5")
    await backfill_all(env)
    started = time.time()
    async with sandboxed_worker(temporal_client, "metrics-recon", [ReconciliationWorkflow],
                                env.reconcile_activities().all()) as running:
        summary = await run_reconciliation(running, env.pairs)
    scope = ",".join(summary.pairs)
    assert summary.wallets == wallets and summary.match_rate == 1.0

    def gauge(name: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"scope": scope})

    finished = gauge("walletmig_reconciliation_last_run_timestamp_seconds")
    assert finished is not None and started <= finished <= time.time()
    assert gauge("walletmig_reconciliation_wallets_checked") == wallets
    assert gauge("walletmig_reconciliation_match_ratio") == 1.0
    assert gauge("walletmig_reconciliation_conservation_ok") == 1


# ---- backlog, credit terminal, live views ----------------------------------------------------

BACKLOG_WALLETS = 4
BACKLOG_OPS = 6
BACKLOG_WAIT_S = 60.0


async def wait_gauges(gauge: Callable[[str], float], what: str,
                      check: Callable[[float, float], bool]) -> None:
    """Until check(items, oldest age) holds, at most BACKLOG_WAIT_S."""
    deadline = time.monotonic() + BACKLOG_WAIT_S
    while not check(gauge("walletmig_backlog_items"),
                    gauge("walletmig_backlog_oldest_age_seconds")):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_backlog_gauges_rise_under_dual_write_and_fall_to_zero_after_the_drain(
    temporal_client: Client, settings: Settings, tmp_path: Path
) -> None:
    """dual_write traffic through a worker in this process: while TigerBeetle lags behind
    MongoDB (the drain activity has items it has not applied yet) the to_tigerbeetle gauges
    are non-zero; once every backlog drained, items and age are 0.

    TigerBeetle (an emulator of the test's own) is stopped (SIGSTOP) while the traffic runs,
    so the drain holds its batches until it is continued: the lag is there by construction
    (a poll of the gauges while a quick TigerBeetle applied every batch could miss it)."""
    isolated = isolated_settings(settings, "metrics_backlog")
    run = uuid.uuid4().hex[:8]

    def gauge(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"direction": "to_tigerbeetle"}) or 0.0

    emulator = EmulatorProcess(str(tmp_path / "backlog.tbemu")).start()
    try:
        async with wallet_harness(temporal_client, isolated,
                                  tb_addresses=f"tbemu://{emulator.address}") as harness:
            await set_phase(harness.stores, DUAL_PAIR, Phase.DUAL_WRITE)
            wallets = [key(f"backlog-{run}-{w}", DUAL_PAIR) for w in range(BACKLOG_WALLETS)]

            async def traffic(wallet: WalletKey) -> None:
                for i in range(BACKLOG_OPS):
                    await harness.client.apply(AddCredit(
                        wallet=wallet, transaction_id=f"{wallet.client_id}.{i}",
                        amount=Decimal("1.00")))

            before = gauge("walletmig_backlog_items")  # 0 unless another test left some
            os.kill(emulator.pid, signal.SIGSTOP)
            try:
                await asyncio.gather(*(traffic(w) for w in wallets))
                await wait_gauges(gauge, "the backlog gauges never saw an item in flight",
                                  lambda items, age_s: items > before and age_s > 0)
            finally:
                os.kill(emulator.pid, signal.SIGCONT)
            for wallet in wallets:
                await wait_drained(harness.client, wallet)
            # The outbox marks a batch applied a moment before the drain un-counts it.
            await wait_gauges(gauge, "the backlog gauges stayed above 0 after the drain",
                              lambda items, age_s: items == 0 and age_s == 0)
    finally:
        emulator.kill()


async def test_terminal_metrics_count_what_the_pipeline_answered(
    temporal_client: Client, mongo_client: AsyncMongoClient[dict[str, Any]],
    settings: Settings,
) -> None:
    """Transactions through the real clearing pipeline (worker in this process): the counters
    by kind and outcome grow by exactly what was sent, latency was observed for each, the
    pending holds are back where they were, the sync lag is 0 after a drain; and `walletmig
    terminal watch --once` shows the kinds from this process's scrape endpoint."""
    db = mongo_client[f"walletmig_metrics_terminal_{uuid.uuid4().hex[:8]}"]
    tb_client = await connect_batched(settings)
    table = own_table()
    sent = [*(sync_txn("ach_credit_in", f"{10 + i}.00") for i in range(5)),
            *(sync_txn("stripe_settlement", "3.10") for _ in range(3))]
    kinds = sorted({str(t.kind) for t in sent})

    def counted(kind: str, outcome: str) -> float:
        return REGISTRY.get_sample_value(
            "walletmig_terminal_transactions_total", {"kind": kind, "outcome": outcome}) or 0.0

    def latency_count(kind: str) -> float:
        return REGISTRY.get_sample_value(
            "walletmig_terminal_transaction_seconds_count", {"kind": kind}) or 0.0

    before = {(k, o): counted(k, o) for k in kinds for o in TERMINAL_OUTCOMES}
    before_latency = {k: latency_count(k) for k in kinds}
    holds_before = REGISTRY.get_sample_value("walletmig_terminal_pending_holds")
    server = serve_metrics(0, "127.0.0.1")
    try:
        activities = await build_clearing_activities(db, tb_client, tb_client.limits, table=table)
        queue = f"metrics-clearing-{uuid.uuid4().hex[:8]}"
        async with Worker(temporal_client, task_queue=queue, workflows=[ClearingBatchWorkflow],
                          activities=activities.all(), workflow_runner=workflow_runner()):
            ledger = GeneralLedger(db, chart=table.chart)
            client = ClearingClient(temporal_client, ClearingStore(db), queue, ledger=ledger,
                                    table=table)
            intake = await client.submit_many(sent)
            assert not intake.refused
            outcomes = await client.wait([t.external_id for t in sent], 60.0)
            # The outcomes read settled once the ledger has their entries; the settle activity
            # counts them just after: its batch workflow's end is when the counters are final
            # (and this worker must not shut down, cancelling it, before).
            await client.batch_outcome(intake.batch_id, 60.0)
        assert {o.state for o in outcomes.values()} == {"settled"}
        for kind in kinds:
            want = sum(1 for t in sent if t.kind == kind)
            assert counted(kind, "settled") - before[(kind, "settled")] == want
            assert latency_count(kind) - before_latency[kind] == want
            for outcome in ("rejected", "expired", "error"):
                assert counted(kind, outcome) == before[(kind, outcome)]
        assert REGISTRY.get_sample_value("walletmig_terminal_pending_holds") == holds_before

        observe_sync_lag(LAG_STALE_S)  # what an earlier measurement left: the drain resets it
        terminal = await make_terminal(db, tb_client, table)
        caught_up = await terminal.sync.run_until_caught_up()
        assert caught_up.caught_up
        assert REGISTRY.get_sample_value("walletmig_ledger_sync_lag_seconds") == 0

        shown = await watch_once(["terminal", "watch"], server.url, {})
        assert all(kind in shown for kind in kinds), shown
        assert "sync lag" in shown
    finally:
        server.close()
        await tb_client.close()
        await mongo_client.drop_database(db.name)


LAG_STALE_S = 123.0
WATCH_TIMEOUT_S = 60


async def watch_once(command: list[str], url: str, env: dict[str, str]) -> str:
    """`walletmig <command> --once` against one scrape URL; its output (wide, no colours)."""
    import os
    import sys

    full_env = {**os.environ, **env, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "walletmig", *command, "--once", "--metrics-url", url,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env)
    out, _ = await asyncio.wait_for(proc.communicate(), WATCH_TIMEOUT_S)
    text = out.decode()
    assert proc.returncode == 0, text
    return text
