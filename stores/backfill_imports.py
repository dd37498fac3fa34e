"""`backfill_imports`: one document per wallet imported into TigerBeetle, and the claim that
serializes the import with the wallet's own dual-write backlog.

Why a claim: the backfill imports wallets in batches, while each wallet workflow applies its
backlog to TigerBeetle on its own. Both sides go through this document: whoever inserts it first
(unique `_id` = canonical wallet key) imports the wallet at the legacy `version` recorded in it;
the other side waits for `status == done` and then skips every backlog operation whose legacy
version is <= `version` (it is in the opening balance). A claimer that died leaves a stale claim
that the next one takes over with the SAME version and target, hence the same deterministic
opening transfer ids: a slow-but-alive first claimer then only gets EXISTS.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from mongobase.mongo import PAGE_LIMIT_MAX, as_utc, bson_to_int, insert_new, int_to_bson, now_ms
from mongobase.queries import wallet_key_filter
from walletcore.balances import MinorBalance

BACKFILL_IMPORTS = "backfill_imports"
CLAIM_STALE_S_DEFAULT = 120.0  # a claim older than this without completion is taken over
MANY_MAX = PAGE_LIMIT_MAX  # claims per call: one backfill page at most

Document = dict[str, Any]


class ImportStatus(StrEnum):
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"


class ImportRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    wallet: str  # canonical key
    version: int = Field(ge=0)  # legacy wallet version the opening balance equals
    balance: MinorBalance  # the legacy balance at `version` (the target)
    status: ImportStatus
    claimed_by: str
    claimed_at: datetime
    done_at: datetime | None = None
    error: str | None = None


def _doc_of(rec: ImportRecord) -> Document:
    return {
        "_id": rec.wallet,
        "version": rec.version,
        "credit": int_to_bson(rec.balance.credit_minor),
        "debit": int_to_bson(rec.balance.debit_minor),
        "historical_credit": int_to_bson(rec.balance.historical_credit_minor),
        "status": rec.status.value,
        "claimed_by": rec.claimed_by,
        "claimed_at": rec.claimed_at,
        "done_at": rec.done_at,
        "error": rec.error,
    }


def _record_of(doc: Document) -> ImportRecord:
    return ImportRecord(
        wallet=doc["_id"],
        version=int(doc["version"]),
        balance=MinorBalance(
            credit_minor=bson_to_int(doc["credit"]),
            debit_minor=bson_to_int(doc["debit"]),
            historical_credit_minor=bson_to_int(doc["historical_credit"]),
        ),
        status=ImportStatus(doc["status"]),
        claimed_by=doc["claimed_by"],
        claimed_at=as_utc(doc["claimed_at"]),
        done_at=None if doc.get("done_at") is None else as_utc(doc["done_at"]),
        error=doc.get("error"),
    )


class ImportLedger:
    """The `backfill_imports` collection."""

    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._col: AsyncCollection[Any] = db[BACKFILL_IMPORTS]

    async def ensure_indexes(self) -> None:
        await self._col.create_indexes(
            [IndexModel([("status", ASCENDING), ("claimed_at", ASCENDING)], name="status_at")]
        )

    async def get(self, wallet: str) -> ImportRecord | None:
        doc = await self._col.find_one({"_id": wallet})
        return None if doc is None else _record_of(doc)

    async def get_many(self, wallets: list[str]) -> dict[str, ImportRecord]:
        assert len(wallets) <= MANY_MAX
        if not wallets:
            return {}
        from stores.reports import find_in

        # Key lookups in small `$in` chunks, never an `_id` range: SecantusDB answers a range
        # by scanning the whole collection (quadratic over a backfill), a key by its index.
        wanted = set(wallets)
        return {doc["_id"]: _record_of(doc)
                for doc in await find_in(self._col, "_id", wallets) if doc["_id"] in wanted}

    async def claim_many(self, records: list[ImportRecord]) -> set[str]:
        """Insert claims; returns the wallets whose claim is ours (others already had one)."""
        assert len(records) <= MANY_MAX
        assert all(r.status is ImportStatus.CLAIMED for r in records)
        if not records:
            return set()
        lost = await insert_new(self._col, [_doc_of(r) for r in records])
        return {r.wallet for i, r in enumerate(records) if i not in lost}

    async def take_over(
        self, stale: ImportRecord, claimer: str, *, stale_s: float = CLAIM_STALE_S_DEFAULT
    ) -> bool:
        """Take a stale (or failed) claim, keeping its version and target. True if ours now."""
        now = now_ms()
        if stale.status is ImportStatus.DONE:
            return False
        if stale.status is ImportStatus.CLAIMED and now - stale.claimed_at < timedelta(
            seconds=stale_s
        ):
            return False
        result = await self._col.update_one(
            {"_id": stale.wallet, "claimed_by": stale.claimed_by,
             "claimed_at": stale.claimed_at, "status": stale.status.value},
            {"$set": {"claimed_by": claimer, "claimed_at": now,
                      "status": ImportStatus.CLAIMED.value, "error": None}},
        )
        return result.modified_count == 1

    async def mark_done(self, claimer: str, done: list[str]) -> int:
        """Completes our claims on `done`. One range update (per-document updates are slow on
        the embedded server). Call `mark_failed` first: failed claims in the range then no longer
        match `status: claimed`, and other claimers' claims never match `claimed_by`."""
        assert len(done) <= MANY_MAX
        if not done:
            return 0
        result = await self._col.update_many(
            {"_id": {"$gte": min(done), "$lte": max(done)}, "claimed_by": claimer,
             "status": ImportStatus.CLAIMED.value},
            {"$set": {"status": ImportStatus.DONE.value, "done_at": now_ms()}},
        )
        return result.modified_count

    async def mark_failed(self, claimer: str, failed: dict[str, str]) -> None:
        """Failed claims can be retried at once by anyone (no stale wait)."""
        assert len(failed) <= MANY_MAX
        for wallet, error in failed.items():
            await self._col.update_one(
                {"_id": wallet, "claimed_by": claimer},
                {"$set": {"status": ImportStatus.FAILED.value, "error": error[:500]}},
            )

    async def count(self, *, status: ImportStatus | None = None) -> int:
        query: Document = {} if status is None else {"status": status.value}
        return await self._col.count_documents(query)

    async def count_done_in(self, scopes: list[str]) -> int:
        """Wallets of a migration scope (ledger pairs, or '*') imported to completion."""
        return await self._col.count_documents(
            {"status": ImportStatus.DONE.value, **wallet_key_filter(scopes, "_id")})
