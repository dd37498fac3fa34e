"""The outbox drainers' activity: apply pending `wallet_outbox` records to TigerBeetle.

One long-lived, heartbeating activity per shard (workflows.outbox runs it again and again):
each pass reads a page of the shard's pending records in (wallet, wallet_version) order,
applies each wallet's records in that order through the one TigerBeetle apply code
(activities.wallet.TigerBeetleBacklog: registry, voids, opening-balance skips, funds pre-check,
the backfill claim at `since_version`), many wallets at once, then marks them applied. Applying
is idempotent (derived transfer ids, registry by transaction id), so a pass that dies after
TigerBeetle and before the mark is simply applied again by the next one. Nothing here costs
the Temporal server per operation: one activity per shard per RUN_S.

The writer starts the drainers (`DrainerStarter.ensure`, from the write that made a record):
whatever moved a pair to dual_write (the migration workflow, a test, the benchmark), the
records it causes always have a drainer, without a boot step every deployment must remember.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from temporalio import activity
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import CancelledError as TemporalCancelledError

from messages.wallet import (
    ACTIVITY_DRAIN_OUTBOX,
    DRAIN_BATCH_MAX,
    OUTBOX_DRAIN_WORKFLOW,
    ApplyTigerBeetleOutput,
    BacklogItem,
    DrainOutboxInput,
    DrainOutboxOutput,
    OutboxDrainInput,
)
from observability.backlog import backlog_gauges
from stores.outbox import OUTBOX_SHARDS, PAGE_MAX, Outbox, OutboxRecord
from walletcore.keys import WalletKey

log = logging.getLogger(__name__)

WALLETS_IN_FLIGHT = 16  # wallets of one pass applied at once (each wallet in its own order)
# The pause after a pass that found less than a page: records gather into the next pass's
# batch (polling right away cost MongoDB several queries per operation at one caller), and a
# new record waits about this long. It grows to the max while nothing comes (2 polls/s/shard).
IDLE_POLL_MIN_S = 0.05
IDLE_POLL_MAX_S = 0.5
ERROR_PAUSE_S = 1.0  # after an outage (TigerBeetle or MongoDB unreachable): try again
ENSURE_EVERY_S = 30.0  # a process re-checks that a shard's drainer runs at most this often
RUN_S_DEFAULT = 60.0  # one activity attempt drains this long, then the workflow runs another


def drainer_id(task_queue: str, shard: int) -> str:
    """One drainer per (task queue, shard): every wallet worker of a queue shares them."""
    return f"wallet-outbox-drain-{task_queue}-{shard}"


class _Applier(Protocol):
    async def apply(
        self, wallet: WalletKey, items: list[BacklogItem], *, since_version: int | None = None
    ) -> ApplyTigerBeetleOutput: ...


class OutboxDrainer:
    """One pass over a shard's pending records (see the module docstring)."""

    def __init__(self, outbox: Outbox, applier: _Applier) -> None:
        self._outbox = outbox
        self._applier = applier

    async def drain_pass(self, shard: int, beat: Callable[[], None] = lambda: None) -> int:
        records = await self._outbox.pending_page(shard)
        if not records:
            return 0
        by_wallet: dict[str, list[OutboxRecord]] = {}
        for record in records:
            by_wallet.setdefault(record.wallet.canonical, []).append(record)
        gate = asyncio.Semaphore(WALLETS_IN_FLIGHT)

        async def one(wallet_records: list[OutboxRecord]) -> int:
            async with gate:
                return await self._wallet(wallet_records, beat)

        done = await asyncio.gather(*(one(rs) for rs in by_wallet.values()),
                                    return_exceptions=True)
        failures = [d for d in done if isinstance(d, BaseException)]
        if failures:
            raise failures[0]  # the others' marks are kept; this wallet's rest stays pending
        return sum(d for d in done if isinstance(d, int))

    async def _wallet(self, records: list[OutboxRecord], beat: Callable[[], None]) -> int:
        """One wallet's records, in legacy order, a batch at a time; stops at an error (the
        later records must not overtake the failed one)."""
        wallet = records[0].wallet
        versions = [r.wallet_version for r in records]
        assert versions == sorted(versions) and len(set(versions)) == len(versions), versions
        gauges = backlog_gauges()
        applied = 0
        for start in range(0, len(records), DRAIN_BATCH_MAX):
            batch = records[start:start + DRAIN_BATCH_MAX]
            gauges.started("to_tigerbeetle", wallet.canonical, [r.created_at for r in batch])
            out = await self._applier.apply(
                wallet, [r.as_backlog_item() for r in batch], since_version=batch[0].since_version)
            refused = {o.transaction_id: (o.error_type, o.error_message or "")
                       for o in out.outcomes if o.error_type is not None}
            await self._outbox.mark_applied([r.transaction_id for r in batch], refused)
            gauges.applied("to_tigerbeetle", wallet.canonical)
            applied += len(batch)
            beat()
        return applied


