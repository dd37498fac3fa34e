"""`backfill start --with-history` against real servers: the session's MongoDB-compatible
server, Redis and Temporal, and a FRESH TigerBeetle emulator per test (imported transfers must
be newer than every transfer in the cluster, and other tests write to the session's one)."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio
import tigerbeetle as tb
from recon_support import Env, credit, debit, make_env, void
from temporalio.client import Client
from wallet_support import history_wanted, sandboxed_worker, save_history

from activities.history_import import NS_PER_MS, ms_of, newest_filter
from messages.backfill import (
    BackfillInput,
    BackfillPageInput,
    BackfillProgress,
    HistoryPageInput,
    HistoryPageOutput,
)
from messages.reconciliation import ReconcileInput, ReconcileSummary
from stores.history_import import BACKFILL_HISTORY, scope_of
from stores.legacy_store import WALLET_TRANSACTIONS
from stores.tigerbeetle_client import TigerBeetleClient, connect_tigerbeetle
from tb_emulator.server import EmulatorProcess, temp_data_file
from walletcore.errors import InvalidInputError
from walletcore.ids import transfer_id, void_transfer_id
from walletcore.keys import WalletKey
from walletcore.phases import MigrationState, Phase
from workflows.backfill import BackfillWorkflow
from workflows.reconciliation import ReconciliationWorkflow

UniqueId = Callable[..., str]


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_tb() -> AsyncIterator[TigerBeetleClient]:
    """An emulator process of this test's own (stopped by PID at the end)."""
    directory, data_file = temp_data_file("tbemu-history-")
    process = EmulatorProcess(data_file)
    await asyncio.to_thread(process.start)
    client = connect_tigerbeetle(f"tbemu://{process.address}")
    try:
        yield client
    finally:
        await client.close()
        process.kill()
        shutil.rmtree(directory, ignore_errors=True)


@pytest_asyncio.fixture(loop_scope="session")
async def env(mongo_db: Any, redis_client: Any, fresh_tb: TigerBeetleClient) -> Env:
    env = await make_env(mongo_db, redis_client, fresh_tb)
    for pair in env.pairs:  # own documents: other tests may move the global scope
        await env.migration.set(MigrationState(scope=pair, phase=Phase.LEGACY, epoch=1))
    return env


async def seed(env: Env, unique_id: UniqueId) -> tuple[list[WalletKey], list[str]]:
    """Credits, debits into debt, voids of both kinds, precisions 0..8; the voided wallet's
    transaction ids last (in order)."""
    c, t = unique_id("c"), unique_id("t")
    keys = {name: env.key(f"{c}-{name}", currency) for name, currency in (
        ("plain", "USD"), ("debt", "USD"), ("voided", "USD"), ("jpy", "JPY"), ("bhd", "BHD"),
        ("usdc", "USDC"), ("btc", "BTC"))}
    await credit(env, keys["plain"], f"{t}-1", "100.50")
    await debit(env, keys["plain"], f"{t}-2", "30.25")
    await debit(env, keys["debt"], f"{t}-3", "50.00", overdraft=True)
    await credit(env, keys["debt"], f"{t}-4", "20.01", overdraft=True)
    await credit(env, keys["voided"], f"{t}-5", "5.55")
    await debit(env, keys["voided"], f"{t}-6", "1.11")
    await void(env, keys["voided"], f"{t}-7", f"{t}-6")  # void of a debit: a credit
    await void(env, keys["voided"], f"{t}-8", f"{t}-5")  # void of a credit: a debit
    await credit(env, keys["jpy"], f"{t}-9", "1000")
    await credit(env, keys["bhd"], f"{t}-10", "1.234")
    await debit(env, keys["bhd"], f"{t}-11", "0.001")
    await credit(env, keys["usdc"], f"{t}-12", "0.000001")
    await credit(env, keys["btc"], f"{t}-13", "0.12345678")
    return list(keys.values()), [f"{t}-{i}" for i in (5, 6, 7, 8)]


async def import_history(env: Env, limit: int = 4) -> HistoryPageOutput:
    importer = env.importer.history
    run_id = f"h-{uuid.uuid4().hex[:6]}"
    for _ in range(100):
        out = await importer.page(HistoryPageInput(run_id=run_id, pairs=env.pairs, limit=limit))
        if out.done:
            return out
    raise AssertionError("history import did not finish")


