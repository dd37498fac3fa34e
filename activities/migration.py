"""Activities of the migration workflow: publish state, collect gate evidence, audit, archive.

Evidence sources (each store reads its own documents):
- read observations (ReadMetricsStore): shadow match rate, fallback rate, TB errors, p95s;
- reconciliation reports (ReportStore): the newest finished, full report covering the whole
  scope inside the window (walletcore.gates.choose_report; the gates judge it);
- backfill (LegacyStore vs ImportLedger): every legacy wallet of the scope imported;
- unapplied writes: operations accepted by the answering store since the write path last
  switched direction and not yet in the other one (legacy transactions vs the Transfer
  Registry, minus what the backfill import already counted; the reverse in tb_primary,
  which `complete` also waits for before it archives MongoDB).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bson import json_util
from pymongo.asynchronous.database import AsyncDatabase
from temporalio import activity

from messages.migration import (
    ACTIVITY_ARCHIVE_LEGACY,
    ACTIVITY_AWAIT_REVERSE_DRAIN,
    ACTIVITY_COLLECT_EVIDENCE,
    ACTIVITY_LOAD_STATE,
    ACTIVITY_OBSERVE,
    ACTIVITY_PUBLISH_STATE,
    ACTIVITY_SYNC,
    ACTIVITY_WRITE_AUDIT,
    ArchiveInfo,
    ArchiveRequest,
    AuditEntry,
    EvidenceRequest,
    LoadStateInput,
    Observation,
    PublishStateInput,
    ReverseDrainRequest,
    ReverseDrainResult,
    SyncRequest,
    SyncResult,
)
from mongobase.queries import Created
from observability.metrics import count_auto_rollback, observe_gates
from registries.transfer_registry import TransferRegistry
from stores.audit_log import AuditLog
from stores.backfill_imports import MANY_MAX, ImportLedger, ImportStatus
from stores.history_import import HistoryCheckpoints
from stores.legacy_store import WALLET_TRANSACTIONS, WALLETS, LegacyStore
from stores.migration_state import MigrationStateStore
from stores.read_metrics import ReadMetricsStore
from stores.reports import ReportStore
from walletcore.errors import ConflictError
from walletcore.gates import EVIDENCE_VERSION, Evidence, choose_report
from walletcore.phases import MigrationState, Phase
from walletcore.transitions import ActionKind, gates_for_move, next_position

logger = logging.getLogger(__name__)

# Operations applied this close to the switch may have been answered under the old epoch
# (readers cache the state ~1 s): they are not owed to the other store.
SWITCH_MARGIN_S = 3.0
# An operation is in flight to the other store for a moment after the answering store took it
# (the outbox drainer's or the reverse projection's normal lag, well under a second). Under
# live traffic some are always on their way: at one instant the count is almost never 0 (the
# small demo at ~33 writes/s had 1-12 in flight at each of 246 instants sampled, so the
# dual_write -> shadow_read gate never opened). The gates count only operations older than
# this (stuck ones); the younger rest is waited for where it matters: tb_primary's write
# (drain_first), `complete` (await_reverse_drain), the demo's final wait (no grace).
IN_FLIGHT_GRACE_S = 5.0
UNAPPLIED_SCAN_MAX = 500_000
# The unapplied-writes scan reads `wallet_transactions` by `created_at` (LegacyStore.
# transactions_created) on every evidence round: without the log-order index that is a
# collection scan and an in-memory sort each round on a log of millions. The gate builds the
# index at its first round (ensure_gate_index) in the background: on a large log the build
# outlasts an evidence activity (30 s), so a round waits at most this long for it and scans
# without it meanwhile (as before); a retried createIndexes joins the running build. MongoDB
# (4.2+) builds it beside live writes; SecantusDB holds every write for the build (200,000
# transactions: ~30 s), once per migration (docs/ARCHITECTURE.md, "The unapplied-writes gate
# reads the log through the log-order index": measurements, the per-write cost).
GATE_INDEX_WAIT_S = 5.0
GATE_INDEX_WAIT_S_MAX = 3600.0
LOOKUP_BATCH_MAX = 1000
ARCHIVE_DOCS_MAX = 50_000_000
ARCHIVE_HEARTBEAT_EVERY = 1000
DRAIN_POLL_S = 0.5


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _archive_line(collection: str, doc: dict[str, Any]) -> bytes:
    """One archived document: canonical extended JSON, keys sorted (a stable digest)."""
    encoded = json.loads(json_util.dumps(doc, json_options=json_util.CANONICAL_JSON_OPTIONS))
    return json.dumps({"collection": collection, "doc": encoded}, sort_keys=True).encode() + b"\n"


def _observe_gates(req: EvidenceRequest, evidence: Evidence, now: datetime) -> None:
    """The next step's gates judged as the workflow judges them (the same walletcore rules on
    the same evidence, phase age included) for walletmig_migration_gate_ok: the workflow
    itself cannot export a metric (deterministic, replayed)."""
    if req.position is None or req.thresholds is None:
        return  # a workflow scheduled before it sent them
    if req.position_since is not None:
        age_s = max(0.0, (now - _utc(req.position_since)).total_seconds())
        evidence = evidence.model_copy(update={"phase_age_s": age_s})
    target = next_position(req.position)
    results = ([] if target is None else
               gates_for_move(req.position, target, evidence, req.thresholds))
    observe_gates(req.migration_id, {r.name: r.passed for r in results})


class MigrationActivities:
    """The stores it reads are built over `db` (each owns its collections)."""

    def __init__(
        self, db: AsyncDatabase[Any], migration: MigrationStateStore | None = None
    ) -> None:
        self._migration = migration or MigrationStateStore(db)
        self._audit = AuditLog(db)
        self._metrics = ReadMetricsStore(db)
        self._reports = ReportStore(db)
        self._legacy = LegacyStore(db)
        self._transfers = TransferRegistry(db)
        self._imports = ImportLedger(db)
        self._history = HistoryCheckpoints(db)
        # Per-process cache: creation time up to which every operation is known applied.
        self._applied_watermark: dict[tuple[str, str, str], datetime] = {}
        self._gate_index: asyncio.Task[None] | None = None  # the log-order index's build

    async def ensure_indexes(self) -> None:
        await self._audit.ensure_indexes()
        await self._metrics.ensure_indexes()
        await self._reports.ensure_indexes()

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

    @activity.defn(name=ACTIVITY_SYNC)
    async def sync(self, req: SyncRequest) -> SyncResult:
        """What is published for the scopes and the newest audit entries of the migration:
        a workflow started again after a terminate, or reset to an earlier point, continues
        from these (the next audit seq, the phase every worker follows)."""
        found = [await self._migration.find(scope, fresh=True) for scope in req.scopes]
        tail = await self._audit.list(req.migration_id, limit=req.recent_max)
        return SyncResult(states=[s for s in found if s is not None], audit_tail=tail)

    # ---- audit ----------------------------------------------------------------------------------

    @activity.defn(name=ACTIVITY_WRITE_AUDIT)
    async def write_audit(self, entry: AuditEntry) -> None:
        """Also counts an automatic rollback (walletmig_migration_auto_rollbacks_total) once:
        a retried attempt finding its entry already recorded does not count it again."""
        counts = entry.action == ActionKind.AUTO_ROLLBACK.value
        if counts:
            newest = await self._audit.list(entry.migration_id, limit=1)
            counts = not newest or newest[-1].seq < entry.seq
        await self._audit.record(entry)
        if counts:
            count_auto_rollback(entry.migration_id)

    # ---- evidence -------------------------------------------------------------------------------

    async def ensure_gate_index(self, wait_s: float = GATE_INDEX_WAIT_S) -> bool:
        """Build the log-order index the unapplied-writes scan reads, once per process, in
        the background; wait up to `wait_s` for it. True once it exists. A failed build is
        logged and started again at the next call (the scan works without it, only slower)."""
        assert 0 <= wait_s <= GATE_INDEX_WAIT_S_MAX
        task = self._gate_index
        if task is not None and task.done() and (task.cancelled() or task.exception()):
            logger.warning("building the log-order index failed, retrying: %r",
                           None if task.cancelled() else task.exception())
            task = None
        if task is None:
            task = asyncio.create_task(self._legacy.ensure_log_order_index())
            self._gate_index = task
        if not task.done() and wait_s > 0:
            await asyncio.wait([task], timeout=wait_s)  # a timeout leaves the build running
        return task.done() and not task.cancelled() and task.exception() is None

    @activity.defn(name=ACTIVITY_COLLECT_EVIDENCE)
    async def collect_evidence(self, req: EvidenceRequest) -> Evidence:
        # Every phase but complete: built while the migration is still in legacy, the index
        # is there when dual_write's gate first counts (complete counts nothing any more).
        if req.phase != Phase.COMPLETE:
            await self.ensure_gate_index()
        now = datetime.now(UTC)
        since = _utc(req.since)
        summary = await self._metrics.summary(req.scopes, since)
        recon = await self._reconciliation(req.scopes, now - timedelta(seconds=req.window_s))
        evidence = Evidence(
            evidence_version=EVIDENCE_VERSION,
            collected_at=now,
            window_s=req.window_s,
            backfill_complete=await self._backfill_complete(req.scopes),
            # Only the way out of legacy (into dual_write) is gated on it.
            history_imports_running=await self._history.running_in(req.scopes)
            if req.phase == Phase.LEGACY else 0,
            unapplied_writes=await self.unapplied_writes(
                req.scopes, req.phase, req.write_switch_at, in_flight_grace_s=IN_FLIGHT_GRACE_S
            ),
            **recon,
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
        _observe_gates(req, evidence, now)
        return evidence

    @activity.defn(name=ACTIVITY_OBSERVE)
    async def observe(self, req: EvidenceRequest) -> Observation:
        """The evidence of a round, the newest published epoch of the scopes and the
        migration's last audit seq (the workflow compares them with its own)."""
        evidence = await self.collect_evidence(req)
        found = [await self._migration.find(scope, fresh=True) for scope in req.scopes]
        last = await self._audit.list(req.migration_id, limit=1)
        return Observation(
            evidence=evidence,
            published_epoch=max((s.epoch for s in found if s is not None), default=0),
            last_audit_seq=last[-1].seq if last else 0,
        )

    async def _reconciliation(self, scopes: list[str], since: datetime) -> dict[str, Any]:
        """The report the reconciliation gates judge: the newest finished, full report that
        covers the whole scope and finished inside the window (or why there is none)."""
        chosen, note = choose_report(await self._reports.finished_since(since), scopes, since)
        rate = None if chosen is None else chosen.match_rate
        at = None if chosen is None else chosen.finished_at
        return {"reconciliation": chosen, "reconciliation_note": note,
                "reconciliation_match_rate": rate, "reconciliation_at": at,
                "last_full_reconciliation_match_rate": rate,
                "last_full_reconciliation_at": at}

    async def _backfill_complete(self, scopes: list[str]) -> bool:
        wallets = await self._legacy.count_scope_wallets(scopes)
        return wallets > 0 and await self._imports.count_done_in(scopes) >= wallets

    async def unapplied_writes(
        self, scopes: list[str], phase: Phase, switch_at: datetime | None, *,
        in_flight_grace_s: float = 0.0,
    ) -> int | None:
        """Operations the answering store accepted that the other store does not hold yet;
        dual-writes younger than `in_flight_grace_s` are left out (the gates pass
        IN_FLIGHT_GRACE_S); tb_primary's projections always leave IN_FLIGHT_GRACE_S out."""
        assert in_flight_grace_s >= 0
        if phase == Phase.LEGACY or phase == Phase.COMPLETE:
            return 0
        if switch_at is None:
            return None
        if phase == Phase.TB_PRIMARY:
            # Every operation TigerBeetle answered since the switch is owed to MongoDB: those
            # the old epoch answered came from MongoDB and are there already.
            return await self._count_unapplied(
                scopes, reverse=True, start=_utc(switch_at),
                until=datetime.now(UTC) - timedelta(seconds=IN_FLIGHT_GRACE_S),
            )
        start = _utc(switch_at) + timedelta(seconds=SWITCH_MARGIN_S)
        until = (datetime.now(UTC) - timedelta(seconds=in_flight_grace_s)
                 if in_flight_grace_s > 0 else None)
        return await self._count_unapplied(scopes, reverse=False, start=start, until=until)

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
        until = None if until is None else _utc(until)
        read = self._transfers.created_between if reverse else self._legacy.transactions_created
        created = await read(scopes, start=start, until=until, limit=UNAPPLIED_SCAN_MAX)
        if len(created) >= UNAPPLIED_SCAN_MAX:
            return None  # too many to count here: unknown, the gate stays closed
        held = self._legacy.transactions_held if reverse else self._transfers.held
        missing: list[Created] = []
        for i in range(0, len(created), LOOKUP_BATCH_MAX):
            batch = created[i : i + LOOKUP_BATCH_MAX]
            present = await held([c.id for c in batch])
            missing += [c for c in batch if c.id not in present]
        if missing and not reverse:
            missing = await self._not_in_import(missing)
        # Advance the watermark to just before the oldest still-missing operation.
        if missing:
            oldest = min(c.created_at for c in missing)
            self._applied_watermark[key] = max(start, oldest - timedelta(milliseconds=1))
        elif created:
            self._applied_watermark[key] = created[-1].created_at
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

    async def _not_in_import(self, missing: list[Created]) -> list[Created]:
        """Drop operations the backfill's opening balance already counted (legacy version <=
        the imported version): the backlog skips those by design."""
        wallets = sorted({c.wallet for c in missing})
        versions: dict[str, int] = {}
        for i in range(0, len(wallets), MANY_MAX):
            records = await self._imports.get_many(wallets[i : i + MANY_MAX])
            versions.update((w, r.version) for w, r in records.items()
                            if r.status is ImportStatus.DONE)
        return [c for c in missing
                if c.wallet_version is None or c.wallet_version > versions.get(c.wallet, -1)]

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
        size = 0
        with tmp.open("wb") as out:
            async for name, doc in self._legacy.archive_documents(
                    req.scopes, limit=ARCHIVE_DOCS_MAX):
                line = _archive_line(name, doc)
                out.write(line)
                digest.update(line)
                size += len(line)
                counts[name] += 1
                if counts[name] % ARCHIVE_HEARTBEAT_EVERY == 0:
                    activity.heartbeat(counts)
                    await asyncio.sleep(0)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
        sha = digest.hexdigest()
        path.with_suffix(".sha256").write_text(f"{sha}  {path.name}\n")
        return ArchiveInfo(path=str(path.resolve()), sha256=sha, wallets=counts[WALLETS],
                           transactions=counts[WALLET_TRANSACTIONS], bytes=size)

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.load_state,
            self.publish_state,
            self.collect_evidence,
            self.write_audit,
            self.archive_legacy,
            self.await_reverse_drain,
            self.sync,
            self.observe,
        ]