class DrainerStarter:
    """Starts a shard's drainer workflow if it is not running (idempotent: USE_EXISTING),
    at most once per ENSURE_EVERY_S per (task queue, shard) in this process."""

    def __init__(self, shards: int = OUTBOX_SHARDS) -> None:
        self._shards = shards
        self._ensured: dict[tuple[str, int], float] = {}

    async def ensure(self, shard: int) -> None:
        assert 0 <= shard < self._shards
        info = activity.info()
        key = (info.task_queue, shard)
        now = time.monotonic()
        last = self._ensured.get(key)
        if last is not None and now - last < ENSURE_EVERY_S:
            return
        try:
            await activity.client().start_workflow(
                OUTBOX_DRAIN_WORKFLOW, OutboxDrainInput(shard=shard, shards=self._shards),
                id=drainer_id(info.task_queue, shard), task_queue=info.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING)
        except (asyncio.CancelledError, TemporalCancelledError):
            raise
        except Exception as err:  # the record is safe in MongoDB; the next write tries again
            log.warning("could not ensure the outbox drainer of shard %d: %s", shard, err)
            return
        self._ensured[key] = now


class OutboxActivities:
    def __init__(self, outbox: Outbox, applier: _Applier) -> None:
        self._outbox = outbox
        self._drainer = OutboxDrainer(outbox, applier)

    @activity.defn(name=ACTIVITY_DRAIN_OUTBOX)
    async def drain_outbox_shard(self, inp: DrainOutboxInput) -> DrainOutboxOutput:
        """Drain the shard for `run_s` (then return: the workflow runs the next attempt), or
        until the worker shuts down. Outages pause and go on: nothing is lost by waiting."""
        assert inp.shard < inp.shards
        deadline = time.monotonic() + inp.run_s
        applied = passes = 0
        idle_s = IDLE_POLL_MIN_S
        shutdown = asyncio.ensure_future(activity.wait_for_worker_shutdown())

        def _beat() -> None:
            activity.heartbeat(applied + passes)

        try:
            while time.monotonic() < deadline and not shutdown.done():
                activity.heartbeat(applied)
                pause = IDLE_POLL_MIN_S
                try:
                    n = await self._drainer.drain_pass(inp.shard, _beat)
                except Exception as err:  # an outage (TigerBeetle, MongoDB): pause, try again
                    log.warning("outbox shard %d: pass failed, retrying: %r", inp.shard, err)
                    n, pause = 0, ERROR_PAUSE_S
                passes += 1
                applied += n
                if n >= PAGE_MAX:
                    continue  # a full page: more are waiting
                if n == 0 and pause < ERROR_PAUSE_S:
                    pause = idle_s
                    idle_s = min(idle_s * 2, IDLE_POLL_MAX_S)
                else:
                    idle_s = IDLE_POLL_MIN_S
                await asyncio.wait([shutdown], timeout=pause)
        finally:
            shutdown.cancel()
        return DrainOutboxOutput(applied=applied, passes=passes)

    def all(self) -> list[Callable[..., Any]]:
        return [self.drain_outbox_shard]
