"""Reconciliation reports, mismatch details and the repair audit log (MongoDB collections).

`reconciliation_reports` has one document per run (what the gates and `reconcile report` read);
`reconciliation_mismatches` holds every real difference of a run (the report embeds the first
few); `reconciliation_audit` records every repair: who, why, before, after, transfers.

A finished report records what the gates need to judge it (walletcore.gates.ReconciliationFacts):
its scope (`pairs`, `covers_all_pairs`), `kind` (check or repair), `full` (every stage ran),
the wallets compared, real and still-in-flight counts, and findings by class (conservation
included). Only this module writes or reads that shape.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pymongo import ASCENDING, DESCENDING, IndexModel, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from messages.reconciliation import Counts, ReconcileSummary
from mongobase.mongo import IN_CHUNK_MAX as IN_CHUNK_MAX  # re-exported (older importers)
from mongobase.mongo import as_utc, now_ms
from mongobase.queries import find_in as find_in  # re-exported (older importers)
from mongobase.queries import find_keys as find_keys
from walletcore.gates import ReconciliationFacts
from walletcore.reconcile import ConservationResult

RECONCILIATION_REPORTS = "reconciliation_reports"
RECONCILIATION_MISMATCHES = "reconciliation_mismatches"
RECONCILIATION_AUDIT = "reconciliation_audit"
EMBEDDED_MISMATCHES_MAX = 100
HISTORY_MAX = 1000
GATE_REPORTS_MAX = 50  # finished reports one evidence collection looks at (newest first)

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


class RunOpened(BaseModel):
    """What a run records when it starts (its report is `running` until it finishes)."""

    model_config = ConfigDict(frozen=True)

    pairs: list[str]
    covers_all_pairs: bool
    kind: str
    full: bool
    actor: str | None = None
    reason: str | None = None


class ReportStore:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._reports: AsyncCollection[Any] = db[RECONCILIATION_REPORTS]
        self._mismatches: AsyncCollection[Any] = db[RECONCILIATION_MISMATCHES]
        self._audit: AsyncCollection[Any] = db[RECONCILIATION_AUDIT]

    async def ensure_indexes(self) -> None:
        await self._reports.create_indexes([
            IndexModel([("started_at", DESCENDING)], name="started_at"),
            IndexModel([("status", ASCENDING), ("finished_at", DESCENDING)],
                       name="status_finished_at"),
        ])
        await self._mismatches.create_indexes(
            [IndexModel([("run_id", ASCENDING), ("kind", ASCENDING)], name="run_kind")]
        )
        await self._audit.create_indexes(
            [IndexModel([("wallet", ASCENDING), ("at", DESCENDING)], name="wallet_at")]
        )

    async def start(self, run_id: str, opened: RunOpened) -> None:
        """Open (or re-open) the run's report. A run id used again (a schedule's fixed id)
        starts from a clean report: the previous run's mismatches are not this run's."""
        await self._mismatches.delete_many({"run_id": run_id})
        await self._reports.replace_one(
            {"_id": run_id},
            {**opened.model_dump(mode="python"), "started_at": now_ms(), "status": "running"},
            upsert=True,
        )

    async def finish(
        self, summary: ReconcileSummary, counts: Counts, *, threshold: float,
        conservation: list[ConservationResult],
    ) -> None:
        """Close the report: the summary's fields (scope, kind, full, wallets, findings by
        class, ...), the running counts, conservation per ledger, the first mismatches."""
        embedded = [
            doc async for doc in self._mismatches.find({"run_id": summary.run_id}, {"_id": 0})
            .limit(EMBEDDED_MISMATCHES_MAX)
        ]
        await self._reports.update_one(
            {"_id": summary.run_id},
            {"$set": {
                **summary.model_dump(mode="python"), "counts": counts.model_dump(mode="python"),
                "threshold": threshold, "alert": bool(summary.alerts),
                "conservation": [c.model_dump(mode="python") for c in conservation],
                "status": "done", "finished_at": now_ms(), "mismatches": embedded,
            }},
            upsert=True,
        )

    async def finished_since(
        self, since: datetime, limit: int = GATE_REPORTS_MAX
    ) -> list[ReconciliationFacts]:
        """Finished reports whose run ended at or after `since`, newest first, as the gates
        read them. Documents without the fields a gate needs (written before they existed, or
        by hand) are not evidence and are left out."""
        assert 0 < limit <= GATE_REPORTS_MAX
        cursor = (self._reports.find({"status": "done", "finished_at": {"$gte": since}},
                                     {"mismatches": 0, "conservation": 0, "counts": 0})
                  .sort("finished_at", DESCENDING).limit(limit))
        found = []
        async for doc in cursor:
            try:
                found.append(ReconciliationFacts(
                    run_id=str(doc["_id"]), finished_at=as_utc(doc["finished_at"]),
                    scope=doc["pairs"], covers_all_pairs=doc["covers_all_pairs"],
                    kind=doc["kind"], full=doc["full"], wallets=doc["wallets"],
                    real=doc["real"], in_flight=doc["in_flight"], findings=doc["findings"],
                    conservation_ok=doc["conservation_ok"]))
            except (KeyError, TypeError, ValidationError):
                continue
        return found

    async def add_mismatches(self, docs: list[MismatchDoc]) -> None:
        """Idempotent per (run, kind, subject): a retried page rewrites the same documents."""
        if not docs:
            return
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
