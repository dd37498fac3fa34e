"""The wallet worker: WalletWorkflow, the read workflows and their activities.

`build_worker` wires one task queue; `run_worker` opens the stores and Temporal client from
Settings, runs one worker per task queue and shuts down gracefully on SIGTERM/SIGINT (in-flight
activities finish, pollers stop, clients close).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from datetime import timedelta

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.wallet import WalletActivities
from walletmig.config import Settings
from walletmig.runtime import make_stores
from workflows.reads import GetBalanceWorkflow, GetMultiBalanceWorkflow
from workflows.wallet import WalletWorkflow

log = logging.getLogger(__name__)

TASK_QUEUES_MAX = 16
SHUTDOWN_GRACE_S = 10.0
# Concurrency bounds: the machine is small, the work is I/O bound (async activities).
MAX_CONCURRENT_WORKFLOW_TASKS = 100
MAX_CONCURRENT_ACTIVITIES = 200
MAX_CONCURRENT_LOCAL_ACTIVITIES = 200

# Every module is passed through the sandbox (loaded once per process, not re-executed for
# each workflow run): profiling showed per-run re-imports costing ~100 ms of CPU per run. The
# sandbox's runtime restrictions (no I/O, no threads, no wall clock) still apply, and
# workflows/ imports only pure modules (models, walletcore, activities.errors).

WORKFLOWS = (WalletWorkflow, GetBalanceWorkflow, GetMultiBalanceWorkflow)


def workflow_runner() -> SandboxedWorkflowRunner:
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_all_modules()
    )


def build_worker(
    client: Client,
    settings: Settings,
    activities: WalletActivities,
    *,
    task_queue: str | None = None,
    extra_workflows: Sequence[type] = (),
) -> Worker:
    """A worker for the wallet workflows on `task_queue` (default: settings.wallet_task_queue)."""
    return Worker(
        client,
        task_queue=task_queue or settings.wallet_task_queue,
        workflows=[*WORKFLOWS, *extra_workflows],
        activities=activities.all(),
        workflow_runner=workflow_runner(),
        max_concurrent_workflow_tasks=MAX_CONCURRENT_WORKFLOW_TASKS,
        max_concurrent_activities=MAX_CONCURRENT_ACTIVITIES,
        max_concurrent_local_activities=MAX_CONCURRENT_LOCAL_ACTIVITIES,
        graceful_shutdown_timeout=timedelta(seconds=SHUTDOWN_GRACE_S),
    )


async def connect_temporal(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )


async def run_worker(settings: Settings, task_queues: Sequence[str] | None = None) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    queues = list(task_queues or [settings.wallet_task_queue])
    assert 0 < len(queues) <= TASK_QUEUES_MAX, f"1..{TASK_QUEUES_MAX} task queues"
    stores = await make_stores(settings)
    try:
        client = await connect_temporal(settings)
        activities = WalletActivities(
            legacy=stores.legacy, tigerbeetle=stores.tigerbeetle, migration=stores.migration
        )
        workers = [build_worker(client, settings, activities, task_queue=q) for q in queues]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        runs = [asyncio.create_task(worker.run()) for worker in workers]
        log.info("wallet worker polling %s on %s", ", ".join(queues), settings.temporal_address)
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopped, *runs], return_when=asyncio.FIRST_COMPLETED)
        log.info("wallet worker shutting down")
        await asyncio.gather(*(worker.shutdown() for worker in workers), return_exceptions=True)
        for task in runs:
            if task in done and not stopped.done():
                task.result()  # a worker that died on its own: surface why
        stopped.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopped
    finally:
        await stores.close()
