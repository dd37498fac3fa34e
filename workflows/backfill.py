"""Backfill workflow: import every legacy wallet of the chosen ledger pairs into TigerBeetle.

Pages of <= 4094 wallets (two opening transfers each fit one 8189-event request), ledger pair
after ledger pair; continue-as-new every `pages_per_run` pages with the cursor and counters in
the input, so history stays bounded however many wallets there are. Resumable: a crash retries
the current page (idempotent), and a restarted workflow with the same id continues from the
carried cursor. Progress: the `progress` query and the UI's current details.

Pacing (`wallets_per_s_max`, patch `backfill-pacing`): the import shares MongoDB with live
traffic, and one page of thousands of wallets is a few huge inserts and range updates that
hold the server for seconds (the demo's live writes waited 0.2-2 s behind them). A paced
backfill asks for pages of at most one second of its budget and, after each page, sleeps
what is left of `scanned / wallets_per_s_max` once the page's own time is counted: a durable
timer, so the pace is deterministic on replay and a worker crash resumes the pause.

`with_history` (activities/history_import.py): first the scope's transaction log, page by page
(<= 8189 imported transfers each) in one global time order, until the history checkpoint says
done; only then the wallets, whose openings post the residual the history does not hold.
History pacing (`history_txns_per_s_max`, patch `backfill-history-pacing`): the same rule for
those pages in transactions/s (the history import runs in phase legacy, beside every live write).
"""

from __future__ import annotations

from datetime import timedelta
from typing import NoReturn

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from messages.backfill import (
        ACTIVITY_COUNT,
        ACTIVITY_HISTORY_PAGE,
        ACTIVITY_PAGE,
        FAILED_SAMPLE_MAX,
        PATCH_HISTORY_PACING,
        PATCH_PACING,
        BackfillCountInput,
        BackfillCountOutput,
        BackfillInput,
        BackfillPageInput,
        BackfillPageOutput,
        BackfillProgress,
        BackfillState,
        HistoryPageInput,
        HistoryPageOutput,
    )
    from walletcore.errors import NON_RETRYABLE_ERROR_TYPES

PAGE_START_TO_CLOSE = timedelta(minutes=10)
PAUSE_S_MIN = 0.01  # a shorter pacing pause is skipped
PAGE_HEARTBEAT = timedelta(minutes=2)
RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=list(NON_RETRYABLE_ERROR_TYPES),
)


def backfill_workflow_id(pairs: list[str]) -> str:
    return "backfill/" + ("+".join(pairs) if pairs else "all")


