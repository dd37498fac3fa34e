"""Best-effort Redis JSON cache: a failure is a miss with a log line, never a wrong answer.

Only the registry's immutable records go here, so serving a cached copy is always correct;
every error path falls back to the caller's MongoDB read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as redis_asyncio
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

CACHE_KEY_PREFIX = "walletmig:acct:"
TTL_S_MAX = 7 * 24 * 3600
WARN_INTERVAL_S = 5.0  # at most one warning per interval, so an outage does not flood the log
CALL_TIMEOUT_S = 0.25  # a cache slower than this is worse than reading MongoDB
BYPASS_S = 2.0  # after a failure, skip the cache this long instead of paying timeouts

T = TypeVar("T")


class JsonCache:
    """get/set/delete of text values under a prefix; every Redis failure degrades to a miss."""

    def __init__(
        self,
        client: redis_asyncio.Redis | None,
        *,
        prefix: str,
        ttl_s: int,
        timeout_s: float = CALL_TIMEOUT_S,
        bypass_s: float = BYPASS_S,
    ) -> None:
        assert 0 < ttl_s <= TTL_S_MAX
        assert 0 < timeout_s <= 10 and 0 <= bypass_s <= 300
        self._client = client
        self._prefix = prefix
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._bypass_s = bypass_s
        self._bypass_until = 0.0
        self._warned_at = 0.0
        self.failures = 0  # observability: cache errors absorbed since start

    def key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    async def get(self, name: str) -> str | None:
        value: Any = await self._call("get", name, self._client_get(name))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def set(self, name: str, value: str) -> None:
        if self._client is not None:
            await self._call("set", name, self._client.set(self.key(name), value, ex=self._ttl_s))

    async def delete(self, name: str) -> None:
        if self._client is not None:
            await self._call("delete", name, self._client.delete(self.key(name)))

    async def _client_get(self, name: str) -> Any:
        return None if self._client is None else await self._client.get(self.key(name))

    async def _call(self, action: str, name: str, call: Awaitable[T]) -> T | None:
        """Run one Redis call with a deadline; any failure is absorbed (and logged)."""
        if self._client is None or time.monotonic() < self._bypass_until:
            if asyncio.iscoroutine(call):
                call.close()  # never awaited: close it so Python does not warn
            return None
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call
        except (RedisError, OSError, TimeoutError) as exc:
            self._degraded(action, exc)
            return None

    def _degraded(self, action: str, exc: Exception) -> None:
        self.failures += 1
        now = time.monotonic()
        self._bypass_until = now + self._bypass_s
        if now - self._warned_at >= WARN_INTERVAL_S:
            self._warned_at = now
            log.warning(
                # The entry's name is left out: it holds a wallet key (a client id).
                "registry cache %s failed, reading MongoDB instead (%d failures so far): %r",
                action,
                self.failures,
                exc,
            )
