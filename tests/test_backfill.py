"""Backfill against the real servers: Temporal, MongoDB-compatible server, Redis, TigerBeetle
emulator. Each test has its own ledger pairs (fresh country code), so scopes never overlap."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import tigerbeetle as tb
from pydantic import ValidationError
from recon_support import BacklogApplier, Env, credit, debit, void
from temporalio.client import Client
from wallet_support import history_wanted, sandboxed_worker, save_history

from messages.backfill import (
    HISTORY_EVENTS_PER_PAGE_DEFAULT,
    WALLETS_PER_PAGE_MAX,
    BackfillInput,
    BackfillProgress,
)
from mongobase.mongo import now_ms
from stores.backfill_imports import ImportRecord, ImportStatus
from walletcore.balances import MinorBalance
from walletcore.ids import transfer_id
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, SubtractCredit, WalletOperation
from walletcore.reconcile import opening_plan
from workflows.backfill import BackfillWorkflow

UniqueId = Callable[..., str]


# `env` (the test's own stores and ledger pairs) comes from conftest.py.


@pytest_asyncio.fixture(loop_scope="session")
async def worker(temporal_client: Client, env: Env) -> AsyncIterator[tuple[Client, str]]:
    async with sandboxed_worker(temporal_client, "backfill-test", [BackfillWorkflow],
                                env.backfill_activities().all()) as served:
        yield served


async def run_backfill(worker: tuple[Client, str], env: Env, *, record: str | None = None,
                       **kw: Any) -> BackfillProgress:
    """One backfill to its end; `record`: save its first run's history under that name
    (tests/data/histories, replayed by tests/test_replay.py) when recording is asked for."""
    client, queue = worker
    run_id = f"bf-{uuid.uuid4().hex[:8]}"
    handle = await client.start_workflow(
        BackfillWorkflow.run, BackfillInput(run_id=run_id, pairs=env.pairs, **kw),
        id=f"backfill-test/{run_id}", task_queue=queue,
        execution_timeout=timedelta(minutes=5),
    )
    progress: BackfillProgress = await handle.result()
    if record is not None and history_wanted(record):
        await save_history(handle, record)
    return progress


async def assert_same(env: Env, keys: list[WalletKey]) -> None:
    for key in keys:
        legacy = await env.legacy.get_balance(key)
        tb = await env.tb_store.get_balance(key)
        assert (tb.credit, tb.debit, tb.historical_credit) == (
            legacy.credit, legacy.debit, legacy.historical_credit), key


async def seed(env: Env, unique_id: UniqueId) -> list[WalletKey]:
    """Wallets with credit, debt, zero balance, voids, in currencies of precision 0..8."""
    c = unique_id("c")
    t = unique_id("t")
    keys = {
        "plain": env.key(f"{c}-plain"), "debt": env.key(f"{c}-debt"),
        "zero": env.key(f"{c}-zero"), "voided": env.key(f"{c}-void"),
        "jpy": env.key(f"{c}-jpy", "JPY"), "bhd": env.key(f"{c}-bhd", "BHD"),
        "usdc": env.key(f"{c}-usdc", "USDC"), "btc": env.key(f"{c}-btc", "BTC"),
    }
    await credit(env, keys["plain"], f"{t}-1", "100.50")
    await debit(env, keys["plain"], f"{t}-2", "30.25")
    await debit(env, keys["debt"], f"{t}-3", "50.00", overdraft=True)
    await credit(env, keys["debt"], f"{t}-4", "20.01")
    await credit(env, keys["zero"], f"{t}-5", "10")
    await debit(env, keys["zero"], f"{t}-6", "10")
    await credit(env, keys["voided"], f"{t}-7", "5.55")
    await debit(env, keys["voided"], f"{t}-8", "1.11")
    await void(env, keys["voided"], f"{t}-9", f"{t}-8")  # void of a debit: a credit
    await void(env, keys["voided"], f"{t}-10", f"{t}-7")  # void of a credit: a debit
    await credit(env, keys["jpy"], f"{t}-11", "1000")
    await credit(env, keys["bhd"], f"{t}-12", "1.234")
    await debit(env, keys["bhd"], f"{t}-13", "0.001")
    await credit(env, keys["usdc"], f"{t}-14", "0.000001")
    await credit(env, keys["btc"], f"{t}-15", "0.12345678")
    return list(keys.values())


async def test_backfill_imports_every_wallet_exactly(
    env: Env, worker: tuple[Client, str], unique_id: UniqueId
) -> None:
    keys = await seed(env, unique_id)
    progress = await run_backfill(worker, env, page_size=3, pages_per_run=2,
                                  record="backfill_pages")
    assert progress.finished and progress.total == len(keys) == progress.done
    assert progress.failed == 0, progress.failed_sample
    assert progress.imported == len(keys)  # every wallet has some historical credit
    assert progress.runs > 1  # continued as new on the way
    await assert_same(env, keys)
    # Idempotent: a second backfill finds everything imported and posts nothing.
    again = await run_backfill(worker, env)
    assert again.imported == 0 and again.already == len(keys) and again.transfers == 0
    await assert_same(env, keys)


async def test_paced_backfill_keeps_to_its_budget(
    env: Env, worker: tuple[Client, str], unique_id: UniqueId
) -> None:
    """wallets_per_s_max: pages of at most one second of the budget and a pause after each
    page but the last, so the import never runs faster than the budget however fast the host
    is (a slower host only pauses less); it imports exactly what an unpaced backfill does."""
    keys = await seed(env, unique_id)
    rate = 2.0
    progress = await run_backfill(worker, env, wallets_per_s_max=rate, record="backfill_paced")
    assert progress.finished and progress.total == len(keys) == progress.done
    assert progress.failed == 0, progress.failed_sample
    assert progress.imported == len(keys)
    assert progress.wallets_per_s_max == rate
    limit = int(rate)  # BackfillInput.wallet_page_limit: one second of the budget
    assert progress.pages >= len(keys) / limit
    # Each page but the last took its wallets' share of the budget (its own time + pause).
    assert progress.elapsed_s >= (progress.done - limit) / rate
    await assert_same(env, keys)


def test_pacing_input_is_bounded() -> None:
    scope = {"run_id": "r", "pairs": ["USD:USA"]}
    assert BackfillInput(**scope).wallet_page_limit() == WALLETS_PER_PAGE_MAX  # unpaced
    assert BackfillInput(**scope, wallets_per_s_max=150).wallet_page_limit() == 150
    assert BackfillInput(**scope, wallets_per_s_max=150,
                         page_size=100).wallet_page_limit() == 100
    assert BackfillInput(**scope, wallets_per_s_max=1.5).wallet_page_limit() == 1
    for bad in (0, 0.5, -1, 2e6):
        with pytest.raises(ValidationError):
            BackfillInput(**scope, wallets_per_s_max=bad)
    # The history pages' budget (--with-history): the same rule, in transactions/s.
    assert BackfillInput(**scope).history_page_limit() == HISTORY_EVENTS_PER_PAGE_DEFAULT
    assert BackfillInput(**scope, history_txns_per_s_max=500).history_page_limit() == 500
    assert BackfillInput(**scope, history_txns_per_s_max=1e6).history_page_limit() == (
        HISTORY_EVENTS_PER_PAGE_DEFAULT)
    assert BackfillInput(**scope, history_txns_per_s_max=1.5).history_page_limit() == 1
    for bad in (0, 0.5, -1, 2e6, float("nan")):
        with pytest.raises(ValidationError):
            BackfillInput(**scope, history_txns_per_s_max=bad)


def test_cli_names_the_bad_budget_in_one_line(tmp_path: Path) -> None:
    """Validated before connecting to anything: one line naming the field, usage status (a
    process of its own with an empty state directory: no stack's addresses)."""
    from walletmig.cli import EXIT_USAGE

    environ = {**os.environ, "WALLETMIG_STATE_DIR": str(tmp_path)}
    for flag, field in (("--history-txns-per-s", "history_txns_per_s_max"),
                        ("--wallets-per-s", "wallets_per_s_max")):
        done = subprocess.run(
            [sys.executable, "-m", "walletmig", "backfill", "start", "--pair", "USD:USA",
             flag, "0"], env=environ, capture_output=True, text=True, timeout=120, check=False)
        err = done.stderr.strip()
        assert done.returncode == EXIT_USAGE and len(err.splitlines()) == 1, err
        assert f"invalid setting {field}:" in err and "greater than or equal to 1" in err, err


async def test_backfill_of_a_net_zero_wallet(env: Env, unique_id: UniqueId) -> None:
    """A debt fully voided: net 0, historical credit 3 (a void of a debit is a credit)."""
    key = env.key(unique_id("c"))
    t = unique_id("t")
    await debit(env, key, f"{t}-1", "3", overdraft=True)
    await void(env, key, f"{t}-2", f"{t}-1")  # void of the only debit: credit 3
    pages = await env.importer.page(
        _page_input(env, env.pairs[0], after=key.canonical[:-1]))
    assert key.canonical not in pages.failed
    await assert_same(env, [key])


def _page_input(env: Env, pair: str, after: str | None) -> Any:
    from messages.backfill import BackfillPageInput

    return BackfillPageInput(run_id=f"p-{uuid.uuid4().hex[:6]}", pair=pair, after=after,
                             limit=10)


async def test_crash_between_opening_and_claim_completion_resumes(
    env: Env, unique_id: UniqueId
) -> None:
    """A page crashed after posting the opening transfers but before completing its claim:
    the next importer takes the stale claim over, sees TigerBeetle already at the target and
    posts nothing more (no double count)."""
    key = env.key(unique_id("c"))
    t = unique_id("t")
    await credit(env, key, f"{t}-1", "42.00")
    await debit(env, key, f"{t}-2", "2.00")
    balance, version = await _legacy_version(env, key)
    # The crashed importer: claim, account, opening transfers... and then nothing.
    stale_at = now_ms() - timedelta(hours=1)
    crashed = ImportRecord(wallet=key.canonical, version=version, balance=balance,
                           status=ImportStatus.CLAIMED, claimed_by="crashed",
                           claimed_at=stale_at)
    assert await env.imports.claim_many([crashed]) == {key.canonical}
    record = await env.tb_store.ensure_account(key, allow_overdraft=False)
    await env.tb_store.ensure_system_accounts(record.ledger)
    from activities.backfill import opening_transfers

    results = await env.tb_client.create_transfers(
        opening_transfers(record, version, opening_plan(balance)))
    assert all(r.status.name == "CREATED" for r in results)
    # A live claim (fresh) is left alone; the stale one is taken over.
    outcome = await env.importer.import_wallets(
        [_legacy_wallet(key, balance, version)], "resumer")
    assert outcome.failed == {} and outcome.imported == [] and outcome.already == 1
    done = await env.imports.get(key.canonical)
    assert done is not None and done.status is ImportStatus.DONE and done.version == version
    await assert_same(env, [key])


async def _legacy_version(env: Env, key: WalletKey) -> tuple[MinorBalance, int]:
    found = await env.legacy.get_wallet_version(key)
    assert found is not None
    return found


def _legacy_wallet(key: WalletKey, balance: MinorBalance, version: int) -> Any:
    from messages.backfill import LegacyWallet

    return LegacyWallet(wallet=key, balance=balance, version=version, allow_overdraft=False)


async def test_fresh_claim_is_busy_and_ensure_imported_waits_for_it(
    env: Env, unique_id: UniqueId
) -> None:
    key = env.key(unique_id("c"))
    await credit(env, key, unique_id("t"), "7.00")
    balance, version = await _legacy_version(env, key)
    live = ImportRecord(wallet=key.canonical, version=version, balance=balance,
                        status=ImportStatus.CLAIMED, claimed_by="other", claimed_at=now_ms())
    await env.imports.claim_many([live])
    outcome = await env.importer.import_wallets([_legacy_wallet(key, balance, version)], "me")
    assert outcome.busy == 1 and outcome.imported == []
    waiter = asyncio.create_task(env.importer.ensure_imported(key, "wallet-workflow"))
    await asyncio.sleep(0.5)
    assert not waiter.done()
    # The other importer finishes (here: its claim turns failed, so the waiter takes over).
    await env.imports.mark_failed("other", {key.canonical: "simulated"})
    assert await asyncio.wait_for(waiter, 20) == version
    await assert_same(env, [key])


async def test_backfill_while_traffic_runs_counts_nothing_twice(
    env: Env, worker: tuple[Client, str], unique_id: UniqueId
) -> None:
    """Live dual-writes on the same wallets during the backfill: MongoDB first, then the
    backlog applier (ensure imported, skip versions in the opening). End: equal balances."""
    c = unique_id("c")
    keys = [env.key(f"{c}-{i:02d}") for i in range(12)]
    for i, key in enumerate(keys):  # history before dual-write: only in MongoDB
        await credit(env, key, f"{c}-pre-{i}", f"{10 + i}.00")
    applier = BacklogApplier(env)
    locks = {key.canonical: asyncio.Lock() for key in keys}

    async def traffic(round_no: int) -> None:
        for i, key in enumerate(keys):
            txn = f"{c}-live-{round_no}-{i}"
            amount = f"{(round_no + i) % 3 + 1}.00"
            async with locks[key.canonical]:  # one wallet workflow = one op at a time
                if round_no % 2:
                    await debit(env, key, txn, amount, overdraft=False)
                    op: WalletOperation = SubtractCredit(
                        wallet=key, transaction_id=txn, amount=Decimal(amount))
                else:
                    await credit(env, key, txn, amount)
                    op = AddCredit(wallet=key, transaction_id=txn, amount=Decimal(amount))
                await applier.apply(key, op)

    async def all_traffic() -> None:
        for round_no in range(6):
            await traffic(round_no)

    progress, _ = await asyncio.gather(
        run_backfill(worker, env, page_size=4, pages_per_run=2), all_traffic())
    assert progress.failed == 0, progress.failed_sample
    assert applier.skipped + applier.applied == 6 * len(keys)
    await assert_same(env, keys)


async def test_mongodb_write_without_a_backlog_item_is_filled_in_before_a_later_one(
    env: Env, unique_id: UniqueId
) -> None:
    """A worker killed after a MongoDB write whose workflow task was never recorded leaves no
    backlog item. A later debit that needs that credit must not be refused by TigerBeetle:
    the backlog fills the gap from the legacy log first, in MongoDB's order, and the lost
    operation's resend then replays."""
    c = unique_id("c")
    key = env.key(f"{c}-gap")
    applier = BacklogApplier(env)
    await credit(env, key, f"{c}-open", "5.00")
    outcome = await applier.apply(key, AddCredit(wallet=key, transaction_id=f"{c}-open",
                                                 amount=Decimal("5.00")))
    assert outcome.in_opening  # imported at this version: the opening holds it
    await credit(env, key, f"{c}-lost", "10.00")  # MongoDB only: its backlog item was lost
    await debit(env, key, f"{c}-spend", "12.00")  # 15 available in MongoDB
    outcome = await applier.apply(key, SubtractCredit(wallet=key, transaction_id=f"{c}-spend",
                                                      amount=Decimal("12.00")))
    assert not outcome.replayed
    resent = await applier.apply(key, AddCredit(wallet=key, transaction_id=f"{c}-lost",
                                                amount=Decimal("10.00")))
    assert resent.replayed  # filled in already: the resend changes nothing
    await assert_same(env, [key])
    record = await env.accounts.get(key)
    assert record is not None
    transfers = await env.tb_client.get_account_transfers(tb.AccountFilter(
        account_id=record.account_id, user_data_128=0, user_data_64=0, user_data_32=0, code=0,
        timestamp_min=0, timestamp_max=0, limit=10,
        flags=tb.AccountFilterFlags.DEBITS | tb.AccountFilterFlags.CREDITS))
    order = [t.id for t in transfers]
    assert order.index(transfer_id(f"{c}-lost")) < order.index(transfer_id(f"{c}-spend"))