async def import_openings(env: Env) -> list[str]:
    failed: list[str] = []
    for pair in env.pairs:
        page = await env.importer.page(BackfillPageInput(
            run_id=f"o-{uuid.uuid4().hex[:6]}", pair=pair, limit=100, with_history=True))
        assert page.exhausted
        failed.extend(page.failed)
    return failed


async def assert_same(env: Env, keys: list[WalletKey]) -> None:
    for key in keys:
        legacy = await env.legacy.get_balance(key)
        tbal = await env.tb_store.get_balance(key)
        assert (tbal.credit, tbal.debit, tbal.historical_credit) == (
            legacy.credit, legacy.debit, legacy.historical_credit), key


async def account_transfers(env: Env, key: WalletKey) -> list[tb.Transfer]:
    record = await env.accounts.get(key)
    assert record is not None
    return await env.tb_client.get_account_transfers(tb.AccountFilter(
        account_id=record.account_id, user_data_128=0, user_data_64=0, user_data_32=0, code=0,
        timestamp_min=0, timestamp_max=0, limit=100,
        flags=tb.AccountFilterFlags.DEBITS | tb.AccountFilterFlags.CREDITS))


async def legacy_log(env: Env, key: WalletKey) -> list[dict[str, Any]]:
    cursor = env.db[WALLET_TRANSACTIONS].find({"wallet": key.canonical}).sort(
        [("created_at", 1), ("wallet_version", 1)])
    return [doc async for doc in cursor]


async def cluster_transfer_count(env: Env) -> int:
    query = newest_filter()
    query.limit = 8189
    return len(await env.tb_client.query_transfers(query))


