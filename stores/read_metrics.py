"""Read-path observations (`read_observations` collection) and their windowed summary.

The read router records one observation per shadow comparison or TigerBeetle-routed read:
which store answered, the outcome, and both durations. The migration workflow's evidence
activity summarises a window of them into gate evidence. Writes are buffered and flushed in
batches, off the answer's critical path.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
# The open-ended summary (the gate evidence's sliding window, every few seconds) keeps what
# it read older than this in process and reads only newer observations next time (see
# ReadMetricsStore.summary): re-reading the whole 300 s window each round cost the demo's
# MongoDB 200-460 ms of CPU per evidence round. Observations are flushed in batches (every
# 0.5 s in the router's processes), so the newest seconds are re-read every time.
SUMMARY_SETTLED_S = 5.0
SUMMARY_WINDOWS_MAX = 16  # cached windows (one per scope list) per store object

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


@dataclass
class _SettledWindow:
    """Observations of one scope list with `at` in [since, until), read before: `rows`
    sorted by `at`. Valid only while MongoDB still counts exactly len(rows) in that range."""

    since: datetime
    until: datetime
    rows: list[Row] = field(default_factory=list)


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
    """`value` in UTC, cut to whole milliseconds as BSON stores it: the kept range's bounds
    then select the same observations in MongoDB as in the kept rows."""
    value = _as_utc(value)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


class ReadMetricsStore:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._collection: AsyncCollection[Any] = db[READ_OBSERVATIONS]
        self._buffer: list[dict[str, Any]] = []
        self._flush_lock = asyncio.Lock()
        self.dropped = 0
        self._settled: dict[str, _SettledWindow] = {}  # scope list key -> what was read
        self.settled_reuses = 0  # observability: summaries that read only the newest part

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
        """The observations of `scopes` with `at` in [since, until) (no `until`: up to now),
        at most `limit` of them.

        Open-ended summaries (the gate evidence's sliding window) read incrementally: the part
        older than SUMMARY_SETTLED_S is kept from the last call with the same scopes and only
        what is newer is read, after MongoDB counts exactly the kept number of observations in
        the kept range (an observation flushed late into it, or a clock behind, changes the
        count and the whole window is read again). The result is the full read's."""
        assert 1 <= limit <= SUMMARY_LIMIT_MAX
        since = _bson_time(since)
        if until is not None:
            return _summarise(await self._rows(scopes, since, _bson_time(until), limit))
        key = ",".join(sorted(scopes))
        settled_until = _bson_time(utc_now() - timedelta(seconds=SUMMARY_SETTLED_S))
        kept = await self._kept(key, scopes, since)
        if kept is None or settled_until <= kept.until:
            settled = _SettledWindow(since, max(since, settled_until),
                                     await self._rows(scopes, since, settled_until, limit))
        else:
            self.settled_reuses += 1
            newer = await self._rows(scopes, kept.until, settled_until, limit)
            settled = _SettledWindow(since, settled_until, kept.rows + newer)
        rows = settled.rows + await self._rows(scopes, settled.until, None, limit)
        if len(rows) >= limit:  # the full read stops at `limit` too: read it that way
            self._settled.pop(key, None)
            return _summarise(await self._rows(scopes, since, None, limit))
        if len(self._settled) >= SUMMARY_WINDOWS_MAX and key not in self._settled:
            self._settled.pop(next(iter(self._settled)))
        self._settled[key] = settled
        return _summarise(rows)

    async def _kept(self, key: str, scopes: list[str], since: datetime
                    ) -> _SettledWindow | None:
        """The kept window of `key` cut to start at `since`, if MongoDB still holds exactly
        its rows in its range; else None (and it is forgotten)."""
        kept = self._settled.get(key)
        if kept is None or since < kept.since or since >= kept.until:
            return None
        rows = kept.rows[bisect.bisect_left(kept.rows, (since,)):]
        held = await self._collection.count_documents(self._query(scopes, since, kept.until))
        if held != len(rows):
            self._settled.pop(key, None)
            return None
        return _SettledWindow(since, kept.until, rows)

    @staticmethod
    def _query(scopes: list[str], since: datetime, until: datetime | None) -> dict[str, Any]:
        at: dict[str, Any] = {"$gte": since}
        if until is not None:
            at["$lt"] = until
        query: dict[str, Any] = {"at": at}
        if GLOBAL_SCOPE not in scopes:
            query["scope"] = {"$in": scopes}
        return query

    async def _rows(self, scopes: list[str], since: datetime, until: datetime | None,
                    limit: int) -> list[Row]:
        """Observations with `at` in [since, until), sorted by `at`, at most `limit`."""
        if until is not None and until <= since:
            return []
        cursor = self._collection.find(
            self._query(scopes, since, until),
            {"at": 1, "outcome": 1, "tb_ms": 1, "mongo_ms": 1, "_id": 0}).limit(limit)
        rows: list[Row] = []
        async for doc in cursor:
            tb, mongo = doc.get("tb_ms"), doc.get("mongo_ms")
            rows.append((_as_utc(doc["at"]), str(doc.get("outcome")),
                         None if tb is None else float(tb),
                         None if mongo is None else float(mongo)))
        rows.sort(key=lambda row: row[0])
        return rows


def utc_now() -> datetime:
    return datetime.now(UTC)
