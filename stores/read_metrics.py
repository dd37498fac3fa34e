"""Read-path observations (`read_observation_blocks` collection) and their windowed summary.

The read router records one observation per shadow comparison or TigerBeetle-routed read:
which store answered, the outcome, and both durations. The migration workflow's evidence
activity summarises a window of them into gate evidence. Writes are buffered and flushed in
batches, off the answer's critical path, as blocks: one document per scope per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from observability.metrics import READS

log = logging.getLogger(__name__)

READ_OBSERVATIONS = "read_observations"  # one document per observation (before blocks)
READ_OBSERVATION_BLOCKS = "read_observation_blocks"  # one document per scope per flush batch
BUFFER_MAX = 10_000  # observations kept while MongoDB is slow; beyond that, drop the oldest
# Observations per flush batch, so rows per block at most: 1,000 rows with a 300-character
# detail each stay far below BSON's 16 MiB document limit (~0.4 MB), and a summary filters at
# most that many rows outside its range in each block straddling one of its bounds.
FLUSH_BATCH_MAX = 1_000
SUMMARY_LIMIT_MAX = 200_000  # observations read per summary (oldest first)
GLOBAL_SCOPE = "*"

# (at, outcome, tb_ms, mongo_ms) of one observation, as a summary needs it.
Row = tuple[datetime, str, float | None, float | None]


class ReadMode(StrEnum):
    SHADOW = "shadow"  # MongoDB answered; TigerBeetle read and compared in the background
    CUTOVER = "cutover"  # the client is in the rollout: TigerBeetle answers, MongoDB fallback
    PRIMARY = "primary"  # tb_primary / complete: TigerBeetle answers


class ReadOutcome(StrEnum):
    MATCH = "match"
    MISMATCH = "mismatch"
    IN_FLIGHT = "in_flight"  # differs only by operations still travelling to TigerBeetle
    TB_ERROR = "tb_error"  # shadow read of TigerBeetle failed or timed out
    TB_SERVED = "tb_served"
    FALLBACK_ERROR = "fallback_error"  # TigerBeetle failed; MongoDB answered
    FALLBACK_OPEN = "fallback_open"  # circuit open: MongoDB answered without trying


class ReadObservation(BaseModel):
    model_config = ConfigDict(frozen=True)

    scope: str  # the wallet's ledger pair, "USD:USA"
    mode: ReadMode
    outcome: ReadOutcome
    mongo_ms: float | None = Field(default=None, ge=0)
    tb_ms: float | None = Field(default=None, ge=0)
    at: datetime
    wallet: str | None = None
    detail: str | None = Field(default=None, max_length=300)


class ReadSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    counts: dict[str, int] = Field(default_factory=dict)
    tb_p95_ms: float | None = None
    mongo_p95_ms: float | None = None
    tb_mean_ms: float | None = None
    mongo_mean_ms: float | None = None

    def count(self, *outcomes: ReadOutcome) -> int:
        return sum(self.counts.get(o.value, 0) for o in outcomes)

    @property
    def tb_reads(self) -> int:
        return self.count(ReadOutcome.MATCH, ReadOutcome.MISMATCH, ReadOutcome.IN_FLIGHT,
                          ReadOutcome.TB_ERROR, ReadOutcome.TB_SERVED,
                          ReadOutcome.FALLBACK_ERROR)

    @property
    def tb_errors(self) -> int:
        return self.count(ReadOutcome.TB_ERROR, ReadOutcome.FALLBACK_ERROR)

    @property
    def cutover_reads(self) -> int:
        return self.count(ReadOutcome.TB_SERVED, ReadOutcome.FALLBACK_ERROR,
                          ReadOutcome.FALLBACK_OPEN)

    @property
    def fallbacks(self) -> int:
        return self.count(ReadOutcome.FALLBACK_ERROR, ReadOutcome.FALLBACK_OPEN)


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (p95 = fraction 0.95)."""
    if not values:
        return None
    assert 0 < fraction <= 1
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))  # ceil without floats drifting
    return ordered[int(rank) - 1]


def _summarise(rows: list[Row]) -> ReadSummary:
    counts: dict[str, int] = {}
    tb_ms: list[float] = []
    mongo_ms: list[float] = []
    for _, outcome, tb, mongo in rows:
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome in (ReadOutcome.MATCH, ReadOutcome.MISMATCH, ReadOutcome.IN_FLIGHT,
                       ReadOutcome.TB_SERVED) and tb is not None:
            tb_ms.append(tb)
        if mongo is not None:
            mongo_ms.append(mongo)
    return ReadSummary(
        counts=counts, tb_p95_ms=percentile(tb_ms, 0.95),
        mongo_p95_ms=percentile(mongo_ms, 0.95),
        tb_mean_ms=sum(tb_ms) / len(tb_ms) if tb_ms else None,
        mongo_mean_ms=sum(mongo_ms) / len(mongo_ms) if mongo_ms else None,
    )


