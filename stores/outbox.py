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
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, IndexModel, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from messages.wallet import BacklogItem, WalletCommand
from mongobase.mongo import IN_CHUNK_MAX, now_ms
from walletcore.keys import WalletKey
from walletcore.phases import Phase
from walletcore.write_facts import LegacyFacts

WALLET_OUTBOX = "wallet_outbox"
# Drainers: one shard each. Changing it re-homes pending records of some wallets to another
# shard: only with the outbox drained (the drainers of the old count would leave them).
OUTBOX_SHARDS = 4
PENDING = "pending"
APPLIED = "applied"
PAGE_MAX = 2048  # records one drainer pass reads (bounded memory and pass time)
# (state, shard, wallet, wallet_version): a pass's page, and one wallet's pending records (its
# shard is known). The only secondary index: every insert and mark maintains it.
PENDING_INDEX = "pending_by_shard"

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

    @property
    def namespace(self) -> str:
        return self.collection.full_name

    async def ensure_indexes(self) -> None:
        await self.collection.create_indexes([
            IndexModel([("state", ASCENDING), ("shard", ASCENDING), ("wallet", ASCENDING),
                        ("wallet_version", ASCENDING)], name=PENDING_INDEX),
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
        canonical = wallet.canonical
        return await self.collection.count_documents(
            {"state": PENDING, "shard": outbox_shard(canonical), "wallet": canonical})

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
        query: Document = {"state": PENDING}
        if shard is not None:
            query["shard"] = shard
        return await self.collection.count_documents(query)

    async def pending_summary(self) -> tuple[int, int, datetime | None]:
        """(pending records, wallets with pending records, oldest pending created_at)."""
        cursor = await self.collection.aggregate([
            {"$match": {"state": PENDING}},
            {"$group": {"_id": "$wallet", "n": {"$sum": 1}, "oldest": {"$min": "$created_at"}}},
        ])
        rows = await cursor.to_list(None)
        if not rows:
            return 0, 0, None
        return (sum(int(r["n"]) for r in rows), len(rows), min(r["oldest"] for r in rows))
