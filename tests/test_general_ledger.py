"""The general ledger store against the real MongoDB-compatible server the fixtures start."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio
from pymongo import ASCENDING, AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from stores.general_ledger import GL_ACCOUNTS, GL_BLOCKS, GL_CHAIN, GL_ENTRIES, GeneralLedger
from walletcore.clearing import DEFAULT_CLEARING_TABLE, ExternalTransaction, settlement_entry
from walletcore.errors import ConflictError, InvalidInputError
from walletcore.gl_chart import DEFAULT_CHART, AccountStatus
from walletcore.journal import INT64_MAX, JournalEntry, JournalLine

Db = AsyncDatabase[dict[str, Any]]
TS = 1_700_000_000_000_000_000
TABLE = DEFAULT_CLEARING_TABLE


@pytest.fixture
def db(mongo_client: AsyncMongoClient[dict[str, Any]]) -> Db:
    """A database per test: the ledger's chain and balances are global to a database."""
    return mongo_client[f"walletmig_gl_{uuid.uuid4().hex[:10]}"]


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(db: Db) -> AsyncIterator[GeneralLedger]:
    gl = GeneralLedger(db)
    await gl.ensure_indexes()
    await gl.ensure_chart()
    yield gl
    await db.client.drop_database(db.name)


def entry(n: int, *, kind: str = "ach_credit_in", amount: str = "10.00",
          currency: str = "USD", ts: int | None = None) -> JournalEntry:
    txn = ExternalTransaction(external_id=f"ext-{n}", kind=kind, amount=Decimal(amount),
                              currency=currency, counterparty="bank")
    return settlement_entry(txn, TABLE, TS + n * 1_000_000 if ts is None else ts)


async def test_post_entries_moves_balances_and_keeps_the_trial_balance_zero(
    ledger: GeneralLedger,
) -> None:
    entries = [entry(1), entry(2, amount="5.50"),
               entry(3, kind="usdc_vault_deposit", amount="1.000001", currency="USDC")]
    result = await ledger.post_entries(entries)
    assert [c.seq for c in result.new] == [1, 2, 3] and result.existing == []
    assert result.head == (await ledger.chain_head()) == result.new[-1].head
    ach = await ledger.balance(1050, "USD")
    assert (ach.debits_minor, ach.credits_minor) == (1550, 0)
    deposits = await ledger.balance(2180, "USDC")
    assert (deposits.debits_minor, deposits.credits_minor) == (0, 1_000_001)
    trial = await ledger.trial_balance()
    assert trial.zero and set(trial.by_currency()) == {"USD", "USDC"}
    assert trial.by_currency()["USD"].debits_minor == 1550
    stored = await ledger.get_entry(entries[0].entry_id)
    assert stored is not None and stored.entry == entries[0] and stored.seq == 1
    assert (await ledger.verify_chain()).ok


async def test_reposting_is_idempotent_and_other_content_conflicts(
    ledger: GeneralLedger,
) -> None:
    first = [entry(1), entry(2)]
    await ledger.post_entries(first)
    again = await ledger.post_entries([entry(2), entry(3), entry(1)])
    assert sorted(again.existing) == sorted(e.entry_id for e in first)
    assert [c.entry.entry_id for c in again.new] == [entry(3).entry_id]
    assert again.head.seq == 3
    assert (await ledger.balance(1050, "USD")).debits_minor == 3000  # not 5000
    with pytest.raises(ConflictError):
        await ledger.post_entries([entry(2, amount="99.00")])
    with pytest.raises(ConflictError):  # the same id twice in one call with other content
        await ledger.post_entries([entry(4), entry(4, amount="1.00")])
    same_twice = await ledger.post_entries([entry(5), entry(5)])
    assert len(same_twice.new) == 1
    assert (await ledger.trial_balance()).zero and (await ledger.verify_chain()).ok


async def test_concurrent_writers_never_fork_the_chain(ledger: GeneralLedger) -> None:
    writers, per_writer, size = 6, 4, 25

    async def writer(w: int) -> None:
        for b in range(per_writer):
            base = (w * per_writer + b) * size
            await ledger.post_entries([entry(base + i) for i in range(size)])

    # One writer reposts another's batch at the same time: still one entry per id.
    await asyncio.gather(*(writer(w) for w in range(writers)), writer(0))
    total = writers * per_writer * size
    head = await ledger.chain_head()
    assert head.seq == total
    verification = await ledger.verify_chain()
    assert verification.ok and verification.checked == total
    assert (await ledger.balance(2180, "USD")).credits_minor == total * 1000
    assert (await ledger.trial_balance()).zero


