"""The phase-aware read router: which store answers a balance read, and what gets measured.

- legacy, dual_write: MongoDB answers.
- shadow_read: MongoDB answers; TigerBeetle is read in a background task (off the answer's
  critical path), compared field by field and recorded: match / mismatch / in_flight /
  tb_error, with both durations. A difference that goes away on a short re-check (or that the
  wallet's pending backlog explains) is in flight, not a mismatch (GitHub Scientist style).
- read_cutover p %: clients whose sticky hash bucket is under p % read TigerBeetle, behind a
  circuit breaker and a timeout; on error/timeout (or an open circuit) MongoDB answers and the
  fallback is recorded. Other clients read MongoDB.
- tb_primary: TigerBeetle answers (MongoDB, the reverse projection, is the fallback).
- complete: TigerBeetle only.

This is the one read path (services embed it; so do the workers). Without a metrics store
(a caller that only wants answers, e.g. a one-off CLI read) nothing is recorded and shadow
comparisons are skipped, since nobody would see them. History follows the same routing as the
balance.

MongoDB unreachable (or a read timing out there) answers StoreUnavailableError naming MongoDB,
never a raw pymongo exception: callers retry a typed, retryable error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field
from pymongo.errors import ConnectionFailure, PyMongoError

from observability.metrics import CIRCUIT_BREAKER_OPEN
from stores.migration_state import GLOBAL_SCOPE, MigrationStateStore
from stores.read_metrics import ReadMetricsStore, ReadMode, ReadObservation, ReadOutcome
from walletcore.balances import WalletBalance
from walletcore.breaker import BreakerConfig, BreakerState, CircuitBreaker
from walletcore.errors import NotFoundError, StoreUnavailableError
from walletcore.ids import wallet_log_name
from walletcore.keys import WalletKey
from walletcore.operations import HistoryEntry
from walletcore.phases import MigrationState, Phase
from walletcore.ports import WalletStore
from walletcore.rollout import in_rollout

log = logging.getLogger(__name__)

COMPARED_FIELDS = ("credit", "debit", "historical_credit")
PendingOps = Callable[[WalletKey], Awaitable[int]]
# Loads a ledger pair's account ids for TigerBeetle reads ahead of them
# (registries.account_registry.AccountRegistry.remember_pair).
PrefetchIds = Callable[[str], Awaitable[int]]
PREFETCH_PAIRS_MAX = 1024  # ledger pairs one router prefetches (the ledger table is far smaller)
TB_READ_PHASES = frozenset({Phase.SHADOW_READ, Phase.READ_CUTOVER, Phase.TB_PRIMARY,
                            Phase.COMPLETE})


class ReadPathConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    tb_timeout_ms: int = Field(default=1_000, ge=1, le=60_000)
    shadow_timeout_ms: int = Field(default=2_000, ge=1, le=60_000)
    recheck_delay_ms: int = Field(default=150, ge=0, le=10_000)
    rechecks_max: int = Field(default=3, ge=0, le=20)
    shadow_tasks_max: int = Field(default=256, ge=1, le=100_000)
    rollout_salt: str = ""
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@contextlib.contextmanager
def mongodb_outage_as_unavailable() -> Iterator[None]:
    """MongoDB unreachable or timing out -> StoreUnavailableError("MongoDB: ..."); other
    pymongo errors (a bug, a bad document) stay as they are."""
    try:
        yield
    except PyMongoError as exc:
        if isinstance(exc, ConnectionFailure) or exc.timeout:
            raise StoreUnavailableError(f"MongoDB: {exc}") from exc
        raise


def _retrieved(task: asyncio.Task[tuple[WalletBalance | None, float]]) -> None:
    """A shadow read whose comparison will not run: its outcome is not needed."""
    if not task.cancelled():
        task.exception()


def balance_diffs(mongo: WalletBalance, tb: WalletBalance) -> list[str]:
    return [f"{f}: mongodb {getattr(mongo, f)} tigerbeetle {getattr(tb, f)}"
            for f in COMPARED_FIELDS if getattr(mongo, f) != getattr(tb, f)]


class ReadRouter:
    def __init__(
        self,
        legacy: WalletStore,
        tigerbeetle: WalletStore,
        migration: MigrationStateStore,
        metrics: ReadMetricsStore | None = None,
        *,
        config: ReadPathConfig | None = None,
        pending_ops: PendingOps | None = None,
        prefetch_ids: PrefetchIds | None = None,
    ) -> None:
        """`prefetch_ids(pair)`: run once per ledger pair, in the background, the first time
        the pair's phase reads TigerBeetle: its account ids are then known before the reads
        that need them (one TigerBeetle round trip from a wallet's first read on)."""
        self._legacy = legacy
        self._tb = tigerbeetle
        self._migration = migration
        self._metrics = metrics
        self.config = config or ReadPathConfig()
        self.breaker = CircuitBreaker(self.config.breaker)
        self._publish_breaker()  # exported at 0 from the start: an absent series reads as no data
        self._pending_ops = pending_ops
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self.shadow_skipped = 0
        self._prefetch_ids = prefetch_ids
        self._prefetched: set[str] = set()  # pairs whose prefetch was started
        self._prefetch_tasks: set[asyncio.Task[None]] = set()

    # ---- public API -----------------------------------------------------------------------------

    async def get_balance(self, wallet: WalletKey) -> WalletBalance:
        with mongodb_outage_as_unavailable():
            return await self._get_balance(wallet)

    async def _get_balance(self, wallet: WalletKey) -> WalletBalance:
        state = await self._migration.resolve(wallet.ledger_pair)
        phase = state.phase
        if phase in TB_READ_PHASES:
            self._prefetch(wallet.ledger_pair)
        if phase in (Phase.LEGACY, Phase.DUAL_WRITE):
            return await self._legacy.get_balance(wallet)
        if phase == Phase.SHADOW_READ:
            return await self._shadow(wallet)
        if phase == Phase.READ_CUTOVER:
            if in_rollout(wallet.client_id, state.rollout_percent, self.config.rollout_salt):
                return await self._tb_with_fallback(wallet, ReadMode.CUTOVER)
            return await self._legacy.get_balance(wallet)
        if phase == Phase.TB_PRIMARY:
            return await self._tb_with_fallback(wallet, ReadMode.PRIMARY)
        return await self._tb.get_balance(wallet)

    async def get_multi_balance(self, client_id: str) -> list[WalletBalance]:
        """A client's wallets span pairs: the global scope's state decides (no comparison)."""
        with mongodb_outage_as_unavailable():
            return await self._get_multi_balance(client_id)

    async def _get_multi_balance(self, client_id: str) -> list[WalletBalance]:
        state = await self._migration.get(GLOBAL_SCOPE)
        if self._tb_answers(state, client_id):
            try:
                async with asyncio.timeout(self.config.tb_timeout_ms / 1000):
                    return await self._tb.get_multi_balance(client_id)
            except (TimeoutError, StoreUnavailableError):
                if state.phase == Phase.COMPLETE:
                    raise
        return await self._legacy.get_multi_balance(client_id)

    async def history(self, wallet: WalletKey, limit: int = 50) -> list[HistoryEntry]:
        """The wallet's recent transactions from the store that answers its balance reads
        (MongoDB when TigerBeetle fails, except in complete)."""
        with mongodb_outage_as_unavailable():
            return await self._history(wallet, limit)

    async def _history(self, wallet: WalletKey, limit: int) -> list[HistoryEntry]:
        state = await self._migration.resolve(wallet.ledger_pair)
        if self._tb_answers(state, wallet.client_id):
            try:
                async with asyncio.timeout(self.config.tb_timeout_ms / 1000):
                    return await self._tb.history(wallet, limit)
            except (TimeoutError, StoreUnavailableError):
                if state.phase == Phase.COMPLETE:
                    raise
        return await self._legacy.history(wallet, limit)

    async def drain(self) -> None:
        """Wait for background shadow comparisons and id prefetches (tests, shutdown)."""
        while self._shadow_tasks or self._prefetch_tasks:
            await asyncio.gather(*self._shadow_tasks, *self._prefetch_tasks,
                                 return_exceptions=True)

    def _prefetch(self, pair: str) -> None:
        """Start `prefetch_ids(pair)` once per pair (off the read's path; a failure is logged
        and costs only speed: reads then ask the registry themselves)."""
        if (self._prefetch_ids is None or pair in self._prefetched
                or len(self._prefetched) >= PREFETCH_PAIRS_MAX):
            return
        self._prefetched.add(pair)
        task = asyncio.create_task(self._run_prefetch(self._prefetch_ids, pair))
        self._prefetch_tasks.add(task)
        task.add_done_callback(self._prefetch_tasks.discard)

    @staticmethod
    async def _run_prefetch(prefetch: PrefetchIds, pair: str) -> None:
        try:
            await prefetch(pair)
        except Exception as exc:  # the reads stay correct without it
            log.warning("prefetching TigerBeetle account ids of %s failed: %s", pair,
                        type(exc).__name__)

    def _tb_answers(self, state: MigrationState, client_id: str) -> bool:
        if state.phase in (Phase.TB_PRIMARY, Phase.COMPLETE):
            return True
        return state.phase == Phase.READ_CUTOVER and in_rollout(
            client_id, state.rollout_percent, self.config.rollout_salt)

    # ---- shadow ---------------------------------------------------------------------------------

    async def _shadow(self, wallet: WalletKey) -> WalletBalance:
        """MongoDB answers; TigerBeetle is read in a task started WITH the MongoDB read (the
        comparison waits for both, off the answer's path). Same start instant on both sides:
        started after MongoDB's reply, the TigerBeetle reads were sampled at the moments this
        process was busiest (MongoDB's replies come in bursts after its stalls) and measured
        ~2x the p95 of the same reads answering in read_cutover."""
        if self._metrics is None:
            return await self._legacy.get_balance(wallet)  # nobody would see the comparison
        if len(self._shadow_tasks) >= self.config.shadow_tasks_max:
            self.shadow_skipped += 1  # shed comparisons, never the answer
            return await self._legacy.get_balance(wallet)
        tb_read = asyncio.create_task(self._read_tb_timed(wallet))
        started = time.perf_counter()
        try:
            answer = await self._legacy.get_balance(wallet)
        except BaseException:
            tb_read.add_done_callback(_retrieved)  # no comparison without MongoDB's answer
            raise
        mongo_ms = (time.perf_counter() - started) * 1000
        task = asyncio.create_task(self._compare(wallet, answer, mongo_ms, tb_read))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)
        return answer

    async def _read_tb_timed(self, wallet: WalletKey) -> tuple[WalletBalance | None, float]:
        """The shadow read of TigerBeetle and its duration (None: no account yet, the backlog
        may not have created it)."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.shadow_timeout_ms / 1000):
                tb = await self._tb.get_balance(wallet)  # timed like MongoDB's: no extra task
        except NotFoundError:
            tb = None
        return tb, (time.perf_counter() - started) * 1000

    async def _compare(self, wallet: WalletKey, mongo: WalletBalance, mongo_ms: float,
                       tb_read: asyncio.Task[tuple[WalletBalance | None, float]]) -> None:
        try:
            outcome, tb_ms, detail = await self._compare_once(wallet, mongo, tb_read)
        except Exception as exc:  # a comparison must never surface to anyone
            log.exception("shadow comparison of %s failed", wallet_log_name(wallet))
            outcome, tb_ms, detail = ReadOutcome.TB_ERROR, None, f"compare: {exc}"[:300]
        assert self._metrics is not None, "shadow comparisons run only with a metrics store"
        self._metrics.record(ReadObservation(
            scope=wallet.ledger_pair, mode=ReadMode.SHADOW, outcome=outcome, mongo_ms=mongo_ms,
            tb_ms=tb_ms, at=datetime.now(UTC), wallet=wallet.canonical, detail=detail))

    async def _compare_once(self, wallet: WalletKey, mongo: WalletBalance,
                            tb_read: asyncio.Task[tuple[WalletBalance | None, float]]
                            ) -> tuple[ReadOutcome, float | None, str | None]:
        try:
            tb, tb_ms = await tb_read
        except Exception as exc:
            return ReadOutcome.TB_ERROR, None, f"{type(exc).__name__}: {exc}"[:300]
        if tb is not None and not balance_diffs(mongo, tb):
            return ReadOutcome.MATCH, tb_ms, None
        first = "no TigerBeetle account" if tb is None else "; ".join(balance_diffs(mongo, tb))
        if await self._pending(wallet):
            return ReadOutcome.IN_FLIGHT, tb_ms, first
        # Re-check: a write between the two reads, or one still in the backlog, settles fast.
        # A re-check that still differs asks for pending operations again: under live traffic
        # the wallet's next write may be on its way by then (a demo at load ~15 had one such
        # "mismatch" in 9,532 comparisons, 77.00 still in the outbox; the final check found
        # both stores equal).
        for _ in range(self.config.rechecks_max):
            await asyncio.sleep(self.config.recheck_delay_ms / 1000)
            try:
                again_mongo = await self._legacy.get_balance(wallet)
                async with asyncio.timeout(self.config.shadow_timeout_ms / 1000):
                    again_tb = await self._tb.get_balance(wallet)
            except NotFoundError:
                continue
            except Exception as exc:
                return ReadOutcome.TB_ERROR, tb_ms, f"{type(exc).__name__}: {exc}"[:300]
            if not balance_diffs(again_mongo, again_tb) or await self._pending(wallet):
                return ReadOutcome.IN_FLIGHT, tb_ms, first
        return ReadOutcome.MISMATCH, tb_ms, first[:300]

    async def _pending(self, wallet: WalletKey) -> bool:
        """Whether operations of the wallet are on their way to the other store."""
        return self._pending_ops is not None and await self._pending_ops(wallet) > 0

    # ---- circuit breaker (walletcore.breaker has no I/O: the gauge is published here) --------

    def _publish_breaker(self) -> None:
        """`walletmig_circuit_breaker_open{scope="*"}`: 1 while the breaker is open or half open
        (reads fall back to MongoDB but for the probes), 0 when closed. One breaker guards every
        ledger pair of this router (TigerBeetle is one cluster), so its scope label is the
        global scope: a bounded label set of one value."""
        CIRCUIT_BREAKER_OPEN.labels(GLOBAL_SCOPE).set(
            0 if self.breaker.state == BreakerState.CLOSED else 1)

    def _breaker_allows(self) -> bool:
        before = self.breaker.state
        allowed = self.breaker.allow(_now_ms())
        if self.breaker.state != before:  # open -> half open
            self._publish_breaker()
        return allowed

    def _breaker_result(self, ok: bool) -> None:
        before = self.breaker.state
        if ok:
            self.breaker.record_success(_now_ms())
        else:
            self.breaker.record_failure(_now_ms())
        if self.breaker.state != before:  # closed/half open -> open, half open -> closed
            self._publish_breaker()

    # ---- TigerBeetle with fallback ----------------------------------------------------------

    async def _tb_with_fallback(self, wallet: WalletKey, mode: ReadMode) -> WalletBalance:
        scope = wallet.ledger_pair
        if not self._breaker_allows():
            answer = await self._legacy.get_balance(wallet)
            self._record(scope, mode, ReadOutcome.FALLBACK_OPEN, wallet, detail="circuit open")
            return answer
        started = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: no task per read (wait_for wraps the read in one,
            # a loop iteration and ~0.1 ms of CPU more on the hot path).
            async with asyncio.timeout(self.config.tb_timeout_ms / 1000):
                answer = await self._tb.get_balance(wallet)
        except NotFoundError:
            # Not a health problem of TigerBeetle: MongoDB decides whether the wallet exists.
            self._breaker_result(ok=True)
            answer = await self._legacy.get_balance(wallet)
            self._record(scope, mode, ReadOutcome.FALLBACK_ERROR, wallet,
                         detail="NotFoundError in TigerBeetle")
            return answer
        except Exception as exc:
            self._breaker_result(ok=False)
            log.warning("TigerBeetle read of %s failed (%s): MongoDB answers",
                        wallet_log_name(wallet), exc)
            answer = await self._legacy.get_balance(wallet)
            self._record(scope, mode, ReadOutcome.FALLBACK_ERROR, wallet,
                         detail=f"{type(exc).__name__}: {exc}"[:300])
            return answer
        self._breaker_result(ok=True)
        self._record(scope, mode, ReadOutcome.TB_SERVED, wallet,
                     tb_ms=(time.perf_counter() - started) * 1000)
        return answer

    def _record(self, scope: str, mode: ReadMode, outcome: ReadOutcome, wallet: WalletKey, *,
                tb_ms: float | None = None, detail: str | None = None) -> None:
        if self._metrics is None:
            return
        self._metrics.record(ReadObservation(
            scope=scope, mode=mode, outcome=outcome, tb_ms=tb_ms, at=datetime.now(UTC),
            wallet=wallet.canonical, detail=detail))
