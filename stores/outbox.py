"""The transactional outbox of the dual-write phases: `wallet_outbox`.

Why: the TigerBeetle side of a MongoDB-answered operation used to be a backlog item in the
wallet workflow's state, applied by one regular activity per batch of that wallet (one per
operation with one caller per wallet: as costly to the Temporal server as the update itself),
and the MongoDB write and the backlog append were two steps (a crash between them needed the
gap fill). Here the record is written by the legacy store INSIDE the transaction of the legacy
write (LegacyStore.apply(..., outbox=...)): both are committed or neither is. A bounded number
of drainers (workflows.outbox, activities.outbox_drain) apply the pending records to
TigerBeetle in each wallet's legacy order, many wallets per pass, and mark them applied.

One document per transaction id (`_id`): a resent operation never makes a second record.
Fields: wallet (canonical key), shard (stable hash of the wallet % OUTBOX_SHARDS), wallet_version
(the legacy order of the wallet), since_version (the legacy version after which every operation
of the wallet is in the outbox or TigerBeetle: the import of a wallet not imported yet may be
taken there), command (the operation, as the wallet workflow's WalletCommand), legacy (its
LegacyFacts), phase and epoch it was answered under, state (pending -> applied), created_at,
applied_at, and error_type/error_message when TigerBeetle refused it for good (a divergence,
left to reconciliation).

Applied records stay (the audit of what crossed, and reconciliation's "in flight iff pending");
they are as many as the legacy transactions of the dual-write phases.

tb_primary's reverse projection (TigerBeetle answers, MongoDB follows) has records of its own in
`wallet_outbox_to_mongodb` (same store, same shards and drainers; activities.reverse_outbox):
the intent is recorded FIRST (`intend_to_mongodb`, before the TigerBeetle write, one document
per transaction id so a retry finds it), then TigerBeetle is written. A separate collection,
not a `direction` field here: the dual-write drainers page this collection's pending records by
(shard, wallet, wallet_version) through its one index, and a reverse record has no legacy
version; a second kind of record in it would be scanned and skipped by every forward pass.
Fields: wallet, shard, command, phase, epoch, state (pending -> applied, or abandoned: the
TigerBeetle write never happened), created_at, armed_at (the last time a write path armed it:
a pending record younger than ABANDON_AFTER_S with no transfer may still be being written),
applied_at, error_type/error_message (MongoDB refused it: a divergence).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, IndexModel, UpdateMany, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from messages.wallet import BacklogItem, WalletCommand
from mongobase.mongo import IN_CHUNK_MAX, now_ms
from walletcore.keys import WalletKey
from walletcore.phases import Phase
from walletcore.write_facts import LegacyFacts

WALLET_OUTBOX = "wallet_outbox"
WALLET_OUTBOX_TO_MONGODB = "wallet_outbox_to_mongodb"  # tb_primary's reverse projection
# Drainers: one shard each. Changing it re-homes pending records of some wallets to another
# shard: only with the outbox drained (the drainers of the old count would leave them).
OUTBOX_SHARDS = 4
PENDING = "pending"
APPLIED = "applied"
ABANDONED = "abandoned"  # a reverse intent whose TigerBeetle write never happened
# A pending reverse record whose transfer TigerBeetle does not hold is abandoned only after
# this (its write may be in flight: the answering write is bounded at 10 s schedule-to-close,
# workflows.wallet PRIMARY_SCHEDULE_TO_CLOSE, 3x that; a retry re-arms it). Until then it holds
# a rollback's MongoDB answers of that wallet (drain_first) and "drained" waits.
ABANDON_AFTER_S = 30.0
PAGE_MAX = 2048  # records one drainer pass reads (bounded memory and pass time)
# (state, shard, wallet, wallet_version): a pass's page, and one wallet's pending records (its
# shard is known). The only secondary index: every insert and mark maintains it.
PENDING_INDEX = "pending_by_shard"
# The reverse records' page: (state, shard, wallet, created_at).
REVERSE_PENDING_INDEX = "reverse_pending_by_shard"
# The two directions of a shard's records (the drain loop's names for its two passes).
TO_TIGERBEETLE = "to_tigerbeetle"
TO_MONGODB = "to_mongodb"

Document = dict[str, Any]


def outbox_shard(canonical: str, shards: int = OUTBOX_SHARDS) -> int:
    """Stable across processes and versions (not Python's salted hash)."""
    assert shards >= 1
    digest = hashlib.blake2b(canonical.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


@dataclass(frozen=True)
class OutboxIntent:
    """What the write path knows before the legacy write; the legacy store adds the facts
    the write produced (wallet version, a void's original) inside its transaction."""

    command: WalletCommand
    phase: Phase
    epoch: int
    since_version: int | None  # None: the version before this write (see the module doc)

    def document(self, facts: LegacyFacts, now: datetime) -> Document:
        canonical = self.command.wallet.canonical
        since = self.since_version
        if since is None or since >= facts.wallet_version:
            since = facts.wallet_version - 1
        return {
            "_id": self.command.transaction_id,
            "wallet": canonical,
            "shard": outbox_shard(canonical),
            "wallet_version": facts.wallet_version,
            "since_version": since,
            "command": self.command.model_dump(mode="json"),
            "legacy": facts.model_dump(mode="json"),
            "phase": self.phase.value,
            "epoch": self.epoch,
            "state": PENDING,
            "created_at": now,
        }


@dataclass(frozen=True)
class OutboxRecord:
    transaction_id: str
    wallet: WalletKey
    shard: int
    wallet_version: int
    since_version: int
    command: WalletCommand
    legacy: LegacyFacts
    phase: Phase
    epoch: int
    created_at: datetime

    def as_backlog_item(self) -> BacklogItem:
        """The shape the TigerBeetle apply code takes (activities.wallet.TigerBeetleBacklog):
        seq is the legacy version, so outcomes come back keyed by it."""
        return BacklogItem(seq=self.wallet_version, command=self.command, phase=self.phase,
                           epoch=self.epoch, accepted_at=self.created_at,
                           direction="to_tigerbeetle", legacy=self.legacy)


@dataclass(frozen=True)
class ReverseRecord:
    """A pending `wallet_outbox_to_mongodb` record: an operation TigerBeetle answers (or is
    answering) under tb_primary, owed to MongoDB."""

    transaction_id: str
    wallet: WalletKey
    shard: int
    command: WalletCommand
    phase: Phase
    epoch: int
    created_at: datetime
    armed_at: datetime


def _reverse_record(doc: Document) -> ReverseRecord:
    command = WalletCommand.model_validate(doc["command"])
    return ReverseRecord(
        transaction_id=doc["_id"], wallet=command.wallet, shard=int(doc["shard"]),
        command=command, phase=Phase(doc["phase"]), epoch=int(doc["epoch"]),
        created_at=doc["created_at"], armed_at=doc.get("armed_at") or doc["created_at"])


def _record(doc: Document) -> OutboxRecord:
    command = WalletCommand.model_validate(doc["command"])
    return OutboxRecord(
        transaction_id=doc["_id"], wallet=command.wallet, shard=int(doc["shard"]),
        wallet_version=int(doc["wallet_version"]), since_version=int(doc["since_version"]),
        command=command, legacy=LegacyFacts.model_validate(doc["legacy"]),
        phase=Phase(doc["phase"]), epoch=int(doc["epoch"]), created_at=doc["created_at"])


class Outbox:
    """The `wallet_outbox` collection. The legacy store inserts records in its transaction
    (`insert_in`); the drainers page, apply and mark them; readers count what is pending."""

    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self.collection: AsyncCollection[Any] = db[WALLET_OUTBOX]
        self.to_mongodb: AsyncCollection[Any] = db[WALLET_OUTBOX_TO_MONGODB]
        # (direction, shard) -> time.monotonic() of this process's last record written there:
        # the drain loop polls a direction that had no local write only at its poll's pace
        # (a hint, never a guarantee: records of other processes are found by that poll).
        # Only reverse intents are noted: dual-write records go with the legacy write (its
        # bulkWrite, not insert_in) and are drained at the poll's pace on purpose (see
        # activities.outbox_drain GATHER_S).
        self._written_at: dict[tuple[str, int], float] = {}

    def _wrote(self, direction: str, canonical: str) -> None:
        self._written_at[(direction, outbox_shard(canonical))] = time.monotonic()

    def written_since(self, direction: str, shard: int, moment: float) -> bool:
        """Did this process write a `direction` record of `shard` at or after `moment`
        (time.monotonic())? Written means handed to MongoDB: it may commit later."""
        assert direction in (TO_TIGERBEETLE, TO_MONGODB)
        return self._written_at.get((direction, shard), float("-inf")) >= moment

    @property
    def namespace(self) -> str:
        return self.collection.full_name

    async def ensure_indexes(self) -> None:
        await self.collection.create_indexes([
            IndexModel([("state", ASCENDING), ("shard", ASCENDING), ("wallet", ASCENDING),
                        ("wallet_version", ASCENDING)], name=PENDING_INDEX),
        ])
        await self.to_mongodb.create_indexes([
            IndexModel([("state", ASCENDING), ("shard", ASCENDING), ("wallet", ASCENDING),
                        ("created_at", ASCENDING)], name=REVERSE_PENDING_INDEX),
        ])

    async def insert_in(self, session: AsyncClientSession, doc: Document) -> None:
        """Inside the legacy write's transaction (its `_id` is the transaction id, which the
        legacy insert of the same transaction already proved new)."""
        await self.collection.insert_one(doc, session=session)

    async def ensure(self, intent: OutboxIntent, facts: LegacyFacts) -> bool:
        """A record for an operation MongoDB holds already (a resend answered as a replay,
        whose first write had none: written before the outbox was on). Never touches an
        existing record. True if it was inserted."""
        doc = intent.document(facts, now_ms())
        result = await self.collection.update_one(
            {"_id": doc["_id"]}, {"$setOnInsert": doc}, upsert=True)
        return result.upserted_id is not None

    async def pending_page(self, shard: int, limit: int = PAGE_MAX) -> list[OutboxRecord]:
        """The shard's pending records in (wallet, wallet_version) order: each wallet's in its
        legacy order (the order TigerBeetle must apply them in)."""
        assert 0 < limit <= PAGE_MAX
        docs = await self.collection.find({"state": PENDING, "shard": shard}).sort(
            [("wallet", ASCENDING), ("wallet_version", ASCENDING)]).limit(limit).to_list(limit)
        return [_record(doc) for doc in docs]

    async def mark_applied(
        self, transaction_ids: Sequence[str], refused: dict[str, tuple[str, str]] | None = None
    ) -> None:
        """`refused`: transaction id -> (error type, message) TigerBeetle refused for good."""
        if not transaction_ids:
            return
        now = now_ms()
        refused = refused or {}
        plain = [t for t in transaction_ids if t not in refused]
        for start in range(0, len(plain), IN_CHUNK_MAX):
            await self.collection.update_many(
                {"_id": {"$in": plain[start:start + IN_CHUNK_MAX]}, "state": PENDING},
                {"$set": {"state": APPLIED, "applied_at": now}})
        if refused:
            await self.collection.bulk_write([
                UpdateOne({"_id": txn, "state": PENDING}, {"$set": {
                    "state": APPLIED, "applied_at": now, "error_type": kind,
                    "error_message": message}})
                for txn, (kind, message) in refused.items()])

    async def pending_count(self, wallet: WalletKey) -> int:
        """The wallet's records still travelling, both directions (what "every store has
        every operation" waits for)."""
        return await self.pending_to_tigerbeetle(wallet) + await self.pending_to_mongodb(wallet)

    async def pending_to_tigerbeetle(self, wallet: WalletKey) -> int:
        canonical = wallet.canonical
        return await self.collection.count_documents(
            {"state": PENDING, "shard": outbox_shard(canonical), "wallet": canonical})

    async def pending_to_mongodb(self, wallet: WalletKey) -> int:
        canonical = wallet.canonical
        return await self.to_mongodb.count_documents(
            {"state": PENDING, "shard": outbox_shard(canonical), "wallet": canonical})

    # ---- tb_primary's reverse projection (wallet_outbox_to_mongodb) ----------------------

    async def intend_to_mongodb(self, command: WalletCommand, phase: Phase, epoch: int) -> bool:
        """Record (or re-arm) the MongoDB-bound intent of a tb_primary write BEFORE its
        TigerBeetle write. True if this call inserted the record (the caller deletes it again
        if TigerBeetle refuses the operation). A pending or abandoned record is re-armed (its
        write is being retried: the drainer must not abandon it meanwhile); an applied one is
        left as it is (a replay)."""
        canonical = command.wallet.canonical
        now = now_ms()
        self._wrote(TO_MONGODB, canonical)
        try:
            result = await self.to_mongodb.update_one(
                {"_id": command.transaction_id, "state": {"$ne": APPLIED}},
                {"$set": {"state": PENDING, "armed_at": now},
                 "$setOnInsert": {"wallet": canonical, "shard": outbox_shard(canonical),
                                  "command": command.model_dump(mode="json"),
                                  "phase": phase.value, "epoch": epoch, "created_at": now}},
                upsert=True)
        except DuplicateKeyError:
            return False  # applied already: the filter missed it and the upsert collided
        return result.upserted_id is not None

    async def withdraw_to_mongodb(self, transaction_id: str) -> None:
        """TigerBeetle refused the operation this call's intent was inserted for: no record."""
        await self.to_mongodb.delete_one({"_id": transaction_id, "state": PENDING})

    async def reverse_page(self, shard: int, limit: int = PAGE_MAX) -> list[ReverseRecord]:
        """The shard's pending reverse records, by (wallet, created_at)."""
        assert 0 < limit <= PAGE_MAX
        docs = await self.to_mongodb.find({"state": PENDING, "shard": shard}).sort(
            [("wallet", ASCENDING), ("created_at", ASCENDING)]).limit(limit).to_list(limit)
        return [_reverse_record(doc) for doc in docs]

    async def mark_reverse(
        self, applied: Sequence[str], refused: dict[str, tuple[str, str]] | None = None
    ) -> None:
        """Applied to MongoDB (`refused`: transaction id -> (error type, message) MongoDB
        refused for good: a divergence for reconciliation)."""
        now = now_ms()
        refused = refused or {}
        for query, change in _applied_marks([t for t in applied if t not in refused], now):
            await self.to_mongodb.update_many(query, change)
        if refused:
            await self.to_mongodb.bulk_write([
                UpdateOne({"_id": txn, "state": PENDING}, {"$set": {
                    "state": APPLIED, "applied_at": now, "error_type": kind,
                    "error_message": message}})
                for txn, (kind, message) in refused.items()])

    def reverse_marks(self, applied: Sequence[str], now: datetime) -> list[UpdateMany]:
        """`mark_reverse`'s update for `applied` as client bulkWrite models (namespaced): the
        legacy store commits them in the transaction that applies those records
        (LegacyStore.apply_reverse_batch), so a record is marked iff it was applied. Each
        matches only pending records: the caller compares the matched count."""
        return [UpdateMany(query, change, namespace=self.to_mongodb.full_name)
                for query, change in _applied_marks(applied, now)]

    async def abandon_reverse(self, record: ReverseRecord) -> bool:
        """No TigerBeetle write happened for it: abandoned, unless a write path re-armed it
        since it was read (armed_at moved)."""
        result = await self.to_mongodb.update_one(
            {"_id": record.transaction_id, "state": PENDING, "armed_at": record.armed_at},
            {"$set": {"state": ABANDONED, "abandoned_at": now_ms()}})
        return result.modified_count == 1

    async def reverse_states_of(self, transaction_ids: Sequence[str]) -> dict[str, str]:
        """transaction id -> state of its reverse record, for the ids that have one."""
        out: dict[str, str] = {}
        ids = list(transaction_ids)
        for start in range(0, len(ids), IN_CHUNK_MAX):
            docs = await self.to_mongodb.find(
                {"_id": {"$in": ids[start:start + IN_CHUNK_MAX]}},
                {"_id": 1, "state": 1}).to_list(None)
            out.update((d["_id"], d["state"]) for d in docs)
        return out

    async def pending_of(self, transaction_ids: Sequence[str]) -> set[str]:
        """Which of `transaction_ids` have a pending record."""
        found: set[str] = set()
        ids = list(transaction_ids)
        for start in range(0, len(ids), IN_CHUNK_MAX):
            docs = await self.collection.find(
                {"_id": {"$in": ids[start:start + IN_CHUNK_MAX]}, "state": PENDING},
                {"_id": 1}).to_list(None)
            found.update(d["_id"] for d in docs)
        return found

    async def states_of(self, transaction_ids: Sequence[str]) -> dict[str, str]:
        """transaction id -> state, for the ids that have a record."""
        out: dict[str, str] = {}
        ids = list(transaction_ids)
        for start in range(0, len(ids), IN_CHUNK_MAX):
            docs = await self.collection.find(
                {"_id": {"$in": ids[start:start + IN_CHUNK_MAX]}},
                {"_id": 1, "state": 1}).to_list(None)
            out.update((d["_id"], d["state"]) for d in docs)
        return out

    async def pending_total(self, shard: int | None = None) -> int:
        """Pending records of both directions (of one shard, or all)."""
        query: Document = {"state": PENDING}
        if shard is not None:
            query["shard"] = shard
        return (await self.collection.count_documents(query)
                + await self.to_mongodb.count_documents(query))

    async def pending_summary(self) -> tuple[int, int, datetime | None]:
        """(pending records, wallets with pending records, oldest pending created_at), both
        directions."""
        rows: list[Document] = []
        for collection in (self.collection, self.to_mongodb):
            cursor = await collection.aggregate([
                {"$match": {"state": PENDING}},
                {"$group": {"_id": "$wallet", "n": {"$sum": 1},
                            "oldest": {"$min": "$created_at"}}},
            ])
            rows += await cursor.to_list(None)
        if not rows:
            return 0, 0, None
        return (sum(int(r["n"]) for r in rows), len({r["_id"] for r in rows}),
                min(r["oldest"] for r in rows))


def _applied_marks(applied: Sequence[str], now: datetime
                   ) -> list[tuple[Document, Document]]:
    """(filter, update) pairs marking `applied` reverse records applied, in bounded `$in`
    chunks; each matches only pending records."""
    ids = list(applied)
    return [({"_id": {"$in": ids[start:start + IN_CHUNK_MAX]}, "state": PENDING},
             {"$set": {"state": APPLIED, "applied_at": now}})
            for start in range(0, len(ids), IN_CHUNK_MAX)]
