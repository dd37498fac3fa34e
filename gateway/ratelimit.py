"""Rate limits per API key and operation class, counted in Redis by the `limits` library.

Each (key, class) has its own budget (`WALLETMIG_API_RATE_LIMIT_MONEY`, `..._READ`), shared
by every gateway process through Redis. Over the budget: 429 with `Retry-After` (seconds
until the window frees a unit) and the `RateLimit-Limit`/`-Remaining`/`-Reset` headers of the
IETF draft. When Redis cannot be asked, the class's fail mode decides: closed (503 naming
redis; the default for money-moving operations, which must never run unmetered) or open (the
request passes and a warning is logged; the default for reads).

Units taken in batches (fixed window only): a Redis round trip per request cost ~15 % of the
API's CPU on the read path, so a process takes `batch` units of a (key, class) budget at once
(one `INCRBY`+`EXPIRE` script call of the `limits` storage) and spends them locally; requests
that find the batch empty together share one refill. A batch is
1 % of the limit (at most BATCH_MAX, at least 1: a limit under 200 per window is counted unit
by unit, exactly as before) and is dropped one window after it was taken. What that changes,
with P gateway processes serving one key:
- never more than the limit is handed out per Redis window; a process may spend a batch's
  last units up to one window after taking it, so one window can admit at most
  limit + P x (batch - 1) requests (1 % over per process);
- units a process took but did not spend are lost to the others: a key may be refused up to
  P x (batch - 1) requests before its limit (1 % per process).
The moving window stays exact (one Redis call per request).
"""

from __future__ import annotations

import asyncio
import functools
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
BATCH_FRACTION = 0.01  # of the limit, per Redis round trip (see the module docstring)
BATCH_MAX = 64
REFILL_ROUNDS_MAX = 4  # then unit by unit: a request never waits on others' refills forever
LOCAL_ENTRIES_MAX = 10_000  # (key, class) batches held; cleared when full (refilled from Redis)


@dataclass(frozen=True)
class ClassPolicy:
    item: RateLimitItem
    fail_open: bool

    @property
    def batch(self) -> int:
        return max(1, min(BATCH_MAX, int(self.item.amount * BATCH_FRACTION)))


_Slot = tuple[str, OperationClass]  # (API key id, class): one budget


@dataclass
class _Batch:
    """Units of one (key, class) budget taken from Redis, spent here until `until`."""

    left: int
    until: float  # time.monotonic()


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
        self._storage = storage
        self._batched = strategy != "moving-window"
        self._limiter: RateLimiter = (
            FixedWindowRateLimiter(storage) if self._batched else MovingWindowRateLimiter(storage)
        )
        self._policies = policies
        self._batches: dict[_Slot, _Batch] = {}
        self._refills: dict[_Slot, asyncio.Future[int]] = {}
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
        slot = (key_id, op_class)
        if self._batched and self._spend_local(slot):
            return
        # Bounded by the pool's socket timeouts (no asyncio.wait_for: a task per request cost
        # measurable CPU on the read path).
        try:
            if await self._take(policy, slot):
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

    def _spend_local(self, slot: _Slot) -> bool:
        batch = self._batches.get(slot)
        if batch is None or batch.left <= 0 or batch.until <= time.monotonic():
            return False
        batch.left -= 1
        return True

    async def _take(self, policy: ClassPolicy, slot: _Slot) -> bool:
        """One unit for this request: from a batch (fixed window), else unit by unit."""
        key_id, op_class = slot
        if self._batched and policy.batch > 1:
            # Requests that find the batch empty together share one refill (one Redis call,
            # not one each); a request the refill left without a unit waits for the next.
            for _ in range(REFILL_ROUNDS_MAX):
                refill = self._refills.get(slot)
                if refill is None:
                    refill = asyncio.ensure_future(self._refill(policy, slot))
                    self._refills[slot] = refill
                    refill.add_done_callback(functools.partial(self._refilled, slot))
                if await asyncio.shield(refill) == 0:
                    return False  # the window is spent
                if self._spend_local(slot):
                    return True
        # Unit by unit on the same counter (limits < 200 per window, moving window, or a
        # request that lost every refill round to others).
        return await self._limiter.hit(policy.item, key_id, op_class.value)

    async def _refill(self, policy: ClassPolicy, slot: _Slot) -> int:
        """Take up to a batch of units from Redis into the slot's local batch; how many."""
        item, want = policy.item, policy.batch
        # The limits library's own counter (same key and expiry as FixedWindowRateLimiter.hit),
        # so get_window_stats and the 429 headers read it as before.
        count = await self._storage.incr(item.key_for(slot[0], slot[1].value),
                                         item.get_expiry(), amount=want)  # fmt: skip
        granted = max(0, min(want, item.amount - (count - want)))
        assert count - want + granted <= item.amount, "never more than the limit per window"
        if granted > 0:
            if len(self._batches) >= LOCAL_ENTRIES_MAX:
                self._batches.clear()  # bounded; unspent units are lost (under-admission)
            # Replaces an empty or expired batch (refills run only then, one at a time).
            self._batches[slot] = _Batch(left=granted, until=time.monotonic() + item.get_expiry())
        return granted

    def _refilled(self, slot: _Slot, done: asyncio.Future[int]) -> None:
        self._refills.pop(slot, None)
        if not done.cancelled():
            done.exception()  # retrieved here too: every waiter may have been cancelled

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
