"""The TigerBeetle -> ledger sync from durable state alone, on the real servers: it catches up
(transfers created straight in TigerBeetle with walletcore.clearing's specs, part of them
settled like the pipeline would), re-runs idempotently, measures the lag, keeps its cursor
across a restart, reports transfers it cannot match, and runs as Temporal workflows."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio
from clearing_support import record_history
from ledger_sync_support import Terminal, make_terminal, mix, spend, txn
from pymongo import AsyncMongoClient
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.worker import Worker
from wallet_support import eventually

from activities.terminal_reconcile import TerminalReconcileActivities
from activities.terminal_sync import LedgerSync, TerminalSyncActivities
from messages.clearing import (
    LedgerSyncInput,
    LedgerSyncOutcome,
    SyncPageReport,
    TerminalReconcileInput,
    TerminalReconcileReport,
)
from stores.clearing_tb import transfer_of
from stores.general_ledger import GeneralLedger
from walletcore.clearing import pending_spec, post_transfer_id
from walletcore.journal import NS_PER_S, entry_id_of
from workers.wallet_worker import workflow_runner
from workflows.terminal_sync import LedgerSyncWorkflow, TerminalReconcileWorkflow

Db = Any


@pytest.fixture
def db(mongo_client: AsyncMongoClient[dict[str, Any]]) -> Db:
    return mongo_client[f"walletmig_tsync_{uuid.uuid4().hex[:10]}"]


@pytest_asyncio.fixture(loop_scope="session")
async def terminal(db: Db, tb_client: Any) -> AsyncIterator[Terminal]:
    made = await make_terminal(db, tb_client)
    await made.create_mirrors()
    yield made
    await db.client.drop_database(db.name)


async def test_sync_catches_up_and_a_rerun_writes_nothing(terminal: Terminal) -> None:
    first, later = mix(), spend()
    stamps = await terminal.clear(first)
    stamps |= await terminal.clear(later)
    voided = [txn() for _ in range(3)]
    await terminal.clear(voided, outcome="void")
    held = [txn() for _ in range(2)]
    await terminal.clear(held, outcome="pending")
    # The pipeline settled every other transaction (in its own order) before it "crashed".
    everything = first + later
    settled = everything[::2]
    await terminal.ledger.post_entries(terminal.entries(settled[::-1], stamps))

    outcome = await terminal.sync.run_until_caught_up(limit=7)  # many pages, 3 ledgers merged
    assert outcome.caught_up and outcome.totals.pages > 5
    assert outcome.totals.new_entries == len(everything) - len(settled)
    transfers = 2 * len(everything) + 2 * len(voided) + len(held)
    assert outcome.totals.scanned == transfers
    newest = await terminal.client.lookup_transfers(
        [pending_spec(t, terminal.table).id for t in held])
    assert outcome.cursor.timestamp == max(t.timestamp for t in newest)  # the last created
    assert outcome.lag_exact and outcome.lag_s > 0  # the first page found missing posts
    for want in terminal.entries(everything, stamps):  # byte for byte what the pipeline writes
        got = await terminal.ledger.get_entry(want.entry_id)
        assert got is not None and got.entry.content_hash == want.content_hash
    for gone in voided + held:
        assert await terminal.ledger.get_entry(entry_id_of(post_transfer_id(gone.external_id))) \
            is None
    assert (await terminal.ledger.trial_balance()).zero
    assert (await terminal.ledger.verify_chain()).ok

    again = await terminal.sync.run_until_caught_up()
    assert again.caught_up and again.totals.new_entries == 0 and again.lag_s == 0
    replay = await terminal.sync.run_until_caught_up(replay=True, limit=50)
    assert replay.totals.new_entries == 0 and replay.totals.scanned == transfers
    assert (await terminal.ledger.chain_head()).seq == len(everything)
    status = await terminal.reports.sync_status()
    assert status is not None and status.exhausted and status.lag_s == 0


async def test_the_lag_is_now_minus_the_oldest_missing_post(db: Db, tb_client: Any) -> None:
    now = {"ns": 0}
    terminal = await make_terminal(db, tb_client, clock=lambda: now["ns"])
    await terminal.create_mirrors()
    txns = [txn() for _ in range(6)]
    stamps = await terminal.clear(txns)
    oldest = min(stamps.values())
    now["ns"] = oldest + 42 * NS_PER_S
    assert await terminal.sync.measure_lag() == (42.0, True)
    # Settled by the pipeline: nothing is missing although the cursor is still at 0.
    await terminal.ledger.post_entries(terminal.entries(txns, stamps))
    assert await terminal.sync.measure_lag() == (0.0, True)

    more = [txn() for _ in range(4)]
    more_stamps = await terminal.clear(more)
    now["ns"] = min(more_stamps.values()) + 7 * NS_PER_S
    page = await terminal.sync.page(limit=3)  # pendings and posts of the first six only
    assert not page.exhausted and page.new_entries == 0
    assert not page.lag_exact and page.lag_s >= 7  # an upper bound: nothing missing yet
    outcome = await terminal.sync.run_until_caught_up(limit=3)
    assert outcome.lag_exact and outcome.lag_s == pytest.approx(7.0)
    assert outcome.totals.new_entries == 4
    assert await terminal.sync.measure_lag() == (0.0, True)
    await db.client.drop_database(db.name)


async def test_the_cursor_survives_a_restart(terminal: Terminal) -> None:
    txns = [txn(amount=f"{i + 1}.00") for i in range(20)]
    await terminal.clear(txns)
    first = await terminal.sync.page(limit=25)
    assert first.new_entries == 5 and not first.exhausted  # the 20 pendings, then 5 posts
    # A new process: new store objects over the same database and TigerBeetle.
    ledger = GeneralLedger(terminal.db, chart=terminal.table.chart)
    assert (await ledger.read_cursor()).timestamp == first.cursor.timestamp
    restarted = LedgerSync(terminal.client, ledger, terminal.clearing, table=terminal.table)
    outcome = await restarted.run_until_caught_up(limit=10)
    assert outcome.caught_up and outcome.totals.new_entries == 15
    assert outcome.totals.scanned == 15  # it went on from the cursor, not from 0
    assert (await ledger.chain_head()).seq == 20 and (await ledger.trial_balance()).zero


async def test_a_post_without_its_transaction_is_reported_not_written(
    terminal: Terminal,
) -> None:
    known = [txn() for _ in range(3)]
    await terminal.clear(known)
    stranger = txn()
    stamps = await terminal.clear([stranger], record=False)  # never recorded: no transaction
    outcome = await terminal.sync.run_until_caught_up()
    assert outcome.caught_up and outcome.totals.new_entries == 3
    assert outcome.totals.unmatched == 1
    status = await terminal.reports.sync_status()
    assert status is not None and status.unmatched_total == 1
    assert status.oldest_unmatched_ts == stamps[stranger.external_id]
    report = await terminal.reconciler.run(TerminalReconcileInput(run_id="unmatched"))
    missing = entry_id_of(post_transfer_id(stranger.external_id))
    assert report.posted_without_entry == [missing] and not report.ok
    assert [m.account for m in report.mismatched_accounts] == [1050, 2180]


async def test_a_clean_terminal_reconciles_and_expired_holds_are_reported(
    terminal: Terminal,
) -> None:
    stamps = await terminal.clear(mix())
    stuck, fresh = txn(), txn()
    await terminal.clearing.record_many([stuck, fresh], "stuck-batch")
    holds = [transfer_of(pending_spec(t, terminal.table)) for t in (stuck, fresh)]
    holds[0].timeout = 1  # TigerBeetle releases this hold after a second
    await terminal.create(holds)
    # Both were received longer ago than their route's timeout (300 s): an intake time six
    # minutes back stands in for the wait. Only the first hold's own timeout has passed.
    for t in (stuck, fresh):
        record = await terminal.clearing.get(t.external_id)
        assert record is not None
        await terminal.db["clearing_transactions"].update_one(
            {"_id": t.external_id},
            {"$set": {"received_at": record.received_at - timedelta(minutes=6)}})
    await asyncio.sleep(1.2)
    report = await terminal.reconciler.run(TerminalReconcileInput(run_id="clean", page_size=5))
    assert report.ok, report
    assert report.entries_checked == report.transfers_checked == len(stamps)
    assert report.accounts_checked == len(terminal.table.chart.mirrors())
    assert report.trial_balance_zero and report.chain_ok and report.sync_lag_s == 0
    assert report.holds_checked == 2 and report.expired_holds == [stuck.external_id]
    saved = await terminal.reports.latest_reconcile()
    assert saved is not None and saved.run_id == "clean" and saved.ok
    assert saved.expired_hold_count == 1


# ---- the workflows ---------------------------------------------------------------------------


async def test_sync_and_reconcile_workflows(terminal: Terminal, temporal_client: Client) -> None:
    queue = f"terminal-{uuid.uuid4().hex[:8]}"
    activities = [*TerminalSyncActivities(terminal.sync).all(),
                  *TerminalReconcileActivities(terminal.reconciler).all()]
    txns = [txn() for _ in range(12)]
    await terminal.clear(txns)
    async with Worker(temporal_client, task_queue=queue,
                      workflows=[LedgerSyncWorkflow, TerminalReconcileWorkflow],
                      activities=activities, workflow_runner=workflow_runner()):
        once: LedgerSyncOutcome = await temporal_client.execute_workflow(
            LedgerSyncWorkflow.run, LedgerSyncInput(once=True, limit=5),
            id=f"sync-once-{queue}", task_queue=queue,
            execution_timeout=timedelta(minutes=2))
        assert once.caught_up and once.totals.new_entries == 12 and once.totals.pages >= 5
        await record_history(temporal_client, f"sync-once-{queue}", "ledger_sync_once")

        # The continuous sync: later posts land without anyone asking, then it idles.
        handle = await temporal_client.start_workflow(
            LedgerSyncWorkflow.run, LedgerSyncInput(idle_s=0.2, pages_per_run=10),
            id=f"sync-loop-{queue}", task_queue=queue)
        later = [txn() for _ in range(5)]
        await terminal.clear(later)
        async def synced() -> bool:
            return (await terminal.ledger.chain_head()).seq == 17

        await eventually(synced, "the continuous sync to write the 5 later entries")
        last = await handle.query(LedgerSyncWorkflow.last_page)
        assert isinstance(last, SyncPageReport)
        first_run = temporal_client.get_workflow_handle(handle.id, run_id=handle.result_run_id)
        async def first_run_ended() -> bool:  # ten pages of 0.2 s idle each, then rotates
            return (await first_run.describe()).status is not WorkflowExecutionStatus.RUNNING

        await eventually(first_run_ended, "the sync's first run to continue as new")
        assert (await first_run.describe()).status is WorkflowExecutionStatus.CONTINUED_AS_NEW
        latest = temporal_client.get_workflow_handle(handle.id)
        assert (await latest.describe()).status is WorkflowExecutionStatus.RUNNING
        await latest.terminate("test over")

        report: TerminalReconcileReport = await temporal_client.execute_workflow(
            TerminalReconcileWorkflow.run, TerminalReconcileInput(run_id="wf", page_size=4),
            id=f"reconcile-{queue}", task_queue=queue, execution_timeout=timedelta(minutes=2))
        assert report.ok and report.entries_checked == 17 and report.transfers_checked == 17
