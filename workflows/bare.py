"""BareEntityWorkflow: an entity workflow that does nothing, for benchmarks.

Same shape as WalletWorkflow (Update-with-Start, one update, one idle timer per idle period,
idle close) without activities, so `walletmig bench wallet-ops` can show what Temporal alone
costs on this machine.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

IDLE_TIMEOUT_S_DEFAULT = 60.0


@workflow.defn
class BareEntityWorkflow:
    def __init__(self) -> None:
        self._count = 0
        self._last_update_at = workflow.now()

    @workflow.run
    async def run(self, idle_timeout_s: float = IDLE_TIMEOUT_S_DEFAULT) -> int:
        idle = timedelta(seconds=idle_timeout_s)
        while True:
            remaining = idle - (workflow.now() - self._last_update_at)
            if remaining > timedelta(0):
                await workflow.sleep(remaining)
                continue
            if workflow.all_handlers_finished():
                return self._count
            await workflow.wait_condition(workflow.all_handlers_finished)

    @workflow.update
    async def touch(self, value: str) -> str:
        self._count += 1
        self._last_update_at = workflow.now()
        return value
