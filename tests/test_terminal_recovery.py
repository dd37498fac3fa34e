"""Recovery both ways on the real servers: the ledger dropped and rebuilt from TigerBeetle (the
same entries, verified), TigerBeetle lost and rebuilt from the ledger into a fresh emulator
(imported mirrors and transfers at the original timestamps, verified), and the verification
catching a tampered entry, a tampered balance document and a tampered TigerBeetle balance."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import tigerbeetle as tb
from ledger_sync_support import Terminal, make_terminal, mix, spend, txn
from pymongo import AsyncMongoClient

from activities.terminal_recovery import (
    ledger_digest,
    rebuild_ledger_from_tigerbeetle,
    rebuild_tigerbeetle_from_ledger,
)
from messages.clearing import TerminalReconcileInput
from stores.clearing_tb import ensure_mirrors
from stores.tigerbeetle_client import TigerBeetleClient, connect_tigerbeetle
from tb_emulator.server import EmulatorProcess, temp_data_file
from walletcore.clearing import DEFAULT_CLEARING_TABLE, post_transfer_id
from walletcore.errors import InvalidInputError
from walletcore.journal import entry_id_of

Db = Any
ENTRIES = len(mix()) + len(spend())  # posted in the fixture


@pytest.fixture
def db(mongo_client: AsyncMongoClient[dict[str, Any]]) -> Db:
    return mongo_client[f"walletmig_trec_{uuid.uuid4().hex[:10]}"]


@pytest_asyncio.fixture(loop_scope="session")
async def terminal(db: Db, tb_client: Any) -> AsyncIterator[Terminal]:
    """A terminal with a mix cleared, the pipeline's share settled (in batch order, not
    TigerBeetle's), the rest synced."""
    made = await make_terminal(db, tb_client)
    await made.create_mirrors()
    first, later = mix(), spend()
    stamps = await made.clear(first) | await made.clear(later)
    await made.clear([txn() for _ in range(3)], outcome="void")
    await made.clear([txn() for _ in range(2)], outcome="pending")
    everything = first + later
    for batch in (everything[20:], everything[5:12]):  # later batches settled first
        await made.ledger.post_entries(made.entries(batch, stamps))
    outcome = await made.sync.run_until_caught_up()
    assert outcome.caught_up and outcome.totals.new_entries == 5 + len(everything[12:20])
    yield made
    await db.client.drop_database(db.name)


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_cluster() -> AsyncIterator[tuple[str, TigerBeetleClient]]:
    """An empty emulator of this test's own, the cluster that replaces a lost one:
    (its address, a client)."""
    async with _empty_cluster() as cluster:
        yield cluster


@pytest_asyncio.fixture(loop_scope="session")
async def source_cluster() -> AsyncIterator[tuple[str, TigerBeetleClient]]:
    """Another empty emulator: the cluster the CLI test clears on. The default chart's ledgers
    (100/101) are shared by every terminal test on the session's TigerBeetle, so a test that
    counts what the CLI syncs from cursor 0 needs a cluster of its own."""
    async with _empty_cluster() as cluster:
        yield cluster


@contextlib.asynccontextmanager
async def _empty_cluster() -> AsyncIterator[tuple[str, TigerBeetleClient]]:
    directory, data_file = temp_data_file("tbemu-terminal-")
    process = EmulatorProcess(data_file)
    await asyncio.to_thread(process.start)
    address = f"tbemu://{process.address}"
    client = connect_tigerbeetle(address)
    try:
        yield address, client
    finally:
        await client.close()
        process.kill()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def fresh_tb(fresh_cluster: tuple[str, TigerBeetleClient]) -> TigerBeetleClient:
    return fresh_cluster[1]


async def test_the_ledger_is_rebuilt_from_tigerbeetle(terminal: Terminal) -> None:
    before = await terminal.reconciler.run(TerminalReconcileInput(run_id="before"))
    assert before.ok and before.entries_checked == ENTRIES
    head = await terminal.ledger.chain_head()
    result = await rebuild_ledger_from_tigerbeetle(
        terminal.sync, terminal.reconciler, drop_existing=True, run_id="rebuilt")
    assert result.ok and result.equal is True, result
    assert result.entries_before == result.entries_after == ENTRIES
    assert result.sync.totals.new_entries == ENTRIES and result.sync.caught_up
    # Chain order is now TigerBeetle's, not the settlement order: same entries, other links.
    assert (await terminal.ledger.chain_head()) != head
    latest = await terminal.reports.latest_reconcile()
    assert latest is not None and latest.run_id == "rebuilt" and latest.ok
    # Rebuilding an intact ledger in place writes nothing.
    again = await rebuild_ledger_from_tigerbeetle(
        terminal.sync, terminal.reconciler, drop_existing=False, run_id="again")
    assert again.ok and again.sync.totals.new_entries == 0 and again.equal is None


