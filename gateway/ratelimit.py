"""Rate limits per API key and operation class, counted in Redis by the `limits` library.

Each (key, class) has its own budget (`WALLETMIG_API_RATE_LIMIT_MONEY`, `..._READ`), shared
by every gateway process through Redis. Over the budget: 429 with `Retry-After` (seconds
until the window frees a unit) and the `RateLimit-Limit`/`-Remaining`/`-Reset` headers of the
IETF draft. When Redis cannot be asked, the class's fail mode decides: closed (503 naming
redis; the default for money-moving operations, which must never run unmetered) or open (the
request passes and a warning is logged; the default for reads).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis_asyncio
from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter, RateLimiter

from gateway.operations import OperationClass
from gateway.problems import ProblemError, dependency_unavailable

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 1.0  # a limiter that waits longer than this is treated as down
KEY_PREFIX = "walletmig-api-rl"


@dataclass(frozen=True)
class ClassPolicy:
    item: RateLimitItem
    fail_open: bool


class GatewayRateLimiter:
    def __init__(
        self, redis_url: str, *, strategy: str, policies: dict[OperationClass, ClassPolicy]
    ) -> None:
        assert set(policies) == set(OperationClass), "every class needs a policy"
        # Our own pool (short timeouts) so a dead Redis fails fast and `close` releases it.
        self._pool = redis_asyncio.ConnectionPool.from_url(
            redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        pool_option: dict[str, Any] = {"connection_pool": self._pool}
        storage = RedisStorage(
            "async+" + redis_url, implementation="redispy", key_prefix=KEY_PREFIX,
            wrap_exceptions=True, **pool_option,
        )  # fmt: skip
        self._limiter: RateLimiter = (
            MovingWindowRateLimiter(storage)
            if strategy == "moving-window"
            else FixedWindowRateLimiter(storage)
        )
        self._policies = policies
        self.failures = 0  # observability: checks Redis could not answer

    @classmethod
    def from_limits(
        cls, redis_url: str, *, strategy: str, money: str, read: str, money_fail_open: bool,
        read_fail_open: bool,
    ) -> GatewayRateLimiter:  # fmt: skip
        return cls(redis_url, strategy=strategy, policies={
            OperationClass.MONEY: ClassPolicy(parse(money), money_fail_open),
            OperationClass.READ: ClassPolicy(parse(read), read_fail_open),
        })  # fmt: skip

    def policy(self, op_class: OperationClass) -> ClassPolicy:
        return self._policies[op_class]

    async def enforce(self, key_id: str, op_class: OperationClass) -> None:
        """Take one unit of the key's budget for the class, or raise 429 (or 503)."""
        policy = self._policies[op_class]
        # Bounded by the pool's socket timeouts (no asyncio.wait_for: a task per request cost
        # measurable CPU on the read path).
        try:
            if await self._limiter.hit(policy.item, key_id, op_class.value):
                return
            stats = await self._limiter.get_window_stats(policy.item, key_id, op_class.value)
        except Exception as exc:  # the storage's errors (wrapped) and timeouts alike
            self.failures += 1
            if policy.fail_open:
                log.warning("rate limiter unavailable, %s request passes: %r", op_class, exc)
                return
            raise dependency_unavailable(
                "redis", f"the rate limiter cannot count {op_class.value} requests"
            ) from None
        raise self._over_limit(policy.item, stats.reset_time, stats.remaining, op_class)

    @staticmethod
    def _over_limit(
        item: RateLimitItem, reset_time: float, remaining: int, op_class: OperationClass
    ) -> ProblemError:
        reset_s = max(1, math.ceil(reset_time - time.time()))
        window_s = item.get_expiry()
        headers = {
            "Retry-After": str(reset_s),
            "RateLimit-Limit": str(item.amount),
            "RateLimit-Remaining": str(max(0, remaining)),
            "RateLimit-Reset": str(reset_s),
            "RateLimit-Policy": f'{item.amount};w={window_s};comment="{op_class.value}"',
        }
        return ProblemError(
            429, "rate-limited", "Too many requests",
            f"over {item.amount} {op_class.value} requests per {window_s} s for this API key; "
            f"retry in {reset_s} s",
            headers=headers,
        )  # fmt: skip

    async def ping(self) -> None:
        client = redis_asyncio.Redis(connection_pool=self._pool)
        await client.ping()

    async def close(self) -> None:
        await self._pool.aclose()
