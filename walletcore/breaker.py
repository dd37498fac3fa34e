"""Circuit breaker state machine for the TigerBeetle read path (no I/O, explicit clock).

closed --(failure_threshold consecutive failures)--> open --(open_ms elapsed)--> half_open
half_open lets `half_open_probes` calls through: all succeed -> closed, any fails -> open.
While open, callers skip TigerBeetle and fall back to MongoDB at once instead of waiting for
timeouts on every read.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    failure_threshold: int = Field(default=5, ge=1, le=10_000)
    open_ms: int = Field(default=2_000, ge=1, le=3_600_000)
    half_open_probes: int = Field(default=1, ge=1, le=100)


class CircuitBreaker:
    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened_at_ms = 0
        self.probes_started = 0
        self.probes_succeeded = 0
        self.times_opened = 0

    def allow(self, now_ms: int) -> bool:
        """May a call go to the protected store now? (Counts a half-open probe when it does.)"""
        if self.state == BreakerState.OPEN:
            if now_ms - self.opened_at_ms < self.config.open_ms:
                return False
            self.state = BreakerState.HALF_OPEN
            self.probes_started = 0
            self.probes_succeeded = 0
        if self.state == BreakerState.HALF_OPEN:
            if self.probes_started >= self.config.half_open_probes:
                return False
            self.probes_started += 1
        return True

    def record_success(self, now_ms: int) -> None:
        self.consecutive_failures = 0
        if self.state == BreakerState.HALF_OPEN:
            self.probes_succeeded += 1
            if self.probes_succeeded >= self.config.half_open_probes:
                self.state = BreakerState.CLOSED

    def record_failure(self, now_ms: int) -> None:
        self.consecutive_failures += 1
        if self.state == BreakerState.HALF_OPEN or (
            self.state == BreakerState.CLOSED
            and self.consecutive_failures >= self.config.failure_threshold
        ):
            self._open(now_ms)

    def _open(self, now_ms: int) -> None:
        self.state = BreakerState.OPEN
        self.opened_at_ms = now_ms
        self.times_opened += 1
        assert self.consecutive_failures >= 1