def _as_utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _bson_time(value: datetime) -> datetime:
    """`value` in UTC, cut to whole milliseconds as BSON stores it: a summary's bounds then
    compare with stored `at` values (filtered here) as MongoDB compares them."""
    value = _as_utc(value)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


class ReadMetricsStore:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._blocks: AsyncCollection[Any] = db[READ_OBSERVATION_BLOCKS]
        self._legacy: AsyncCollection[Any] = db[READ_OBSERVATIONS]
        self._buffer: list[ReadObservation] = []
        self._flush_lock = asyncio.Lock()
        self.dropped = 0

    async def ensure_indexes(self) -> None:
        await self._blocks.create_indexes([
            IndexModel([("last_at", ASCENDING)]),
            IndexModel([("scope", ASCENDING), ("last_at", ASCENDING)]),
        ])
        # The per-observation collection of earlier versions, still read (see summary).
        await self._legacy.create_indexes([
            IndexModel([("at", ASCENDING)]),
            IndexModel([("scope", ASCENDING), ("at", ASCENDING)]),
        ])

    def record(self, obs: ReadObservation) -> None:
        """Buffer one observation (never blocks the read); `flush` writes the buffer. Counted
        for Prometheus too (shadow comparisons, fallbacks, circuit-open answers by scope)."""
        READS.labels(obs.scope, obs.mode.value, obs.outcome.value).inc()
        if len(self._buffer) >= BUFFER_MAX:
            del self._buffer[0]
            self.dropped += 1
        self._buffer.append(obs)

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def flush(self) -> int:
        """Write the buffer as blocks: one document per scope per batch of at most
        FLUSH_BATCH_MAX observations (one document per observation cost the Python MongoDB
        server ~1 ms of CPU per read: a document and two index entries each)."""
        written = 0
        async with self._flush_lock:
            while self._buffer:
                batch = self._buffer[:FLUSH_BATCH_MAX]
                await self._blocks.insert_many(_blocks(batch), ordered=False)
                del self._buffer[: len(batch)]
                written += len(batch)
        return written

    async def run_flusher(self, interval_s: float = 0.5) -> None:
        """Background task: flush every `interval_s` until cancelled (then flush once more)."""
        assert interval_s > 0
        try:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await self.flush()
                except Exception:  # metrics must never take the read path down
                    log.exception("flushing read observations failed")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush())

    async def summary(self, scopes: list[str], since: datetime, *,
                      until: datetime | None = None,
                      limit: int = SUMMARY_LIMIT_MAX) -> ReadSummary:
        """The observations of `scopes` with `at` in [since, until) (no `until`: up to now),
        at most `limit` of them, oldest first.

        Reads the blocks overlapping the range and filters their rows here. Also reads the
        range from `read_observations`, where versions before blocks wrote one document per
        observation: an upgraded deployment may still hold some, and they age out of every
        summary window within minutes (the gate's window is 300 s); once empty, that read is
        one index probe."""
        assert 1 <= limit <= SUMMARY_LIMIT_MAX
        since = _bson_time(since)
        bound = None if until is None else _bson_time(until)
        if bound is not None and bound <= since:
            return _summarise([])
        rows = await self._block_rows(scopes, since, bound, limit)
        rows += await self._legacy_rows(scopes, since, bound, limit)
        rows.sort(key=lambda row: row[0])
        return _summarise(rows[:limit])

    async def observations(self, since: datetime, *, wallet: str | None = None,
                           limit: int = FLUSH_BATCH_MAX) -> list[ReadObservation]:
        """Stored observations with `at` >= `since` (of `wallet`, if given), oldest first, at
        most `limit`: for inspection and tests (summaries read only what they count)."""
        assert 1 <= limit <= SUMMARY_LIMIT_MAX
        since = _bson_time(since)
        query: dict[str, Any] = {"last_at": {"$gte": since}}
        if wallet is not None:
            query["wallet"] = wallet  # a block holding it: its array has the value
        found: list[ReadObservation] = []
        async for block in self._blocks.find(query).sort("first_at", ASCENDING):
            for row in zip(block["at"], block["mode"], block["outcome"], block["tb_ms"],
                           block["mongo_ms"], block["wallet"], block["detail"], strict=True):
                obs = ReadObservation(scope=block["scope"], at=_as_utc(row[0]), mode=row[1],
                                      outcome=row[2], tb_ms=row[3], mongo_ms=row[4],
                                      wallet=row[5], detail=row[6])
                if obs.at >= since and (wallet is None or obs.wallet == wallet):
                    found.append(obs)
        legacy: dict[str, Any] = {"at": {"$gte": since}}
        if wallet is not None:
            legacy["wallet"] = wallet
        async for doc in self._legacy.find(legacy, {"_id": 0}).sort("at", ASCENDING):
            found.append(ReadObservation.model_validate({**doc, "at": _as_utc(doc["at"])}))
        found.sort(key=lambda obs: obs.at)
        return found[:limit]

    async def _block_rows(self, scopes: list[str], since: datetime, until: datetime | None,
                          limit: int) -> list[Row]:
        """Rows of the blocks overlapping [since, until) with `at` in it, the oldest `limit`
        of them (sorted by `at`). Blocks come oldest first: once `limit` rows are held, a
        block starting after the newest held row cannot hold any of the oldest `limit`."""
        query: dict[str, Any] = {"last_at": {"$gte": since}}
        if until is not None:
            query["first_at"] = {"$lt": until}
        if GLOBAL_SCOPE not in scopes:
            query["scope"] = {"$in": scopes}
        # Whole blocks, no projection: SecantusDB's projection of array fields cost it more
        # than sending the unused ones (8,000 observations: 60-100 vs 20-60 ms of its CPU).
        cursor = self._blocks.find(query).sort("first_at", ASCENDING)
        rows: list[Row] = []
        async for block in cursor:
            if len(rows) >= limit and _as_utc(block["first_at"]) > rows[-1][0]:
                break
            for at, outcome, tb, mongo in zip(block["at"], block["outcome"], block["tb_ms"],
                                              block["mongo_ms"], strict=True):
                at = _as_utc(at)
                if since <= at and (until is None or at < until):
                    rows.append((at, outcome, tb, mongo))
            if len(rows) >= limit:
                rows.sort(key=lambda row: row[0])
                del rows[limit:]
        rows.sort(key=lambda row: row[0])
        return rows

    async def _legacy_rows(self, scopes: list[str], since: datetime, until: datetime | None,
                           limit: int) -> list[Row]:
        """Per-observation documents (before blocks) with `at` in [since, until), oldest
        first, at most `limit`."""
        at: dict[str, Any] = {"$gte": since}
        if until is not None:
            at["$lt"] = until
        query: dict[str, Any] = {"at": at}
        if GLOBAL_SCOPE not in scopes:
            query["scope"] = {"$in": scopes}
        cursor = self._legacy.find(
            query, {"at": 1, "outcome": 1, "tb_ms": 1, "mongo_ms": 1, "_id": 0}
        ).sort("at", ASCENDING).limit(limit)
        rows: list[Row] = []
        async for doc in cursor:
            tb, mongo = doc.get("tb_ms"), doc.get("mongo_ms")
            rows.append((_as_utc(doc["at"]), str(doc.get("outcome")),
                         None if tb is None else float(tb),
                         None if mongo is None else float(mongo)))
        return rows


def _blocks(batch: list[ReadObservation]) -> list[dict[str, Any]]:
    """One block document per scope of `batch`: its rows as parallel arrays (one array per
    field, so a block stays one small BSON document without per-row keys)."""
    assert 0 < len(batch) <= FLUSH_BATCH_MAX
    by_scope: dict[str, list[ReadObservation]] = {}
    for obs in batch:
        by_scope.setdefault(obs.scope, []).append(obs)
    blocks: list[dict[str, Any]] = []
    for scope, rows in by_scope.items():
        ats = [_as_utc(obs.at) for obs in rows]
        blocks.append({
            "scope": scope, "first_at": min(ats), "last_at": max(ats), "count": len(rows),
            "at": ats,
            "mode": [obs.mode.value for obs in rows],
            "outcome": [obs.outcome.value for obs in rows],
            "tb_ms": [obs.tb_ms for obs in rows],
            "mongo_ms": [obs.mongo_ms for obs in rows],
            "wallet": [obs.wallet for obs in rows],
            "detail": [obs.detail for obs in rows],
        })
    return blocks


def utc_now() -> datetime:
    return datetime.now(UTC)
