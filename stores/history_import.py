"""`backfill_history`: the checkpoint of `walletmig backfill start --with-history`, and the
TigerBeetle account helpers that let normal writers live next to `imported` accounts.

One document per scope (`_id` = the sorted pairs joined by '+'): the cut (only legacy
transactions created before it are imported; later ones reach TigerBeetle through the
opening balance's residual), the cursor in (created_at, wallet, wallet_version) order, the
counters and the status. `pages` is the compare-and-swap token of `advance`, so a page retried
after a crash that already advanced the checkpoint cannot advance it twice.

Why the account helper: TigerBeetle stores the `imported` flag on the account, and an
idempotent `create_accounts` of the same account without it answers EXISTS_WITH_DIFFERENT_FLAGS.
Every writer that (re)creates accounts after a history import must treat "differs only by
`imported`" as EXISTS (see `create_accounts_allowing_imported`).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import tigerbeetle as tb
from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from mongobase.mongo import PAGE_LIMIT_MAX, as_utc, now_ms
from stores.legacy_store import HistoryCursor
from stores.tigerbeetle_client import TigerBeetleClient
from walletcore.gates import GLOBAL_SCOPE

BACKFILL_HISTORY = "backfill_history"
FAILED_SAMPLE_MAX = 20

Document = dict[str, Any]


class HistoryStatus(StrEnum):
    RUNNING = "running"
    DONE = "done"


class HistoryCheckpoint(BaseModel):
    model_config = ConfigDict(frozen=True)

    scope: str
    pairs: list[str]
    run_id: str
    cut: datetime  # legacy transactions created at or after the cut are not imported
    status: HistoryStatus = HistoryStatus.RUNNING
    after: HistoryCursor | None = None  # the last legacy transaction a page handled
    pages: int = Field(default=0, ge=0)
    total: int = Field(default=0, ge=0)  # scope transactions before the cut, counted at start
    scanned: int = Field(default=0, ge=0)
    imported: int = Field(default=0, ge=0)  # transfers created by this import
    already: int = Field(default=0, ge=0)  # transfers found in TigerBeetle (a retried page)
    skipped: int = Field(default=0, ge=0)  # no wallet document, void of an unimported original
    failed: int = Field(default=0, ge=0)  # rejected by TigerBeetle: the residual opening holds it
    failed_sample: dict[str, str] = Field(default_factory=dict)
    started_at: datetime
    done_at: datetime | None = None


class PageCounts(BaseModel):
    """What one page adds to the checkpoint's counters."""

    model_config = ConfigDict(frozen=True)

    scanned: int = 0
    imported: int = 0
    already: int = 0
    skipped: int = 0
    failed: dict[str, str] = Field(default_factory=dict)


def scope_of(pairs: list[str]) -> str:
    assert pairs, "a history import needs at least one ledger pair"
    return "+".join(sorted(set(pairs)))


class HistoryCheckpoints:
    """The `backfill_history` collection."""

    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._col: AsyncCollection[Any] = db[BACKFILL_HISTORY]

    async def ensure_indexes(self) -> None:
        await self._col.create_indexes(
            [IndexModel([("pairs", ASCENDING), ("status", ASCENDING)], name="pairs_status")])

    async def get(self, scope: str) -> HistoryCheckpoint | None:
        doc = await self._col.find_one({"_id": scope})
        return None if doc is None else _checkpoint_of(doc)

    async def create(self, checkpoint: HistoryCheckpoint) -> HistoryCheckpoint:
        """Insert; a concurrent creator's document wins and is returned."""
        try:
            await self._col.insert_one(_doc_of(checkpoint))
        except DuplicateKeyError:
            existing = await self.get(checkpoint.scope)
            assert existing is not None
            return existing
        return checkpoint

    async def advance(
        self, checkpoint: HistoryCheckpoint, after: HistoryCursor | None, counts: PageCounts,
        *, done: bool,
    ) -> HistoryCheckpoint | None:
        """Record one page; None if another attempt advanced the checkpoint first."""
        sample = dict(checkpoint.failed_sample)
        for key, error in counts.failed.items():
            if len(sample) >= FAILED_SAMPLE_MAX:
                break
            sample[key] = error[:300]
        updated = checkpoint.model_copy(update={
            "after": after, "pages": checkpoint.pages + 1,
            "scanned": checkpoint.scanned + counts.scanned,
            "imported": checkpoint.imported + counts.imported,
            "already": checkpoint.already + counts.already,
            "skipped": checkpoint.skipped + counts.skipped,
            "failed": checkpoint.failed + len(counts.failed),
            "failed_sample": sample,
            "status": HistoryStatus.DONE if done else HistoryStatus.RUNNING,
            "done_at": now_ms() if done else None,
        })
        doc = _doc_of(updated)
        del doc["_id"]
        result = await self._col.update_one(
            {"_id": checkpoint.scope, "pages": checkpoint.pages,
             "status": HistoryStatus.RUNNING.value},
            {"$set": doc})
        return updated if result.modified_count == 1 else None

    async def done_for(self, pair: str) -> bool:
        """Has a finished history import covered `pair`?"""
        found = await self._col.find_one(
            {"pairs": pair, "status": HistoryStatus.DONE.value}, {"_id": 1})
        return found is not None

    async def running_in(self, scopes: list[str]) -> int:
        """History imports still running on any pair of a migration scope (or any, for '*')."""
        query: Document = {"status": HistoryStatus.RUNNING.value}
        if GLOBAL_SCOPE not in scopes:
            query["pairs"] = {"$in": scopes}
        return await self._col.count_documents(query)


