"""Reconciliation against the real servers: clean runs, in-flight backlogs, seeded corruption
found, classified and repaired. Each test has its own ledger pairs (fresh country code)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest_asyncio
from bson.decimal128 import Decimal128
from recon_support import Env, credit, debit, make_env
from temporalio.client import Client
from temporalio.worker import Worker

from registries.account_registry import ACCOUNT_REGISTRY
from registries.transfer_registry import TransferRecord
from stores.legacy_store import WALLETS
from walletcore.ids import transfer_id
from walletcore.keys import WalletKey
from walletcore.phases import MigrationState, Phase
from walletcore.reconcile import IssueKind
from walletmig.commands.reconcile import render_html
from workers.wallet_worker import workflow_runner
from workflows.backfill_models import BackfillPageInput
from workflows.reconciliation import ReconciliationWorkflow
from workflows.reconciliation_models import ReconcileInput, ReconcileSummary

UniqueId = Callable[..., str]


@pytest_asyncio.fixture(loop_scope="session")
async def env(mongo_db: Any, redis_client: Any, tb_client: Any) -> Env:
    return await make_env(mongo_db, redis_client, tb_client)


@pytest_asyncio.fixture(loop_scope="session")
async def worker(temporal_client: Client, env: Env) -> AsyncIterator[tuple[Client, str]]:
    queue = f"reconcile-test-{uuid.uuid4().hex[:8]}"
    async with Worker(temporal_client, task_queue=queue, workflows=[ReconciliationWorkflow],
                      activities=env.reconcile_activities().all(),
                      workflow_runner=workflow_runner()):
        yield temporal_client, queue


async def reconcile(worker: tuple[Client, str], env: Env, **kw: Any) -> ReconcileSummary:
    client, queue = worker
    run_id = f"rc-{uuid.uuid4().hex[:8]}"
    kw.setdefault("recheck_delay_s", 0.5)
    return await client.execute_workflow(
        ReconciliationWorkflow.run, ReconcileInput(run_id=run_id, pairs=env.pairs, **kw),
        id=f"reconcile-test/{run_id}", task_queue=queue, execution_timeout=timedelta(minutes=5))


async def backfill_all(env: Env) -> None:
    for pair in env.pairs:
        after = None
        while True:
            page = await env.importer.page(BackfillPageInput(
                run_id="test-backfill", pair=pair, after=after, limit=100))
            assert page.failed == {}
            after = page.last_key
            if page.exhausted:
                break


async def seed(env: Env, unique_id: UniqueId, n: int = 6) -> list[WalletKey]:
    c, t = unique_id("c"), unique_id("t")
    keys = []
    for i in range(n):
        key = env.key(f"{c}-{i}", ("USD", "JPY", "BHD")[i % 3])
        await credit(env, key, f"{t}-{i}-a", "30", overdraft=True)
        await debit(env, key, f"{t}-{i}-b", "12", overdraft=True)
        if i % 2:
            await debit(env, key, f"{t}-{i}-c", "40", overdraft=True)  # into debt
        keys.append(key)
    return keys


async def test_clean_run_matches_everything(
    env: Env, worker: tuple[Client, str], unique_id: UniqueId
) -> None:
    keys = await seed(env, unique_id)
    await backfill_all(env)
    # Live traffic after the import goes through both stores (as the backlog applies it).
    await credit(env, keys[0], "live-" + unique_id(), "1.25")
    txn = unique_id("live")
    await credit(env, keys[3], txn, "2.50")  # keys[3] is USD
    await credit(env, keys[3], txn, "2.50", store=env.tb_store)
    summary = await reconcile(worker, env, page_size=4, pages_per_run=2)
    # keys[0]'s second legacy credit never reached TigerBeetle: young, so in flight, not real
    assert summary.wallets == len(keys)
    assert summary.real == 0 and summary.in_flight == 1, summary
    assert summary.match_rate == 1.0 and summary.alerts == [], summary.alerts
    assert summary.conservation_ok
    report = await env.reports.get(summary.run_id)
    assert report is not None and report["status"] == "done"
    assert report["counts"]["tb_accounts"] == len(keys)
    page = render_html(report, await env.reports.history(10))
    assert "<svg" in page and summary.run_id in page and "polyline" in page


async def test_in_flight_backlog_is_not_a_false_alarm(
    env: Env, worker: tuple[Client, str], unique_id: UniqueId
) -> None:
    keys = await seed(env, unique_id, n=3)
    await backfill_all(env)
    txn = unique_id("late")
    await debit(env, keys[2], txn, "3.000", overdraft=True)  # MongoDB answered... (BHD)

    async def backlog_lands() -> None:  # ...and the backlog applies it a moment later
        await asyncio.sleep(0.3)
        await debit(env, keys[2], txn, "3.000", overdraft=True, store=env.tb_store)

    summary, _ = await asyncio.gather(
        reconcile(worker, env, recheck_delay_s=3.0), backlog_lands())
    assert summary.real == 0 and summary.in_flight == 0
    assert summary.resolved_on_recheck == 1 and summary.matched == 3
    assert summary.alerts == []


async def test_stuck_backlog_is_real(
    env: Env, worker: tuple[Client, str], unique_id: UniqueId
) -> None:
    keys = await seed(env, unique_id, n=1)
    await backfill_all(env)
    await credit(env, keys[0], unique_id("stuck"), "9.00")  # never reaches TigerBeetle
    await asyncio.sleep(1.2)
    summary = await reconcile(worker, env, in_flight_max_age_s=1.0)
    assert summary.real == 1 and summary.alerts
    (doc,) = await env.reports.mismatches(summary.run_id)
    assert doc["kind"] == IssueKind.BALANCE_MISMATCH and "stuck" in doc["detail"]
    assert doc["recent_legacy_ops"] and doc["legacy"]["credit_minor"] != doc[
        "tigerbeetle"]["credit_minor"]


async def test_seeded_corruption_found_classified_and_repaired(
    env: Env, worker: tuple[Client, str], unique_id: UniqueId
) -> None:
    keys = await seed(env, unique_id, n=4)
    await backfill_all(env)
    edited, unregistered = keys[0], keys[2]
    # 1. A wallet edited behind the platform's back (+5.00 of credit in MongoDB only).
    await env.db[WALLETS].update_one({"_id": edited.canonical}, {"$set": {
        "credit": Decimal128("23.00"), "historical_credit": Decimal128("35.00")}})
    # 2. A registry entry lost (its TigerBeetle account stays: now unregistered).
    await env.db[ACCOUNT_REGISTRY].delete_one({"_id": unregistered.canonical})
    # 3. A Transfer Registry entry whose transfer never reached TigerBeetle.
    ghost = unique_id("ghost")
    record = await env.accounts.get_or_create(keys[1], allow_overdraft=True)
    await env.transfers.record(TransferRecord(
        transaction_id=ghost, transfer_id=transfer_id(ghost), wallet=keys[1],
        account_id=record.account_id, type="credit", amount_minor=100,
        reference_id=None, created_at=datetime.now(UTC)))

    found = await reconcile(worker, env)
    assert found.real == 2, found
    assert found.findings.get(IssueKind.BALANCE_MISMATCH) == 1
    assert found.findings.get(IssueKind.MISSING_REGISTRY) == 1
    assert found.findings.get(IssueKind.UNREGISTERED_TB_ACCOUNT) == 1
    assert found.findings.get(IssueKind.MISSING_TRANSFER) == 1
    assert found.alerts
    docs = {d["subject"]: d for d in await env.reports.mismatches(found.run_id)}
    assert docs[edited.canonical]["diffs"][0]["diff_minor"] == -500

    # --repair is refused outside dual_write...
    refused = await reconcile(worker, env, repair=True, actor="test", reason="seeded")
    assert refused.repaired == 0 and refused.repair_failed == 2
    # ...and fixes both wallets with Correction transfers in dual_write.
    for pair in env.pairs:
        await env.migration.set(MigrationState(scope=pair, phase=Phase.DUAL_WRITE, epoch=1))
    repaired = await reconcile(worker, env, repair=True, actor="test", reason="seeded")
    assert repaired.repaired == 2 and repaired.repair_failed == 0
    audits = await env.reports.audits(edited.canonical)
    assert audits and audits[0]["ok"] and audits[0]["actor"] == "test"
    assert audits[0]["transfers"][0]["amount"] == 500
    after = await reconcile(worker, env)
    assert after.real == 0 and after.match_rate == 1.0
    assert IssueKind.MISSING_REGISTRY not in after.findings
    assert IssueKind.UNREGISTERED_TB_ACCOUNT not in after.findings
    assert after.findings.get(IssueKind.MISSING_TRANSFER) == 1  # reported, never invented
    tb = await env.tb_store.get_balance(edited)
    assert str(tb.credit) == "23.00" and str(tb.historical_credit) == "35.00"
