"""Activities of the wallet workflows: MongoDB primary write, TigerBeetle backlog, reads.

Stores arrive in the constructor (opened once per worker process, see stores.bundle); each
activity takes one pydantic input model. Domain errors leave through messages.errors.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from temporalio import activity

from activities.backfill import WalletImporter
from activities.outbox_drain import BATCHED_DEFAULT as OUTBOX_BATCHED_DEFAULT
from activities.outbox_drain import DrainerStarter, OutboxActivities, OutboxBatcher
from activities.reverse_outbox import ReverseOutboxDrainer
from activities.reverse_projection import (
    ReverseProjectionActivities,
    answering_direction,
    must_drain_first,
)
from activities.store_ops import apply_to, refused_outcome
from messages.errors import to_application_error, wallet_errors_as_application_errors
from messages.wallet import (
    ACTIVITY_APPLY_PRIMARY,
    ACTIVITY_APPLY_TIGERBEETLE,
    ACTIVITY_READ_BALANCE,
    ACTIVITY_READ_MULTI_BALANCE,
    DRAIN_BATCH_MAX,
    ApplyPrimaryInput,
    ApplyTigerBeetleInput,
    ApplyTigerBeetleOutput,
    BacklogItem,
    MultiBalance,
    PrimaryOutcome,
    ReadBalanceInput,
    ReadMultiBalanceInput,
    TigerBeetleItemOutcome,
)
from observability.backlog import backlog_gauges
from stores.backfill_imports import ImportStatus
from stores.legacy_store import GAP_OPERATIONS_MAX, LegacyStore
from stores.migration_state import MigrationStateStore
from stores.outbox import OutboxIntent, outbox_shard
from stores.read_metrics import ReadMetricsStore
from stores.tigerbeetle_store import KnownRecords, TigerBeetleStore
from walletclient.read_path import ReadRouter
from walletcore.balances import WalletBalance
from walletcore.errors import ConfigurationError, WalletError
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, OperationResult, SubtractCredit, Void, WalletOperation
from walletcore.phases import MigrationState
from walletcore.write_facts import LegacyFacts, OriginalFacts

log = logging.getLogger(__name__)

# The claimer name of imports started by a wallet's own write path (backfill uses its run id).
WALLET_CLAIMER = "wallet-workflow"
IMPORTED_KNOWN_MAX = 100_000  # finished imports remembered per process (ImportedVersions)
# The dual-write TigerBeetle side goes to the transactional outbox (stores.outbox) rather
# than the workflow's backlog. False: the backlog path of every earlier release.
# WALLETMIG_OUTBOX=off switches it off for a process (the benchmarks' before/after runs).
OUTBOX_DEFAULT = os.environ.get("WALLETMIG_OUTBOX", "on").lower() != "off"
# tb_primary's reverse projection through the outbox too (intent recorded before the
# TigerBeetle write, activities.reverse_outbox) rather than `to_mongodb` backlog items.
# WALLETMIG_REVERSE_OUTBOX=off switches it off for a process (the benchmarks' before runs).
REVERSE_OUTBOX_DEFAULT = os.environ.get("WALLETMIG_REVERSE_OUTBOX", "on").lower() != "off"
# (wallet, scope, epoch) seen with no outbox record pending towards the store answering there
OUTBOX_CLEAR_KNOWN_MAX = 100_000


class TigerBeetleBacklog:
    """The TigerBeetle side of dual-writes, race-free with the backfill.

    Per wallet, serialized by its workflow: make sure the wallet is imported (or import it now,
    through the same claim the backfill takes), skip the operations whose legacy version the
    opening balance already holds, apply the others in order. The one implementation: the
    wallet workflow's activity and the tests' applier both call `apply`.
    """

    def __init__(
        self,
        legacy: LegacyStore,
        tigerbeetle: TigerBeetleStore,
        importer: WalletImporter,
        imported: ImportedVersions | None = None,
    ) -> None:
        self._legacy = legacy
        self._tigerbeetle = tigerbeetle
        self._importer = importer
        self._imported = imported or ImportedVersions(importer)

    async def apply(
        self, wallet: WalletKey, items: list[BacklogItem], *, since_version: int | None = None
    ) -> ApplyTigerBeetleOutput:
        """A domain error retrying cannot fix is reported as a divergence and the batch goes
        on; anything else raises and the whole batch is retried (idempotent by transaction
        id, and a skip decision depends only on the import record, which never changes)."""
        assert 0 < len(items) <= DRAIN_BATCH_MAX
        imported = await self._imported.ensure(wallet, since_version=since_version)
        facts_of: list[LegacyFacts | None] = []
        for item in items:
            assert item.command.wallet == wallet, "backlog item of another wallet"
            assert item.direction == "to_tigerbeetle", "reverse projection item in TB batch"
            facts_of.append(item.legacy or await self._legacy.facts_of(item.command.transaction_id))
        to_write = [
            item.command.transaction_id
            for item, facts in zip(items, facts_of, strict=True)
            if facts is None or facts.wallet_version > imported
        ]
        # The registry records of the batch in one query (one wallet, one account read): each
        # item then costs its TigerBeetle calls and its own registry insert only.
        known = await self._tigerbeetle.known_records(wallet, to_write) if to_write else None
        seen: set[str] = set()
        outcomes: list[TigerBeetleItemOutcome] = []
        for item, facts in zip(items, facts_of, strict=True):
            txn = item.command.transaction_id
            if facts is not None and facts.wallet_version <= imported:
                outcomes.append(
                    TigerBeetleItemOutcome(
                        seq=item.seq, transaction_id=txn, replayed=True, in_opening=True
                    )
                )
                continue
            original = facts.original if facts is not None else None
            # An original the opening holds has no registry record: legacy is the truth.
            opening = original if original and original.wallet_version <= imported else None
            # An id seen earlier in this batch (a resent operation) was written since the
            # prefetch: read it again. A void reads its own records (it may mark an original
            # of this batch), so it leaves `known` as it is.
            prefetched = known if txn not in seen else None
            seen.add(txn)
            try:
                done = await self._tigerbeetle.replicate(
                    item.command.op, opening_original=opening, known=prefetched
                )
            except WalletError as err:
                if _stops_batch(err):
                    raise  # outage: the activity retries the batch; configuration: see there
                refused: WalletError | None = err
                if facts is not None and await self._fill_gap(
                        wallet, imported, facts.wallet_version):
                    known = None  # the fill wrote records the prefetch does not have
                    try:  # refused for want of what the fill applied? Once more.
                        done = await self._tigerbeetle.replicate(
                            item.command.op, opening_original=opening)
                        refused = None
                    except WalletError as again:
                        if _stops_batch(again):
                            raise
                        refused = again
                if refused is not None:
                    outcomes.append(refused_outcome(item, refused, "TigerBeetle"))
                    continue
            if known is not None and done.account not in (None, known.account):
                known = replace(known, account=done.account)  # created by this item
            outcomes.append(
                TigerBeetleItemOutcome(seq=item.seq, transaction_id=txn, replayed=done.replayed)
            )
        return ApplyTigerBeetleOutput(outcomes=outcomes)

    async def _fill_gap(self, wallet: WalletKey, imported: int, version: int) -> int:
        """Apply to TigerBeetle, in legacy order, the operations MongoDB holds between the
        opening (`imported`) and `version` that TigerBeetle lacks; returns how many.

        Such operations exist when a worker died after a MongoDB write whose workflow task was
        never recorded: no backlog item was made, so a later operation of the wallet can reach
        TigerBeetle first (the lost one's resend, if any, comes after it and replays). A debit
        that needs the lost credit is then refused; filling the gap first keeps MongoDB's
        order. Stops at a void (its original may be in the opening: left to reconciliation)
        and at anything TigerBeetle refuses."""
        # The lost write is just before `version` (a crash loses the task in flight): read the
        # newest GAP_OPERATIONS_MAX versions below it.
        after = max(imported, version - GAP_OPERATIONS_MAX - 1)
        movements = await self._legacy.movements_between(wallet, after, version)
        if not movements:
            return 0
        known = await self._tigerbeetle.known_records(wallet, [txn for txn, _ in movements])
        filled = 0
        for txn, op in movements:
            if txn in known.transfers:
                continue
            if op is None:
                break
            try:  # One registry read for the whole gap, like a batch (see KnownRecords).
                done = await self._tigerbeetle.replicate(op, known=known)
            except WalletError as err:
                if _stops_batch(err):
                    raise
                break
            if done.account not in (None, known.account):
                known = replace(known, account=done.account)  # created by this operation
            log.warning("account %s: %s was in MongoDB before version %d but not in "
                        "TigerBeetle (no backlog item): applied first",
                        known.account.account_id if known.account else "-", txn, version)
            filled += 1
        return filled


class ImportedVersions:
    """WalletImporter.ensure_imported with the finished imports remembered in this process.

    A `done` import record never changes (status and version are final), so its version is
    kept (LRU, bounded): the backlog and the tb_primary write path then skip one MongoDB read
    per batch. Anything not done yet goes through ensure_imported every time."""

    def __init__(self, importer: WalletImporter) -> None:
        self._importer = importer
        self._imports = importer.imports
        self._done: OrderedDict[str, int] = OrderedDict()

    async def ensure(
        self, wallet: WalletKey, *, record_absent: bool = False, since_version: int | None = None
    ) -> int:
        key = wallet.canonical
        version = self._done.get(key)
        if version is not None:
            self._done.move_to_end(key)
            return version
        record = await self._imports.get(key)
        if record is None or record.status is not ImportStatus.DONE:
            # Not done yet: import now (or wait for the claimer); the next call reads the
            # record again and remembers it once done.
            return await self._importer.ensure_imported(
                wallet, WALLET_CLAIMER, record_absent=record_absent, since_version=since_version
            )
        self._done[key] = record.version
        while len(self._done) > IMPORTED_KNOWN_MAX:
            self._done.popitem(last=False)
        return record.version


class WalletActivities:
    def __init__(
        self,
        *,
        legacy: LegacyStore,
        tigerbeetle: TigerBeetleStore,
        migration: MigrationStateStore,
        importer: WalletImporter,
        metrics: ReadMetricsStore | None = None,
        outbox: bool = OUTBOX_DEFAULT,
        reverse_outbox: bool = REVERSE_OUTBOX_DEFAULT,
    ) -> None:
        """`importer`: the backfill's importer over the same stores (workers.wiring builds it).
        `metrics`: where the read activities record their observations (gate evidence);
        its owner runs the flusher (workers.process). `outbox`: see OUTBOX_DEFAULT;
        `reverse_outbox`: see REVERSE_OUTBOX_DEFAULT."""
        self._legacy = legacy
        self._tigerbeetle = tigerbeetle
        self._migration = migration
        self._importer = importer
        self._imported = ImportedVersions(importer)
        self._backlog = TigerBeetleBacklog(legacy, tigerbeetle, self._importer, self._imported)
        self._projection = ReverseProjectionActivities(legacy)
        self._reader = ReadRouter(legacy, tigerbeetle, migration, metrics,
                                  prefetch_ids=tigerbeetle.accounts.remember_pair)
        self._outbox_on = outbox
        self._reverse_on = reverse_outbox
        # The drainers run the reverse pass whatever this process writes: records of other
        # processes (or of an earlier run of this one) are drained by the shard's one drainer.
        reverse = ReverseOutboxDrainer(legacy.outbox, legacy, tigerbeetle)
        self._outbox = OutboxActivities(legacy.outbox, self._backlog, batcher=OutboxBatcher(
            legacy.outbox, tigerbeetle, self._imported) if OUTBOX_BATCHED_DEFAULT else None,
            reverse=reverse.drain_pass)
        self._drainers = DrainerStarter()
        # A wallet whose outbox was seen with nothing pending towards the store that answers
        # under a state: no such record can be added under that same state (records towards
        # TigerBeetle come only from MongoDB-answered writes, towards MongoDB only from
        # TigerBeetle-answered ones).
        self._outbox_clear: OrderedDict[tuple[str, str | None, int], None] = OrderedDict()

    @activity.defn(name=ACTIVITY_APPLY_PRIMARY)
    async def apply_primary(self, inp: ApplyPrimaryInput) -> PrimaryOutcome:
        """The write that answers the caller, under the wallet pair's current migration phase.

        If the backlog still carries operations to the store that would answer now (a phase
        switch between the two write paths), nothing is written: the workflow drains and
        calls again, so both stores apply every operation in the same order."""
        op = inp.command.op
        with wallet_errors_as_application_errors():
            state = await self._resolve(inp)
            if must_drain_first(state, inp.pending_direction):
                return PrimaryOutcome(
                    phase=state.phase,
                    epoch=state.epoch,
                    scope=state.scope,
                    writes_tigerbeetle=False,
                    drain_first=True,
                )
            pending = await self._outbox_pending(state, op.wallet)
            if pending:
                # The other store answered operations still in the outbox on their way to the
                # store that answers now: it must apply them before it answers a new one.
                return PrimaryOutcome(
                    phase=state.phase, epoch=state.epoch, scope=state.scope,
                    writes_tigerbeetle=False, drain_first=True, outbox_pending=pending)
            if not state.mongo_answers_writes:
                return await self._apply_tigerbeetle_primary(inp, state, op)
            direction = answering_direction(state)
            intent = self._outbox_intent(inp, state, direction)
            result, facts = await self._legacy.apply(op, outbox=intent)
            if intent is not None:
                await self._outbox_written(intent, result.replayed, facts)
        return PrimaryOutcome(
            result=result,
            phase=state.phase,
            epoch=state.epoch,
            scope=state.scope,
            writes_tigerbeetle=direction == "to_tigerbeetle",
            backlog_direction=direction,
            legacy=facts,
            outbox=intent is not None,
        )

    def _outbox_intent(
        self, inp: ApplyPrimaryInput, state: MigrationState, direction: str | None
    ) -> OutboxIntent | None:
        """The outbox takes the TigerBeetle side when it is on, the workflow knows the outbox
        path, and its backlog holds nothing for TigerBeetle (those must be applied first: an
        outbox record would otherwise reach TigerBeetle before them)."""
        if not (self._outbox_on and inp.outbox_ok and direction == "to_tigerbeetle"
                and inp.pending_direction is None):
            return None
        return OutboxIntent(command=inp.command, phase=state.phase, epoch=state.epoch,
                            since_version=inp.since_version)

    async def _outbox_written(
        self, intent: OutboxIntent, replayed: bool, facts: LegacyFacts
    ) -> None:
        if replayed:
            # MongoDB held it already; its first write may predate the outbox (then it has no
            # record): make sure one exists. An existing record is left as it is.
            await self._legacy.outbox.ensure(intent, facts)
        await self._drainers.ensure(outbox_shard(intent.command.wallet.canonical))

    async def _outbox_pending(self, state: MigrationState, wallet: WalletKey) -> int:
        """The wallet's outbox records pending towards the store that answers under `state`
        (0 once seen none under this state)."""
        key = (wallet.canonical, state.scope, state.epoch)
        if key in self._outbox_clear:
            self._outbox_clear.move_to_end(key)
            return 0
        outbox = self._legacy.outbox
        pending = await (outbox.pending_to_mongodb(wallet) if state.mongo_answers_writes
                         else outbox.pending_to_tigerbeetle(wallet))
        if pending == 0:
            self._outbox_clear[key] = None
            while len(self._outbox_clear) > OUTBOX_CLEAR_KNOWN_MAX:
                self._outbox_clear.popitem(last=False)
        return pending

    async def _resolve(self, inp: ApplyPrimaryInput) -> MigrationState:
        """The wallet pair's migration state, never older than the one its workflow last
        acted on: this process's cache may be (another worker answered before, or the cache
        is still within its TTL of an older read)."""
        pair = inp.command.op.wallet.ledger_pair
        state = await self._migration.resolve(pair)
        if not _below_floor(state, inp):
            return state
        state = await self._migration.resolve(pair, fresh=True)
        assert not _below_floor(state, inp), (
            f"migration state of {pair} went back to epoch {state.epoch} "
            f"(the workflow acted on {inp.floor_scope} epoch {inp.floor_epoch})"
        )
        return state

    async def _apply_tigerbeetle_primary(
        self, inp: ApplyPrimaryInput, state: MigrationState, op: WalletOperation
    ) -> PrimaryOutcome:
        """tb_primary / complete: TigerBeetle decides (insufficient funds comes from it);
        tb_primary then projects the operation to MongoDB: through the reverse outbox (its
        intent recorded before the TigerBeetle write, see _write_tigerbeetle), else the backlog.

        Idempotency spans the whole history: a transaction id MongoDB already holds is a
        replay answered from there (TigerBeetle has no record of operations older than its
        import). A void of such an old transaction reverses it from MongoDB's record."""
        imported = await self._imported.ensure(op.wallet, record_absent=True)
        direction = answering_direction(state)
        intent = (self._reverse_on and inp.reverse_outbox_ok and direction == "to_mongodb"
                  and inp.pending_direction is None)  # backlog items first (none to MongoDB)
        replay, inserted, known = await self._replay_or_intent(inp, state, intent=intent)
        if replay is not None:
            # MongoDB answered this operation under an earlier phase, but TigerBeetle may not
            # hold it: a worker killed after that MongoDB write and before its workflow task
            # was recorded leaves no backlog item; the resent update lands here after the
            # switch. It goes to TigerBeetle through the backlog like any MongoDB-answered
            # operation (the next TigerBeetle-answered one drains it first, so the order
            # holds); TigerBeetle answers EXISTS when it has it already, and the import skips
            # what the opening balance holds. Its facts are read when the backlog drains, not
            # on the answer's path.
            return PrimaryOutcome(
                result=replay,
                phase=state.phase,
                epoch=state.epoch,
                scope=state.scope,
                writes_tigerbeetle=True,
                backlog_direction="to_tigerbeetle",
            )
        opening: OriginalFacts | None = None
        if isinstance(op, Void):
            original = await self._legacy.original_facts(op.wallet, op.original_transaction_id)
            if original is not None and original.wallet_version <= imported:
                opening = original
        result = await self._write_tigerbeetle(
            inp, opening, intent=intent, inserted=inserted, known=known)
        return PrimaryOutcome(
            result=result,
            phase=state.phase,
            epoch=state.epoch,
            scope=state.scope,
            writes_tigerbeetle=False,
            backlog_direction=direction,
            outbox=intent,
        )

    async def _replay_or_intent(
        self, inp: ApplyPrimaryInput, state: MigrationState, *, intent: bool
    ) -> tuple[OperationResult | None, bool, KnownRecords | None]:
        """MongoDB's answer if it holds the operation already (a replay), and, with `intent`,
        the operation's MongoDB-bound record (stores.outbox intend_to_mongodb; True: this call
        inserted it), and (credits and debits) the registry records the TigerBeetle write
        reads first, with a debit's funds check (TigerBeetleStore.known_for_movement). All
        round trips in one wait (issue 18: the tb_primary answer's path; the registry reads
        and the funds check were round trips after the others). A replay, or a failed check
        (insufficient funds included), withdraws a record this call inserted:
        nothing is written to TigerBeetle for it (a drainer that saw it meanwhile finds no
        transfer, or applies one TigerBeetle already had, a MongoDB replay)."""
        op = inp.command.op
        outbox = self._legacy.outbox
        reads = asyncio.gather(
            self._legacy.replay_of(op),
            self._known_records(op),
            outbox.intend_to_mongodb(inp.command, state.phase, state.epoch) if intent
            else _nothing_inserted(),
            return_exceptions=True)
        replay, known, inserted = await reads
        if isinstance(inserted, BaseException):
            raise inserted  # nothing was inserted (the other two only read)
        if isinstance(replay, BaseException):
            failed: BaseException | None = replay
        elif replay is not None:
            failed, known = None, None  # answered from MongoDB: the TigerBeetle reads are moot
        else:
            failed = known if isinstance(known, BaseException) else None
        if (replay is not None or failed is not None) and inserted:
            await outbox.withdraw_to_mongodb(op.transaction_id)
        if failed is not None:
            raise failed
        assert not isinstance(replay, BaseException) and not isinstance(known, BaseException)
        return replay, inserted, known

    async def _known_records(self, op: WalletOperation) -> KnownRecords | None:
        """A credit's or debit's registry records, and a debit's funds check (a refusal
        withdraws the intent like any failed check); a void reads its own (see void)."""
        if isinstance(op, Void):
            return None
        return await self._tigerbeetle.known_for_movement(op)

    async def _write_tigerbeetle(
        self, inp: ApplyPrimaryInput, opening: OriginalFacts | None, *, intent: bool,
        inserted: bool, known: KnownRecords | None = None,
    ) -> OperationResult:
        """The TigerBeetle write; with `intent`, its MongoDB-bound record is already there
        (_replay_or_intent): once TigerBeetle holds the transfer, the record says MongoDB is
        owed it, whatever crashes after. A refusal withdraws a record this call inserted
        (nothing is owed); an outage leaves it pending (the retry re-arms it; the drainer
        abandons it if no transfer ever comes)."""
        op = inp.command.op
        outbox = self._legacy.outbox
        try:
            result = await _tigerbeetle_write(self._tigerbeetle, op, opening, known)
        except WalletError as err:
            if inserted and not err.retryable:
                await outbox.withdraw_to_mongodb(op.transaction_id)
            raise
        if intent:
            await self._drainers.ensure(outbox_shard(op.wallet.canonical))
        return result

    @activity.defn(name=ACTIVITY_APPLY_TIGERBEETLE)
    async def apply_tigerbeetle(self, inp: ApplyTigerBeetleInput) -> ApplyTigerBeetleOutput:
        """Apply to_tigerbeetle backlog items in order (see TigerBeetleBacklog). A configuration
        error fails the attempt for good (non-retryable): the workflow keeps the items, logs the
        error and tries again after a pause, instead of retrying the activity silently."""
        # Counted until an attempt succeeds: a failing one leaves the batch in the backlog.
        gauges = backlog_gauges()
        gauges.started("to_tigerbeetle", inp.wallet.canonical,
                       [item.accepted_at for item in inp.items])
        try:
            out = await self._backlog.apply(
                inp.wallet, inp.items, since_version=inp.since_version)
        except ConfigurationError as err:
            raise to_application_error(err) from err
        gauges.applied("to_tigerbeetle", inp.wallet.canonical)
        return out

    @activity.defn(name=ACTIVITY_READ_BALANCE)
    async def read_balance(self, inp: ReadBalanceInput) -> WalletBalance:
        with wallet_errors_as_application_errors():
            return await self._reader.get_balance(inp.query.wallet)

    @activity.defn(name=ACTIVITY_READ_MULTI_BALANCE)
    async def read_multi_balance(self, inp: ReadMultiBalanceInput) -> MultiBalance:
        with wallet_errors_as_application_errors():
            return MultiBalance(balances=await self._reader.get_multi_balance(inp.query.client_id))

    def all(self) -> list[Callable[..., Any]]:
        """The activity callables, for Worker(activities=...)."""
        return [
            self.apply_primary,
            self.apply_tigerbeetle,
            *self._projection.all(),
            *self._outbox.all(),
            self.read_balance,
            self.read_multi_balance,
        ]


async def _nothing_inserted() -> bool:
    return False


async def _tigerbeetle_write(
    store: TigerBeetleStore, op: WalletOperation, opening: OriginalFacts | None,
    known: KnownRecords | None,
) -> OperationResult:
    """The answering TigerBeetle write, with the registry records read beforehand (if any)."""
    if known is None:
        return await apply_to(store, op, opening_original=opening)
    # SubtractCredit subclasses AddCredit: test it first.
    if isinstance(op, SubtractCredit):
        return await store.subtract_credit(op, known=known)
    assert isinstance(op, AddCredit), "a void reads its own records"
    return await store.add_credit(op, known=known)


def _stops_batch(err: WalletError) -> bool:
    """An error no item of the batch is at fault for: an outage (retrying helps) or a
    configuration error (e.g. a TigerBeetle request limit set too high, an operator must act).
    Recording it as the item's divergence would drop a good operation."""
    return err.retryable or isinstance(err, ConfigurationError)


def _below_floor(state: MigrationState, inp: ApplyPrimaryInput) -> bool:
    # Epochs count per scope document: a pair's first document may start below "*"'s epoch.
    return (
        inp.floor_epoch is not None
        and state.scope == inp.floor_scope
        and state.epoch < inp.floor_epoch
    )
