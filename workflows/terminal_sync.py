"""The credit terminal's ledger sync and reconciliation as Temporal workflows.

LedgerSyncWorkflow: sync pages (activity `ledger_sync_page`, activities/terminal_sync.py) one
after the other. Continuous (`once` False, workflow id `ledger-sync/continuous`): while caught
up it sleeps `idle_s` (a durable timer) and looks again, and continues as new every
`pages_per_run` pages (or when Temporal suggests it) with its cursor and totals. Catch-up
(`once` True: what the Temporal Schedule starts every 5 minutes): pages until caught up, then
returns. Both may run at once: the cursor only moves forward and entries are idempotent by
transfer id, so two syncs write each entry once.

The catch-up run first resumes the batches a dead submitter left `received` (activity
`terminal_resume_received`, bounded by `inp.resume`; patch PATCH_RESUME_RECEIVED, so runs
recorded before it replay). Why here: it is the one periodic job of the terminal, and without
it such a batch waited for a replay of one of its ids or a manual `walletmig terminal resume`.
A failing resume is logged and left to the next run: it never holds up the sync.

TerminalReconcileWorkflow: the reconciliation's stages as activities (`terminal_reconcile_page`
until the state reaches `finish`, then `terminal_reconcile_finish`, which saves the report),
continuing as new every RECONCILE_PAGES_PER_RUN pages with its state.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from messages.clearing import (
        ACTIVITY_RECONCILE_FINISH,
        ACTIVITY_RECONCILE_PAGE,
        ACTIVITY_RESUME_RECEIVED,
        ACTIVITY_SYNC_PAGE,
        LEDGER_SYNC_WORKFLOW,
        TERMINAL_RECONCILE_WORKFLOW,
        LedgerSyncInput,
        LedgerSyncOutcome,
        ResumeReceivedReport,
        SyncPageInput,
        SyncPageReport,
        SyncTotals,
        TerminalReconcileInput,
        TerminalReconcileReport,
        TerminalReconcileState,
    )
    from walletcore.errors import NON_RETRYABLE_ERROR_TYPES

PAGE_TIMEOUT = timedelta(minutes=5)
PATCH_RESUME_RECEIVED = "ledger-sync-resume-received"
RESUME_TIMEOUT = timedelta(minutes=2)  # <= 1000 batches: a read and a start RPC each
RESUME_RETRY = RetryPolicy(  # a few tries; the next scheduled run tries again
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10), maximum_attempts=3,
)
RECONCILE_PAGES_PER_RUN = 500
RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=list(NON_RETRYABLE_ERROR_TYPES),
)


def _totals(totals: SyncTotals, page: SyncPageReport) -> SyncTotals:
    return SyncTotals(pages=totals.pages + 1, scanned=totals.scanned + page.scanned,
                      new_entries=totals.new_entries + page.new_entries,
                      unmatched=totals.unmatched + page.unmatched_count)


@workflow.defn(name=LEDGER_SYNC_WORKFLOW)
class LedgerSyncWorkflow:
    def __init__(self) -> None:
        self._last: SyncPageReport | None = None

    @workflow.query(name="last_page")
    def last_page(self) -> SyncPageReport | None:
        return self._last

    @workflow.run
    async def run(self, inp: LedgerSyncInput) -> LedgerSyncOutcome:
        cursor, totals = inp.cursor, inp.totals
        lag: float | None = None
        resumed: list[str] = []
        first_run = totals.pages == 0  # not a continue-as-new of this catch-up
        if inp.once and first_run and inp.resume is not None and workflow.patched(
                PATCH_RESUME_RECEIVED):
            resumed = await self._resume(inp)
        for _ in range(inp.pages_per_run):
            page = await workflow.execute_activity(
                ACTIVITY_SYNC_PAGE, SyncPageInput(cursor=cursor, limit=inp.limit),
                result_type=SyncPageReport, start_to_close_timeout=PAGE_TIMEOUT,
                retry_policy=RETRY)
            self._last = page
            cursor, totals = page.cursor, _totals(totals, page)
            if lag is None and (page.lag_exact or page.exhausted):
                lag = page.lag_s
            workflow.set_current_details(
                f"cursor {cursor.timestamp} · lag {page.lag_s:.1f}s"
                f"{'' if page.lag_exact else ' (at most)'} · entries {totals.new_entries}"
                f" · unmatched {totals.unmatched}")
            if page.exhausted:
                if inp.once:
                    return LedgerSyncOutcome(cursor=cursor, totals=totals, caught_up=True,
                                             lag_s=lag if lag is not None else 0.0,
                                             resumed=resumed)
                await workflow.sleep(timedelta(seconds=inp.idle_s))
            if workflow.info().is_continue_as_new_suggested():
                break
        workflow.continue_as_new(inp.model_copy(update={"cursor": cursor, "totals": totals}))

    async def _resume(self, inp: LedgerSyncInput) -> list[str]:
        """The batches the resume started; none when it failed (logged)."""
        assert inp.resume is not None
        try:
            report: ResumeReceivedReport = await workflow.execute_activity(
                ACTIVITY_RESUME_RECEIVED, inp.resume, result_type=ResumeReceivedReport,
                start_to_close_timeout=RESUME_TIMEOUT, retry_policy=RESUME_RETRY)
        except ActivityError as err:
            workflow.logger.warning("resume of batches left received failed: %s", err.cause)
            return []
        if report.started:
            workflow.logger.info("resumed %d batches left received", len(report.started))
        return report.started


@workflow.defn(name=TERMINAL_RECONCILE_WORKFLOW)
class TerminalReconcileWorkflow:
    def __init__(self) -> None:
        self._stage = "start"

    @workflow.query(name="stage")
    def stage(self) -> str:
        return self._stage

    @workflow.run
    async def run(self, inp: TerminalReconcileInput) -> TerminalReconcileReport:
        state = inp.state or TerminalReconcileState(
            run_id=inp.run_id, page_size=inp.page_size, catch_up=inp.catch_up)
        for _ in range(RECONCILE_PAGES_PER_RUN):
            if state.stage == "finish":
                report: TerminalReconcileReport = await workflow.execute_activity(
                    ACTIVITY_RECONCILE_FINISH, state, result_type=TerminalReconcileReport,
                    start_to_close_timeout=PAGE_TIMEOUT, retry_policy=RETRY)
                return report
            state = await workflow.execute_activity(
                ACTIVITY_RECONCILE_PAGE, state, result_type=TerminalReconcileState,
                start_to_close_timeout=PAGE_TIMEOUT, retry_policy=RETRY)
            self._stage = state.stage
            workflow.set_current_details(
                f"stage {state.stage} · entries {state.entries_checked} · transfers "
                f"{state.transfers_checked}")
        workflow.continue_as_new(inp.model_copy(update={"state": state}))
