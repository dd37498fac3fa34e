"""The migration worker: MigrationWorkflow and its activities on the migration task queue.

Kept apart from the wallet worker so the migration can be operated (and its worker restarted)
without touching the wallet traffic; `run_migration_worker` is what a process runs.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.migration import MigrationActivities
from workflows.migration import MigrationWorkflow

PASSTHROUGH_MODULES = ("pydantic", "pydantic_core", "annotated_types", "walletcore")
SHUTDOWN_GRACE_S = 10.0
MAX_CONCURRENT_ACTIVITIES = 20


def migration_workflow_runner() -> SandboxedWorkflowRunner:
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH_MODULES)
    )


async def build_migration_worker(client: Client, db: AsyncDatabase[Any], task_queue: str,
                                 *, archive_root: str | None = None) -> Worker:
    del archive_root  # the archive directory travels in the workflow's config
    activities = MigrationActivities(db)
    await activities.ensure_indexes()
    return Worker(
        client, task_queue=task_queue, workflows=[MigrationWorkflow],
        activities=activities.all(), workflow_runner=migration_workflow_runner(),
        max_concurrent_activities=MAX_CONCURRENT_ACTIVITIES,
        graceful_shutdown_timeout=timedelta(seconds=SHUTDOWN_GRACE_S),
    )