async def test_invalid_entries_are_refused_before_writing(ledger: GeneralLedger) -> None:
    vault_in_usd = JournalEntry(transfer_id=7, tb_timestamp=TS, lines=(
        JournalLine(account=1010, currency="USD", debit_minor=1),
        JournalLine(account=2180, currency="USD", credit_minor=1)))
    with pytest.raises(InvalidInputError) as wrong:
        await ledger.post_entries([vault_in_usd])
    assert wrong.value.field == "currency"
    unknown = JournalEntry(transfer_id=8, tb_timestamp=TS, lines=(
        JournalLine(account=1234, currency="USD", debit_minor=1),
        JournalLine(account=2180, currency="USD", credit_minor=1)))
    with pytest.raises(InvalidInputError) as missing:
        await ledger.post_entries([unknown])
    assert missing.value.field == "lines.account"
    assert (await ledger.chain_head()).seq == 0


async def test_a_balance_past_int64_is_refused_not_rounded(ledger: GeneralLedger) -> None:
    huge = JournalEntry(transfer_id=11, tb_timestamp=TS, lines=(
        JournalLine(account=3000, currency="USD", debit_minor=INT64_MAX),
        JournalLine(account=2300, currency="USD", credit_minor=INT64_MAX)))
    await ledger.post_entries([huge])
    one_more = JournalEntry(transfer_id=12, tb_timestamp=TS + 1, lines=(
        JournalLine(account=3000, currency="USD", debit_minor=1),
        JournalLine(account=2300, currency="USD", credit_minor=1)))
    with pytest.raises(ConflictError):
        await ledger.post_entries([one_more])
    assert (await ledger.chain_head()).seq == 1  # the whole transaction was rolled back
    assert (await ledger.balance(3000, "USD")).debits_minor == INT64_MAX


async def test_statement_pages_and_filters_by_time(ledger: GeneralLedger) -> None:
    await ledger.post_entries([entry(i) for i in range(1, 6)])
    await ledger.post_entries([entry(6, kind="ach_debit_out", amount="3.00")])
    page = await ledger.statement(2180, "USD", limit=4)
    assert [line.seq for line in page.lines] == [1, 2, 3, 4] and page.next_after_seq == 4
    rest = await ledger.statement(2180, "USD", after_seq=4, limit=4)
    assert [line.seq for line in rest.lines] == [5, 6] and rest.next_after_seq is None
    assert rest.lines[-1].debit_minor == 300 and rest.lines[0].credit_minor == 1000
    assert (rest.balance_debits_minor, rest.balance_credits_minor) == (300, 5000)
    first = page.lines[0].posted_at
    window = await ledger.statement(2180, "USD", since=first + timedelta(milliseconds=1),
                                    until=first + timedelta(milliseconds=3))
    assert [line.seq for line in window.lines] == [2, 3]
    assert (await ledger.statement(1000, "USD")).lines == []


async def test_verify_chain_finds_tampering(ledger: GeneralLedger, db: Db) -> None:
    await ledger.post_entries([entry(i) for i in range(1, 8)])
    assert (await ledger.verify_chain(limit=3)).last.seq == 3
    continued = await ledger.verify_chain(after_seq=3)
    assert continued.ok and continued.last.seq == 7
    entries = db[GL_ENTRIES]
    # An amount edited in place (both lines, so the entry still balances).
    victim = entry(3).entry_id
    await entries.update_one({"_id": victim}, {"$set": {"lines.0.debit_minor": 1,
                                                        "lines.1.credit_minor": 1}})
    broken = await ledger.verify_chain()
    assert not broken.ok and broken.first_bad_seq == 3 and broken.checked == 2
    # An unbalanced edit is refused as an invalid entry at its seq.
    await entries.update_one({"_id": victim}, {"$set": {"lines.0.debit_minor": 2}})
    invalid = await ledger.verify_chain()
    assert not invalid.ok and invalid.first_bad_seq == 3 and "invalid" in str(invalid.reason)


async def test_verify_chain_finds_a_cut_off_end_and_a_gap(ledger: GeneralLedger, db: Db) -> None:
    await ledger.post_entries([entry(i) for i in range(1, 5)])
    await db[GL_ENTRIES].delete_one({"seq": 4})
    cut = await ledger.verify_chain()
    assert not cut.ok and "head" in str(cut.reason)
    await db[GL_ENTRIES].delete_one({"seq": 2})
    gap = await ledger.verify_chain()
    assert not gap.ok and gap.first_bad_seq == 3
    await db[GL_CHAIN].delete_many({})
    assert not (await ledger.verify_chain()).ok


