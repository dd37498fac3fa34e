"""The outbox drainers' activity: apply pending `wallet_outbox` records to TigerBeetle.

One long-lived, heartbeating activity per shard (workflows.outbox runs it again and again):
each pass reads a page of the shard's pending records in (wallet, wallet_version) order. The
common ones (credits and debits of imported, registered wallets) of MANY wallets go in one
batch (OutboxBatcher: one create_transfers request cut at the cluster's limit, each wallet's in
order inside it, one registry write, one mark); from a wallet's first record the batch cannot
take, its records go through the one per-record TigerBeetle apply code
(activities.wallet.TigerBeetleBacklog: registry, voids, opening-balance skips, funds pre-check,
the backfill claim at `since_version`), many wallets at once, then are marked applied. Applying
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
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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
from mongobase.mongo import PAGE_LIMIT_MAX
from observability.backlog import backlog_gauges
from observability.metrics import observe_store_batch
from registries.account_registry import AccountRecord
from registries.transfer_registry import TransferRecord
from stores.outbox import (
    OUTBOX_SHARDS,
    PAGE_MAX,
    TO_MONGODB,
    TO_TIGERBEETLE,
    Outbox,
    OutboxRecord,
)
from stores.tigerbeetle_store import STORE_NAME, BatchedMovement, TigerBeetleStore
from walletcore.errors import WalletError
from walletcore.ids import transfer_id, wallet_log_name
from walletcore.keys import WalletKey
from walletcore.operations import (
    AddCredit,
    OperationType,
    SubtractCredit,
    Void,
    validate_operation,
)

log = logging.getLogger(__name__)

WALLETS_IN_FLIGHT = 16  # wallets of one pass applied at once (each wallet in its own order)
# Polls cost MongoDB CPU (a page query ~0.5 ms on SecantusDB even when empty, plus the pass's
# account and registry reads and its mark), so a drain loop queries when it has a reason to:
# - every IDLE_POLL_S, each direction (other processes' records, and this process's
#   dual-write records: a pass then takes ~0.5 s of them, ~20 at 40 writes/s, where the 50 ms
#   re-polls took ~2; no answer waits for them, a switch to tb_primary up to IDLE_POLL_S more);
# - a tb_primary write of this process rang its bell (DrainerStarter.ensure after the
#   TigerBeetle write, ShardWakeups) and noted its intent (Outbox.written_since): the reverse
#   direction GATHER_S later, so one pass takes the burst;
# - a full page: the next one at once.
GATHER_S = 0.2
IDLE_POLL_S = 0.5
# An intent noted this long before a pass may have its TigerBeetle write only after it: its
# direction stays due (when the bell rings) until then.
COMMIT_SLACK_S = 1.0
ERROR_PAUSE_S = 1.0  # after an outage (TigerBeetle or MongoDB unreachable): try again
ENSURE_EVERY_S = 30.0  # a process re-checks that a shard's drainer runs at most this often
# The batched fast path (OutboxBatcher) is on unless `WALLETMIG_OUTBOX_BATCHED=off`: off, every
# record goes the per-record path, as before it existed (per process, read at import; the
# benchmarks' before/after runs).
BATCHED_DEFAULT = os.environ.get("WALLETMIG_OUTBOX_BATCHED", "on").lower() != "off"
RUN_S_DEFAULT = 60.0  # one activity attempt drains this long, then the workflow runs another


def drainer_id(task_queue: str, shard: int) -> str:
    """One drainer per (task queue, shard): every wallet worker of a queue shares them."""
    return f"wallet-outbox-drain-{task_queue}-{shard}"


class _Applier(Protocol):
    async def apply(
        self, wallet: WalletKey, items: list[BacklogItem], *, since_version: int | None = None
    ) -> ApplyTigerBeetleOutput: ...


class _Imported(Protocol):
    async def ensure(self, wallet: WalletKey, *, record_absent: bool = False,
                     since_version: int | None = None) -> int: ...


@dataclass
class _Plan:
    """One wallet's records of a pass, split: `done` need nothing from TigerBeetle (inside
    the opening balance, or registered already: a re-run), `moves` go in the batch, `rest`
    (from the first record the batch cannot take, in order) to the per-record path."""

    done: list[OutboxRecord] = field(default_factory=list)
    moves: list[tuple[OutboxRecord, BatchedMovement]] = field(default_factory=list)
    rest: list[OutboxRecord] = field(default_factory=list)
    registered: list[OperationType] = field(default_factory=list)  # of `done`: a dead run's


def _movement(record: OutboxRecord, account: AccountRecord) -> BatchedMovement | None:
    """The record as a batched credit or debit, or None (a void, an invalid amount)."""
    op = record.command.op
    if isinstance(op, Void) or not isinstance(op, AddCredit):
        return None
    kind = OperationType.DEBIT if isinstance(op, SubtractCredit) else OperationType.CREDIT
    try:
        validate_operation(op)
    except WalletError:
        return None
    return BatchedMovement(op=op, kind=kind, account=account)


def _registered_same(known: TransferRecord, move: BatchedMovement) -> bool:
    """The registry holds this very movement (written after TigerBeetle: it is applied)."""
    return (known.wallet == move.op.wallet and known.type == move.kind.value
            and known.amount_minor == validate_operation(move.op)
            and known.transfer_id == transfer_id(move.op.transaction_id))


class OutboxBatcher:
    """The fast path of a pass: the common records of MANY wallets in one create_transfers
    request (stores.tb_batches cuts it at the cluster's request limit), each wallet's in its
    legacy order inside it (TigerBeetle applies a request's events in order), registered in
    one Transfer Registry write, marked in one update. Taken: credits and debits past the
    wallet's imported version on a registered account, up to the wallet's first record it
    cannot take (a void, an unregistered wallet, a debit the funds pre-check refuses, any
    result other than created/EXISTS); that record and the wallet's later ones of the pass go
    the per-record path (TigerBeetleBacklog), after the batch, so each wallet keeps its order.

    Funds: a debit of a wallet without overdraft that TigerBeetle refuses (EXCEEDS_CREDITS)
    burns its id, so every such debit is checked first against one lookup of the accounts,
    counting the earlier movements of the same wallet in the batch. Cheap bound first (the
    batch's debits only, no credits); if it does not hold, the wallet's transfers TigerBeetle
    already holds (a re-run after a crash: already in the balance) are looked up and left out
    of the count. A debit still short goes the per-record path with the wallets' rest."""

    def __init__(self, outbox: Outbox, tigerbeetle: TigerBeetleStore, imported: _Imported) -> None:
        self._outbox = outbox
        self._tigerbeetle = tigerbeetle
        self._imported = imported

    async def apply(
        self, by_wallet: dict[str, list[OutboxRecord]], beat: Callable[[], None] = lambda: None
    ) -> tuple[int, dict[str, list[OutboxRecord]]]:
        """(records applied and marked, each wallet's rest for the per-record path)."""
        plans = await self._plans(by_wallet, beat)
        await self._funds_check(plans)
        moves = [move for plan in plans.values() for _, move in plan.moves]
        started = time.perf_counter()
        ok = await self._tigerbeetle.create_movements(moves) if moves else []
        elapsed_s = time.perf_counter() - started
        beat()
        created: dict[OperationType, int] = dict.fromkeys(OperationType, 0)
        cursor = 0
        for plan in plans.values():
            taken = ok[cursor:cursor + len(plan.moves)]
            cursor += len(plan.moves)
            cut = taken.index(False) if False in taken else len(taken)
            for _, move in plan.moves[:cut]:
                created[move.kind] += 1
            plan.done.extend(record for record, _ in plan.moves[:cut])
            plan.rest[:0] = [record for record, _ in plan.moves[cut:]]
            plan.moves = []
        assert cursor == len(moves)
        # Counted when TigerBeetle and the registry hold them, before the mark (as the
        # per-record path's replicate counts): a reader seeing them marked sees them counted.
        _observe(created, [kind for p in plans.values() for kind in p.registered], elapsed_s)
        done = [r.transaction_id for plan in plans.values() for r in plan.done]
        await self._outbox.mark_applied(done)
        rest = {w: plan.rest for w, plan in plans.items() if plan.rest}
        assert len(done) + sum(len(rs) for rs in rest.values()) == sum(
            len(rs) for rs in by_wallet.values())
        return len(done), rest

    async def _imported_versions(
        self, by_wallet: dict[str, list[OutboxRecord]], beat: Callable[[], None]
    ) -> dict[str, int | None]:
        """Each wallet's imported version, importing the ones not imported yet (the same
        import claim as the per-record path, at the first record's since_version), a
        heartbeat after each (many fresh imports outlast the heartbeat timeout). None: the
        import failed; the per-record path takes the wallet's records (and says why) without
        stopping the batch of the others."""
        gate = asyncio.Semaphore(WALLETS_IN_FLIGHT)

        async def imported_of(records: list[OutboxRecord]) -> int | None:
            async with gate:
                try:
                    return await self._imported.ensure(
                        records[0].wallet, since_version=records[0].since_version)
                except (asyncio.CancelledError, TemporalCancelledError):
                    raise
                except Exception as err:  # the per-record path raises it (and the pass retries)
                    log.info("outbox: import of %s left to the per-record path: %r",
                             wallet_log_name(records[0].wallet), err)
                    return None
                finally:
                    beat()

        versions = await asyncio.gather(*(imported_of(rs) for rs in by_wallet.values()))
        return dict(zip(by_wallet, versions, strict=True))

    async def _plans(
        self, by_wallet: dict[str, list[OutboxRecord]], beat: Callable[[], None]
    ) -> dict[str, _Plan]:
        """Each wallet's split before the funds check (see _Plan)."""
        imported = await self._imported_versions(by_wallet, beat)
        accounts = await self._tigerbeetle.batch_accounts(
            [rs[0].wallet for w, rs in by_wallet.items() if imported[w] is not None])
        wanted = [r.transaction_id for w, rs in by_wallet.items() if w in accounts
                  for r in rs if r.wallet_version > (imported[w] or 0)]
        known: dict[str, TransferRecord] = {}
        for start in range(0, len(wanted), PAGE_LIMIT_MAX):
            known.update(await self._tigerbeetle.transfers.get_many(
                wanted[start:start + PAGE_LIMIT_MAX]))
        plans: dict[str, _Plan] = {}
        for canonical, records in by_wallet.items():
            plan = plans[canonical] = _Plan()
            version = imported[canonical]
            if version is None:
                plan.rest = records
                continue
            account = accounts.get(canonical)
            for index, record in enumerate(records):
                if record.wallet_version <= version:
                    plan.done.append(record)  # in the opening balance (as the slow path)
                    continue
                move = _movement(record, account) if account is not None else None
                registered = known.get(record.transaction_id)
                same = (move is not None and registered is not None
                        and _registered_same(registered, move))
                if same and not plan.moves:
                    assert move is not None
                    plan.done.append(record)  # applied and registered by a run that died
                    plan.registered.append(move.kind)
                    continue
                if move is None or (registered is not None and not same):
                    plan.rest = records[index:]
                    break
                plan.moves.append((record, move))
        return plans

    async def _funds_check(self, plans: dict[str, _Plan]) -> None:
        """Cut each wallet's moves at its first debit the balance may not cover (see the
        class docstring): only debits of accounts without overdraft are checked."""
        checked = [p for p in plans.values()
                   if p.moves and not p.moves[0][1].account.allow_overdraft
                   and any(m.kind is OperationType.DEBIT for _, m in p.moves)]
        if not checked:
            return
        spendable = await self._tigerbeetle.spendable_minor(
            [p.moves[0][1].account for p in checked])
        unsure = [p for p in checked if not _covers(p, spendable, count_credits=False)]
        held: set[int] = set()
        if unsure:
            ids = [transfer_id(r.transaction_id) for p in unsure for r, _ in p.moves]
            held = await self._tigerbeetle.existing_transfers(ids)
        for plan in unsure:
            _cut_at_shortfall(plan, spendable, held)


def _observe(created: dict[OperationType, int], registered: list[OperationType],
             elapsed_s: float) -> None:
    """The store series the per-record path feeds through TigerBeetleStore.replicate
    (walletmig_wallet_operations_total, walletmig_store_operation_seconds): each movement
    the batch created (or found: EXISTS) `ok`, a record a dead run had applied and registered
    `replayed` (the per-record path answers it as a replay), each at the batch's time."""
    for kind, count in created.items():
        observe_store_batch(STORE_NAME, kind.value, ok=count,
                            replayed=registered.count(kind), seconds=elapsed_s)


def _covers(plan: _Plan, spendable: dict[int, int], *, count_credits: bool) -> bool:
    """Every debit of the plan covered, counting the batch's earlier debits (and credits if
    `count_credits`: only valid when none of them is in TigerBeetle already)."""
    account = plan.moves[0][1].account
    available = spendable.get(account.account_id)
    if available is None:
        return False
    for _, move in plan.moves:
        amount = validate_operation(move.op)
        if move.kind is OperationType.CREDIT:
            available += amount if count_credits else 0
        elif available < amount:
            return False
        else:
            available -= amount
    return True


def _cut_at_shortfall(plan: _Plan, spendable: dict[int, int], held: set[int]) -> None:
    """Move the plan's first uncovered debit and everything after it to `rest`. A transfer
    TigerBeetle holds already is in `spendable` (a re-run): it is not counted again."""
    available = spendable.get(plan.moves[0][1].account.account_id)
    cut = 0 if available is None else len(plan.moves)
    for index, (record, move) in enumerate(plan.moves if available is not None else []):
        assert available is not None
        amount = validate_operation(move.op)
        if transfer_id(record.transaction_id) in held:
            continue
        if move.kind is OperationType.CREDIT:
            available += amount
        elif available < amount:
            cut = index
            break
        else:
            available -= amount
    plan.rest[:0] = [r for r, _ in plan.moves[cut:]]
    plan.moves = plan.moves[:cut]


class OutboxDrainer:
    """One pass over a shard's pending records (see the module docstring). `batcher`: the
    fast path (OutboxBatcher) tried first; None: every record goes the per-record path."""

    def __init__(
        self, outbox: Outbox, applier: _Applier, batcher: OutboxBatcher | None = None
    ) -> None:
        self._outbox = outbox
        self._applier = applier
        self._batcher = batcher

    async def drain_pass(self, shard: int, beat: Callable[[], None] = lambda: None) -> int:
        records = await self._outbox.pending_page(shard)
        if not records:
            return 0
        by_wallet: dict[str, list[OutboxRecord]] = {}
        for record in records:
            by_wallet.setdefault(record.wallet.canonical, []).append(record)
        batched = 0
        if self._batcher is not None:
            # The backlog gauges (observability.backlog) count what a drain holds from the
            # moment it starts on it until it is applied; a pass that fails leaves its
            # wallets counted (the age keeps growing: the BacklogAgeGrowing alert).
            gauges = backlog_gauges()
            for canonical, wallet_records in by_wallet.items():
                gauges.started(TO_TIGERBEETLE, canonical, [r.created_at for r in wallet_records])
            batched, rest = await self._batcher.apply(by_wallet, beat)
            for canonical in by_wallet.keys() - rest.keys():
                gauges.applied(TO_TIGERBEETLE, canonical)
            by_wallet = rest
        if not by_wallet:
            return batched
        gate = asyncio.Semaphore(WALLETS_IN_FLIGHT)

        async def one(wallet_records: list[OutboxRecord]) -> int:
            async with gate:
                return await self._wallet(wallet_records, beat)

        done = await asyncio.gather(*(one(rs) for rs in by_wallet.values()),
                                    return_exceptions=True)
        failures = [d for d in done if isinstance(d, BaseException)]
        if failures:
            raise failures[0]  # the others' marks are kept; this wallet's rest stays pending
        return batched + sum(d for d in done if isinstance(d, int))

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
            gauges.started(TO_TIGERBEETLE, wallet.canonical, [r.created_at for r in batch])
            out = await self._applier.apply(
                wallet, [r.as_backlog_item() for r in batch], since_version=batch[0].since_version)
            refused = {o.transaction_id: (o.error_type, o.error_message or "")
                       for o in out.outcomes if o.error_type is not None}
            await self._outbox.mark_applied([r.transaction_id for r in batch], refused)
            gauges.applied(TO_TIGERBEETLE, wallet.canonical)
            applied += len(batch)
            beat()
        return applied


class _Bell:
    """One drain loop's wake-up: rung by every write of its shard in this process (kept until
    the loop takes it), and the future its idle wait is on (if it waits)."""

    def __init__(self) -> None:
        self.rung = False
        self.waiter: asyncio.Future[None] | None = None

    def ring(self) -> None:
        self.rung = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def take(self) -> bool:
        rung, self.rung = self.rung, False
        return rung


class ShardWakeups:
    """Process-local wake-ups of the drain loops: a write path that has just written a
    shard's record (DrainerStarter.ensure: after the commit, or after the TigerBeetle write)
    rings the bell of every drain loop of that shard running in this process, instead of the
    record waiting for the loop's next poll. A hint only: the polls still find every record.
    Bells of another event loop (tests run many) are left alone."""

    def __init__(self) -> None:
        self._bells: dict[int, list[_Bell]] = {}

    def notify(self, shard: int) -> None:
        loop = asyncio.get_running_loop()
        for bell in self._bells.get(shard, ()):
            if bell.waiter is None or bell.waiter.get_loop() is loop:
                bell.ring()

    def register(self, shard: int) -> _Bell:
        bell = _Bell()
        self._bells.setdefault(shard, []).append(bell)
        return bell

    def unregister(self, shard: int, bell: _Bell) -> None:
        self._bells[shard].remove(bell)

    @staticmethod
    async def wait(bell: _Bell, timeout_s: float, stop: asyncio.Future[Any]) -> bool:
        """Until the bell rings (at once if it rang since its last take), `stop` is done or
        `timeout_s` passed: True if it rang (taken)."""
        assert timeout_s > 0 and bell.waiter is None
        if bell.take():
            return True
        bell.waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait([bell.waiter, stop], timeout=timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            bell.waiter.cancel()
            bell.waiter = None
        return bell.take()


WAKEUPS = ShardWakeups()  # one per process: the write paths' and drain loops' meeting point


class DrainerStarter:
    """Starts a shard's drainer workflow if it is not running (idempotent: USE_EXISTING),
    at most once per ENSURE_EVERY_S per (task queue, shard) in this process."""

    def __init__(self, shards: int = OUTBOX_SHARDS) -> None:
        self._shards = shards
        self._ensured: dict[tuple[str, int], float] = {}

    async def ensure(self, shard: int) -> None:
        """Called after each record the write path wrote: wakes this process's drain loop of
        the shard (if any runs here), then makes sure a drainer runs somewhere."""
        assert 0 <= shard < self._shards
        WAKEUPS.notify(shard)
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


# Another pass each drain loop turn runs after the shard's own (H4's hook: tb_primary's
# reverse projection, activities.reverse_outbox): (shard, beat) -> records it handled.
ExtraPass = Callable[[int, Callable[[], None]], Awaitable[int]]


class OutboxActivities:
    def __init__(self, outbox: Outbox, applier: _Applier, *,
                 batcher: OutboxBatcher | None = None, reverse: ExtraPass | None = None) -> None:
        self._outbox = outbox
        self._drainer = OutboxDrainer(outbox, applier, batcher)
        self._reverse = reverse

    @activity.defn(name=ACTIVITY_DRAIN_OUTBOX)
    async def drain_outbox_shard(self, inp: DrainOutboxInput) -> DrainOutboxOutput:
        """Drain the shard for `run_s` (then return: the workflow runs the next attempt), or
        until the worker shuts down. Outages pause and go on: nothing is lost by waiting.
        When to query: see GATHER_S."""
        assert inp.shard < inp.shards
        deadline = time.monotonic() + inp.run_s
        bell = WAKEUPS.register(inp.shard)
        loop = _ShardLoop(self._outbox, inp.shard, self._passes(), bell)
        shutdown = asyncio.ensure_future(activity.wait_for_worker_shutdown())

        def _beat() -> None:
            activity.heartbeat(loop.applied + loop.passes)

        try:
            while time.monotonic() < deadline and not shutdown.done():
                activity.heartbeat(loop.applied)
                pause_s = await loop.turn(_beat)
                if pause_s is None:  # nothing due soon: until a write wakes it, or its poll
                    await loop.idle(shutdown)
                elif pause_s > 0:
                    await asyncio.wait([shutdown], timeout=pause_s)
        finally:
            shutdown.cancel()
            WAKEUPS.unregister(inp.shard, bell)
        return DrainOutboxOutput(applied=loop.applied, passes=loop.passes)

    def _passes(self) -> dict[str, ExtraPass]:
        passes: dict[str, ExtraPass] = {TO_TIGERBEETLE: self._drainer.drain_pass}
        if self._reverse is not None:
            passes[TO_MONGODB] = self._reverse
        return passes

    def all(self) -> list[Callable[..., Any]]:
        return [self.drain_outbox_shard]


class _ShardLoop:
    """One drain activity's state for its shard: which direction to query at each turn and
    how long to wait after it (see GATHER_S)."""

    def __init__(self, outbox: Outbox, shard: int, passes: dict[str, ExtraPass],
                 bell: _Bell) -> None:
        assert passes and set(passes) <= {TO_TIGERBEETLE, TO_MONGODB}
        self._outbox = outbox
        self._shard = shard
        self._passes = passes
        self._bell = bell
        self._started = dict.fromkeys(passes, float("-inf"))  # each direction's last pass
        self._poll_all = True  # the first turn, and after an idle poll's timeout or an error
        self.applied = 0
        self.passes = 0

    def _due(self, direction: str, rung: bool, now: float) -> bool:
        """Query `direction` now? At the poll (also while bells of the other direction keep
        the loop from idling: no direction waits longer than IDLE_POLL_S), or when the bell
        rang and this process wrote one of its records since (or just before: its commit may
        come after) its last pass."""
        return (self._poll_all or now - self._started[direction] >= IDLE_POLL_S
                or (rung and self._outbox.written_since(
                    direction, self._shard, self._started[direction] - COMMIT_SLACK_S)))

    async def turn(self, beat: Callable[[], None]) -> float | None:
        """The due directions' passes; then the pause before the next turn (0: at once, a
        full page; None: idle)."""
        started = time.monotonic()
        rung = self._bell.take()
        due = [d for d in self._passes if self._due(d, rung, started)]
        self._poll_all = False
        full = False
        for direction in due:
            try:
                n = await self._passes[direction](self._shard, beat)
            except Exception as err:  # an outage (TigerBeetle, MongoDB): pause, try again
                log.warning("outbox shard %d: %s pass failed, retrying: %r",
                            self._shard, direction, err)
                self._poll_all = True
                return ERROR_PAUSE_S
            self.passes += 1
            self.applied += n
            self._started[direction] = started
            full = full or n >= PAGE_MAX
        return 0.0 if full else None  # a full page: more are waiting

    async def idle(self, stop: asyncio.Future[Any]) -> None:
        """Until this process writes a record of the shard (then GATHER_S more, so the pass
        takes the burst), or the poll of both directions is due."""
        if await WAKEUPS.wait(self._bell, IDLE_POLL_S, stop):
            self._bell.ring()  # taken by the wait: the next turn's
            await asyncio.wait([stop], timeout=GATHER_S)
        else:
            self._poll_all = True
