"""The worker process: one `walletmig worker` serves every task queue (wallet and migration)
or the ones asked for, and shuts down gracefully on SIGTERM/SIGINT (in-flight activities
finish within the grace period, pollers stop, clients close).

Reads served by the read workflows' activities are recorded in the read-metrics store (the
migration gates' evidence); the process runs its flusher and flushes once more on shutdown.

Metrics (observability): with WALLETMIG_METRICS_PORT set the process serves its Prometheus
metrics on that port (`/metrics`); with WALLETMIG_TEMPORAL_METRICS_PORT the Temporal SDK
exports its own (schedule-to-start latency, task slots, failures) on a second port. The SDK's
exporter lives in its Rust core, outside prometheus-client's registry: hence two ports.

`build_workers` is also what in-process users (the demo, benchmarks) call, so they run exactly
the wiring the deployed worker runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any, Literal

from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import Worker

from activities.wallet import WalletActivities
from observability.exposition import MetricsServer, serve_metrics
from stores.bundle import Stores, make_stores
from stores.read_metrics import ReadMetricsStore
from walletconfig.settings import Settings
from workers.migration_worker import (
    MIGRATION_WORKFLOWS,
    build_migration_worker,
    migration_activities,
)
from workers.wallet_worker import (
    build_worker,
    connect_temporal,
    unique_activities,
    wallet_activities,
)
from workers.wiring import make_importer

log = logging.getLogger(__name__)

Role = Literal["wallet", "migration"]
ROLES: tuple[Role, ...] = ("wallet", "migration")
TASK_QUEUES_MAX = 16
METRICS_FLUSH_INTERVAL_S = 0.5


class UnknownTaskQueueError(ValueError):
    pass


def task_queue_roles(settings: Settings) -> dict[Role, str]:
    return {"wallet": settings.wallet_task_queue, "migration": settings.migration_task_queue}


def plan(settings: Settings, task_queues: Sequence[str] | None = None) -> dict[str, set[Role]]:
    """Task queue -> roles it serves. `task_queues` restricts to some configured queues (a
    queue's name is set with WALLET_TASK_QUEUE / MIGRATION_TASK_QUEUE); both roles may share
    one queue, in which case one Worker registers everything."""
    roles = task_queue_roles(settings)
    wanted = list(dict.fromkeys(task_queues or roles.values()))
    assert 0 < len(wanted) <= TASK_QUEUES_MAX, f"1..{TASK_QUEUES_MAX} task queues"
    out: dict[str, set[Role]] = {}
    for queue in wanted:
        served = {role for role, name in roles.items() if name == queue}
        if not served:
            known = ", ".join(f"{name!r} ({role})" for role, name in roles.items())
            raise UnknownTaskQueueError(
                f"task queue {queue!r} is not configured; known: {known} "
                "(rename with WALLET_TASK_QUEUE / MIGRATION_TASK_QUEUE)")
        out[queue] = served
    return out


def _wallet_activities(stores: Stores,
                       metrics: ReadMetricsStore | None) -> list[Callable[..., Any]]:
    if metrics is None:
        return wallet_activities(stores)
    wallet = WalletActivities(
        legacy=stores.legacy, tigerbeetle=stores.tigerbeetle, migration=stores.migration,
        importer=make_importer(stores), metrics=metrics,
    )
    return unique_activities(wallet.all())


async def build_workers(client: Client, settings: Settings, stores: Stores,
                        task_queues: Sequence[str] | None = None, *,
                        metrics: ReadMetricsStore | None = None) -> list[Worker]:
    """One Worker per task queue in `plan`, sharing the process's stores. `metrics`: where
    the read activities record observations (its owner runs the flusher, see run_worker)."""
    planned = plan(settings, task_queues)
    wants_migration = any("migration" in roles for roles in planned.values())
    wallet_acts = _wallet_activities(stores, metrics)
    migration_acts = await migration_activities(stores) if wants_migration else []
    workers: list[Worker] = []
    for queue, roles in planned.items():
        if "wallet" in roles:
            both = "migration" in roles
            workers.append(build_worker(
                client, settings, wallet_acts, task_queue=queue,
                extra_workflows=MIGRATION_WORKFLOWS if both else (),
                extra_activities=migration_acts if both else ()))
        else:
            workers.append(build_migration_worker(client, queue, migration_acts))
    return workers


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
METRICS_BIND_ADDRESS = "0.0.0.0"  # scraped from other hosts/containers


def start_metrics(settings: Settings) -> MetricsServer | None:
    """The process's scrape endpoints, per the settings (none when both ports are 0). The
    Temporal SDK's runtime must be set before the first client connects: call this first."""
    if settings.temporal_metrics_port:
        Runtime.set_default(Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(
            bind_address=f"{METRICS_BIND_ADDRESS}:{settings.temporal_metrics_port}"))))
        log.info("Temporal SDK metrics on :%d/metrics", settings.temporal_metrics_port)
    if not settings.metrics_port:
        return None
    server = serve_metrics(settings.metrics_port, METRICS_BIND_ADDRESS)
    log.info("metrics on %s", server.url)
    return server


async def run_worker(settings: Settings, task_queues: Sequence[str] | None = None,
                     *, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set), then shut down gracefully."""
    planned = plan(settings, task_queues)  # refuse a bad queue before opening anything
    stores = await make_stores(settings)
    metrics = ReadMetricsStore(stores.db)
    flusher: asyncio.Task[None] | None = None
    metrics_server: MetricsServer | None = None
    try:
        metrics_server = start_metrics(settings)
        await metrics.ensure_indexes()
        flusher = asyncio.create_task(metrics.run_flusher(METRICS_FLUSH_INTERVAL_S))
        client = await connect_temporal(settings)
        workers = await build_workers(client, settings, stores, list(planned), metrics=metrics)
        # Signals are ours only when the caller gave no `stop`: an embedding caller (a test, the
        # demo) keeps its own handlers, which would otherwise end up reset to the default.
        owns_signals = stop is None
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        previous: dict[int, Any] = {}
        if owns_signals:
            for signum in STOP_SIGNALS:
                previous[signum] = signal.getsignal(signum)
                loop.add_signal_handler(signum, stop.set)
        runs = [asyncio.create_task(worker.run()) for worker in workers]
        served = ", ".join(f"{q} ({'+'.join(sorted(r))})" for q, r in planned.items())
        log.info("worker polling %s on %s", served, settings.temporal_address)
        limits = stores.limits
        log.info("TigerBeetle request limit %d bytes: <= %d events per create, <= %d ids per "
                 "lookup", limits.request_limit_bytes, limits.create_batch_max,
                 limits.lookup_batch_max)
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopped, *runs], return_when=asyncio.FIRST_COMPLETED)
        log.info("worker shutting down")
        await asyncio.gather(*(worker.shutdown() for worker in workers), return_exceptions=True)
        for task in runs:
            if task in done and not stopped.done():
                task.result()  # a worker that died on its own: surface why
        stopped.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopped
        if owns_signals:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)
                signal.signal(signum, previous[signum])  # remove_* leaves SIG_DFL behind
    finally:
        if flusher is not None:  # stops after flushing what the last reads recorded
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        await stores.close()
        if metrics_server is not None:
            metrics_server.close()