async def test_history_then_residual_opening_matches_legacy(
    env: Env, unique_id: UniqueId
) -> None:
    keys, voided_txns = await seed(env, unique_id)
    history = await import_history(env, limit=4)  # several pages, shared milliseconds
    assert history.failed == 0, history.failed_sample
    assert history.total == history.scanned == history.imported == 13 and history.pages >= 4
    # After the cut: these reach TigerBeetle only through the residual opening.
    t = unique_id("late")
    await credit(env, keys[0], f"{t}-1", "1.00")
    await debit(env, keys[1], f"{t}-2", "9.99", overdraft=True)
    assert await import_openings(env) == []
    await assert_same(env, keys)

    # The wallet's TigerBeetle history is the legacy log, with the original timestamps.
    voided = keys[2]
    log = await legacy_log(env, voided)
    transfers = await account_transfers(env, voided)
    expected_ids = [transfer_id(d["_id"]) if d["type"] != "void"
                    else void_transfer_id(d["original_transaction_id"]) for d in log]
    assert [t.id for t in transfers] == expected_ids
    assert [t.timestamp // NS_PER_MS for t in transfers] == [ms_of(d["created_at"]) for d in log]
    assert all(t.flags & tb.TransferFlags.IMPORTED for t in transfers)
    # The Transfer Registry knows them as the live path records them (voids included).
    original = await env.transfers.get(voided_txns[0])
    assert original is not None and original.voided
    assert original.void_transaction_id == voided_txns[3]
    entries = await env.tb_store.history(voided, limit=10)
    assert {e.transaction_id for e in entries} == set(voided_txns)
    # A residual opening only where a write came after the cut.
    plain = await account_transfers(env, keys[0])
    assert [t.code for t in plain][-1] == 10 and len(plain) == 3  # credit, debit, opening


async def test_rerun_is_idempotent_and_resumes_from_tigerbeetle(
    env: Env, unique_id: UniqueId
) -> None:
    keys, _ = await seed(env, unique_id)
    importer = env.importer.history
    first = await importer.page(HistoryPageInput(run_id="r1", pairs=env.pairs, limit=5))
    assert not first.done and first.imported == 5
    # Checkpoint lost (e.g. the collection was dropped): a new run recomputes from TigerBeetle.
    await env.db[BACKFILL_HISTORY].delete_one({"_id": scope_of(env.pairs)})
    again = await import_history(env, limit=8189)
    assert again.already == 5 and again.imported == 8 and again.failed == 0
    count = await cluster_transfer_count(env)
    # Finished: a further run is a no-op, so are openings run twice.
    assert (await import_history(env)).pages == again.pages
    assert await import_openings(env) == [] and await import_openings(env) == []
    assert await cluster_transfer_count(env) == count  # no residual: history holds it all
    await assert_same(env, keys)
    # A narrower scope whose history came in with this one: done at once, not refused.
    narrower = await importer.page(HistoryPageInput(run_id="r3", pairs=env.pairs[:1]))
    assert narrower.done and narrower.scanned == 0


async def test_rejected_history_transfer_is_covered_by_the_residual(
    env: Env, unique_id: UniqueId
) -> None:
    """Clock skew put a debit before the credit that funded it: TigerBeetle rejects it
    (no overdraft), the import goes on, and the opening's residual holds its effect."""
    key = env.key(unique_id("skew"))
    t = unique_id("t")
    await credit(env, key, f"{t}-1", "10.00")
    await debit(env, key, f"{t}-2", "4.00")
    credit_doc = await env.db[WALLET_TRANSACTIONS].find_one({"_id": f"{t}-1"})
    assert credit_doc is not None
    await env.db[WALLET_TRANSACTIONS].update_one(
        {"_id": f"{t}-2"}, {"$set": {"created_at": credit_doc["created_at"] - timedelta(
            milliseconds=5)}})
    history = await import_history(env)
    assert history.failed == 1 and f"{t}-2" in history.failed_sample
    assert "EXCEEDS_CREDITS" in history.failed_sample[f"{t}-2"]
    assert await import_openings(env) == []
    await assert_same(env, [key])


async def test_refused_once_the_cluster_holds_normal_transfers(
    env: Env, unique_id: UniqueId
) -> None:
    key = env.key(unique_id("c"))
    await credit(env, key, unique_id("t"), "3.00")
    with pytest.raises(InvalidInputError) as refused_openings:
        await import_openings(env)  # openings wait for the history
    assert refused_openings.value.field == "with_history"
    await credit(env, key, unique_id("t"), "1.00", store=env.tb_store)  # a normal write
    with pytest.raises(InvalidInputError) as refused:
        await import_history(env)
    assert refused.value.field == "with_history" and "normally" in refused.value.message


async def test_refused_when_a_pair_left_phase_legacy(env: Env, unique_id: UniqueId) -> None:
    await credit(env, env.key(unique_id("c")), unique_id("t"), "3.00")
    await env.migration.set(MigrationState(scope=env.pairs[0], phase=Phase.DUAL_WRITE,
                                           epoch=2))
    with pytest.raises(InvalidInputError) as refused:
        await import_history(env)
    assert refused.value.field == "with_history" and "dual_write" in refused.value.message


async def test_backfill_workflow_with_history(
    env: Env, temporal_client: Client, unique_id: UniqueId
) -> None:
    """The workflow: history first, then the wallets; reconciliation then finds the imported
    history exactly where the Transfer Registry says (voids included), nothing else."""
    keys, _ = await seed(env, unique_id)
    async with sandboxed_worker(
            temporal_client, "history-test", [BackfillWorkflow, ReconciliationWorkflow],
            [*env.backfill_activities().all(), *env.reconcile_activities().all()],
    ) as (_, queue):
        run_id = f"bf-{uuid.uuid4().hex[:8]}"
        progress: BackfillProgress = await temporal_client.execute_workflow(
            BackfillWorkflow.run,
            BackfillInput(run_id=run_id, pairs=env.pairs, with_history=True,
                          history_page_size=5, pages_per_run=4),
            id=f"backfill-test/{run_id}", task_queue=queue,
            execution_timeout=timedelta(minutes=2))
        summary: ReconcileSummary = await temporal_client.execute_workflow(
            ReconciliationWorkflow.run,
            ReconcileInput(run_id=f"rc-{run_id}", pairs=env.pairs, recheck_delay_s=0.5),
            id=f"reconcile-test/{run_id}", task_queue=queue,
            execution_timeout=timedelta(minutes=2))
    assert summary.real == 0 and summary.matched == len(keys), summary
    assert not any(summary.findings.values()), summary.findings
    assert summary.conservation_ok
    assert progress.finished and progress.stage == "finished" and progress.runs > 1
    assert progress.history is not None and progress.history.imported == 13
    assert progress.failed == 0 and progress.history.failed == 0
    assert progress.transfers == 0  # the history holds every balance: no residual
    await assert_same(env, keys)


async def timers(client: Client, workflow_id: str, run_id: str | None) -> tuple[int, float]:
    """Timers a workflow started over its runs (continue-as-new followed), and their sum."""
    count, total_s = 0, 0.0
    for _ in range(100):  # bounded: a run chain of this test is a few runs long
        if run_id is None:
            return count, total_s
        events = (await client.get_workflow_handle(workflow_id, run_id=run_id)
                  .fetch_history()).events
        run_id = None
        for event in events:
            if event.HasField("timer_started_event_attributes"):
                count += 1
                total_s += (event.timer_started_event_attributes.start_to_fire_timeout
                            .ToTimedelta().total_seconds())
            if event.HasField("workflow_execution_continued_as_new_event_attributes"):
                run_id = (event.workflow_execution_continued_as_new_event_attributes
                          .new_execution_run_id)
    raise AssertionError("run chain longer than 100")


async def test_paced_history_imports_every_transaction_once_in_order(
    env: Env, temporal_client: Client, unique_id: UniqueId
) -> None:
    """history_txns_per_s_max: history pages of at most one second of the budget and a
    durable timer after each but the last (across continue-as-new) for what the page left of
    it; the import is the unpaced one's: every transaction once, in legacy order per wallet."""
    keys, _ = await seed(env, unique_id)
    rate = 2.0
    async with sandboxed_worker(temporal_client, "history-paced", [BackfillWorkflow],
                                env.backfill_activities().all()) as (_, queue):
        run_id = f"bf-{uuid.uuid4().hex[:8]}"
        handle = await temporal_client.start_workflow(
            BackfillWorkflow.run,
            BackfillInput(run_id=run_id, pairs=env.pairs, with_history=True,
                          history_txns_per_s_max=rate, pages_per_run=2),
            id=f"backfill-test/{run_id}", task_queue=queue,
            execution_timeout=timedelta(minutes=2))
        progress: BackfillProgress = await handle.result()
    history = progress.history
    assert progress.finished and history is not None and history.failed == 0
    assert history.total == history.scanned == history.imported == 13 and history.already == 0
    assert history.pages >= 13 / rate and progress.runs > 1  # pages of <= 2, continued as new
    assert progress.history_txns_per_s_max == rate
    # Each page but the last took its transactions' share of the budget (own time + pause),
    # however long the page itself took.
    assert progress.elapsed_s >= (history.scanned - int(rate)) / rate
    # Every pause is a durable timer (none after the last page, none for the unpaced wallets);
    # a page that took its whole second itself pauses not at all, but not all 6 of them.
    count, total_s = await timers(temporal_client, handle.id, handle.first_execution_run_id)
    assert 0 < count <= history.pages - 1 and progress.paused_s > 0
    assert abs(total_s - progress.paused_s) < 0.01, (total_s, progress.paused_s)
    if history_wanted("backfill_history_paced"):  # the first run: marker, pages, timers, CAN
        await save_history(temporal_client.get_workflow_handle(
            handle.id, run_id=handle.first_execution_run_id), "backfill_history_paced")
    for key in keys:
        log = await legacy_log(env, key)
        expected = [transfer_id(d["_id"]) if d["type"] != "void"
                    else void_transfer_id(d["original_transaction_id"]) for d in log]
        assert [t.id for t in await account_transfers(env, key)] == expected, key
    await assert_same(env, keys)


async def test_live_writes_after_history(env: Env, unique_id: UniqueId) -> None:
    """dual_write / tb_primary after the history: the live TigerBeetle store writes to the
    imported accounts (its create_accounts must accept an account that differs only by the
    `imported` flag)."""
    keys, _ = await seed(env, unique_id)
    await import_history(env, limit=8189)
    assert await import_openings(env) == []
    t = unique_id("live")
    await credit(env, keys[0], f"{t}-1", "2.00", store=env.tb_store)
    await credit(env, keys[0], f"{t}-1", "2.00", store=env.legacy)
    await void(env, keys[0], f"{t}-2", f"{t}-1", store=env.tb_store)
    await void(env, keys[0], f"{t}-2", f"{t}-1", store=env.legacy)
    await assert_same(env, keys)