async def test_sync_cursor_only_moves_forward(ledger: GeneralLedger) -> None:
    assert (await ledger.read_cursor()).timestamp == 0
    assert (await ledger.advance_cursor(500)).timestamp == 500
    assert (await ledger.advance_cursor(100)).timestamp == 500
    await ledger.post_entries([entry(1)], cursor_timestamp=TS)
    cursor = await ledger.read_cursor()
    assert cursor.timestamp == TS and cursor.updated_at is not None
    await ledger.post_entries([entry(1)], cursor_timestamp=TS + 5)  # replay still advances
    assert (await ledger.read_cursor()).timestamp == TS + 5


async def test_account_status_and_chart_conflicts(ledger: GeneralLedger, db: Db) -> None:
    await ledger.ensure_chart()  # idempotent
    assert {a.number for a in await ledger.accounts()} == {a.number for a in DEFAULT_CHART.accounts}
    await ledger.set_status(2180, AccountStatus.FROZEN)
    assert (await ledger.account_statuses())[2180] is AccountStatus.FROZEN
    await ledger.set_status(2180, AccountStatus.OPEN)
    await ledger.set_status(6100, AccountStatus.CLOSED)
    await ledger.set_status(6100, AccountStatus.CLOSED)  # idempotent
    with pytest.raises(ConflictError):
        await ledger.set_status(6100, AccountStatus.OPEN)
    await ledger.ensure_chart()
    assert (await ledger.account_statuses())[6100] is AccountStatus.CLOSED  # kept
    with pytest.raises(InvalidInputError):
        await ledger.set_status(9999, AccountStatus.FROZEN)
    await db[GL_ACCOUNTS].update_one({"_id": 2300}, {"$set": {"name": "Payables"}})
    with pytest.raises(ConflictError):
        await ledger.ensure_chart()


async def test_drop_all_leaves_an_empty_ledger(ledger: GeneralLedger) -> None:
    await ledger.post_entries([entry(1), entry(2)], cursor_timestamp=TS)
    await ledger.drop_all()
    await ledger.ensure_indexes()
    await ledger.ensure_chart()
    assert (await ledger.chain_head()).seq == 0
    assert (await ledger.balances()) == [] and (await ledger.read_cursor()).timestamp == 0
    assert (await ledger.verify_chain()).ok
    again = await ledger.post_entries([entry(1)])
    assert again.new[0].seq == 1
    assert await ledger.existing_entry_ids([entry(1).entry_id, entry(2).entry_id]) == {
        entry(1).entry_id}
    assert [c.seq for c in await ledger.entries_page(after_seq=0, limit=10)] == [1]


async def test_entries_written_before_blocks_get_blocks(ledger: GeneralLedger, db: Db) -> None:
    """A ledger of the old layout (entries with their own seq, postings and time indexes, no
    block documents), upgraded while a new writer already posts: ensure_indexes indexes the
    old entries in blocks (stopping at a gap), drops the old indexes, and every read serves
    both."""
    await ledger.post_entries([entry(i) for i in range(1, 7)])
    await db[GL_BLOCKS].delete_many({})  # the entries as the old code left them
    await db[GL_ENTRIES].create_index([("seq", ASCENDING)], name="seq", unique=True)
    await db[GL_ENTRIES].create_index(
        [("postings", ASCENDING), ("seq", ASCENDING)], name="postings_seq")
    await db[GL_ENTRIES].create_index([("tb_timestamp", ASCENDING)], name="tb_timestamp")
    await db[GL_ENTRIES].delete_one({"seq": 4})  # a gap: a block stops before it
    await ledger.post_entries([entry(7, amount="2.00"), entry(8)])  # new code, before upgrade
    await ledger.ensure_indexes()
    await ledger.ensure_indexes()  # idempotent
    blocks = await db[GL_BLOCKS].find({}).sort("_id", ASCENDING).to_list(None)
    assert [(b["_id"], b["last"], b.get("legacy", False)) for b in blocks] == [
        (1, 3, True), (5, 6, True), (7, 8, False)]
    names = {ix["name"] async for ix in await db[GL_ENTRIES].list_indexes()}
    assert names == {"_id_"}
    assert [c.seq for c in await ledger.entries_page(after_seq=2, limit=10)] == [3, 5, 6, 7, 8]
    statement = await ledger.statement(1050, "USD", after_seq=4, limit=2)
    assert [line.seq for line in statement.lines] == [5, 6] and statement.next_after_seq == 6
    stamped = await ledger.entries_by_timestamp(after_timestamp=TS + 3_000_000, limit=10)
    assert [c.seq for c in stamped] == [5, 6, 7, 8]
    assert await ledger.count_entries_between(TS, TS + 8_000_000) == 7  # 4 is gone
    gap = await ledger.verify_chain()
    assert not gap.ok and gap.first_bad_seq == 5
    assert (await ledger.verify_chain(after_seq=5)).ok
