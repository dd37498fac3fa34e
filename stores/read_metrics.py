"""Read-path observations (`read_observations` collection) and their windowed summary.

The read router records one observation per shadow comparison or TigerBeetle-routed read:
which store answered, the outcome, and both durations. The migration workflow's evidence
activity summarises a window of them into gate evidence. Writes are buffered and flushed in
batches, off the answer's critical path.
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

READ_OBSERVATIONS = "read_observations"
BUFFER_MAX = 10_000  # observations kept while MongoDB is slow; beyond that, drop the oldest
FLUSH_BATCH_MAX = 1_000
SUMMARY_LIMIT_MAX = 200_000  # observations read per summary (newest first)
GLOBAL_SCOPE = "*"


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


class ReadMetricsStore:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._collection: AsyncCollection[Any] = db[READ_OBSERVATIONS]
        self._buffer: list[dict[str, Any]] = []
        self._flush_lock = asyncio.Lock()
        self.dropped = 0

    async def ensure_indexes(self) -> None:
        await self._collection.create_indexes([
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
        doc = obs.model_dump(mode="python")
        doc["mode"], doc["outcome"] = obs.mode.value, obs.outcome.value
        self._buffer.append(doc)

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def flush(self) -> int:
        written = 0
        async with self._flush_lock:
            while self._buffer:
                batch = self._buffer[:FLUSH_BATCH_MAX]
                await self._collection.insert_many(batch, ordered=False)
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
        assert 1 <= limit <= SUMMARY_LIMIT_MAX
        at: dict[str, Any] = {"$gte": since}
        if until is not None:
            at["$lt"] = until
        query: dict[str, Any] = {"at": at}
        if GLOBAL_SCOPE not in scopes:
            query["scope"] = {"$in": scopes}
        counts: dict[str, int] = {}
        tb_ms: list[float] = []
        mongo_ms: list[float] = []
        cursor = self._collection.find(
            query, {"outcome": 1, "tb_ms": 1, "mongo_ms": 1, "_id": 0}).limit(limit)
        async for doc in cursor:
            outcome = str(doc.get("outcome"))
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome in (ReadOutcome.MATCH, ReadOutcome.MISMATCH, ReadOutcome.IN_FLIGHT,
                           ReadOutcome.TB_SERVED) and doc.get("tb_ms") is not None:
                tb_ms.append(float(doc["tb_ms"]))
            if doc.get("mongo_ms") is not None:
                mongo_ms.append(float(doc["mongo_ms"]))
        return ReadSummary(
            counts=counts, tb_p95_ms=percentile(tb_ms, 0.95),
            mongo_p95_ms=percentile(mongo_ms, 0.95),
            tb_mean_ms=sum(tb_ms) / len(tb_ms) if tb_ms else None,
            mongo_mean_ms=sum(mongo_ms) / len(mongo_ms) if mongo_ms else None,
        )


def utc_now() -> datetime:
    return datetime.now(UTC)
