"""WalletWorkflow: one entity workflow per wallet key, fed by Update-with-Start.

Operations arrive as `apply` updates and run one at a time under a lock: the answering store
is written by a local activity (MongoDB up to read_cutover, TigerBeetle from tb_primary). In
the dual-write phases the MongoDB write also commits the operation's record in the
transactional outbox (stores.outbox; runs with the `outbox-write-path` patch): the shard
drainers (workflows.outbox) apply it to TigerBeetle, and this run carries nothing for it.
In tb_primary (runs with the `reverse-outbox-write-path` patch) the TigerBeetle write is
preceded by its MongoDB-bound intent record (stores.outbox, `wallet_outbox_to_mongodb`), which
the same drainers apply to MongoDB (activities.reverse_outbox): nothing to carry here either.
Otherwise the operation is appended to ONE ordered backlog that lives in workflow state, each
item tagged with where it goes (`to_tigerbeetle`: dual-writes of runs without the outbox,
`to_mongodb`: tb_primary's reverse projection of runs without the reverse outbox), and the run
loop applies it there in order, retrying without limit. The caller never waits for the other
store.

Switching the write path: when the store that would answer is the one the backlog (or the
wallet's outbox records) is still travelling to, the activity writes nothing (`drain_first`),
the update waits for the backlog to drain (for the outbox: asks again after a growing pause)
and asks again, so both stores apply every operation in the same order.

Why the backlog is durable: an item is appended in the same workflow task that completes the
update, so "answered" implies "in history"; it leaves the backlog only after the TigerBeetle
activity has applied it (TigerBeetle and the Transfer Registry are idempotent by transaction id,
so an activity attempt that applied but whose completion was lost is simply applied again), and
it travels in the continue-as-new input. A worker crash replays the history and rebuilds it.
The reverse does not hold: a store write whose workflow task is never recorded stays written,
so the task that continues-as-new carries no write of its own (see `_continue_as_new`).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from messages.errors import (
        invalid_input,
        to_application_error,
        wallet_error_from_failure,
    )
    from messages.wallet import (
        ACTIVITY_APPLY_MONGODB,
        ACTIVITY_APPLY_PRIMARY,
        ACTIVITY_APPLY_TIGERBEETLE,
        DIVERGENCES_KEPT_MAX,
        DRAIN_BATCH_MAX,
        RECENT_RESULTS_MAX,
        ROTATING_ERROR_TYPE,
        WALLET_QUERY_STATUS,
        WALLET_UPDATE_APPLY,
        WALLET_WORKFLOW,
        ApplyPrimaryInput,
        ApplyTigerBeetleInput,
        ApplyTigerBeetleOutput,
        BacklogDirection,
        BacklogItem,
        Divergence,
        PrimaryOutcome,
        RecentResult,
        WalletCommand,
        WalletState,
        WalletStatus,
        WalletWorkflowInput,
        WalletWorkflowResult,
    )
    from walletcore.errors import StoreUnavailableError, WalletError
    from walletcore.operations import OperationResult, validate_operation
    from walletcore.phases import MONGO_PRIMARY_DUAL_WRITE, Phase

# The write that answers the caller: bounded, so a store outage fails the update clearly
# (StoreUnavailableError naming the store) inside the client's answer bound (walletclient's
# RETRY_WINDOW_S_DEFAULT, 15 s) instead of holding the caller. Attempts are retried within it
# (a MongoDB server selection gives up after 5 s: mongobase). A crashed worker's open MongoDB
# transaction can hold the wallet for its 60 s lifetime: the update then fails after this bound
# and the client re-sends it while its window lasts (a caller riding out such a stall passes a
# longer window). Local activity timeouts are not in history: recorded runs replay unchanged.
# Schedule-to-close must exceed start-to-close: with equal values the core SDK retries a
# local activity whose attempt timed out past its schedule-to-close, for ever (measured with
# temporalio 1.35: a hung attempt at 10 s / 10 s never timed out; at 5 s / 10 s it did at 10 s).
PRIMARY_START_TO_CLOSE = timedelta(seconds=5)
PRIMARY_SCHEDULE_TO_CLOSE = timedelta(seconds=10)
assert PRIMARY_SCHEDULE_TO_CLOSE > PRIMARY_START_TO_CLOSE
PRIMARY_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=100),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=2),
)
# Ends the workflow task holding the last store writes before continue-as-new (see there).
PATCH_COMMIT_BEFORE_ROTATING = "commit-writes-before-continue-as-new"
COMMIT_PAUSE = timedelta(milliseconds=1)
# TigerBeetle writes must eventually happen: unlimited attempts, capped backoff.
TIGERBEETLE_START_TO_CLOSE = timedelta(seconds=60)  # a full batch under a saturated registry
TIGERBEETLE_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=0,
)
# The transactional outbox (stores.outbox): a dual-write operation's TigerBeetle side is
# written with its MongoDB write; the shard drainers (workflows.outbox) apply it. Runs that
# recorded no marker (every history before it) keep the backlog path.
PATCH_OUTBOX = "outbox-write-path"
# The run never waits for its outbox records (no timer, no activity per operation): whether
# they are in TigerBeetle is a fact of the store (Outbox.pending_count), read by whoever needs
# it: the tb_primary switch below, reconciliation, the gate, the benchmark, the tests.
# tb_primary waiting for the wallet's outbox records (drain_first): the pause between asks,
# growing to the max, and how long an update waits before it fails (nothing was written; the
# client retries within its window).
# tb_primary's reverse projection the same way, intent recorded first (stores.outbox,
# activities.reverse_outbox). Runs without the marker keep `to_mongodb` backlog items.
PATCH_REVERSE_OUTBOX = "reverse-outbox-write-path"
OUTBOX_DRAIN_POLL = timedelta(milliseconds=50)
OUTBOX_DRAIN_POLL_MAX = timedelta(seconds=1)
OUTBOX_DRAIN_WAIT_MAX = timedelta(seconds=10)


@workflow.defn(name=WALLET_WORKFLOW)
class WalletWorkflow:
    @workflow.init
    def __init__(self, inp: WalletWorkflowInput) -> None:
        self._input = inp
        self._wallet = inp.wallet
        # All state that outlives a run is in this one structure (continue-as-new input).
        self._state: WalletState = inp.state.model_copy(deep=True) if inp.state else WalletState()
        # Serialises operations: each one reads and writes the wallet, and the awaits inside
        # (local activity) would otherwise interleave two updates' read-modify-write.
        self._lock = asyncio.Lock()
        self._pending = 0  # accepted updates not finished yet (validator backpressure)
        self._ops_this_run = 0
        self._last_activity_at = workflow.now()
        self._rotating = False  # set once this run decided to continue-as-new
        self._idle_timer: asyncio.Task[None] | None = None

    # ---- run loop ------------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: WalletWorkflowInput) -> WalletWorkflowResult:
        self._publish_details()
        while True:
            if self._state.backlog:
                await self._drain_or_rotate()
            elif self._should_continue_as_new():
                await self._continue_as_new()
            elif self._idle():
                # No await between the check and the return: no update can be accepted in
                # between. Updates the server admitted meanwhile are failed by the server and
                # the client retries them on a new run (Update-with-Start).
                return WalletWorkflowResult(
                    ops_applied=self._state.ops_applied,
                    tb_applied=self._state.tb_applied,
                    divergence_count=self._state.divergence_count,
                    runs=self._state.runs,
                )
            else:
                await self._wait_for_work()

    async def _wait_for_work(self) -> None:
        remaining = self._idle_remaining()
        if remaining > timedelta(0):
            # One durable timer per idle period, reused across loop turns: updates do not
            # restart it (that would cost a cancel and a start event per operation). When it
            # fires, the loop recomputes the remaining idle time from the last update.
            if self._idle_timer is None or self._idle_timer.done():
                self._idle_timer = asyncio.create_task(workflow.sleep(remaining))
            timer = self._idle_timer
            await workflow.wait_condition(
                lambda: bool(self._state.backlog) or self._should_continue_as_new() or timer.done()
            )
        else:
            # Idle time is up but updates are still running: wait for them to finish (their
            # completion restarts the idle period).
            await workflow.wait_condition(
                lambda: (
                    bool(self._state.backlog)
                    or self._should_continue_as_new()
                    or (self._pending == 0 and workflow.all_handlers_finished())
                )
            )

    def _idle(self) -> bool:
        return (
            not self._state.backlog
            and self._pending == 0
            and workflow.all_handlers_finished()
            and self._idle_remaining() <= timedelta(0)
        )

    def _idle_remaining(self) -> timedelta:
        idle = timedelta(seconds=self._input.idle_timeout_s)
        return max(idle - (workflow.now() - self._last_activity_at), timedelta(0))

    def _should_continue_as_new(self) -> bool:
        return (
            self._ops_this_run >= self._input.max_ops_per_run
            or workflow.info().is_continue_as_new_suggested()
        )

    async def _continue_as_new(self) -> None:
        # From now on the validator rejects new updates (the client retries them on the next
        # run); the ones already accepted must finish first so none is dropped.
        self._rotating = True
        self._publish_details()
        await workflow.wait_condition(workflow.all_handlers_finished)
        if workflow.patched(PATCH_COMMIT_BEFORE_ROTATING):
            # The last updates' store writes (local activities) must be recorded in a workflow
            # task of their own: the server refuses a task ending in continue-as-new when an
            # update arrived meanwhile (UnhandledCommand), and would discard their markers,
            # answers and backlog items while the writes stay in the store. The resent update
            # then finds the store "replayed" after later operations, or, across a switch,
            # is written to the other store: the two stores would apply it in different
            # orders. A timer ends this task; the next one holds only continue-as-new
            # (the validator refuses new updates from here on).
            await workflow.sleep(COMMIT_PAUSE)
        self._state.runs += 1
        workflow.logger.info(
            "%s continues as new (run %d, backlog %d)",
            workflow.info().workflow_id,
            self._state.runs,
            len(self._state.backlog),
        )
        workflow.continue_as_new(self._input.model_copy(update={"state": self._state}))

    async def _drain_or_rotate(self) -> None:
        """Apply one batch from the backlog head; give up waiting if the run must rotate.

        During a TigerBeetle outage the activity retries for as long as it takes, while
        updates keep being answered and the history grows: rotating then cancels the attempt
        (the items stay in the backlog, idempotent to re-apply) and continues as new.
        """
        drain = asyncio.create_task(self._drain_batch())
        await workflow.wait_condition(lambda: drain.done() or self._should_continue_as_new())
        if drain.done():
            try:
                drain.result()
            except ActivityError as err:
                # Unreachable with unlimited retries, but if a non-retryable failure ever comes
                # back, the items stay in the backlog and are tried again after a pause; failing
                # the workflow would lose them.
                workflow.logger.error("%s: TigerBeetle drain failed: %s",
                                      workflow.info().workflow_id, err)
                await workflow.sleep(TIGERBEETLE_RETRY.maximum_interval or timedelta(seconds=10))
            return
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError, ActivityError):
            await drain  # the backlog was left untouched
        await self._continue_as_new()

    async def _drain_batch(self) -> None:
        # One direction per batch: the head's. For a backlog with one direction only (every
        # history recorded before tb_primary existed) this is the same head slice as before.
        direction = self._state.backlog[0].direction
        batch: list[BacklogItem] = []
        for item in self._state.backlog[:DRAIN_BATCH_MAX]:
            if item.direction != direction:
                break
            batch.append(item)
        to_tb = direction == "to_tigerbeetle"
        output: ApplyTigerBeetleOutput = await workflow.execute_activity(
            ACTIVITY_APPLY_TIGERBEETLE if to_tb else ACTIVITY_APPLY_MONGODB,
            ApplyTigerBeetleInput(
                wallet=self._wallet,
                items=batch,
                since_version=self._state.tracked_since_version if to_tb else None,
            ),
            result_type=ApplyTigerBeetleOutput,
            start_to_close_timeout=TIGERBEETLE_START_TO_CLOSE,
            retry_policy=TIGERBEETLE_RETRY,
        )
        # Safe without the lock: handlers only append to the backlog's tail, and only this loop
        # removes from its head, so the batch is still the head after the await.
        head = self._state.backlog[: len(batch)]
        assert [item.seq for item in head] == [item.seq for item in batch], "backlog head moved"
        assert [o.seq for o in output.outcomes] == [item.seq for item in batch]
        del self._state.backlog[: len(batch)]
        now = workflow.now()
        for item, outcome in zip(batch, output.outcomes, strict=True):
            if to_tb:
                self._state.tb_applied += 1
            else:
                self._state.mongo_applied += 1
            if outcome.error_type is not None:
                self._record_divergence(item, outcome.error_type, outcome.error_message or "", now)
        self._publish_details()

    def _record_divergence(
        self, item: BacklogItem, error_type: str, message: str, now: datetime
    ) -> None:
        self._state.divergence_count += 1
        self._state.divergences.append(
            Divergence(
                seq=item.seq,
                transaction_id=item.command.transaction_id,
                kind=item.command.kind,
                error_type=error_type,
                message=message,
                at=now,
            )
        )
        del self._state.divergences[:-DIVERGENCES_KEPT_MAX]
        refused, accepted = (
            ("TigerBeetle", "MongoDB") if item.direction == "to_tigerbeetle"
            else ("MongoDB", "TigerBeetle")
        )  # fmt: skip
        workflow.logger.warning(
            "%s: %s refused %s %s that %s accepted (%s: %s); left for reconciliation",
            workflow.info().workflow_id,
            refused,
            item.command.kind.value,
            item.command.transaction_id,
            accepted,
            error_type,
            message,
        )

    # ---- operations ----------------------------------------------------------------------

    @workflow.update(name=WALLET_UPDATE_APPLY)
    async def apply(self, command: WalletCommand) -> OperationResult:
        self._pending += 1
        try:
            async with self._lock:
                return await self._apply_locked(command)
        finally:
            self._pending -= 1
            self._last_activity_at = workflow.now()

    async def _apply_locked(self, command: WalletCommand) -> OperationResult:
        self._last_activity_at = workflow.now()
        txn = command.transaction_id
        # Idempotency guard: a replay of a recent operation is answered from state, without
        # touching the stores. Different content under the same id goes to the store, which
        # answers DuplicateTransactionError.
        recent = self._state.recent.get(txn)
        if recent is not None and recent.command == command:
            return recent.result.model_copy(update={"replayed": True})
        outcome = await self._apply_primary(command, self._pending_direction())
        self._observe(outcome)
        if outcome.drain_first:
            outcome = await self._drain_then_apply(command, outcome)
        result = outcome.result
        assert result is not None, "an applied operation has a result"
        self._state.ops_applied += 1
        self._ops_this_run += 1
        direction = outcome.backlog_direction
        if direction is None and outcome.writes_tigerbeetle:
            direction = "to_tigerbeetle"  # recorded before backlog_direction existed
        self._track_legacy_versions(outcome, direction)
        if outcome.outbox:
            # Its other side is in the outbox (stores.outbox): committed with the MongoDB
            # write, or (tb_primary) recorded as intent before the TigerBeetle write. The
            # drainers apply it. Nothing to carry here, only to count.
            if direction == "to_mongodb":
                self._state.reverse_outbox_ops += 1
            else:
                assert direction == "to_tigerbeetle", "an outbox operation goes somewhere"
                self._state.outbox_ops += 1
        elif direction is not None:
            # Appended even when the answering store says "replayed": a crash may have hit
            # between its write and this point; the other store is idempotent too.
            self._state.backlog.append(
                BacklogItem(
                    seq=self._state.next_seq,
                    command=command,
                    phase=outcome.phase,
                    epoch=outcome.epoch,
                    accepted_at=workflow.now(),
                    direction=direction,
                    legacy=outcome.legacy,
                )
            )
            self._state.next_seq += 1
        self._remember(command, result)
        self._publish_details()
        return result

    async def _drain_then_apply(
        self, command: WalletCommand, outcome: PrimaryOutcome
    ) -> PrimaryOutcome:
        """The write path switched: the store that answers now must first receive every
        operation the other one answered. Nothing was written; wait until they are applied,
        then ask again (as often as the answer is drain_first)."""
        poll = OUTBOX_DRAIN_POLL
        waited = timedelta(0)
        while outcome.drain_first:
            self._publish_details()
            if outcome.outbox_pending:
                # In the outbox: the shard drainers apply them, not this run. Ask again after a
                # pause, for a bounded time (nothing was written: the client retries).
                if waited >= OUTBOX_DRAIN_WAIT_MAX:
                    behind = "MongoDB" if _mongodb_answers(outcome.phase) else "TigerBeetle"
                    raise to_application_error(StoreUnavailableError(
                        f"{behind} has not applied this wallet's {outcome.outbox_pending} "
                        "earlier operations yet; retry"))
                await workflow.sleep(poll)
                waited += poll
                poll = min(poll * 2, OUTBOX_DRAIN_POLL_MAX)
            else:
                await workflow.wait_condition(lambda: not self._state.backlog or self._rotating)
                if self._state.backlog:
                    # The run is rotating (it cancelled the drain): the client resends this
                    # update to the next run, which still carries the backlog.
                    raise ApplicationError(
                        "wallet workflow is continuing as new; retry", type=ROTATING_ERROR_TYPE
                    )
            outcome = await self._apply_primary(command, self._pending_direction())
            self._observe(outcome)
        return outcome

    def _track_legacy_versions(
        self, outcome: PrimaryOutcome, direction: BacklogDirection | None
    ) -> None:
        facts = outcome.legacy
        if facts is None or outcome.result is None or outcome.result.replayed:
            return  # not a fresh MongoDB write: the tracked range is unchanged
        if direction != "to_tigerbeetle":
            self._state.tracked_since_version = None  # a MongoDB-only write: a gap
        elif self._state.tracked_since_version is None:
            self._state.tracked_since_version = facts.wallet_version - 1

    def _observe(self, outcome: PrimaryOutcome) -> None:
        """Remember the migration state an apply acted on; within a scope it never goes back
        (the activity reads through a stale cache below this floor)."""
        state = self._state
        if outcome.scope is not None and outcome.scope == state.scope_seen:
            assert state.epoch_seen is not None
            assert outcome.epoch >= state.epoch_seen, (
                f"migration state went back from epoch {state.epoch_seen} to {outcome.epoch}"
            )
        state.phase_seen = outcome.phase
        state.epoch_seen = outcome.epoch
        state.scope_seen = outcome.scope

    def _pending_direction(self) -> BacklogDirection | None:
        # Every item has the same direction except across a switch, which drains first: the
        # tail's direction is the one a new operation could be reordered against.
        return self._state.backlog[-1].direction if self._state.backlog else None

    async def _apply_primary(
        self, command: WalletCommand, pending: BacklogDirection | None
    ) -> PrimaryOutcome:
        try:
            # This await would be unsafe without the lock: another update could read the
            # wallet between our read and our write, and the backlog order would no longer
            # be the answering store's order.
            outcome: PrimaryOutcome = await workflow.execute_local_activity(
                ACTIVITY_APPLY_PRIMARY,
                ApplyPrimaryInput(
                    command=command,
                    pending_direction=pending,
                    floor_scope=self._state.scope_seen,
                    floor_epoch=self._state.epoch_seen if self._state.scope_seen else None,
                    outbox_ok=workflow.patched(PATCH_OUTBOX),
                    since_version=self._state.tracked_since_version,
                    reverse_outbox_ok=workflow.patched(PATCH_REVERSE_OUTBOX),
                ),
                result_type=PrimaryOutcome,
                start_to_close_timeout=PRIMARY_START_TO_CLOSE,
                schedule_to_close_timeout=PRIMARY_SCHEDULE_TO_CLOSE,
                retry_policy=PRIMARY_RETRY,
            )
        except ActivityError as err:
            raise _caller_failure(err, self._state.phase_seen) from None
        return outcome

    def _remember(self, command: WalletCommand, result: OperationResult) -> None:
        recent = self._state.recent
        recent.pop(command.transaction_id, None)
        recent[command.transaction_id] = RecentResult(command=command, result=result)
        while len(recent) > RECENT_RESULTS_MAX:
            del recent[next(iter(recent))]

    @apply.validator
    def validate_apply(self, command: WalletCommand) -> None:
        """Rejected updates leave no trace in history and write nothing."""
        if self._rotating:
            raise ApplicationError(
                "wallet workflow is continuing as new; retry", type=ROTATING_ERROR_TYPE
            )
        if command.wallet != self._wallet:
            raise invalid_input(
                # No wallet key in the text: failure messages may be stored in the clear
                # where no payload codec is configured (issue 12).
                f"the command's wallet does not belong to {workflow.info().workflow_id}",
                "wallet",
            )
        try:
            validate_operation(command.op)
        except WalletError as err:
            raise to_application_error(err) from None
        if len(self._state.backlog) + self._pending >= self._input.backlog_max:
            raise to_application_error(
                StoreUnavailableError(
                    "this wallet's TigerBeetle backlog is full "
                    f"({len(self._state.backlog)} operations); retry later"
                )
            )

    # ---- observability -------------------------------------------------------------------

    @workflow.query(name=WALLET_QUERY_STATUS)
    def status(self) -> WalletStatus:
        backlog = self._state.backlog
        return WalletStatus(
            wallet=self._wallet,
            backlog_length=len(backlog),
            outbox_ops=self._state.outbox_ops,
            reverse_outbox_ops=self._state.reverse_outbox_ops,
            oldest_backlog_at=backlog[0].accepted_at if backlog else None,
            ops_applied=self._state.ops_applied,
            ops_this_run=self._ops_this_run,
            tb_applied=self._state.tb_applied,
            divergence_count=self._state.divergence_count,
            divergences=list(self._state.divergences),
            mongo_applied=self._state.mongo_applied,
            backlog_direction=backlog[0].direction if backlog else None,
            phase_seen=self._state.phase_seen,
            epoch_seen=self._state.epoch_seen,
            runs=self._state.runs,
            rotating=self._rotating,
        )

    def _publish_details(self) -> None:
        state = self._state
        phase = state.phase_seen.value if state.phase_seen else "-"
        rotating = " · **continuing as new**" if self._rotating else ""
        direction = f" ({state.backlog[0].direction})" if state.backlog else ""
        via = state.outbox_ops + state.reverse_outbox_ops
        outbox = f" · via outbox {via}" if via else ""
        # The workflow id, not the wallet key: the key carries the client id (issue 12).
        workflow.set_current_details(
            f"**{workflow.info().workflow_id}** · phase `{phase}` (epoch {state.epoch_seen}) · "
            f"ops {state.ops_applied} · backlog **{len(state.backlog)}**{direction}{outbox} · "
            f"divergences {state.divergence_count} · run {state.runs}{rotating}"
        )


def _caller_failure(err: ActivityError, phase: Phase | None) -> ApplicationError:
    """What the caller sees when the answering write failed: the domain error, unwrapped."""
    domain = wallet_error_from_failure(err)
    if domain is not None:
        return to_application_error(domain)
    # Timeouts or exhausted retries: the outcome is not known; the caller may retry with the
    # same transaction id (idempotent). The message starts with the store that answers in the
    # phase last seen (callers and the HTTP gateway name the dependency from it); its own
    # failure is lost when the bound cuts an attempt (Temporal reports only the timeout).
    store = "the answering store" if phase is None else (
        "MongoDB" if _mongodb_answers(phase) else "TigerBeetle")  # fmt: skip
    return to_application_error(
        StoreUnavailableError(f"{store}: the write did not complete: {err.cause or err}")
    )


def _mongodb_answers(phase: Phase) -> bool:
    return phase == Phase.LEGACY or phase in MONGO_PRIMARY_DUAL_WRITE