async def test_a_tampered_entry_is_caught(terminal: Terminal) -> None:
    victim = entry_id_of(post_transfer_id((await terminal.ledger.entries_page(
        after_seq=3, limit=1))[0].entry.external_id or ""))
    before = await ledger_digest(terminal.ledger)
    await terminal.db["gl_entries"].update_one(
        {"_id": victim}, {"$inc": {"lines.0.debit_minor": 100, "lines.1.credit_minor": 100}})
    report = await terminal.reconciler.run(TerminalReconcileInput(run_id="tampered-entry"))
    assert not report.ok and not report.chain_ok and "seq 4" in (report.chain_reason or "")
    assert report.transfer_mismatches == [victim]
    assert report.balance_drift  # the balance documents no longer follow the entries
    assert await ledger_digest(terminal.ledger) != before
    # Rebuilding from TigerBeetle restores what TigerBeetle says, verified.
    rebuilt = await rebuild_ledger_from_tigerbeetle(
        terminal.sync, terminal.reconciler, drop_existing=True, run_id="repaired")
    assert rebuilt.ok and rebuilt.equal is False  # other than the tampered ledger
    assert (rebuilt.entries_after, rebuilt.digest_after) == before


async def test_a_tampered_balance_is_caught(terminal: Terminal) -> None:
    await terminal.db["gl_balances"].update_one(
        {"_id": "2180:USD"}, {"$inc": {"credits_minor": 1}})
    report = await terminal.reconciler.run(TerminalReconcileInput(run_id="tampered-balance"))
    assert not report.ok and report.chain_ok and not report.trial_balance_zero
    assert [(d.account, d.currency) for d in report.balance_drift] == [(2180, "USD")]
    (mismatch,) = report.mismatched_accounts
    assert (mismatch.account, mismatch.currency) == (2180, "USD")
    assert mismatch.gl_credits_minor == mismatch.tb_credits_posted + 1


async def test_tigerbeetle_is_rebuilt_from_the_ledger(
    terminal: Terminal, fresh_tb: TigerBeetleClient,
) -> None:
    result = await rebuild_tigerbeetle_from_ledger(terminal.ledger, fresh_tb)
    assert result.ok, result
    mirrors = terminal.table.chart.mirrors()
    assert result.accounts_created == len(mirrors) and result.transfers_imported == ENTRIES
    # The original timestamps: each entry's transfer sits at its entry's time, as a post.
    entries = await terminal.ledger.entries_by_timestamp(after_timestamp=0, limit=100)
    found = {t.id: t for t in await fresh_tb.lookup_transfers(
        [link.entry.transfer_id for link in entries])}
    assert [found[link.entry.transfer_id].timestamp for link in entries] == [
        link.entry.tb_timestamp for link in entries]
    assert all(found[link.entry.transfer_id].flags & tb.TransferFlags.IMPORTED
               for link in entries)
    accounts = await fresh_tb.lookup_accounts([m.id for m in mirrors])
    assert all(a.flags & tb.AccountFlags.IMPORTED for a in accounts)
    assert await ensure_mirrors(fresh_tb, terminal.table.chart) == 0  # the pipeline's check

    # The ledger reconciles against the rebuilt cluster as it did against the lost one.
    rebuilt = await make_terminal(terminal.db, fresh_tb, terminal.table)
    report = await rebuilt.reconciler.run(TerminalReconcileInput(run_id="on-rebuilt"))
    assert report.ok and report.transfers_checked == ENTRIES, report
    again = await rebuild_tigerbeetle_from_ledger(terminal.ledger, fresh_tb)
    assert again.ok and again.transfers_existing == ENTRIES and again.transfers_imported == 0

    # Clearing goes on in the rebuilt cluster; the sync takes the new posts after the imports.
    later = [txn() for _ in range(4)]
    await rebuilt.clear(later)
    synced = await rebuilt.sync.run_until_caught_up()
    assert synced.caught_up and synced.totals.new_entries == 4
    assert (await rebuilt.reconciler.run(TerminalReconcileInput(run_id="after"))).ok

    # A balance TigerBeetle holds and the ledger does not is caught.
    stray = tb.Transfer(id=uuid.uuid4().int >> 1, debit_account_id=mirrors[0].id,
                        credit_account_id=terminal.table.chart.mirror(3000, "USD").id,
                        amount=1, ledger=mirrors[0].ledger, code=1)
    assert mirrors[0].gl_number == 1000
    (created,) = await fresh_tb.create_transfers([stray])
    assert created.status is tb.CreateTransferStatus.CREATED
    verify = await rebuild_tigerbeetle_from_ledger(terminal.ledger, fresh_tb)
    assert not verify.ok
    assert sorted(m.account for m in verify.mismatched_accounts) == [1000, 3000]