@workflow.defn(name="BackfillWorkflow")
class BackfillWorkflow:
    def __init__(self) -> None:
        self._input: BackfillInput | None = None
        self._state = BackfillState()

    @workflow.run
    async def run(self, inp: BackfillInput) -> BackfillProgress:
        assert inp.pairs, "the starter resolves an empty scope to every configured pair"
        self._input = inp
        self._state = inp.state or BackfillState(started_at=workflow.now())
        state = self._state
        if not state.totals:
            counted = await workflow.execute_activity(
                ACTIVITY_COUNT, BackfillCountInput(pairs=inp.pairs),
                result_type=BackfillCountOutput,
                start_to_close_timeout=timedelta(minutes=2), retry_policy=RETRY,
            )
            state.totals = counted.totals
        self._publish()
        pages_this_run = 0
        # Unpaced history imports (and every history recorded before their pacing) never
        # reach the patch call.
        history_paced = (inp.with_history and not state.history_done
                         and inp.history_txns_per_s_max is not None
                         and workflow.patched(PATCH_HISTORY_PACING))
        history_limit = inp.history_page_limit() if history_paced else inp.history_page_size
        while inp.with_history and not state.history_done:
            if pages_this_run >= inp.pages_per_run:
                self._continue_as_new()
            scanned_before = 0 if state.history is None else state.history.scanned
            page_started = workflow.now()
            state.history = await workflow.execute_activity(
                ACTIVITY_HISTORY_PAGE,
                HistoryPageInput(run_id=inp.run_id, pairs=inp.pairs, limit=history_limit),
                result_type=HistoryPageOutput,
                start_to_close_timeout=PAGE_START_TO_CLOSE,
                heartbeat_timeout=PAGE_HEARTBEAT,
                retry_policy=RETRY,
            )
            pages_this_run += 1
            state.history_done = state.history.done
            self._publish()
            if history_paced and not state.history_done:  # no pause after the last page
                assert inp.history_txns_per_s_max is not None
                # The checkpoint's counts are cumulative (a workflow started again with the
                # same run id finds earlier pages counted): this page's, at most its limit.
                scanned = min(max(state.history.scanned - scanned_before, 0), history_limit)
                await self._pace(scanned, inp.history_txns_per_s_max,
                                 workflow.now() - page_started)
        # Unpaced runs (and every history recorded before pacing) never reach the patch call.
        paced = inp.wallets_per_s_max is not None and workflow.patched(PATCH_PACING)
        limit = inp.wallet_page_limit() if paced else inp.page_size
        while state.pair_index < len(inp.pairs):
            if pages_this_run >= inp.pages_per_run:
                self._continue_as_new()
            pair = inp.pairs[state.pair_index]
            page_started = workflow.now()
            page = await workflow.execute_activity(
                ACTIVITY_PAGE,
                BackfillPageInput(run_id=inp.run_id, pair=pair, after=state.after,
                                  limit=limit, with_history=inp.with_history),
                result_type=BackfillPageOutput,
                start_to_close_timeout=PAGE_START_TO_CLOSE,
                heartbeat_timeout=PAGE_HEARTBEAT,
                retry_policy=RETRY,
            )
            pages_this_run += 1
            self._count(page)
            if page.exhausted:
                state.pair_index += 1
                state.after = None
            else:
                state.after = page.last_key
            self._publish()
            if paced and state.pair_index < len(inp.pairs):  # no pause after the last page
                assert inp.wallets_per_s_max is not None
                await self._pace(page.scanned, inp.wallets_per_s_max,
                                 workflow.now() - page_started)
        state.finished_at = workflow.now()
        self._publish()
        return self.progress()

    async def _pace(self, scanned: int, per_s_max: float, took: timedelta) -> None:
        """Sleep what the page left of its budget (`scanned` wallets or transactions at
        `per_s_max`): over any run of pages the import then stays at or under the budget,
        however long a page itself takes (a slow page pauses less, or not at all)."""
        assert scanned >= 0 and per_s_max > 0
        pause_s = scanned / per_s_max - took.total_seconds()
        assert pause_s <= scanned / per_s_max
        if pause_s < PAUSE_S_MIN:  # not worth a timer (and its history events)
            return
        await workflow.sleep(pause_s)
        self._state.paused_s += pause_s
        self._publish()

    def _continue_as_new(self) -> NoReturn:
        inp = self._input
        assert inp is not None
        carried = self._state.model_copy(update={"runs": self._state.runs + 1})
        workflow.continue_as_new(inp.model_copy(update={"state": carried}))

    def _count(self, page: BackfillPageOutput) -> None:
        state = self._state
        state.pages += 1
        state.scanned += page.scanned
        state.imported += page.imported
        state.already += page.already
        state.busy += page.busy
        state.failed += len(page.failed)
        state.transfers += page.transfers
        for key, error in page.failed.items():
            if len(state.failed_sample) < FAILED_SAMPLE_MAX:
                state.failed_sample[key] = error

    @workflow.query
    def progress(self) -> BackfillProgress:
        inp, state = self._input, self._state
        assert inp is not None
        now = state.finished_at or workflow.now()
        elapsed_s = max((now - (state.started_at or now)).total_seconds(), 0.0)
        total = sum(state.totals.values())
        rate = state.scanned / elapsed_s if elapsed_s > 0 else 0.0
        finished = state.pair_index >= len(inp.pairs)
        in_history = inp.with_history and not state.history_done
        stage = "history" if in_history else "finished" if finished else "wallets"
        remaining = max(total - state.scanned, 0)
        return BackfillProgress(
            run_id=inp.run_id, pairs=inp.pairs,
            pair=None if finished else inp.pairs[state.pair_index],
            total=total, done=state.scanned, imported=state.imported, already=state.already,
            busy=state.busy, failed=state.failed, failed_sample=dict(state.failed_sample),
            transfers=state.transfers, pages=state.pages, runs=state.runs,
            rate_per_s=rate, eta_s=(remaining / rate if rate > 0 and not finished else None),
            elapsed_s=elapsed_s, finished=finished, stage=stage, history=state.history,
            wallets_per_s_max=inp.wallets_per_s_max, paused_s=round(state.paused_s, 3),
            history_txns_per_s_max=inp.history_txns_per_s_max,
        )

    def _publish(self) -> None:
        p = self.progress()
        share = p.done / p.total if p.total else 1.0
        eta = "-" if p.eta_s is None else f"{p.eta_s:.0f}s"
        where = "finished" if p.finished else f"importing `{p.pair}`"
        if p.stage == "history":
            h = p.history
            done, total = (h.scanned, h.total) if h else (0, 0)
            reached = h.reached.isoformat() if h and h.reached else "-"
            workflow.set_current_details(
                f"**backfill {p.run_id}** · importing **history** · **{done}/{total}** "
                f"transactions · reached {reached} · imported {h.imported if h else 0} · "
                f"already {h.already if h else 0} · failed **{h.failed if h else 0}** · "
                f"run {p.runs}{_pacing(p.history_txns_per_s_max, 'transactions', p.paused_s)}")
            return
        history = "" if p.history is None else (
            f" · history {p.history.imported + p.history.already}/{p.history.total} "
            f"(failed {p.history.failed})")
        workflow.set_current_details(
            f"**backfill {p.run_id}** · {where} · **{p.done}/{p.total}** ({share:.1%}) · "
            f"{p.rate_per_s:.0f} wallets/s · ETA {eta} · imported {p.imported} · "
            f"already {p.already} · busy {p.busy} · failed **{p.failed}** · run {p.runs}"
            f"{history}{_pacing(p.wallets_per_s_max, 'wallets', p.paused_s)}"
        )


def _pacing(per_s_max: float | None, unit: str, paused_s: float) -> str:
    """The summary's pacing note for a budget of `per_s_max` `unit`/s ("" when unpaced)."""
    if per_s_max is None:
        return ""
    return f" · paced <= {per_s_max:g} {unit}/s (paused {paused_s:.0f}s)"
