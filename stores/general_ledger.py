"""The general ledger on MongoDB: the central truth of the credit terminal's books.

Collections (this store alone touches them):
- `gl_accounts`: the chart's accounts (`_id` = GL number) with their status;
- `gl_entries`: immutable journal entries, `_id` = the entry id (the posted TigerBeetle
  transfer's id in 32 hex digits), so an entry can exist once; each carries `seq`, `prev_hash`
  and `hash` (walletcore.journal's chain) and `postings` (`account:currency` keys). No
  secondary index: on SecantusDB each one costs 0.1-0.2 ms of server CPU per inserted entry;
- `gl_entry_blocks`: the entries' index, one document per `post_entries` call (a block of
  consecutive seqs): `_id` = first seq, `last`, the entry ids in seq order, their TigerBeetle
  timestamps (`ts`, `ts_min`, `ts_max`) and, per posting key, the offsets of the entries that
  touch it. Chain order, statements and TigerBeetle time order read blocks, then entries by
  `_id`. Ledgers written before blocks existed get blocks built by `ensure_indexes`
  (`_index_legacy_entries`), which then drops the entries' old indexes;
- `gl_balances`: posted debits and credits per `account:currency`, changed in the same
  MongoDB transaction as the entries that move them;
- `gl_chain`: the chain head (`_id` "head": seq, hash). Every posting transaction updates it
  first, with a compare-and-swap on the seq it read: two writers cannot both extend the chain
  from the same head (the loser's transaction meets a write conflict or a zero match, aborts
  and retries on the new head), so the chain never forks; a unique index on `seq` guards too;
- `gl_sync`: the sync cursor (`_id` "tigerbeetle": the last TigerBeetle timestamp settled).

Amounts are int64 minor units, not Decimal128: integers are what TigerBeetle counts, so
reconciliation compares them as they are; the server adds them exactly (`$inc`, `$sum`) and
refuses an int64 overflow instead of rounding; a currency's precision is fixed
(walletcore.currencies), so minor units are unambiguous and Decimal appears only at the edges
(walletcore.money.from_minor). The cost is a ceiling of 2^63-1 minor units per balance side
(92 quadrillion USD, 9.2 trillion USDC), beyond which a posting is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError
from pymongo import ASCENDING, IndexModel, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from messages.clearing import SyncCursor
from mongobase.mongo import (
    DUPLICATE_KEY_CODE,
    TXN_ATTEMPTS_MAX,
    abort_quietly,
    as_utc,
    backoff,
    bson_to_int,
    commit,
    duplicate_insert_indexes,
    insert_new,
    is_retryable_txn_error,
    now_ms,
)
from mongobase.queries import find_in
from walletcore.errors import ConflictError, InvalidInputError, StoreUnavailableError
from walletcore.gl_chart import DEFAULT_CHART, AccountStatus, ChartOfAccounts, GLAccount
from walletcore.journal import (
    INT64_MAX,
    AccountBalance,
    ChainedEntry,
    ChainHead,
    ChainVerification,
    JournalEntry,
    JournalLine,
    TrialBalance,
    balance_deltas,
    extend_chain,
    posted_at_of,
    posting_key,
    trial_balance,
    verify_segment,
)

log = logging.getLogger(__name__)

GL_ACCOUNTS = "gl_accounts"
GL_ENTRIES = "gl_entries"
GL_BALANCES = "gl_balances"
GL_CHAIN = "gl_chain"
GL_SYNC = "gl_sync"
GL_BLOCKS = "gl_entry_blocks"
ALL_COLLECTIONS = (GL_ACCOUNTS, GL_ENTRIES, GL_BALANCES, GL_CHAIN, GL_SYNC, GL_BLOCKS)
# The entries' indexes before blocks (session 7): dropped once their entries are in blocks.
LEGACY_ENTRY_INDEXES = ("seq", "postings_seq", "tb_timestamp")
LEGACY_BLOCKS_MAX = 100_000  # ensure_indexes: blocks built per call (x 8189 entries)
HEAD_ID = "head"
CURSOR_ID = "tigerbeetle"
ENTRIES_MAX = 8189  # one post_entries call: one TigerBeetle batch of posted transfers
PAGE_MAX = 8189
BALANCES_MAX = 65_536  # GL_ACCOUNTS_MAX x currencies: all of them fit one read
SECONDS_PER_NS = 1e-9

Document = dict[str, Any]


class StatementLine(BaseModel):
    """One entry as it touches one account and currency."""

    model_config = ConfigDict(frozen=True)

    seq: int
    entry_id: str
    posted_at: datetime
    tb_timestamp: int
    kind: str | None
    external_id: str | None
    debit_minor: int
    credit_minor: int
    memo: str | None = None


class Statement(BaseModel):
    """Lines in chain order after `after_seq`; `next_after_seq` continues (None: no more)."""

    model_config = ConfigDict(frozen=True)

    account: int
    currency: str
    lines: list[StatementLine]
    balance_debits_minor: int
    balance_credits_minor: int
    next_after_seq: int | None


@dataclass
class PostResult:
    """`new`: entries this call chained; `existing`: entry ids already in the ledger with the
    same content (a replay: skipped); `head`: the chain head after the call."""

    new: list[ChainedEntry] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    head: ChainHead = field(default_factory=ChainHead)
    attempts: int = 0


class _EntriesExist(Exception):
    """A posting transaction met entry ids that are in the ledger already."""




class GeneralLedger:
    def __init__(
        self, db: AsyncDatabase[Any], *, chart: ChartOfAccounts = DEFAULT_CHART,
        attempts_max: int = TXN_ATTEMPTS_MAX,
    ) -> None:
        assert 0 < attempts_max <= 10_000
        self._db = db
        self._client = db.client
        self._chart = chart
        self._attempts_max = attempts_max
        self._accounts: AsyncCollection[Any] = db[GL_ACCOUNTS]
        self._entries: AsyncCollection[Any] = db[GL_ENTRIES]
        self._balances: AsyncCollection[Any] = db[GL_BALANCES]
        self._chain: AsyncCollection[Any] = db[GL_CHAIN]
        self._sync: AsyncCollection[Any] = db[GL_SYNC]
        self._blocks: AsyncCollection[Any] = db[GL_BLOCKS]
        self._postable = {
            (a.number, currency) for a in chart.accounts for currency in a.currencies
        }
        self.conflict_retries = 0  # observability: posting attempts retried

    @property
    def chart(self) -> ChartOfAccounts:
        return self._chart

    async def ensure_indexes(self) -> None:
        await self._blocks.create_indexes([
            # Blocks are consecutive and disjoint: `last` order is chain order. Unique, with
            # the `_id` (first seq), it is the second guard against a fork after the head's
            # compare-and-swap.
            IndexModel([("last", ASCENDING)], name="last", unique=True),
            IndexModel([("postings", ASCENDING), ("last", ASCENDING)], name="postings_last"),
            # TigerBeetle time order (chain order differs): rebuilding TigerBeetle imports the
            # entries in it, the sync counts a page's entries, reconciliation reads as of a time.
            IndexModel([("ts_max", ASCENDING)], name="ts_max"),
        ])
        await self._index_legacy_entries()

    async def _index_legacy_entries(self) -> None:
        """Blocks for entries written before blocks existed (they carry `seq` and the old
        indexes): the seqs below the first block written by `post_entries`, read through the
        old `seq` index, in blocks that stop at a gap (blocks are consecutive). Idempotent
        (block `_id`s are their first seqs: a concurrent indexer's duplicate is skipped);
        the old indexes are dropped once every legacy entry is in a block."""
        existing = {ix["name"] async for ix in await self._entries.list_indexes()}
        legacy = [name for name in LEGACY_ENTRY_INDEXES if name in existing]
        if not legacy:
            return
        native = await self._blocks.find_one({"legacy": {"$ne": True}}, sort=[("last", 1)])
        until = (await self._read_head()).seq if native is None else int(native["_id"]) - 1
        done = await self._blocks.find_one({"legacy": True}, sort=[("last", -1)])
        after = 0 if done is None else int(done["last"])
        for _ in range(LEGACY_BLOCKS_MAX):
            if after >= until:
                break
            cursor = self._entries.find(
                {"seq": {"$gt": after, "$lte": until}},
                {"seq": 1, "tb_timestamp": 1, "postings": 1},
            ).sort("seq", ASCENDING).limit(ENTRIES_MAX)
            rows = [_BlockRow(int(d["seq"]), d["_id"], bson_to_int(d["tb_timestamp"]),
                              tuple(d.get("postings", ()))) async for d in cursor]
            if not rows:
                break
            run = [rows[0]]
            for row in rows[1:]:
                if row.seq != run[-1].seq + 1:
                    break  # a gap (a deleted entry): the next block starts after it
                run.append(row)
            await insert_new(self._blocks, [{**_block_doc(run, now_ms()), "legacy": True}])
            after = run[-1].seq
        else:
            return  # more than LEGACY_BLOCKS_MAX blocks: the next ensure_indexes goes on
        for name in legacy:
            await self._entries.drop_index(name)

    async def drop_all(self) -> None:
        """Drop every collection of the ledger (the rebuild-from-TigerBeetle test and command
        start from nothing); call ensure_indexes and ensure_chart again afterwards."""
        for name in ALL_COLLECTIONS:
            await self._db.drop_collection(name)

    # ---- accounts ----------------------------------------------------------------------------

    async def ensure_chart(self) -> None:
        """Store the chart's accounts. An account stored before keeps its status; one stored
        with another name, type or currencies is a ConflictError (the configuration changed
        under existing books)."""
        docs = [_account_doc(a) for a in self._chart.accounts]
        taken = await insert_new(self._accounts, docs)
        if not taken:
            return
        stored = {doc["_id"]: doc async for doc in self._accounts.find({})}
        for index in sorted(taken):
            wanted, have = docs[index], stored.get(docs[index]["_id"], {})
            fields = ("name", "type", "currencies", "balance_limit")
            differing = [name for name in fields if have.get(name) != wanted[name]]
            if differing:
                raise ConflictError(
                    f"GL account {wanted['_id']} is stored with another {', '.join(differing)}",
                    field="account",
                )

    async def accounts(self) -> list[GLAccount]:
        """The chart's accounts with their stored status (open when not stored yet)."""
        statuses = await self.account_statuses()
        return [
            a.model_copy(update={"status": statuses.get(a.number, a.status)})
            for a in self._chart.accounts
        ]

    async def account_statuses(self) -> dict[int, AccountStatus]:
        cursor = self._accounts.find({}, {"status": 1})
        return {int(doc["_id"]): AccountStatus(doc["status"]) async for doc in cursor}

    async def set_status(self, number: int, status: AccountStatus) -> None:
        """Freeze, reopen or close an account. Closing is final: a closed account never
        reopens (its books are done; a new account takes over)."""
        self._chart.account(number)
        updated = await self._accounts.update_one(
            {"_id": number, "status": {"$ne": AccountStatus.CLOSED.value}},
            {"$set": {"status": status.value, "updated_at": now_ms()}},
        )
        if updated.matched_count == 1:
            return
        doc = await self._accounts.find_one({"_id": number})
        if doc is None:
            raise InvalidInputError(f"GL account {number} is not stored: run ensure_chart",
                                    field="account")
        if status is not AccountStatus.CLOSED:
            raise ConflictError(f"GL account {number} is closed", field="account")

    # ---- posting -----------------------------------------------------------------------------

    async def post_entries(
        self, entries: Sequence[JournalEntry], *, cursor_timestamp: int | None = None
    ) -> PostResult:
        """Chain and write `entries` (in order) with their balance changes in one MongoDB
        transaction; entries already in the ledger with the same content are skipped, with
        other content refused (ConflictError). `cursor_timestamp` also advances the sync
        cursor in that transaction. Retries write conflicts (bounded, jittered)."""
        pending = self._validated(entries)
        result = PostResult()
        for attempt in range(self._attempts_max):
            result.attempts = attempt + 1
            try:
                async with self._client.start_session() as session:
                    result.new, result.head = await self._post_attempt(
                        session, pending, cursor_timestamp
                    )
                    return result
            except _EntriesExist:
                known = await self._existing(pending)
                result.existing.extend(known)
                pending = [e for e in pending if e.entry_id not in known]
                continue  # no backoff: the next attempt writes less
            except PyMongoError as exc:
                if not is_retryable_txn_error(exc):
                    raise _store_error(exc) from exc
            self.conflict_retries += 1
            await backoff(attempt)
        raise StoreUnavailableError(
            f"ledger still conflicting after {self._attempts_max} attempts", field=None
        )

    def _validated(self, entries: Sequence[JournalEntry]) -> list[JournalEntry]:
        """Accounts and currencies from the chart; one entry per id (same content twice in a
        batch is one entry, different content a conflict)."""
        if len(entries) > ENTRIES_MAX:
            raise InvalidInputError(f"at most {ENTRIES_MAX} entries per call", field="entries")
        unique: dict[str, JournalEntry] = {}
        for entry in entries:
            for line in entry.lines:
                self._check_postable(line)
            seen = unique.setdefault(entry.entry_id, entry)
            if seen.content_hash != entry.content_hash:
                raise ConflictError(f"entry {entry.entry_id} appears twice with other content",
                                    field="entries")
        return list(unique.values())

    def _check_postable(self, line: JournalLine) -> None:
        if (line.account, line.currency) not in self._postable:
            self._chart.mirror(line.account, line.currency, field="lines.account")
            raise AssertionError("a mirror exists for every postable pair")

    async def _post_attempt(
        self, session: AsyncClientSession, entries: list[JournalEntry],
        cursor_timestamp: int | None,
    ) -> tuple[list[ChainedEntry], ChainHead]:
        await session.start_transaction()
        try:
            head = await self._read_head(session)
            chained = extend_chain(head, entries)
            new_head = chained[-1].head if chained else head
            # The head first: a concurrent writer conflicts here, before writing thousands.
            if chained:
                await self._swap_head(session, head, new_head)
                await self._insert_entries(session, chained)
                await self._apply_balances(session, entries)
            if cursor_timestamp is not None:
                await self._advance_cursor(session, cursor_timestamp)
            await commit(session)  # a commit conflict is retryable (mongobase)
        except BaseException:
            await abort_quietly(session)
            raise
        return chained, new_head

    async def _read_head(self, session: AsyncClientSession | None = None) -> ChainHead:
        doc = await self._chain.find_one({"_id": HEAD_ID}, session=session)
        return ChainHead() if doc is None else ChainHead(seq=int(doc["seq"]), hash=doc["hash"])

    async def _swap_head(
        self, session: AsyncClientSession, old: ChainHead, new: ChainHead
    ) -> None:
        """Compare-and-swap on the head's seq (upsert creates the head at the first post: a
        concurrent creator makes it a duplicate key, which retries)."""
        updated = await self._chain.update_one(
            {"_id": HEAD_ID, "seq": old.seq},
            {"$set": {"seq": new.seq, "hash": new.hash, "updated_at": now_ms()}},
            upsert=old.seq == 0, session=session,
        )
        if updated.matched_count == 0 and updated.upserted_id is None:
            raise DuplicateKeyError("chain head moved", code=DUPLICATE_KEY_CODE)

    async def _insert_entries(
        self, session: AsyncClientSession, chained: list[ChainedEntry]
    ) -> None:
        now = now_ms()
        try:
            await self._entries.insert_many(
                [_entry_doc(link, now) for link in chained], ordered=True, session=session
            )
        except BulkWriteError as exc:
            if duplicate_insert_indexes(exc) is not None:
                raise _EntriesExist() from exc
            raise
        # Their index: one document for the whole call (a duplicate `_id`/`last` is a fork the
        # head's compare-and-swap missed: DuplicateKeyError, retried on the new head).
        rows = [_BlockRow(link.seq, link.entry.entry_id, link.entry.tb_timestamp,
                          tuple(link.entry.postings)) for link in chained]
        await self._blocks.insert_one(_block_doc(rows, now), session=session)

    async def _apply_balances(
        self, session: AsyncClientSession, entries: list[JournalEntry]
    ) -> None:
        now = now_ms()
        ops = [
            UpdateOne(
                {"_id": posting_key(account, currency)},
                {
                    "$inc": {"debits_minor": debits, "credits_minor": credits},
                    "$set": {"updated_at": now},
                    "$setOnInsert": {"account": account, "currency": currency},
                },
                upsert=True,
            )
            for (account, currency), (debits, credits) in sorted(balance_deltas(entries).items())
        ]
        await self._balances.bulk_write(ops, ordered=True, session=session)

    async def _existing(self, entries: list[JournalEntry]) -> set[str]:
        """Which of `entries` the ledger holds; ConflictError if one holds other content."""
        wanted = {e.entry_id: e for e in entries}
        docs = await find_in(self._entries, "_id", list(wanted))
        for doc in docs:
            stored = _chained_of(doc).entry
            if stored.content_hash != wanted[doc["_id"]].content_hash:
                raise ConflictError(
                    f"entry {doc['_id']} exists with other content", field="entries"
                )
        return {doc["_id"] for doc in docs}

    # ---- reads -------------------------------------------------------------------------------

    async def chain_head(self) -> ChainHead:
        return await self._read_head()

    async def get_entry(self, entry_id: str) -> ChainedEntry | None:
        doc = await self._entries.find_one({"_id": entry_id})
        return None if doc is None else _chained_of(doc)

    async def existing_entry_ids(self, entry_ids: Sequence[str]) -> set[str]:
        """The ids among `entry_ids` that have an entry (chunked reads)."""
        if len(entry_ids) > PAGE_MAX:
            raise InvalidInputError(f"at most {PAGE_MAX} ids per call", field="entry_ids")
        docs = await find_in(self._entries, "_id", list(dict.fromkeys(entry_ids)), {"_id": 1})
        return {doc["_id"] for doc in docs}

    async def entries_page(self, *, after_seq: int, limit: int) -> list[ChainedEntry]:
        """Entries in chain order after `after_seq` (reconciliation, rebuilding TigerBeetle)."""
        _check_limit(limit)
        docs = await self._docs_of(await self._seq_ids(after_seq, limit))
        return [_chained_of(doc) for doc in docs if doc is not None]

    async def _seq_ids(
        self, after_seq: int, limit: int, *, posting: str | None = None,
        since: datetime | None = None, until: datetime | None = None,
    ) -> list[str]:
        """Up to `limit` entry ids in chain order after `after_seq` (touching `posting`, posted
        in [since, until), when given), from the blocks."""
        query: Document = {"last": {"$gt": after_seq}}
        if posting is not None:
            query["postings"] = posting
        ids: list[str] = []
        cursor = self._blocks.find(query).sort("last", ASCENDING)
        try:
            async for block in cursor:
                first, block_ids, stamps = int(block["_id"]), block["ids"], block["ts"]
                offsets = (range(len(block_ids)) if posting is None
                           else block["by_posting"].get(posting, []))
                for offset in offsets:
                    posted_at = posted_at_of(bson_to_int(stamps[offset]))
                    if first + offset <= after_seq or (since is not None and posted_at < since):
                        continue
                    if until is not None and posted_at >= until:
                        continue
                    ids.append(block_ids[offset])
                    if len(ids) == limit:
                        return ids
        finally:
            await cursor.close()
        return ids

    async def _docs_of(self, ids: list[str]) -> list[Document | None]:
        """The entries of `ids`, in that order (None: the entry is not there)."""
        found = {doc["_id"]: doc for doc in await find_in(self._entries, "_id", ids)}
        return [found.get(entry_id) for entry_id in ids]

    async def balances(self) -> list[AccountBalance]:
        cursor = self._balances.find({}).sort("_id", ASCENDING).limit(BALANCES_MAX)
        return [_balance_of(doc) async for doc in cursor]

    async def balance(self, account: int, currency: str) -> AccountBalance:
        self._chart.mirror(account, currency)
        doc = await self._balances.find_one({"_id": posting_key(account, currency)})
        if doc is None:
            return AccountBalance(account=account, currency=currency, debits_minor=0,
                                  credits_minor=0)
        return _balance_of(doc)

    async def trial_balance(self) -> TrialBalance:
        return trial_balance(await self.balances())

    async def statement(
        self, account: int, currency: str, *, since: datetime | None = None,
        until: datetime | None = None, after_seq: int = 0, limit: int = 100,
    ) -> Statement:
        """The account's entries in one currency, posted in [since, until), chain order."""
        _check_limit(limit)
        balance = await self.balance(account, currency)
        ids = await self._seq_ids(after_seq, limit, posting=posting_key(account, currency),
                                  since=since, until=until)
        lines = [_statement_line(_chained_of(doc), account, currency)
                 for doc in await self._docs_of(ids) if doc is not None]
        return Statement(
            account=account, currency=currency, lines=lines,
            balance_debits_minor=balance.debits_minor, balance_credits_minor=balance.credits_minor,
            next_after_seq=lines[-1].seq if len(lines) == limit else None,
        )

    async def verify_chain(self, *, limit: int = PAGE_MAX, after_seq: int = 0) -> ChainVerification:
        """Walk up to `limit` entries after `after_seq`, recomputing every hash from the stored
        content; at the chain's end the stored head must be the last link. Continue a long
        chain with after_seq = result.last.seq."""
        _check_limit(limit)
        start = ChainHead()
        if after_seq > 0:
            before_ids = await self._seq_ids(after_seq - 1, 1)
            before = None if not before_ids else (await self._docs_of(before_ids))[0]
            if before is None or before.get("seq") != after_seq:
                return ChainVerification(ok=False, checked=0, last=ChainHead(seq=after_seq),
                                         first_bad_seq=after_seq, reason="entry missing")
            start = ChainHead(seq=after_seq, hash=before["hash"])
        ids = await self._seq_ids(after_seq, limit)
        # A missing entry is skipped (as an index scan would): the hash of the next one fails.
        docs = [doc for doc in await self._docs_of(ids) if doc is not None]
        segment: list[ChainedEntry] = []
        for doc in docs:
            try:
                segment.append(_chained_of(doc))
            except (ValidationError, KeyError, TypeError, ValueError, ConflictError) as err:
                checked = verify_segment(start, segment)
                if not checked.ok:
                    return checked
                return ChainVerification(ok=False, checked=len(segment), last=checked.last,
                                         first_bad_seq=doc.get("seq"), reason=f"invalid: {err}")
        result = verify_segment(start, segment)
        if result.ok and len(ids) < limit:
            head = await self._read_head()
            if head != result.last:
                return result.model_copy(update={
                    "ok": False, "first_bad_seq": head.seq,
                    "reason": f"stored head {head.seq} differs from the last entry",
                })
        return result

    # ---- the sync cursor ---------------------------------------------------------------------

    async def read_cursor(self) -> SyncCursor:
        doc = await self._sync.find_one({"_id": CURSOR_ID})
        if doc is None:
            return SyncCursor()
        return SyncCursor(timestamp=int(doc["timestamp"]), updated_at=as_utc(doc["updated_at"]))

    async def advance_cursor(self, timestamp: int) -> SyncCursor:
        """Move the cursor forward to `timestamp` (never back: `$max`)."""
        await self._advance_cursor(None, timestamp)
        return await self.read_cursor()

    async def _advance_cursor(self, session: AsyncClientSession | None, timestamp: int) -> None:
        if not 0 <= timestamp <= INT64_MAX:
            raise InvalidInputError(f"{timestamp} outside 0..2^63-1", field="timestamp")
        await self._sync.update_one(
            {"_id": CURSOR_ID},
            {"$max": {"timestamp": timestamp}, "$set": {"updated_at": now_ms()}},
            upsert=True, session=session,
        )

    # ---- TigerBeetle time order --------------------------------------------------------------

    async def entries_by_timestamp(
        self, *, after_timestamp: int, limit: int, until_timestamp: int | None = None
    ) -> list[ChainedEntry]:
        """Entries in TigerBeetle timestamp order with after < tb_timestamp <= until (no upper
        bound when None): what rebuilding TigerBeetle imports, oldest first."""
        _check_limit(limit)
        until = INT64_MAX if until_timestamp is None else until_timestamp
        # Blocks overlapping the window, by their earliest time: once `limit` entries are
        # found and the next block starts after the limit-th, no later block can add one.
        metas = sorted(
            [(bson_to_int(m["ts_min"]), int(m["_id"])) async for m in self._blocks.find(
                {"ts_max": {"$gt": after_timestamp}, "ts_min": {"$lte": until}}, {"ts_min": 1})])
        found: list[tuple[int, str]] = []
        for ts_min, block_id in metas:
            if len(found) >= limit and ts_min > found[limit - 1][0]:
                break
            block = await self._blocks.find_one({"_id": block_id}, {"ids": 1, "ts": 1})
            if block is None:
                continue
            found.extend((ts, entry_id) for ts, entry_id in _stamped(block)
                         if after_timestamp < ts <= until)
            found.sort()
        ids = [entry_id for _, entry_id in found[:limit]]
        return [_chained_of(doc) for doc in await self._docs_of(ids) if doc is not None]

    async def count_entries_between(self, after_timestamp: int, until_timestamp: int) -> int:
        """Entries with after < tb_timestamp <= until, counted in the blocks that overlap the
        range (the sync's cheap "all there?" before it reads ids)."""
        blocks = self._blocks.find(
            {"ts_max": {"$gt": after_timestamp}, "ts_min": {"$lte": until_timestamp}},
            {"ids": 1, "ts": 1})
        return sum([
            sum(1 for ts, _ in _stamped(block) if after_timestamp < ts <= until_timestamp)
            async for block in blocks
        ])


# ---- documents ----------------------------------------------------------------------------


def _account_doc(account: GLAccount) -> Document:
    return {
        "_id": account.number, "name": account.name, "type": account.type.value,
        "currencies": list(account.currencies), "balance_limit": account.balance_limit,
        "status": account.status.value, "updated_at": now_ms(),
    }


def _entry_doc(link: ChainedEntry, now: datetime) -> Document:
    entry = link.entry
    return {
        "_id": entry.entry_id,
        "seq": link.seq,
        "prev_hash": link.prev_hash,
        "hash": link.hash,
        "tb_timestamp": entry.tb_timestamp,
        "posted_at": entry.posted_at,
        "code": entry.code,
        "kind": entry.kind,
        "external_id": entry.external_id,
        "memo": entry.memo,
        "lines": [line.model_dump() for line in entry.lines],
        "postings": entry.postings,
        "recorded_at": now,
    }


class _BlockRow(NamedTuple):
    seq: int
    entry_id: str
    tb_timestamp: int
    postings: tuple[str, ...]


def _block_doc(rows: Sequence[_BlockRow], now: datetime) -> Document:
    """The index document of consecutive entries (`rows` in seq order, at least one)."""
    assert rows and all(row.seq == rows[0].seq + i for i, row in enumerate(rows))
    by_posting: dict[str, list[int]] = {}
    for offset, row in enumerate(rows):
        for key in row.postings:
            by_posting.setdefault(key, []).append(offset)
    stamps = [row.tb_timestamp for row in rows]
    return {
        "_id": rows[0].seq, "last": rows[-1].seq, "ids": [row.entry_id for row in rows],
        "ts": stamps, "ts_min": min(stamps), "ts_max": max(stamps),
        "postings": sorted(by_posting), "by_posting": by_posting, "recorded_at": now,
    }


def _stamped(block: Document) -> list[tuple[int, str]]:
    return [(bson_to_int(ts), entry_id)
            for ts, entry_id in zip(block["ts"], block["ids"], strict=True)]


def _chained_of(doc: Document) -> ChainedEntry:
    """A stored entry back as the chain sees it (a tampered amount or line fails here or in
    the hash check; the transfer id is the `_id`)."""
    entry = JournalEntry(
        transfer_id=int(doc["_id"], 16), tb_timestamp=bson_to_int(doc["tb_timestamp"]),
        code=doc["code"], kind=doc.get("kind"), external_id=doc.get("external_id"),
        memo=doc.get("memo"), lines=tuple(JournalLine(**line) for line in doc["lines"]),
    )
    return ChainedEntry(entry=entry, seq=int(doc["seq"]), prev_hash=doc["prev_hash"],
                        hash=doc["hash"])


def _balance_of(doc: Document) -> AccountBalance:
    return AccountBalance(
        account=int(doc["account"]), currency=doc["currency"],
        debits_minor=bson_to_int(doc.get("debits_minor", 0)),
        credits_minor=bson_to_int(doc.get("credits_minor", 0)),
    )


def _statement_line(link: ChainedEntry, account: int, currency: str) -> StatementLine:
    entry = link.entry
    mine = [ln for ln in entry.lines if ln.account == account and ln.currency == currency]
    return StatementLine(
        seq=link.seq, entry_id=entry.entry_id, posted_at=entry.posted_at,
        tb_timestamp=entry.tb_timestamp, kind=entry.kind, external_id=entry.external_id,
        debit_minor=sum(ln.debit_minor for ln in mine),
        credit_minor=sum(ln.credit_minor for ln in mine), memo=entry.memo,
    )


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= PAGE_MAX:
        raise InvalidInputError(f"must be 1..{PAGE_MAX}, got {limit}", field="limit")


def _store_error(exc: PyMongoError) -> Exception:
    """A refusal the server will repeat (e.g. a balance past int64) is a conflict; anything
    else (network, timeouts) may pass later."""
    if getattr(exc, "code", None) is not None:
        return ConflictError(f"the ledger refused the write: {exc}", field="entries")
    return StoreUnavailableError(f"MongoDB: {exc}", field=None)