async def test_rebuilding_into_the_intact_cluster_only_verifies(
    terminal: Terminal, tb_client: Any,
) -> None:
    """Every transfer is there already (posted, not imported): nothing is written, the
    balances compare equal."""
    result = await rebuild_tigerbeetle_from_ledger(terminal.ledger, tb_client)
    assert result.ok and result.transfers_existing == ENTRIES and result.transfers_imported == 0
    assert result.accounts_created == 0


async def test_rebuilding_into_a_used_cluster_is_refused(
    terminal: Terminal, fresh_tb: TigerBeetleClient,
) -> None:
    account_ids = [uuid.uuid4().int >> 1 for _ in range(2)]
    await fresh_tb.create_accounts([tb.Account(id=i, ledger=1, code=1) for i in account_ids])
    (done,) = await fresh_tb.create_transfers([tb.Transfer(
        id=uuid.uuid4().int >> 1, debit_account_id=account_ids[0],
        credit_account_id=account_ids[1], amount=5, ledger=1, code=1)])
    assert done.status is tb.CreateTransferStatus.CREATED
    with pytest.raises(InvalidInputError, match="newer than the ledger's oldest entry") as err:
        await rebuild_tigerbeetle_from_ledger(terminal.ledger, fresh_tb)
    assert err.value.field == "target_addresses"
    mirrors = terminal.table.chart.mirrors()
    assert await fresh_tb.lookup_accounts([m.id for m in mirrors]) == []  # nothing written


# ---- the commands ----------------------------------------------------------------------------


def _cli(env: dict[str, str], repo_root: Any, *args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "walletmig", "ledger", *args, "--json"], cwd=repo_root, env=env,
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode in (0, 3), done.stderr
    return done.returncode, json.loads(done.stdout)


async def test_the_ledger_commands(
    settings_env: dict[str, str], mongo_client: Any,
    source_cluster: tuple[str, TigerBeetleClient],
    fresh_cluster: tuple[str, TigerBeetleClient], repo_root: Any,
) -> None:
    """sync --once, sync-status, reconcile and both rebuilds, as an operator runs them (the
    default chart, on a cluster and a database of this test's own)."""
    db = mongo_client[f"ledger_cli_{uuid.uuid4().hex[:12]}"]
    env = {**settings_env, "TB_ADDRESSES": source_cluster[0], "MONGODB_DATABASE": db.name}
    terminal = await make_terminal(db, source_cluster[1], DEFAULT_CLEARING_TABLE)
    await terminal.create_mirrors()
    await terminal.clear([txn() for _ in range(5)] + [txn("usdc_vault_deposit", "2.5", "USDC")])
    run = functools.partial(_cli, env, repo_root)

    code, synced = await asyncio.to_thread(run, "sync", "--once")
    assert code == 0 and synced["caught_up"] and synced["totals"]["new_entries"] == 6
    code, status = await asyncio.to_thread(run, "sync-status")
    assert code == 0 and status["sync_lag_seconds"] == 0 and status["lag_exact"]
    code, report = await asyncio.to_thread(run, "reconcile")
    assert code == 0 and report["entries_checked"] == 6 and report["trial_balance_zero"]
    code, rebuilt = await asyncio.to_thread(run, "rebuild-from-tigerbeetle", "--drop-existing")
    assert code == 0 and rebuilt["ok"] and rebuilt["equal"] is True
    assert rebuilt["entries_after"] == 6
    code, imported = await asyncio.to_thread(
        run, "rebuild-tigerbeetle", "--target-addresses", fresh_cluster[0])
    assert code == 0 and imported["ok"] and imported["transfers_imported"] == 6
    saved = await terminal.reports.latest_rebuild("tigerbeetle_rebuild")
    assert saved is not None and saved["transfers_imported"] == 6
    await db["gl_balances"].update_one({"_id": "1050:USD"}, {"$inc": {"debits_minor": 7}})
    code, tampered = await asyncio.to_thread(run, "reconcile", "--no-catch-up")
    assert code == 3 and tampered["balance_drift"] and not tampered["trial_balance_zero"]
    await mongo_client.drop_database(db.name)
