"""OutboxDrainWorkflow: one per (task queue, shard) of the transactional outbox (stores.outbox).

It only keeps the shard's drain activity running (activities.outbox_drain): each attempt
drains for RUN_S while heartbeating, then returns and the next one starts; a worker that dies
mid-attempt is noticed by the heartbeat timeout and the attempt retried on another worker
(applying is idempotent). Continues as new every RUNS_PER_RUN attempts, so the history stays
small. Started by the write path (DrainerStarter) with USE_EXISTING: at most one per shard.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from messages.wallet import (
        ACTIVITY_DRAIN_OUTBOX,
        OUTBOX_DRAIN_WORKFLOW,
        DrainOutboxInput,
        DrainOutboxOutput,
        OutboxDrainInput,
    )

RUN_S = 60.0
RUNS_PER_RUN = 60  # about an hour of draining per workflow run
HEARTBEAT_TIMEOUT = timedelta(seconds=5)  # a dead worker's shard waits at most this (+ retry)
DRAIN_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=0,
)


@workflow.defn(name=OUTBOX_DRAIN_WORKFLOW)
class OutboxDrainWorkflow:
    @workflow.run
    async def run(self, inp: OutboxDrainInput) -> None:
        for _ in range(RUNS_PER_RUN):
            await workflow.execute_activity(
                ACTIVITY_DRAIN_OUTBOX,
                DrainOutboxInput(shard=inp.shard, shards=inp.shards, run_s=RUN_S),
                result_type=DrainOutboxOutput,
                start_to_close_timeout=timedelta(seconds=RUN_S * 2),
                heartbeat_timeout=HEARTBEAT_TIMEOUT,
                retry_policy=DRAIN_RETRY,
            )
            if workflow.info().is_continue_as_new_suggested():
                break
        workflow.continue_as_new(inp)
