"""`terminal_reports`: what the credit terminal's sync, reconciliation and rebuilds found.

One collection, three kinds of documents (this store alone touches it):
- `reconcile`: one per terminal reconciliation run (`_id` = run id), the whole
  messages.clearing.TerminalReconcileReport with `ok`, newest by `finished_at`;
- `sync_status`: one document (`_id` "sync-status"): the last sync page's figures (cursor,
  lag, exact or an upper bound, when) plus the posted transfers the sync could never match
  (counted, the oldest kept: it keeps the lag honest while they stay unmatched);
- `ledger_rebuild` / `tigerbeetle_rebuild`: one per rebuild (`_id` = run id), its result.

Reports are evidence, not state: losing them loses history, never money.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel
from pymongo import DESCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from messages.clearing import SyncPageReport, TerminalReconcileReport
from mongobase.mongo import as_utc, now_ms

TERMINAL_REPORTS = "terminal_reports"
SYNC_STATUS_ID = "sync-status"
KIND_RECONCILE = "reconcile"
KIND_SYNC_STATUS = "sync_status"
KIND_LEDGER_REBUILD = "ledger_rebuild"
KIND_TIGERBEETLE_REBUILD = "tigerbeetle_rebuild"
HISTORY_MAX = 1000

Document = dict[str, Any]


class SyncStatus(BaseModel):
    """The sync as its last page left it. `unmatched_total`: posted transfers never matched
    to a transaction (each page that meets one counts it); `oldest_unmatched_ts`: the oldest
    such transfer's TigerBeetle time (0: none)."""

    cursor_timestamp: int = 0
    lag_s: float = 0.0
    lag_exact: bool = True
    exhausted: bool = False
    scanned: int = 0
    new_entries: int = 0
    unmatched_total: int = 0
    oldest_unmatched_ts: int = 0
    measured_at: datetime | None = None


class TerminalReports:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._reports: AsyncCollection[Any] = db[TERMINAL_REPORTS]

    async def ensure_indexes(self) -> None:
        await self._reports.create_indexes([
            IndexModel([("kind", 1), ("finished_at", DESCENDING)], name="kind_finished"),
        ])

    # ---- reconciliation ----------------------------------------------------------------------

    async def save_reconcile(self, report: TerminalReconcileReport) -> None:
        """Idempotent by run id (a retried finish writes the same document again)."""
        await self._save(KIND_RECONCILE, report.run_id, report,
                         {"ok": report.ok, "finished_at": report.finished_at or now_ms()})

    async def latest_reconcile(self) -> TerminalReconcileReport | None:
        doc = await self._latest(KIND_RECONCILE)
        return None if doc is None else TerminalReconcileReport.model_validate(_body(doc))

    async def reconcile_history(self, limit: int) -> list[Document]:
        """Newest first: run id, finished_at, ok (for a history view)."""
        assert 1 <= limit <= HISTORY_MAX
        cursor = self._reports.find(
            {"kind": KIND_RECONCILE}, {"run_id": 1, "finished_at": 1, "ok": 1}
        ).sort("finished_at", DESCENDING).limit(limit)
        return [doc async for doc in cursor]

    # ---- rebuilds ----------------------------------------------------------------------------

    async def save_rebuild(self, kind: str, run_id: str, result: BaseModel, ok: bool) -> None:
        assert kind in (KIND_LEDGER_REBUILD, KIND_TIGERBEETLE_REBUILD)
        await self._save(kind, run_id, result, {"ok": ok, "finished_at": now_ms()})

    async def latest_rebuild(self, kind: str) -> Document | None:
        doc = await self._latest(kind)
        return None if doc is None else _body(doc)

    # ---- the sync's status -------------------------------------------------------------------

    async def save_sync_page(self, page: SyncPageReport) -> None:
        """The last page's figures; unmatched transfers add up and keep the oldest."""
        update: Document = {
            "$set": {
                "kind": KIND_SYNC_STATUS, "cursor_timestamp": page.cursor.timestamp,
                "lag_s": page.lag_s, "lag_exact": page.lag_exact, "exhausted": page.exhausted,
                "scanned": page.scanned, "new_entries": page.new_entries,
                "measured_at": now_ms(), "finished_at": now_ms(),
            },
            "$inc": {"unmatched_total": page.unmatched_count},
        }
        if page.oldest_unmatched_ts:
            update["$min"] = {"oldest_unmatched_ts": page.oldest_unmatched_ts}
        await self._reports.update_one({"_id": SYNC_STATUS_ID}, update, upsert=True)

    async def sync_status(self) -> SyncStatus | None:
        doc = await self._reports.find_one({"_id": SYNC_STATUS_ID})
        if doc is None:
            return None
        fields = {name: doc[name] for name in SyncStatus.model_fields if name in doc}
        if fields.get("measured_at") is not None:
            fields["measured_at"] = as_utc(fields["measured_at"])
        return SyncStatus.model_validate(fields)

    async def clear_unmatched(self) -> None:
        """Forget the unmatched transfers (after a rebuild replayed them from the start)."""
        await self._reports.update_one(
            {"_id": SYNC_STATUS_ID},
            {"$set": {"unmatched_total": 0}, "$unset": {"oldest_unmatched_ts": ""}},
        )

    # ---- documents ---------------------------------------------------------------------------

    async def _save(self, kind: str, run_id: str, body: BaseModel, extra: Document) -> None:
        doc: Document = {"kind": kind, "run_id": run_id, "body": body.model_dump(mode="json"),
                         **extra}
        await self._reports.replace_one({"_id": f"{kind}:{run_id}"}, doc, upsert=True)

    async def _latest(self, kind: str) -> Document | None:
        cursor = self._reports.find({"kind": kind}).sort("finished_at", DESCENDING).limit(1)
        docs: list[Document] = [doc async for doc in cursor]
        return docs[0] if docs else None


def _body(doc: Document) -> Document:
    body = doc.get("body")
    assert isinstance(body, dict), f"report {doc.get('_id')} has no body"
    return body
