"""The migration task queue's worker: MigrationWorkflow, BackfillWorkflow and
ReconciliationWorkflow with their activities.

Its own task queue, so the migration can be operated (and its pollers scaled) apart from the
wallet traffic; the same `walletmig worker` process serves both queues by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from activities.clearing import build_clearing_activities
from activities.migration import MigrationActivities
from activities.terminal_recovery import terminal_ops
from stores.bundle import Stores
from workers.wallet_worker import unique_activities, workflow_runner
from workers.wiring import OPS_WORKFLOWS, ensure_ops_indexes, ops_activities
from workflows.clearing import ClearingBatchWorkflow
from workflows.migration import MigrationWorkflow
from workflows.terminal_sync import LedgerSyncWorkflow, TerminalReconcileWorkflow

SHUTDOWN_GRACE_S = 10.0
MAX_CONCURRENT_ACTIVITIES = 20  # backfill/reconcile pages are heavy: a few at a time

MIGRATION_WORKFLOWS: tuple[type, ...] = (MigrationWorkflow, *OPS_WORKFLOWS, ClearingBatchWorkflow,
                                          LedgerSyncWorkflow, TerminalReconcileWorkflow)


def migration_workflow_runner() -> SandboxedWorkflowRunner:
    """The same sandbox settings as the wallet workflows (one runner per process)."""
    return workflow_runner()


async def migration_activities(stores: Stores) -> list[Callable[..., Any]]:
    """Every activity of the migration queue's workflows; ensures their indexes first."""
    migration = MigrationActivities(stores.db, stores.migration)
    await migration.ensure_indexes()
    await ensure_ops_indexes(stores)
    clearing = await build_clearing_activities(stores.db, stores.tb_client, stores.limits)
    terminal = terminal_ops(stores.db, stores.tb_client, limits=stores.limits)
    await terminal.ensure_indexes()
    return unique_activities([*migration.all(), *ops_activities(stores), *clearing.all(),
                              *terminal.activities()])


def build_migration_worker(
    client: Client,
    task_queue: str,
    activities: Sequence[Callable[..., Any]],
    *,
    extra_workflows: Sequence[type] = (),
) -> Worker:
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[*MIGRATION_WORKFLOWS, *extra_workflows],
        activities=unique_activities(activities),
        workflow_runner=workflow_runner(),
        max_concurrent_activities=MAX_CONCURRENT_ACTIVITIES,
        graceful_shutdown_timeout=timedelta(seconds=SHUTDOWN_GRACE_S),
    )