def _doc_of(cp: HistoryCheckpoint) -> Document:
    doc = cp.model_dump(mode="python", exclude={"scope"})
    doc["_id"] = cp.scope
    doc["status"] = cp.status.value
    return doc


def _checkpoint_of(doc: Document) -> HistoryCheckpoint:
    fields = {k: v for k, v in doc.items() if k != "_id"}
    for name in ("cut", "started_at", "done_at"):
        if fields.get(name) is not None:
            fields[name] = as_utc(fields[name])
    if fields.get("after") is not None:
        fields["after"] = {**fields["after"], "created_at": as_utc(fields["after"]["created_at"])}
    return HistoryCheckpoint(scope=doc["_id"], **fields)


# --------------------------------------------------------------------------- accounts

_AS = tb.CreateAccountStatus
IMPORTED_FLAG = int(tb.AccountFlags.IMPORTED)


def exists_status(requested: tb.Account, existing: tb.Account) -> tb.CreateAccountStatus:
    """TigerBeetle's EXISTS* verdict for `requested` against `existing`, except that the
    `imported` flag is ignored (an imported account is the same account)."""
    assert requested.id == existing.id
    if int(requested.flags) & ~IMPORTED_FLAG != int(existing.flags) & ~IMPORTED_FLAG:
        return _AS.EXISTS_WITH_DIFFERENT_FLAGS
    for name, status in (("user_data_128", _AS.EXISTS_WITH_DIFFERENT_USER_DATA_128),
                         ("user_data_64", _AS.EXISTS_WITH_DIFFERENT_USER_DATA_64),
                         ("user_data_32", _AS.EXISTS_WITH_DIFFERENT_USER_DATA_32),
                         ("ledger", _AS.EXISTS_WITH_DIFFERENT_LEDGER),
                         ("code", _AS.EXISTS_WITH_DIFFERENT_CODE)):
        if getattr(requested, name) != getattr(existing, name):
            return status
    return _AS.EXISTS


async def create_accounts_allowing_imported(
    client: TigerBeetleClient, accounts: list[tb.Account]
) -> list[tb.CreateAccountStatus]:
    """`create_accounts` whose EXISTS_WITH_DIFFERENT_FLAGS becomes EXISTS when the stored
    account differs only by the `imported` flag (created by a history import). One extra
    lookup, only when TigerBeetle reported that status. `client`: cut to the cluster's request
    limit (stores.tb_batches), so any page of accounts fits."""
    assert len(accounts) <= PAGE_LIMIT_MAX
    if not accounts:
        return []
    results = await client.create_accounts(accounts)
    assert len(results) == len(accounts)
    statuses = [r.status for r in results]
    differ = [i for i, s in enumerate(statuses) if s is _AS.EXISTS_WITH_DIFFERENT_FLAGS]
    if differ:
        found = {a.id: a for a in await client.lookup_accounts([accounts[i].id for i in differ])}
        for i in differ:
            existing = found.get(accounts[i].id)
            if existing is not None:
                statuses[i] = exists_status(accounts[i], existing)
    return statuses


def checkpoint_started(scope: str, pairs: list[str], run_id: str, cut: datetime,
                       total: int) -> HistoryCheckpoint:
    return HistoryCheckpoint(scope=scope, pairs=sorted(set(pairs)), run_id=run_id, cut=cut,
                             total=total, started_at=now_ms())
