"""The backlog gauges: `walletmig_backlog_items{direction}` and
`walletmig_backlog_oldest_age_seconds{direction}`.

Why here and how: each wallet's backlog lives in its workflow's state (deterministic code, no
metrics there). What a worker process sees is the batches its drain activities are given: the
head of each wallet's backlog. A batch is counted from the moment an activity starts applying
it until an attempt succeeds; a failing attempt (TigerBeetle down, a configuration error)
leaves it counted, so while the TigerBeetle side lags the items stay visible and the oldest
item's age (from its accepted time, computed at scrape time) keeps growing, which is what the
BacklogAgeGrowing alert watches. Items still queued behind a batch are not seen (at most
DRAIN_BATCH_MAX per wallet are): the gauges are a lower bound, exact when the backlog drains.
"""

from __future__ import annotations

import functools
import threading
import time
from datetime import datetime

from observability.metrics import BACKLOG_ITEMS, BACKLOG_OLDEST_AGE_SECONDS

__all__ = ["BACKLOG_DIRECTIONS", "BacklogGauges", "backlog_gauges"]

BACKLOG_DIRECTIONS = ("to_tigerbeetle", "to_mongodb")
WALLETS_TRACKED_MAX = 100_000  # wallets with a batch in flight per process (bounded memory)


class BacklogGauges:
    """Per direction: wallet -> (items, oldest accepted time in unix seconds) of the batch
    being applied or retried. Thread-safe: the gauges are read by the scrape thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, tuple[int, float]]] = {
            direction: {} for direction in BACKLOG_DIRECTIONS}
        for direction in BACKLOG_DIRECTIONS:
            BACKLOG_ITEMS.labels(direction).set_function(
                functools.partial(self.items, direction))
            BACKLOG_OLDEST_AGE_SECONDS.labels(direction).set_function(
                functools.partial(self.oldest_age_s, direction))

    def started(self, direction: str, wallet: str, accepted_at: list[datetime]) -> None:
        """A drain activity starts on a batch (the head of `wallet`'s backlog)."""
        assert direction in BACKLOG_DIRECTIONS, direction
        assert accepted_at, "an empty batch"
        oldest = min(moment.timestamp() for moment in accepted_at)
        with self._lock:
            pending = self._pending[direction]
            if wallet not in pending and len(pending) >= WALLETS_TRACKED_MAX:
                # Bounded: forget the newest-started half rather than grow without limit.
                for key in list(pending)[WALLETS_TRACKED_MAX // 2:]:
                    del pending[key]
            pending[wallet] = (len(accepted_at), oldest)

    def applied(self, direction: str, wallet: str) -> None:
        """The batch is applied: it leaves the backlog (the workflow removes it next)."""
        with self._lock:
            self._pending[direction].pop(wallet, None)

    def items(self, direction: str) -> float:
        with self._lock:
            return float(sum(count for count, _ in self._pending[direction].values()))

    def oldest_age_s(self, direction: str) -> float:
        with self._lock:
            oldest = min((at for _, at in self._pending[direction].values()), default=None)
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)


# Made at import: a worker exports both directions at 0 before its first batch (an absent
# series would read as "no data" on the dashboard, not as an empty backlog).
_GAUGES = BacklogGauges()


def backlog_gauges() -> BacklogGauges:
    """The process's one tracker (the gauges are process-wide, so is what they read)."""
    return _GAUGES
