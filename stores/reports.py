"""Reconciliation reports, mismatch details and the repair audit log (MongoDB collections).

`reconciliation_reports` has one document per run (what the gates and `reconcile report` read);
`reconciliation_mismatches` holds every real difference of a run (the report embeds the first
few); `reconciliation_audit` records every repair: who, why, before, after, transfers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from mongobase.mongo import now_ms

RECONCILIATION_REPORTS = "reconciliation_reports"
RECONCILIATION_MISMATCHES = "reconciliation_mismatches"
RECONCILIATION_AUDIT = "reconciliation_audit"
EMBEDDED_MISMATCHES_MAX = 100
HISTORY_MAX = 1000

Document = dict[str, Any]


class MismatchDoc(BaseModel):
    """One real problem: a balance difference (both sides) or a registry/account/transfer one."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    kind: str
    subject: str  # wallet canonical key, transaction id or ledger
    detail: str
    legacy: dict[str, Any] | None = None
    tigerbeetle: dict[str, Any] | None = None
    diffs: list[dict[str, Any]] = Field(default_factory=list)
    recent_legacy_ops: list[dict[str, Any]] = Field(default_factory=list)
    recent_tb_transfers: list[dict[str, Any]] = Field(default_factory=list)
    max_diff_minor: int = 0
    repaired: bool = False
    at: datetime | None = None


class ReportStore:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._reports: AsyncCollection[Any] = db[RECONCILIATION_REPORTS]
        self._mismatches: AsyncCollection[Any] = db[RECONCILIATION_MISMATCHES]
        self._audit: AsyncCollection[Any] = db[RECONCILIATION_AUDIT]

    async def ensure_indexes(self) -> None:
        await self._reports.create_indexes(
            [IndexModel([("started_at", DESCENDING)], name="started_at")]
        )
        await self._mismatches.create_indexes(
            [IndexModel([("run_id", ASCENDING), ("kind", ASCENDING)], name="run_kind")]
        )
        await self._audit.create_indexes(
            [IndexModel([("wallet", ASCENDING), ("at", DESCENDING)], name="wallet_at")]
        )

    async def start(self, run_id: str, fields: Document) -> None:
        await self._reports.update_one(
            {"_id": run_id},
            {"$setOnInsert": {"started_at": now_ms(), **fields}, "$set": {"status": "running"}},
            upsert=True,
        )

    async def finish(self, run_id: str, fields: Document) -> None:
        embedded = [
            doc async for doc in self._mismatches.find({"run_id": run_id}, {"_id": 0})
            .limit(EMBEDDED_MISMATCHES_MAX)
        ]
        await self._reports.update_one(
            {"_id": run_id},
            {"$set": {**fields, "status": "done", "finished_at": now_ms(),
                      "mismatches": embedded}},
            upsert=True,
        )

    async def add_mismatches(self, docs: list[MismatchDoc]) -> None:
        """Idempotent per (run, kind, subject): a retried page rewrites the same documents."""
        if not docs:
            return
        from pymongo import ReplaceOne

        ops = [
            ReplaceOne({"_id": f"{d.run_id}|{d.kind}|{d.subject}"},
                       {**d.model_dump(mode="python"), "at": d.at or now_ms()}, upsert=True)
            for d in docs
        ]
        await self._mismatches.bulk_write(ops, ordered=False)

    async def mark_repaired(self, run_id: str, subjects: list[str]) -> None:
        await self._mismatches.update_many(
            {"run_id": run_id, "subject": {"$in": subjects}}, {"$set": {"repaired": True}}
        )

    async def mismatches(self, run_id: str, limit: int = 1000) -> list[Document]:
        assert 0 < limit <= HISTORY_MAX * 10
        return [d async for d in self._mismatches.find({"run_id": run_id}).limit(limit)]

    async def audit(self, entry: Document) -> None:
        await self._audit.insert_one({**entry, "at": now_ms()})

    async def audits(self, wallet: str, limit: int = 50) -> list[Document]:
        cursor = self._audit.find({"wallet": wallet}).sort("at", DESCENDING).limit(limit)
        return [d async for d in cursor]

    async def get(self, run_id: str) -> Document | None:
        doc: Document | None = await self._reports.find_one({"_id": run_id})
        return doc

    async def latest(self, *, finished: bool = True) -> Document | None:
        query: Document = {"status": "done"} if finished else {}
        doc: Document | None = await self._reports.find_one(
            query, sort=[("started_at", DESCENDING)]
        )
        return doc

    async def history(self, limit: int = 100) -> list[Document]:
        """Finished reports, oldest first (for the match-rate chart)."""
        assert 0 < limit <= HISTORY_MAX
        cursor = (self._reports.find({"status": "done"}, {"mismatches": 0})
                  .sort("started_at", DESCENDING).limit(limit))
        docs = [d async for d in cursor]
        docs.reverse()
        return docs


IN_CHUNK_MAX = 64  # large `$in` lists are quadratic on the embedded server; chunks are not
IN_CONCURRENCY = 8


async def find_in(
    collection: AsyncCollection[Any], field: str, values: list[Any],
    projection: Document | None = None,
) -> list[Document]:
    """`{field: {$in: values}}` as bounded concurrent chunks (same answer, any server)."""
    import asyncio

    gate = asyncio.Semaphore(IN_CONCURRENCY)

    async def chunk(part: list[Any]) -> list[Document]:
        async with gate:
            return [d async for d in collection.find({field: {"$in": part}}, projection)]

    parts = [values[i:i + IN_CHUNK_MAX] for i in range(0, len(values), IN_CHUNK_MAX)]
    found = await asyncio.gather(*(chunk(p) for p in parts))
    return [doc for part in found for doc in part]


async def find_keys(
    collection: AsyncCollection[Any], keys: list[str], projection: Document | None = None
) -> dict[str, Document]:
    """Documents whose `_id` is in `keys`: one `_id` range scan when the keys are many (pages
    are contiguous key ranges), chunked `$in` otherwise."""
    if not keys:
        return {}
    wanted = set(keys)
    if len(keys) <= IN_CHUNK_MAX:
        docs = await find_in(collection, "_id", keys, projection)
    else:
        docs = [d async for d in collection.find(
            {"_id": {"$gte": min(keys), "$lte": max(keys)}}, projection)]
    return {d["_id"]: d for d in docs if d["_id"] in wanted}
