"""Activities of the migration workflow: publish state, collect gate evidence, audit, archive.

Evidence sources (all MongoDB, the stores' own collections):
- read observations (stores/read_metrics.py): shadow match rate, fallback rate, TB errors, p95s;
- `reconciliation_reports` (written by the reconciliation workflow): latest and latest full;
- `backfill_imports` vs `wallets`: every legacy wallet of the scope imported;
- unapplied writes: operations accepted by the answering store since the write path last
  switched direction and not yet in the other one (legacy `wallet_transactions` vs the
  Transfer Registry, minus what the backfill import already counted; the reverse in tb_primary,
  which `complete` also waits for before it archives MongoDB).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bson import json_util
from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from temporalio import activity

from messages.migration import (
    ACTIVITY_ARCHIVE_LEGACY,
    ACTIVITY_AWAIT_REVERSE_DRAIN,
    ACTIVITY_COLLECT_EVIDENCE,
    ACTIVITY_LOAD_STATE,
    ACTIVITY_PUBLISH_STATE,
    ACTIVITY_WRITE_AUDIT,
    ArchiveInfo,
    ArchiveRequest,
    AuditEntry,
    EvidenceRequest,
    LoadStateInput,
    PublishStateInput,
    ReverseDrainRequest,
    ReverseDrainResult,
)
from stores.audit_log import AuditLog
from stores.history_import import BACKFILL_HISTORY, HistoryStatus
from stores.migration_state import MigrationStateStore
from stores.read_metrics import ReadMetricsStore
from walletcore.errors import ConflictError
from walletcore.gates import Evidence
from walletcore.phases import MigrationState, Phase

RECONCILIATION_REPORTS = "reconciliation_reports"
BACKFILL_IMPORTS = "backfill_imports"
WALLETS = "wallets"
WALLET_TRANSACTIONS = "wallet_transactions"
TRANSFER_REGISTRY = "transfer_registry"
GLOBAL_SCOPE = "*"
# Operations applied this close to the switch may have been answered under the old epoch
# (readers cache the state ~1 s): they are not owed to the other store.
SWITCH_MARGIN_S = 3.0
# In tb_primary an operation is in flight to MongoDB for a moment after TigerBeetle answered;
# the complete gate counts only projections older than this (stuck ones): `complete` itself
# drains the in-flight rest before it archives (await_reverse_drain). Under live traffic the
# projection backlog is almost never empty at one instant, so counting it all would block.
PROJECTION_GRACE_S = 5.0
UNAPPLIED_SCAN_MAX = 500_000
LOOKUP_BATCH_MAX = 1000
ARCHIVE_DOCS_MAX = 50_000_000
DRAIN_POLL_S = 0.5


def scope_wallet_regex(scope: str) -> str | None:
    """Regex on canonical wallet keys (`client|country|currency|issuer`) for a ledger pair."""
    if scope == GLOBAL_SCOPE:
        return None
    currency, country = scope.split(":")
    return rf"^[^|]*\|{re.escape(country)}\|{re.escape(currency)}\|"


def wallet_filter(scopes: list[str], field: str) -> dict[str, Any]:
    if GLOBAL_SCOPE in scopes:
        return {}
    patterns = [scope_wallet_regex(s) for s in scopes]
    return {"$or": [{field: {"$regex": p}} for p in patterns if p is not None]}


def pair_filter(scopes: list[str]) -> dict[str, Any]:
    """Filter on `wallets` documents (which carry currency and country fields)."""
    if GLOBAL_SCOPE in scopes:
        return {}
    pairs = [s.split(":") for s in scopes]
    return {"$or": [{"currency": cur, "country": cty} for cur, cty in pairs]}


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class MigrationActivities:
    def __init__(
        self,
        db: AsyncDatabase[Any],
        migration: MigrationStateStore | None = None,
        *,
        in_flight_grace_s: float = 0.0,
    ) -> None:
        self._db = db
        self._migration = migration or MigrationStateStore(db)
        self._audit = AuditLog(db)
        self._metrics = ReadMetricsStore(db)
        # Per-process cache: creation time up to which every operation is known applied.
        self._applied_watermark: dict[tuple[str, str, str], datetime] = {}
        self._in_flight_grace_s = in_flight_grace_s

    async def ensure_indexes(self) -> None:
        await self._audit.ensure_indexes()
        await self._metrics.ensure_indexes()

    # ---- state --------------------------------------------------------------------------------

    @activity.defn(name=ACTIVITY_LOAD_STATE)
    async def load_state(self, inp: LoadStateInput) -> list[MigrationState]:
        found = [await self._migration.find(scope) for scope in inp.scopes]
        return [state for state in found if state is not None]

    @activity.defn(name=ACTIVITY_PUBLISH_STATE)
    async def publish_state(self, inp: PublishStateInput) -> None:
        """Idempotent: a retry finding its own epoch already stored is done."""
        for state in inp.states:
            try:
                await self._migration.set(state)
            except ConflictError:
                self._migration.invalidate(state.scope)
                current = await self._migration.find(state.scope)
                if (
                    current is None
                    or current.epoch != state.epoch
                    or (current.phase, current.rollout_percent)
                    != (state.phase, state.rollout_percent)
                ):
                    raise  # someone else published a newer state: never overwrite it

    # ---- audit ----------------------------------------------------------------------------------

    @activity.defn(name=ACTIVITY_WRITE_AUDIT)
    async def write_audit(self, entry: AuditEntry) -> None:
        await self._audit.record(entry)

    # ---- evidence -------------------------------------------------------------------------------

    @activity.defn(name=ACTIVITY_COLLECT_EVIDENCE)
    async def collect_evidence(self, req: EvidenceRequest) -> Evidence:
        now = datetime.now(UTC)
        since = _utc(req.since)
        summary = await self._metrics.summary(req.scopes, since)
        recon = await self._reconciliation(req.scopes, now - timedelta(seconds=req.window_s))
        return Evidence(
            collected_at=now,
            window_s=req.window_s,
            backfill_complete=await self._backfill_complete(req.scopes),
            # Only the way out of legacy (into dual_write) is gated on it.
            history_imports_running=await self._history_imports_running(req.scopes)
            if req.phase == Phase.LEGACY else 0,
            unapplied_writes=await self.unapplied_writes(
                req.scopes, req.phase, req.write_switch_at
            ),
            reconciliation_match_rate=recon["rate"],
            reconciliation_at=recon["at"],
            last_full_reconciliation_match_rate=recon["full_rate"],
            last_full_reconciliation_at=recon["full_at"],
            shadow_matches=summary.counts.get("match", 0),
            shadow_mismatches=summary.counts.get("mismatch", 0),
            shadow_in_flight=summary.counts.get("in_flight", 0),
            tb_reads=summary.tb_reads,
            tb_errors=summary.tb_errors,
            tb_read_p95_ms=summary.tb_p95_ms,
            mongo_read_p95_ms=summary.mongo_p95_ms,
            cutover_reads=summary.cutover_reads,
            cutover_fallbacks=summary.fallbacks,
        )

    async def _reconciliation(self, scopes: list[str], since: datetime) -> dict[str, Any]:
        """Latest report in the window, and the latest full report (any age)."""
        reports = self._db[RECONCILIATION_REPORTS]
        scope_match: dict[str, Any] = {}
        if GLOBAL_SCOPE not in scopes:
            scope_match = {"$or": [{"scope": {"$in": [*scopes, GLOBAL_SCOPE]}}, {"scope": None}]}
        out: dict[str, Any] = {"rate": None, "at": None, "full_rate": None, "full_at": None}
        cursor = (
            reports.find(scope_match)
            .sort([("finished_at", DESCENDING), ("_id", DESCENDING)])
            .limit(50)
        )
        async for doc in cursor:
            if doc.get("status", "done") != "done":
                continue  # still running: its rate is not evidence yet
            at = report_time(doc)
            rate = report_rate(doc)
            if at is None or rate is None:
                continue
            if out["rate"] is None and at >= since:
                out["rate"], out["at"] = rate, at
            if out["full_rate"] is None and report_is_full(doc):
                out["full_rate"], out["full_at"] = rate, at
            if out["rate"] is not None and out["full_rate"] is not None:
                break
        return out

    async def _history_imports_running(self, scopes: list[str]) -> int:
        query: dict[str, Any] = {"status": HistoryStatus.RUNNING.value}
        if GLOBAL_SCOPE not in scopes:
            query["pairs"] = {"$in": scopes}
        return await self._db[BACKFILL_HISTORY].count_documents(query)

    async def _backfill_complete(self, scopes: list[str]) -> bool:
        wallets = await self._db[WALLETS].count_documents(pair_filter(scopes))
        imports = await self._db[BACKFILL_IMPORTS].count_documents(
            {"status": "done", **wallet_filter(scopes, "_id")}
        )
        return wallets > 0 and imports >= wallets

    async def unapplied_writes(
        self, scopes: list[str], phase: Phase, switch_at: datetime | None
    ) -> int | None:
        """Operations the answering store accepted that the other store does not hold yet."""
        if phase == Phase.LEGACY or phase == Phase.COMPLETE:
            return 0
        if switch_at is None:
            return None
        if phase == Phase.TB_PRIMARY:
            # Every operation TigerBeetle answered since the switch is owed to MongoDB: those
            # the old epoch answered came from MongoDB and are there already.
            return await self._count_unapplied(
                scopes, reverse=True, start=_utc(switch_at),
                until=datetime.now(UTC) - timedelta(seconds=PROJECTION_GRACE_S),
            )
        start = _utc(switch_at) + timedelta(seconds=SWITCH_MARGIN_S)
        return await self._count_unapplied(scopes, reverse=False, start=start)

    async def _count_unapplied(
        self, scopes: list[str], *, reverse: bool, start: datetime,
        until: datetime | None = None,
    ) -> int | None:
        """Forward: legacy operations without a Transfer Registry record (minus what the
        backfill import counted). Reverse: Transfer Registry records without a legacy
        operation (the tb_primary reverse projection's backlog). Created in [start, until]."""
        # The watermark only ever passes operations found applied, so it holds for any `until`:
        # keep it out of the key (a moving `until` would otherwise grow the map without bound).
        key = (",".join(sorted(scopes)), start.isoformat(), "rev" if reverse else "fwd")
        start = max(start, self._applied_watermark.get(key, start))
        if reverse:
            source, other, other_key = TRANSFER_REGISTRY, WALLET_TRANSACTIONS, "_id"
        else:
            source, other, other_key = WALLET_TRANSACTIONS, TRANSFER_REGISTRY, "_id"
        created: dict[str, Any] = {"$gte": start}
        if until is not None:
            created["$lte"] = _utc(until)
        cursor = (
            self._db[source]
            .find(
                {"created_at": created, **wallet_filter(scopes, "wallet")},
                {"_id": 1, "wallet": 1, "wallet_version": 1, "created_at": 1},
            )
            .sort("created_at", ASCENDING)
            .limit(UNAPPLIED_SCAN_MAX)
        )
        docs = [doc async for doc in cursor]
        if len(docs) >= UNAPPLIED_SCAN_MAX:
            return None  # too many to count here: unknown, the gate stays closed
        missing: list[dict[str, Any]] = []
        for i in range(0, len(docs), LOOKUP_BATCH_MAX):
            batch = docs[i : i + LOOKUP_BATCH_MAX]
            ids = [d["_id"] for d in batch]
            present = {
                d[other_key]
                async for d in self._db[other].find({other_key: {"$in": ids}}, {other_key: 1})
            }
            missing += [d for d in batch if d["_id"] not in present]
        if missing and not reverse:
            missing = await self._not_in_import(missing)
        # Advance the watermark to just before the oldest still-missing operation.
        if missing:
            oldest = min(_utc(d["created_at"]) for d in missing)
            self._applied_watermark[key] = max(start, oldest - timedelta(milliseconds=1))
        elif docs:
            self._applied_watermark[key] = _utc(docs[-1]["created_at"])
        return len(missing)

    @activity.defn(name=ACTIVITY_AWAIT_REVERSE_DRAIN)
    async def await_reverse_drain(self, req: ReverseDrainRequest) -> ReverseDrainResult:
        """complete: poll until MongoDB holds every operation TigerBeetle answered in
        tb_primary (the wallet workflows keep draining their `to_mongodb` backlogs after the
        switch), or until the deadline (then report what is still missing)."""
        deadline = _utc(req.deadline)
        polls = 0
        while True:
            polls += 1
            unapplied = await self._count_unapplied(
                req.scopes, reverse=True, start=_utc(req.switch_at), until=req.cutoff)
            activity.heartbeat(unapplied)
            if unapplied == 0 or datetime.now(UTC) >= deadline:
                return ReverseDrainResult(unapplied=unapplied, polls=polls)
            await asyncio.sleep(DRAIN_POLL_S)

    async def _not_in_import(self, missing: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Drop operations the backfill's opening balance already counted (legacy version <=
        the imported version): the backlog skips those by design."""
        wallets = list({d["wallet"] for d in missing})
        versions: dict[str, int] = {}
        for i in range(0, len(wallets), LOOKUP_BATCH_MAX):
            async for imp in self._db[BACKFILL_IMPORTS].find(
                {"_id": {"$in": wallets[i : i + LOOKUP_BATCH_MAX]}, "status": "done"},
                {"version": 1},
            ):
                versions[imp["_id"]] = int(imp["version"])
        return [
            d
            for d in missing
            if d.get("wallet_version") is None
            or int(d["wallet_version"]) > versions.get(d["wallet"], -1)
        ]

    # ---- archive ------------------------------------------------------------------------

    @activity.defn(name=ACTIVITY_ARCHIVE_LEGACY)
    async def archive_legacy(self, req: ArchiveRequest) -> ArchiveInfo:
        """Export the scope's legacy wallets and transactions as JSON lines with a SHA-256.

        Deterministic name per migration: a retried attempt rewrites the same file (written to
        a temporary name, then renamed). The collections are kept (read-only by convention)."""
        directory = Path(req.archive_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{req.migration_id}.legacy.jsonl"
        tmp = path.with_suffix(".tmp")
        digest = hashlib.sha256()
        counts = {WALLETS: 0, WALLET_TRANSACTIONS: 0}
        filters: dict[str, dict[str, Any]] = {
            WALLETS: pair_filter(req.scopes),
            WALLET_TRANSACTIONS: wallet_filter(req.scopes, "wallet"),
        }
        size = 0
        with tmp.open("wb") as out:
            for name, query in filters.items():
                cursor = self._db[name].find(query).sort("_id", ASCENDING).limit(ARCHIVE_DOCS_MAX)
                async for doc in cursor:
                    line = (
                        json.dumps(
                            {
                                "collection": name,
                                "doc": json.loads(
                                    json_util.dumps(
                                        doc, json_options=json_util.CANONICAL_JSON_OPTIONS
                                    )
                                ),
                            },
                            sort_keys=True,
                        ).encode()
                        + b"\n"
                    )
                    out.write(line)
                    digest.update(line)
                    size += len(line)
                    counts[name] += 1
                    if counts[name] % 1000 == 0:
                        activity.heartbeat(counts)
                        await asyncio.sleep(0)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
        sha = digest.hexdigest()
        path.with_suffix(".sha256").write_text(f"{sha}  {path.name}\n")
        return ArchiveInfo(
            path=str(path.resolve()),
            sha256=sha,
            wallets=counts[WALLETS],
            transactions=counts[WALLET_TRANSACTIONS],
            bytes=size,
        )

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.load_state,
            self.publish_state,
            self.collect_evidence,
            self.write_audit,
            self.archive_legacy,
            self.await_reverse_drain,
        ]


# ---- reconciliation report fields (tolerant: the reconciliation workflow owns the schema) ------


def report_time(doc: dict[str, Any]) -> datetime | None:
    for field in ("finished_at", "completed_at", "created_at", "at", "started_at"):
        value = doc.get(field)
        if isinstance(value, datetime):
            return _utc(value)
    return None


def report_rate(doc: dict[str, Any]) -> float | None:
    for field in ("match_rate", "matchRate", "rate"):
        value = doc.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool):
            rate = float(value)
            return rate / 100 if rate > 1 else rate
    summary = doc.get("summary")
    if isinstance(summary, dict):
        return report_rate(summary)
    return None


def report_is_full(doc: dict[str, Any]) -> bool:
    """A report is full unless it says it is partial (a sample or a subset of wallets)."""
    if "full" in doc:
        return doc["full"] is True
    kind = doc.get("kind", doc.get("mode"))
    return kind is None or kind in ("full", "complete", "scheduled")
