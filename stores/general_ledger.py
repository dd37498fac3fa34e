"""The general ledger on MongoDB: the central truth of the credit terminal's books.

Collections (this store alone touches them):
- `gl_accounts`: the chart's accounts (`_id` = GL number) with their status;
- `gl_entries`: immutable journal entries, `_id` = the entry id (the posted TigerBeetle
  transfer's id in 32 hex digits), so an entry can exist once; each carries `seq`, `prev_hash`
  and `hash` (walletcore.journal's chain) and `postings` (`account:currency` keys, indexed
  with seq for statements);
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
from typing import Any

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
ALL_COLLECTIONS = (GL_ACCOUNTS, GL_ENTRIES, GL_BALANCES, GL_CHAIN, GL_SYNC)
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
        self._postable = {
            (a.number, currency) for a in chart.accounts for currency in a.currencies
        }
        self.conflict_retries = 0  # observability: posting attempts retried

    @property
    def chart(self) -> ChartOfAccounts:
        return self._chart

    async def ensure_indexes(self) -> None:
        await self._entries.create_indexes([
            IndexModel([("seq", ASCENDING)], name="seq", unique=True),
            IndexModel([("postings", ASCENDING), ("seq", ASCENDING)], name="postings_seq"),
            # TigerBeetle time order (chain order differs): rebuilding TigerBeetle imports the
            # entries in it, reconciliation reads balances as of a timestamp.
            IndexModel([("tb_timestamp", ASCENDING)], name="tb_timestamp"),
        ])

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
            errors = exc.details.get("writeErrors", [])
            if errors and all(e.get("code") == DUPLICATE_KEY_CODE for e in errors):
                raise _EntriesExist() from exc
            raise

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
        cursor = self._entries.find({"seq": {"$gt": after_seq}}).sort("seq", ASCENDING)
        return [_chained_of(doc) async for doc in cursor.limit(limit)]

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
        query: Document = {"postings": posting_key(account, currency), "seq": {"$gt": after_seq}}
        window: Document = {}
        if since is not None:
            window["$gte"] = since
        if until is not None:
            window["$lt"] = until
        if window:
            query["posted_at"] = window
        cursor = self._entries.find(query).sort("seq", ASCENDING).limit(limit)
        lines = [_statement_line(_chained_of(doc), account, currency) async for doc in cursor]
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
            before = await self._entries.find_one({"seq": after_seq})
            if before is None:
                return ChainVerification(ok=False, checked=0, last=ChainHead(seq=after_seq),
                                         first_bad_seq=after_seq, reason="entry missing")
            start = ChainHead(seq=after_seq, hash=before["hash"])
        cursor = self._entries.find({"seq": {"$gt": after_seq}}).sort("seq", ASCENDING)
        segment: list[ChainedEntry] = []
        async for doc in cursor.limit(limit):
            try:
                segment.append(_chained_of(doc))
            except (ValidationError, KeyError, TypeError, ValueError, ConflictError) as err:
                checked = verify_segment(start, segment)
                if not checked.ok:
                    return checked
                return ChainVerification(ok=False, checked=len(segment), last=checked.last,
                                         first_bad_seq=doc.get("seq"), reason=f"invalid: {err}")
        result = verify_segment(start, segment)
        if result.ok and len(segment) < limit:
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
        window: Document = {"$gt": after_timestamp}
        if until_timestamp is not None:
            window["$lte"] = until_timestamp
        cursor = self._entries.find({"tb_timestamp": window}).sort(
            [("tb_timestamp", ASCENDING), ("_id", ASCENDING)]).limit(limit)
        return [_chained_of(doc) async for doc in cursor]

    async def count_entries_between(self, after_timestamp: int, until_timestamp: int) -> int:
        """Entries with after < tb_timestamp <= until (one index range count: the sync's
        cheap "all there?" before it reads ids)."""
        return await self._entries.count_documents(
            {"tb_timestamp": {"$gt": after_timestamp, "$lte": until_timestamp}})


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


