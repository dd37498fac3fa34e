"""Reconciliation against the real servers: clean runs, in-flight backlogs, seeded corruption
found, classified and repaired. Each test has its own ledger pairs (fresh country code)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest_asyncio
import tigerbeetle as tb
from bson.decimal128 import Decimal128
from recon_support import (
    BacklogApplier,
    Env,
    backfill_all,
    credit,
    debit,
    run_reconciliation,
)
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from wallet_support import sandboxed_worker

from activities.store_ops import apply_to
from messages.reconciliation import ReconcileInput, ReconcileSummary
from registries.account_registry import ACCOUNT_REGISTRY
from registries.transfer_registry import TransferRecord
from stores.legacy_store import WALLETS
from walletcore.codes import CUSTOMER_ACCOUNT_CODE
from walletcore.ids import hash_u128, transfer_id, void_transfer_id
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, SubtractCredit, Void, WalletOperation
from walletcore.phases import MigrationState, Phase
from walletcore.reconcile import IssueKind
from walletmig.commands.reconcile import render_html
from workflows.reconciliation import ReconciliationWorkflow

UniqueId = Callable[..., str]


@pytest_asyncio.fixture(loop_scope="session")
async def worker(temporal_client: Client, env: Env) -> AsyncIterator[tuple[Client, str]]:
    async with sandboxed_worker(temporal_client, "reconcile-test", [ReconciliationWorkflow],
                                env.reconcile_activities().all()) as running:
        yield running


async def reconcile(worker: tuple[Client, str], env: Env, **kw: Any) -> ReconcileSummary:
    return await run_reconciliation(worker, env.pairs, **kw)


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
    # What a gate judges: scope, kind, every stage run, wallets compared, findings by class.
    assert (report["pairs"], report["kind"], report["full"]) == (sorted(env.pairs), "check", True)
    assert (report["wallets"], report["in_flight"], report["findings"]) == (len(keys), 1, {})
    assert not report["covers_all_pairs"]  # the env's pairs, not the whole default table
    page = render_html(report, await env.reports.history(10))
    assert "<svg" in page and summary.run_id in page and "polyline" in page


async def test_in_flight_backlog_is_not_a_false_alarm(
    env: Env, worker: tuple[Client, str], unique_id: UniqueId
) -> None:
    keys = await seed(env, unique_id, n=3)
    await backfill_all(env)
    txn = unique_id("late")
    await debit(env, keys[2], txn, "3.000", overdraft=True)  # MongoDB answered... (BHD)

    client, queue = worker
    run_id = f"rc-{uuid.uuid4().hex[:8]}"
    handle = await client.start_workflow(
        ReconciliationWorkflow.run,
        ReconcileInput(run_id=run_id, pairs=env.pairs, recheck_delay_s=3.0),
        id=f"reconcile-test/{run_id}", task_queue=queue, execution_timeout=timedelta(minutes=5))
    # ...and the backlog applies it while the run waits to re-check: once the first look has
    # seen it in flight (the re-check timer started), whatever the machine's speed.
    for _ in range(600):
        events = [e async for e in handle.fetch_history_events()]
        if any(e.event_type == EventType.EVENT_TYPE_TIMER_STARTED for e in events):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the reconciliation never waited to re-check")
    await debit(env, keys[2], txn, "3.000", overdraft=True, store=env.tb_store)
    summary = await handle.result()
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


async def test_live_traffic_during_reconciliation_has_no_real_mismatch(
    env: Env, worker: tuple[Client, str], unique_id: UniqueId
) -> None:
    """Both write directions keep running while reconciliation reads: the legacy balance, its
    recent operations and TigerBeetle are read at different moments, yet nothing is real."""
    keys = await seed(env, unique_id, n=4)
    await backfill_all(env)
    applier = BacklogApplier(env)
    stop = asyncio.Event()
    done: list[int] = []

    async def traffic(key: WalletKey, tb_first: bool) -> None:
        rng = random.Random(key.canonical)
        credits: list[str] = []
        n = 0
        while not stop.is_set():
            n += 1
            txn = unique_id("live")
            op: WalletOperation
            if credits and rng.random() < 0.2:
                op = Void(wallet=key, transaction_id=txn,
                          original_transaction_id=credits.pop(rng.randrange(len(credits))))
            elif rng.random() < 0.5:
                op = AddCredit(wallet=key, transaction_id=txn, amount=Decimal("2"),
                               allow_overdraft=True)
                credits.append(txn)
            else:
                op = SubtractCredit(wallet=key, transaction_id=txn, amount=Decimal("1"),
                                    allow_overdraft=True)
            if tb_first:  # tb_primary: TigerBeetle answers, the reverse projection follows
                await apply_to(env.tb_store, op)
                await asyncio.sleep(rng.uniform(0, 0.03))
                await apply_to(env.legacy, op)
            else:  # dual_write: MongoDB answers, the backlog follows
                await apply_to(env.legacy, op)
                await asyncio.sleep(rng.uniform(0, 0.03))
                await applier.apply(key, op)
            await asyncio.sleep(rng.uniform(0.02, 0.08))  # light: 2 shared cores
        done.append(n)

    tasks = [asyncio.create_task(traffic(k, i % 2 == 1)) for i, k in enumerate(keys)]
    try:
        await asyncio.sleep(0.3)
        runs = [await reconcile(worker, env, page_size=2, recheck_delay_s=0.2)]
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert sum(done) > 8, done  # traffic really ran during the run
    for summary in runs:
        assert summary.wallets == len(keys)
        assert summary.real == 0, await env.reports.mismatches(summary.run_id)
        assert summary.match_rate == 1.0
        assert IssueKind.BALANCE_MISMATCH not in summary.findings
    quiet = await reconcile(worker, env)
    assert quiet.matched == len(keys) and quiet.real == 0 and quiet.in_flight == 0
    assert quiet.alerts == [], quiet.alerts


async def test_voids_of_pre_migration_transactions_are_checked(
    env: Env, worker: tuple[Client, str], unique_id: UniqueId
) -> None:
    """`credit_in_opening` / `debit_in_opening` records: the original has no transfer (the
    opening balance holds it), its void must exist like any other transfer."""
    c, t = unique_id("c"), unique_id("t")
    key = env.key(c)
    await credit(env, key, f"{t}-a", "30", overdraft=True)
    await debit(env, key, f"{t}-b", "12", overdraft=True)
    await debit(env, key, f"{t}-c", "2", overdraft=True)
    await backfill_all(env)
    # tb_primary: TigerBeetle voids the pre-migration credit, the projection follows.
    for original in (f"{t}-a", f"{t}-b"):
        op = Void(wallet=key, transaction_id=f"{original}-void", original_transaction_id=original)
        await apply_to(env.tb_store, op,
                       opening_original=await env.legacy.original_facts(key, original))
        await apply_to(env.legacy, op)
    kinds = {r.type for r in [await env.transfers.get(f"{t}-a"), await env.transfers.get(f"{t}-b")]
             if r is not None}
    assert kinds == {"credit_in_opening", "debit_in_opening"}
    clean = await reconcile(worker, env)
    assert clean.real == 0 and clean.findings == {}, await env.reports.mismatches(clean.run_id)
    report = await env.reports.get(clean.run_id)
    assert report is not None and report["counts"]["transfers_checked"] >= 4

    # A void recorded for a pre-migration debit whose void transfer never reached TigerBeetle.
    record = await env.accounts.get(key)
    assert record is not None
    ghost = f"{t}-c"
    await env.transfers.record(TransferRecord(
        transaction_id=ghost, transfer_id=transfer_id(ghost), wallet=key,
        account_id=record.account_id, type="debit_in_opening", amount_minor=200,
        reference_id=None, created_at=datetime.now(UTC)))
    await env.transfers.mark_voided(ghost, void_transaction_id=f"{ghost}-void",
                                    void_transfer_id=void_transfer_id(ghost))
    found = await reconcile(worker, env)
    assert found.findings == {IssueKind.MISSING_TRANSFER: 1}, found.findings
    (doc,) = [d for d in await env.reports.mismatches(found.run_id)
              if d["kind"] == IssueKind.MISSING_TRANSFER]
    assert doc["subject"] == f"{ghost}-void (void of {ghost})"


async def test_accounts_of_other_deployments_are_not_unregistered(
    env: Env, worker: tuple[Client, str], unique_id: UniqueId
) -> None:
    """Only this deployment's customer accounts (its tag in user_data_64) must be in its
    Account Registry; another deployment's accounts on the same ledger are counted apart."""
    keys = await seed(env, unique_id, n=2)
    await backfill_all(env)
    ledger = env.ledgers.ledger_of("USD", env.country)
    other = (env.tb_store.deployment_tag + 1) % 2**63 or 1
    theirs, ours = hash_u128(unique_id("theirs")), hash_u128(unique_id("ours"))
    results = await env.tb_client.create_accounts([
        tb.Account(id=theirs, ledger=ledger, code=CUSTOMER_ACCOUNT_CODE,
                   flags=tb.AccountFlags.HISTORY, user_data_64=other),
        tb.Account(id=ours, ledger=ledger, code=CUSTOMER_ACCOUNT_CODE,
                   flags=tb.AccountFlags.HISTORY, user_data_64=env.tb_store.deployment_tag),
    ])
    assert all(r.status == tb.CreateAccountStatus.CREATED for r in results), results
    summary = await reconcile(worker, env)
    assert summary.findings == {IssueKind.UNREGISTERED_TB_ACCOUNT: 1}, summary.findings
    (doc,) = await env.reports.mismatches(summary.run_id)
    assert doc["subject"] == f"{ours:032x}"
    report = await env.reports.get(summary.run_id)
    assert report is not None
    assert report["counts"]["tb_accounts"] == len(keys) + 1
    assert report["counts"]["foreign_tb_accounts"] == 1 and summary.conservation_ok
    (account,) = await env.tb_client.lookup_accounts(
        [(await env.accounts.get(keys[0])).account_id])  # type: ignore[union-attr]
    assert account.user_data_64 == env.tb_store.deployment_tag  # set by the backfill import
