"""Reconciliation workflow (run by a Temporal Schedule, default every 5 minutes).

Stages: start (report opened, system accounts snapshot) -> wallets (pages of <= 8189 legacy
wallets per pair; differences first classified, in-flight ones re-checked once after
`recheck_delay_s`; optional repair in dual_write) -> accounts (every TigerBeetle customer
account must be in the registry; sums customer nets per ledger) -> transfers (every Transfer
Registry entry must match its TigerBeetle transfer) -> finish (money conservation, match
rate, alerts, report). Continue-as-new every `pages_per_run` pages with cursor and counters.
The report records its scope, kind (check or repair) and whether every stage ran (full): the
migration gates accept only a finished full report covering their scope (walletcore.gates).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from messages.reconciliation import (
        ACTIVITY_ACCOUNT_PAGE,
        ACTIVITY_FINISH,
        ACTIVITY_RECHECK,
        ACTIVITY_REPAIR,
        ACTIVITY_START,
        ACTIVITY_TRANSFER_PAGE,
        ACTIVITY_WALLET_PAGE,
        PAGE_MAX,
        AccountPageInput,
        AccountPageOutput,
        FinishInput,
        RecheckInput,
        RecheckOutput,
        ReconcileInput,
        ReconcileState,
        ReconcileSummary,
        RepairInput,
        RepairOutput,
        StartInput,
        StartOutput,
        TransferPageInput,
        TransferPageOutput,
        WalletPageInput,
        WalletPageOutput,
    )
    from walletcore.errors import NON_RETRYABLE_ERROR_TYPES
    from walletcore.gates import pct

T = TypeVar("T")
TIMEOUT = timedelta(minutes=10)
RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30), maximum_attempts=20,
    non_retryable_error_types=list(NON_RETRYABLE_ERROR_TYPES),
)


@workflow.defn(name="ReconciliationWorkflow")
class ReconciliationWorkflow:
    def __init__(self) -> None:
        self._input: ReconcileInput | None = None
        self._state = ReconcileState()
        self._pages_this_run = 0

    @workflow.run
    async def run(self, inp: ReconcileInput) -> ReconcileSummary:
        self._input = inp
        self._state = inp.state or ReconcileState(started_at=workflow.now())
        s = self._state
        if s.stage == "start":
            started = await self._call(ACTIVITY_START, StartInput(
                run_id=inp.run_id, pairs=inp.pairs, repair=inp.repair, actor=inp.actor,
                reason=inp.reason, check_transfers=inp.check_transfers), StartOutput)
            s.system_start = started.system
            s.stage = "wallets"
        while s.stage == "wallets":
            self._maybe_continue_as_new()
            await self._wallet_page()
        ledgers = self._ledgers_of()
        if s.stage == "accounts" and not ledgers:
            s.stage = "transfers" if inp.check_transfers else "finish"
        while s.stage == "accounts":
            self._maybe_continue_as_new()
            ledger = ledgers[s.pair_index]
            page = await self._call(ACTIVITY_ACCOUNT_PAGE, AccountPageInput(
                run_id=inp.run_id, ledger=ledger, timestamp_after=s.timestamp_after,
                limit=inp.page_size), AccountPageOutput)
            self._pages_this_run += 1
            s.counts.tb_accounts += page.scanned
            s.counts.foreign_tb_accounts += page.foreign
            s.counts.add_findings(page.findings)
            s.customer_net[str(ledger)] = s.customer_net.get(str(ledger), 0) + page.net_minor
            s.timestamp_after = page.last_timestamp
            if page.exhausted:
                s.pair_index, s.timestamp_after = s.pair_index + 1, 0
                if s.pair_index >= len(ledgers):
                    s.stage, s.pair_index, s.after = (
                        "transfers" if inp.check_transfers else "finish"), 0, None
            self._publish()
        while s.stage == "transfers":
            self._maybe_continue_as_new()
            tpage = await self._call(ACTIVITY_TRANSFER_PAGE, TransferPageInput(
                run_id=inp.run_id, pairs=inp.pairs, after=s.after,
                limit=min(inp.page_size, PAGE_MAX // 2)), TransferPageOutput)
            self._pages_this_run += 1
            s.counts.transfers_checked += tpage.checked
            s.counts.add_findings(tpage.findings)
            s.after = tpage.last_key
            if tpage.exhausted:
                s.stage = "finish"
            self._publish()
        # check_transfers and repair only say what the report records (scope, kind, full):
        # the activities' inputs, no new command (replay-compatible).
        summary = await self._call(ACTIVITY_FINISH, FinishInput(
            run_id=inp.run_id, pairs=inp.pairs, counts=s.counts, customer_net=s.customer_net,
            system_start=s.system_start, threshold=inp.threshold,
            check_transfers=inp.check_transfers, repair=inp.repair), ReconcileSummary)
        s.stage = "done"
        self._publish(summary)
        return summary

    def _ledgers_of(self) -> list[int]:
        """Ledger ids come from the activities' table (the workflow has no configuration):
        the start snapshot is keyed by the ledgers it resolved."""
        return sorted(int(ledger) for ledger in self._state.system_start)

    async def _wallet_page(self) -> None:
        inp, s = self._input, self._state
        assert inp is not None
        pair = inp.pairs[s.pair_index]
        page = await self._call(ACTIVITY_WALLET_PAGE, WalletPageInput(
            run_id=inp.run_id, pair=pair, after=s.after, limit=inp.page_size,
            in_flight_max_age_s=inp.in_flight_max_age_s), WalletPageOutput)
        self._pages_this_run += 1
        c = s.counts
        c.wallets += page.scanned
        c.matched += page.matched
        c.real += page.real
        c.max_real_diff_minor = max(c.max_real_diff_minor, page.max_real_diff_minor)
        c.add_findings(page.findings)
        repairable = list(page.repairable)
        if page.in_flight:
            # In flight now: give the backlog time to land, then look once more.
            await workflow.sleep(timedelta(seconds=inp.recheck_delay_s))
            again = await self._call(ACTIVITY_RECHECK, RecheckInput(
                run_id=inp.run_id, wallets=page.in_flight,
                in_flight_max_age_s=inp.in_flight_max_age_s), RecheckOutput)
            c.resolved_on_recheck += again.matched
            c.matched += again.matched
            c.in_flight += again.in_flight
            c.real += again.real
            c.max_real_diff_minor = max(c.max_real_diff_minor, again.max_real_diff_minor)
            c.add_findings(again.findings)
            repairable.extend(again.repairable)
        if inp.repair and repairable:
            fixed = await self._call(ACTIVITY_REPAIR, RepairInput(
                run_id=inp.run_id, wallets=repairable, actor=inp.actor or "unknown",
                reason=inp.reason or "reconciliation --repair",
                in_flight_max_age_s=inp.in_flight_max_age_s), RepairOutput)
            c.repaired += len(fixed.repaired)
            c.repair_failed += len(fixed.failed)
        s.after = page.last_key
        if page.exhausted:
            s.pair_index += 1
            s.after = None
            if s.pair_index >= len(inp.pairs):
                s.stage, s.pair_index = "accounts", 0
        self._publish()

    def _maybe_continue_as_new(self) -> None:
        inp = self._input
        assert inp is not None
        if self._pages_this_run >= inp.pages_per_run:
            carried = self._state.model_copy(update={"runs": self._state.runs + 1})
            workflow.continue_as_new(inp.model_copy(update={"state": carried}))

    async def _call(self, name: str, arg: object, result_type: type[T]) -> T:
        result: T = await workflow.execute_activity(
            name, arg, result_type=result_type, start_to_close_timeout=TIMEOUT,
            retry_policy=RETRY)
        return result

    @workflow.query
    def progress(self) -> ReconcileState:
        return self._state

    def _publish(self, summary: ReconcileSummary | None = None) -> None:
        s, c = self._state, self._state.counts
        if summary is not None:
            alert = " · **ALERT**: " + "; ".join(summary.alerts) if summary.alerts else ""
            workflow.set_current_details(
                f"**done** · match rate **{pct(summary.match_rate)}** · wallets "
                f"{summary.wallets} · real {summary.real} · in flight {summary.in_flight} · "
                f"repaired {summary.repaired}{alert}")
            return
        workflow.set_current_details(
            f"stage **{s.stage}** · wallets {c.wallets} · matched {c.matched} · real "
            f"**{c.real}** · in flight {c.in_flight} (resolved {c.resolved_on_recheck}) · "
            f"TB accounts {c.tb_accounts} · transfers {c.transfers_checked} · run {s.runs}")
