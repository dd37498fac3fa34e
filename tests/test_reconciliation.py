"""Reconciliation against the real servers: clean runs, in-flight backlogs, seeded corruption
found, classified and repaired. Each test has its own ledger pairs (fresh country code)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest_asyncio
import tigerbeetle as tb
from bson.decimal128 import Decimal128
from recon_support import (
    CURRENCIES,
    BacklogApplier,
    Env,
    backfill_all,
    credit,
    debit,
    run_reconciliation,
)
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from wallet_support import sandboxed_worker, twin_in_tigerbeetle

from activities.reconciliation.compare import Evaluation
from activities.store_ops import apply_to
from messages.reconciliation import ReconcileInput, ReconcileSummary
from registries.account_registry import ACCOUNT_REGISTRY
from registries.transfer_registry import TransferRecord
from stores.legacy_store import WALLET_TRANSACTIONS, WALLETS
from walletcore.balances import MinorBalance
from walletcore.codes import CUSTOMER_ACCOUNT_CODE
from walletcore.ids import hash_u128, transfer_id, void_transfer_id
from walletcore.keys import WalletKey
from walletcore.money import from_minor
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


async def set_phase(env: Env, phase: Phase, pairs: list[str] | None = None) -> None:
    """Publish `phase` for `pairs` (default: every pair of the env), one epoch up: which write
    path may carry a pending operation depends on it."""
    for pair in pairs or env.pairs:
        current = await env.migration.find(pair, fresh=True)
        epoch = 1 if current is None else current.epoch + 1
        await env.migration.set(MigrationState(scope=pair, phase=phase, epoch=epoch))


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
    await set_phase(env, Phase.DUAL_WRITE)
    # Live traffic after the import goes through both stores (as the backlog applies it).
    for key, txn in ((keys[0], unique_id("live")), (keys[3], unique_id("live"))):  # both USD
        await credit(env, key, txn, "2.50")
        await credit(env, key, txn, "2.50", store=env.tb_store)
    summary = await reconcile(worker, env, page_size=4, pages_per_run=2)
    assert summary.wallets == len(keys)
    assert summary.real == 0 and summary.in_flight == 0, summary
    assert summary.match_rate == 1.0 and summary.alerts == [], summary.alerts
    assert summary.conservation_ok
    report = await env.reports.get(summary.run_id)
    assert report is not None and report["status"] == "done"
    assert report["counts"]["tb_accounts"] == len(keys)
    # What a gate judges: scope, kind, every stage run, wallets compared, findings by class.
    assert (report["pairs"], report["kind"], report["full"]) == (sorted(env.pairs), "check", True)
    assert (report["wallets"], report["in_flight"], report["findings"]) == (len(keys), 0, {})
    assert not report["covers_all_pairs"]  # the env's pairs, not the whole default table
    page = render_html(report, await env.reports.history(10))
    assert "<svg" in page and summary.run_id in page and "polyline" in page


async def test_in_flight_backlog_is_not_a_false_alarm(
    env: Env, worker: tuple[Client, str], unique_id: UniqueId
) -> None:
    keys = await seed(env, unique_id, n=3)
    await backfill_all(env)
    await set_phase(env, Phase.DUAL_WRITE)  # the backlog carries MongoDB's answers
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
    await set_phase(env, Phase.DUAL_WRITE)
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


# An operation pending at a run's first read must have crossed to the other store by the
# re-check, else it is real: the premise of the live-traffic test, asserted by the traffic
# itself (LiveCrossings); a run whose slowest crossing took longer is run again, at most this
# many times in all (a loaded host may stall one write past the delay).
LIVE_RECHECK_DELAY_S = 1.0
LIVE_RUN_ATTEMPTS = 3


class LiveCrossings:
    """How long the traffic's operations took to reach both stores (from before the first
    write to after the second): an upper bound of how long each was pending."""

    def __init__(self) -> None:
        self.slowest_s = 0.0
        self.open_since: dict[str, float] = {}  # traffic task -> its operation's start

    def start(self, task: str) -> None:
        self.open_since[task] = time.monotonic()

    def crossed(self, task: str) -> None:
        self.slowest_s = max(self.slowest_s, time.monotonic() - self.open_since.pop(task))

    def take(self) -> float:
        """The slowest crossing since the last take, operations still pending included."""
        now = time.monotonic()
        slowest = max([self.slowest_s, *(now - s for s in self.open_since.values())])
        self.slowest_s = 0.0
        return slowest


async def test_live_traffic_during_reconciliation_has_no_real_mismatch(
    env: Env, worker: tuple[Client, str], unique_id: UniqueId
) -> None:
    """Both write directions keep running while reconciliation reads: the legacy balance, its
    recent operations and TigerBeetle are read at different moments, yet nothing is real
    (in a run where every operation reached both stores within the re-check delay: asserted
    from the traffic's own clock, not assumed)."""
    keys = await seed(env, unique_id, n=4)  # USD, JPY, BHD, USD
    await backfill_all(env)
    # Each write path where its phase has it: USD in dual_write, JPY and BHD in tb_primary.
    usd = env.pairs[CURRENCIES.index("USD")]
    await set_phase(env, Phase.DUAL_WRITE, [usd])
    await set_phase(env, Phase.TB_PRIMARY, [p for p in env.pairs if p != usd])
    applier = BacklogApplier(env)
    stop = asyncio.Event()
    done: list[int] = []
    crossings = LiveCrossings()

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
            crossings.start(key.canonical)
            if tb_first:  # tb_primary: TigerBeetle answers, the reverse projection follows
                await apply_to(env.tb_store, op)
                await asyncio.sleep(rng.uniform(0, 0.03))
                await apply_to(env.legacy, op)
            else:  # dual_write: MongoDB answers, the backlog follows
                await apply_to(env.legacy, op)
                await asyncio.sleep(rng.uniform(0, 0.03))
                await applier.apply(key, op)
            crossings.crossed(key.canonical)
            await asyncio.sleep(rng.uniform(0.02, 0.08))  # light: 2 shared cores
        done.append(n)

    tasks = [asyncio.create_task(traffic(k, k.currency != "USD")) for k in keys]
    runs: list[tuple[ReconcileSummary, float]] = []
    try:
        await asyncio.sleep(0.3)
        crossings.take()  # the premise counts from the run's start
        for _ in range(LIVE_RUN_ATTEMPTS):
            summary = await reconcile(worker, env, page_size=2,
                                      recheck_delay_s=LIVE_RECHECK_DELAY_S)
            runs.append((summary, crossings.take()))
            if runs[-1][1] < LIVE_RECHECK_DELAY_S:
                break
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert sum(done) > 8, done  # traffic really ran during the run
    summary, slowest_s = runs[-1]
    print(f"\nlive traffic: {sum(done)} operations; slowest crossing in each run "
          f"{[round(s, 3) for _, s in runs]} s (re-check delay {LIVE_RECHECK_DELAY_S} s)")
    assert slowest_s < LIVE_RECHECK_DELAY_S, (
        f"in each of {len(runs)} runs an operation took longer than the re-check delay to "
        f"reach both stores: {[round(s, 2) for _, s in runs]} s")
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


async def _judge(env: Env, key: WalletKey) -> Evaluation:
    """One first read of one wallet (the wallet page's judgement, no re-check)."""
    wallets = env.reconciler.wallets
    subjects = await wallets.subjects_of([key.canonical])
    return await wallets.evaluate(f"rc-{uuid.uuid4().hex[:8]}", subjects, 300.0)


async def _drop_mongodb_write(env: Env, key: WalletKey, txn: str, amount_minor: int) -> None:
    """Behind the platform's back: a credit MongoDB answered is lost (its transaction document
    and its effect on the wallet document both go)."""
    found = await env.legacy.get_wallet_version(key)
    assert found is not None
    held = found[0]
    credits = held.historical_credit_minor
    undone = MinorBalance.from_posted(credits - amount_minor, credits - held.net_minor)
    assert (await env.db[WALLET_TRANSACTIONS].delete_one({"_id": txn})).deleted_count == 1
    fields = {"credit": undone.credit_minor, "debit": undone.debit_minor,
              "historical_credit": undone.historical_credit_minor}
    await env.db[WALLETS].update_one({"_id": key.canonical}, {"$set": {
        name: Decimal128(from_minor(value, key.currency)) for name, value in fields.items()}})


async def test_tampering_is_real_and_a_genuine_backlog_is_in_flight(
    env: Env, worker: tuple[Client, str], unique_id: UniqueId
) -> None:
    """A pending operation is in flight only if a write path of the wallet's phase carries it:
    a transfer the platform did not make, or a MongoDB write lost in dual_write, is real with
    its class; a young legacy operation not drained yet is in flight, and real once a re-check
    finds it still pending."""
    keys = await seed(env, unique_id, n=3)  # USD, JPY, BHD
    legacy_only = env.key(unique_id("legacy"), "USDC")
    await credit(env, legacy_only, unique_id("t"), "5")
    await backfill_all(env)
    usd, jpy, bhd = (env.pairs[CURRENCIES.index(c)] for c in ("USD", "JPY", "BHD"))
    await set_phase(env, Phase.DUAL_WRITE, [usd, bhd])  # USDC stays legacy
    doubled, dropped, backlog = keys[0], keys[2], env.key(unique_id("backlog"))
    doubled_txn, lost = unique_id("live"), unique_id("live")
    for key, txn, amount in ((doubled, doubled_txn, "7"), (dropped, lost, "7.000")):
        await credit(env, key, txn, amount, overdraft=True)  # both stores, as the backlog does
        await credit(env, key, txn, amount, overdraft=True, store=env.tb_store)
    twin = await twin_in_tigerbeetle(env.tb_client, doubled_txn, doubled_txn)
    await _drop_mongodb_write(env, dropped, lost, 7000)  # BHD: 3 decimals
    await credit(env, backlog, unique_id("seed"), "3")  # a new wallet: the backlog imports it...
    await credit(env, backlog, (pending := unique_id("pending")), "2")  # ...not drained yet

    # (a) alone: a second transfer of the same money, not the platform's.
    found = await _judge(env, doubled)
    assert (found.real, found.in_flight) == (1, []), found
    assert found.findings == {IssueKind.BALANCE_MISMATCH: 1, IssueKind.UNKNOWN_TRANSFER: 1}
    assert any(f"{twin:032x}" in d.detail for d in found.docs), found.docs
    # (b) alone: the registered credit TigerBeetle holds, lost by MongoDB in dual_write.
    found = await _judge(env, dropped)
    assert (found.real, found.in_flight) == (1, []), found
    assert found.findings == {IssueKind.BALANCE_MISMATCH: 1, IssueKind.LOST_LEGACY_WRITE: 1}
    assert any(d.detail.startswith(lost) for d in found.docs), found.docs
    # A genuine backlog item (no TigerBeetle account yet, even): in flight.
    found = await _judge(env, backlog)
    assert (found.real, found.in_flight, dict(found.findings)) == (0, [backlog.canonical], {})
    assert pending in found.pending[backlog.canonical]
    # The same MongoDB-only operation in phase legacy: no backlog carries it.
    found = await _judge(env, legacy_only)
    assert found.real == 0 and found.in_flight == [], found  # imported: nothing pending
    await credit(env, legacy_only, unique_id("after"), "1")
    found = await _judge(env, legacy_only)
    assert found.real == 1 and found.findings[IssueKind.UNAPPLIED_LEGACY_OPERATION] == 1

    # In tb_primary a registered transfer MongoDB lacks is the reverse projection (in flight);
    # a transfer the platform did not make is real whatever the phase.
    await set_phase(env, Phase.TB_PRIMARY, [jpy])
    projected = unique_id("tbfirst")
    await credit(env, keys[1], projected, "4", overdraft=True, store=env.tb_store)
    found = await _judge(env, keys[1])
    assert (found.real, found.in_flight) == (0, [keys[1].canonical]), found
    await twin_in_tigerbeetle(env.tb_client, projected, unique_id("twin"))
    found = await _judge(env, keys[1])
    assert found.real == 1 and found.findings[IssueKind.UNKNOWN_TRANSFER] == 1, found
    await credit(env, keys[1], projected, "4", overdraft=True)  # the projection lands

    # The whole run: both tamperings real; the backlog item, still pending at the re-check,
    # did not clear (real); the match rate shows them.
    summary = await run_reconciliation(worker, [usd, jpy, bhd])
    assert summary.in_flight == 0 and summary.real == 4, summary
    assert summary.match_rate is not None and summary.match_rate < 1
    assert summary.findings[IssueKind.UNKNOWN_TRANSFER] == 2, summary.findings
    assert summary.findings[IssueKind.LOST_LEGACY_WRITE] == 1
    assert summary.findings[IssueKind.NOT_CLEARED] == 1
    assert summary.alerts
