"""MigrationWorkflow: one long-running workflow per migration, operated from the Temporal Web UI.

It owns the phase, the rollout percentage and the gate thresholds. Engineers act through
Updates (`advance`, `force_advance`, `rollback`, `set_rollout`, `pause`, `resume`); each
validator decides with the evidence the workflow last collected and rejects an illegal or
unproven step with the rule or gate that failed (rejected updates leave no history and write
nothing). An accepted step bumps the epoch, publishes MigrationState for every scope, waits out
the readers' state cache, writes the audit log, and refreshes the search attributes and the
markdown details shown on the workflow's page. A loop collects evidence every
`evidence_interval_s` and rolls back one phase by itself when the error or mismatch rate passes
its threshold. The run continues-as-new after a bounded number of actions or history events,
carrying its state.

The Temporal Web UI is the engineers' console (behind `PATCH_UI_CONSOLE`, so runs recorded
before it replay as they ran):
- Update inputs arrive loosely typed and are checked in the validator (`parse_update_input`):
  empty Data means every default; a mistyped field or value gets one line naming the field
  and the allowed values. Refusals say what blocks and what unblocks it, without a stack trace
  (`Refusal`). Results begin with a one-line summary.
- Search attributes are written only when the phase or the rollout changes; the current
  details are markdown the UI renders (lists, PASS/FAIL words).
- A cancellation request is refused and recorded: the phase stays, automatic rollback keeps
  watching. A workflow started again after a terminate re-reads what is published and
  audited (`migration_sync`) and continues from there; one reset to an earlier point notices
  it is behind (each evidence round observes the published epoch and the audit's last seq,
  each action syncs first) and adopts the published phase; an Update a reset re-delivers is
  refused by its id instead of being applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.api.failure.v1 import ApplicationFailureInfo, Failure
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from messages.migration import (
        ACTIVITY_ARCHIVE_LEGACY,
        ACTIVITY_AWAIT_REVERSE_DRAIN,
        ACTIVITY_COLLECT_EVIDENCE,
        ACTIVITY_LOAD_STATE,
        ACTIVITY_OBSERVE,
        ACTIVITY_PUBLISH_STATE,
        ACTIVITY_SYNC,
        ACTIVITY_WRITE_AUDIT,
        ACTOR_CANCEL,
        ACTOR_UNNAMED,
        ACTOR_WORKFLOW,
        QUERY_DESCRIPTIONS,
        QUERY_GATES,
        QUERY_STATUS,
        RECENT_ACTIONS_MAX,
        UPDATE_ADVANCE,
        UPDATE_APPROVE,
        UPDATE_DESCRIPTIONS,
        UPDATE_EXAMPLES,
        UPDATE_FORCE_ADVANCE,
        UPDATE_PAUSE,
        UPDATE_RESUME,
        UPDATE_ROLLBACK,
        UPDATE_SET_ROLLOUT,
        ActionRecord,
        AdvanceRequest,
        ApproveRequest,
        ArchiveInfo,
        ArchiveRequest,
        AuditEntry,
        EvidenceRequest,
        ForceAdvanceRequest,
        GatesView,
        LoadStateInput,
        MigrationInput,
        MigrationRuntime,
        MigrationStatus,
        Observation,
        PauseRequest,
        PendingApproval,
        PublishStateInput,
        ReverseDrainRequest,
        ReverseDrainResult,
        RollbackRequest,
        SetRolloutRequest,
        SyncRequest,
        SyncResult,
        UpdateInputError,
        UpdateRequest,
        next_steps,
        parse_update_input,
        refusal_text,
        sent_fields,
    )
    from walletcore.gates import Evidence, GateResult, failed_reasons, pct
    from walletcore.phases import MigrationState, Phase
    from walletcore.transitions import (
        ActionKind,
        Decision,
        Position,
        clip_reason,
        decide_advance,
        decide_auto_rollback,
        decide_pause,
        decide_rollback,
        decide_set_rollout,
        describe,
        gates_for_move,
        next_position,
    )

R = TypeVar("R", bound=UpdateRequest)
MIGRATION_PHASE = SearchAttributeKey.for_keyword("MigrationPhase")
ROLLOUT_PERCENT = SearchAttributeKey.for_int("RolloutPercent")
REJECTED_ERROR_TYPE = "TransitionRejected"
INPUT_ERROR_TYPE = "InvalidUpdateInput"

ACTIVITY_TIMEOUT = timedelta(seconds=30)
ARCHIVE_TIMEOUT = timedelta(minutes=30)
ACTIVITY_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
)
# Evidence is advisory: a few failed attempts keep the previous evidence and try next round.
EVIDENCE_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_attempts=3)
# complete waits for the reverse projection before archiving (histories recorded before this
# change archive right away).
PATCH_DRAIN_BEFORE_ARCHIVE = "complete-drains-reverse-projection"
# The Web UI console (module docstring): search attributes only on change, continue-as-new by
# history length, cancellation refused, sync with what is published after a restart or reset.
PATCH_UI_CONSOLE = "migration-ui-console"
# Four eyes (MigrationConfig.approvals_required): force_advance and entering complete wait for
# a second engineer's `approve`. Asked only when the config requires approvals, which no
# recorded history does, so they replay unchanged.
PATCH_FOUR_EYES = "four-eyes"
DRAIN_SLACK = timedelta(seconds=60)
DRAIN_HEARTBEAT = timedelta(seconds=30)
# Phases whose write path answers from TigerBeetle (a switch in/out of these drains first).
TB_ANSWERS = frozenset({Phase.TB_PRIMARY, Phase.COMPLETE})
DETAILS_ACTIONS_SHOWN = 5
DETAILS_REASON_MAX = 160
ACTION_VERBS = {
    "advance": "advanced", "force_advance": "advanced (forced)", "rollback": "rolled back",
    "set_rollout": "set rollout", "pause": "paused", "resume": "resumed",
    "auto_rollback": "rolled back automatically", "adopt_published": "adopted the published",
    "cancel_refused": "refused cancellation",
    "approval_requested": "asked for approval",
}  # fmt: skip


class Refusal(ApplicationError):
    """An answer, not a crash: sent without a stack trace.

    The SDK's default failure converter copies the failure an error already carries
    (`failure`) as it is instead of formatting the Python traceback into it, so the Web UI
    shows the one-line message alone (an ApplicationError raised in a validator otherwise
    carries the frames of this module and of the SDK)."""

    def __init__(self, message: str, *, type: str) -> None:
        super().__init__(message, type=type, non_retryable=True)

    @property
    def failure(self) -> Failure | None:
        return Failure(message=self.message, application_failure_info=ApplicationFailureInfo(
            type=self.type or "", non_retryable=True))


def _reject(decision: Decision) -> Refusal:
    return Refusal(refusal_text(decision), type=REJECTED_ERROR_TYPE)


def _input(update: str, model: type[R], payload: object) -> R:
    try:
        return parse_update_input(update, model, payload)
    except UpdateInputError as exc:
        raise Refusal(str(exc), type=INPUT_ERROR_TYPE) from None


def _utc(at: datetime) -> str:
    return f"{at:%H:%M:%S} UTC"


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _action_summary(record: ActionRecord) -> str:
    """`advanced legacy → dual_write (epoch 1)`: the first line of an Update's result."""
    verb = ACTION_VERBS.get(record.action, record.action)
    src, dst = describe(record.from_position), describe(record.to_position)
    moved = src != dst
    text = f"{verb} {src} → {dst}" if moved else f"{verb} in {dst}"
    return f"{text} (epoch {record.epoch})"


@workflow.defn(name="MigrationWorkflow")
class MigrationWorkflow:
    @workflow.init
    def __init__(self, inp: MigrationInput) -> None:
        self._config = inp.config
        self._rt = inp.runtime or MigrationRuntime()
        self._evidence: Evidence | None = None
        self._lock = asyncio.Lock()
        self._run_actions = 0
        self._wake = False
        self._last_evidence_error: str | None = None
        self._draining = False
        self._behind = False  # the last observation saw a newer epoch or audit entry
        self._cancel_unrecorded = False

    def _console(self) -> bool:
        """The Web UI console behaviour applies (False while replaying older histories)."""
        if not self._rt.console:
            self._rt.console = workflow.patched(PATCH_UI_CONSOLE)
        return self._rt.console

    # ---- run loop --------------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: MigrationInput) -> MigrationStatus:
        self._console()  # decided once per run, before any command
        if not self._rt.initialized:
            await self._guarded(self._adopt_published_state, retry=True)
        if self._cancel_unrecorded:
            await self._record_cancel_refusal()
        self._refresh_ui()
        while self._rt.position.phase != Phase.COMPLETE:
            await self._guarded(self._watch_once, retry=False)
        await self._guarded(self._handlers_finished, retry=True)
        self._refresh_ui()
        return self.status()

    async def _handlers_finished(self) -> None:
        await workflow.wait_condition(workflow.all_handlers_finished)

    async def _guarded(self, step: Callable[[], Awaitable[None]], *, retry: bool) -> None:
        """Run `step`; a cancellation request is refused (recorded, the phase stays) and the
        step runs again when `retry` (a watch round just ends early)."""
        while True:
            try:
                await step()
                return
            except BaseException as exc:  # continue-as-new is a BaseException: re-raised
                if not is_cancelled_exception(exc) or not self._console():
                    raise  # histories recorded before the console: cancelled as they were
                await self._refuse_cancel()
                if not retry:
                    return

    async def _watch_once(self) -> None:
        """One round: evidence (and catching up when behind), automatic rollback, UI,
        continue-as-new, then wait for the interval or an action."""
        await self._collect_evidence()
        if self._behind:
            await self._shielded(self._locked_catch_up)
        auto = (None if self._evidence is None else
                decide_auto_rollback(self._rt.position, self._evidence, self._config.thresholds))
        if auto is not None:
            await self._shielded(self._auto_rollback)
        self._refresh_ui()
        if self._should_continue_as_new():
            await workflow.wait_condition(
                lambda: workflow.all_handlers_finished() and not self._lock.locked())
            workflow.continue_as_new(MigrationInput(
                config=self._config,
                runtime=self._rt.model_copy(update={"runs": self._rt.runs + 1}),
            ))
        self._wake = False
        with contextlib.suppress(TimeoutError):
            await workflow.wait_condition(
                lambda: self._wake or self._rt.position.phase == Phase.COMPLETE,
                timeout=timedelta(seconds=self._config.evidence_interval_s),
            )

    async def _shielded(self, step: Callable[[], Awaitable[None]]) -> None:
        """A cancellation request must not cut a state change in half (published but not
        audited): the step runs to its end; the request is refused after it."""
        if self._console():
            await asyncio.shield(asyncio.ensure_future(step()))
        else:
            await step()  # histories recorded before the console: as they ran

    async def _locked_catch_up(self) -> None:
        async with self._lock:
            await self._catch_up(await self._sync())

    async def _auto_rollback(self) -> None:
        async with self._lock:
            if self._console() and await self._catch_up(await self._sync()):
                return  # the evidence spoke for a position this workflow no longer holds
            # Re-decide under the lock: an engineer's action may have landed meanwhile.
            again = (None if self._evidence is None else decide_auto_rollback(
                self._rt.position, self._evidence, self._config.thresholds))
            if again is not None:
                self._rt.auto_rollbacks += 1
                await self._apply(again, actor=ACTOR_WORKFLOW, automatic=True)

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        if (self._run_actions >= self._config.actions_per_run_max
                or info.is_continue_as_new_suggested()):
            return True
        # Bounded whatever the server suggests: replays stay short, the UI's history small.
        return (self._console() and info.get_current_history_length()
                >= self._config.history_events_per_run_max)

    async def _adopt_published_state(self) -> None:
        """Start from what is published (a restarted migration resumes where it stands)."""
        if self._console():
            self._adopt(await self._sync())
            self._rt.position_since = self._rt.position_since or workflow.now()
            self._rt.initialized = True
            return
        states: list[MigrationState] = await workflow.execute_activity(
            ACTIVITY_LOAD_STATE, LoadStateInput(scopes=self._config.scopes),
            result_type=list[MigrationState], start_to_close_timeout=ACTIVITY_TIMEOUT,
            retry_policy=ACTIVITY_RETRY,
        )
        if states:
            newest = max(states, key=lambda s: s.epoch)
            self._rt.epoch = max(s.epoch for s in states)
            self._rt.position = Position(phase=newest.phase,
                                         rollout_percent=newest.rollout_percent)
        self._rt.position_since = workflow.now()
        self._rt.initialized = True

    async def _sync(self) -> SyncResult:
        result: SyncResult = await workflow.execute_activity(
            ACTIVITY_SYNC, SyncRequest(migration_id=self._config.migration_id,
                                       scopes=self._config.scopes),
            result_type=SyncResult, start_to_close_timeout=ACTIVITY_TIMEOUT,
            retry_policy=ACTIVITY_RETRY,
        )
        return result

    def _adopt(self, sync: SyncResult) -> None:
        """Take the published position, the audit's sequence and recent actions, and the
        clocks the newest audit entry recorded (when it speaks for the published epoch)."""
        self._rt.audit_seq = max(self._rt.audit_seq, sync.last_seq)
        if sync.audit_tail:
            self._rt.recent_actions = [_record_of(e) for e in sync.audit_tail][
                -RECENT_ACTIONS_MAX:]
        if not sync.states:
            return
        newest = max(sync.states, key=lambda s: s.epoch)
        last = sync.audit_tail[-1] if sync.audit_tail else None
        current = last is not None and (last.epoch, last.to_phase, last.to_rollout) == (
            newest.epoch, newest.phase, newest.rollout_percent)
        self._rt.epoch = max(s.epoch for s in sync.states)
        self._rt.position = Position(phase=newest.phase, rollout_percent=newest.rollout_percent,
                                     paused=current and last is not None and last.paused)
        # Unknown clocks stay unknown: the unapplied-writes gate then reads "unknown" (shut)
        # and the stable window starts again; never a later start that would miss writes.
        self._rt.position_since = last.position_since if current and last else None
        self._rt.write_switch_at = last.write_switch_at if current and last else None

    async def _catch_up(self, sync: SyncResult) -> bool:
        """Under the lock: when what is published or audited is ahead of this workflow (it was
        reset to an earlier point, or another writer acted), adopt it and say so. Returns
        whether it was behind."""
        self._behind = False
        epoch = max((s.epoch for s in sync.states), default=0)
        if epoch <= self._rt.epoch and sync.last_seq <= self._rt.audit_seq:
            return False
        source, own_epoch = self._rt.position, self._rt.epoch
        self._adopt(sync)
        self._rt.position_since = self._rt.position_since or workflow.now()
        self._evidence = None
        await self._record(
            "adopt_published", actor=ACTOR_WORKFLOW, source=source, target=self._rt.position,
            automatic=True, gates=[],
            reason=f"the published state (epoch {epoch}, audit #{sync.last_seq}) is ahead of "
                   f"this workflow (epoch {own_epoch}; reset to an earlier point, or another "
                   "writer): continuing from the published phase")
        self._refresh_ui()
        return True

    async def _refuse_cancel(self) -> None:
        """A cancellation request (the Web UI's main button) leaves the migration running in
        its phase: recorded, shown, logged. Terminate stops the workflow instead."""
        self._rt.cancel_refusals += 1
        workflow.logger.warning(
            "migration %s: cancellation request refused; it keeps running in %s",
            self._config.migration_id, describe(self._rt.position))
        if not self._rt.initialized:
            self._cancel_unrecorded = True  # the audit sequence is not known yet
            return
        await self._record_cancel_refusal()

    async def _record_cancel_refusal(self) -> None:
        self._cancel_unrecorded = False
        async with self._lock:
            pos = self._rt.position
            await self._record(
                "cancel_refused", actor=ACTOR_CANCEL, source=pos, target=pos, automatic=True,
                gates=[],
                reason=f"cancellation refused: the migration keeps running in {describe(pos)} "
                       "(rollback changes the phase; Terminate stops the workflow and leaves "
                       "the phase published)")
        self._refresh_ui()

    async def _collect_evidence(self) -> None:
        now = workflow.now()
        since = now - timedelta(seconds=self._config.thresholds.window_s)
        if self._rt.position_since is not None and self._rt.position_since > since:
            since = self._rt.position_since
        request = EvidenceRequest(
            migration_id=self._config.migration_id, scopes=self._config.scopes,
            phase=self._rt.position.phase, since=since,
            window_s=self._config.thresholds.window_s, write_switch_at=self._write_switch_at(),
            position=self._rt.position, position_since=self._rt.position_since,
            thresholds=self._config.thresholds,
        )
        try:
            if self._console():
                seen: Observation = await workflow.execute_activity(
                    ACTIVITY_OBSERVE, request, result_type=Observation,
                    start_to_close_timeout=ACTIVITY_TIMEOUT, retry_policy=EVIDENCE_RETRY)
                evidence = seen.evidence
                self._behind = (seen.published_epoch > self._rt.epoch
                                or seen.last_audit_seq > self._rt.audit_seq)
            else:
                evidence = await workflow.execute_activity(
                    ACTIVITY_COLLECT_EVIDENCE, request, result_type=Evidence,
                    start_to_close_timeout=ACTIVITY_TIMEOUT, retry_policy=EVIDENCE_RETRY)
        except Exception as exc:  # keep the last evidence; the UI shows why it is stale
            if is_cancelled_exception(exc) and self._console():
                raise  # the workflow's cancellation, not the evidence's failure: refused
            self._last_evidence_error = str(exc)[:300]
            return
        self._last_evidence_error = None
        age_s = 0.0
        if self._rt.position_since is not None:
            age_s = max(0.0, (now - self._rt.position_since).total_seconds())
        self._evidence = evidence.model_copy(update={"phase_age_s": age_s})

    def _write_switch_at(self) -> datetime | None:
        """When writes last started flowing to the other store in their current direction."""
        return self._rt.write_switch_at

    # ---- applying a decision ----------------------------------------------------------------

    async def _apply(self, decision: Decision, *, actor: str, automatic: bool = False,
                     reason: str = "", request: dict[str, Any] | None = None,
                     update_id: str | None = None) -> MigrationStatus:
        assert decision.allowed, decision.reason
        source, target = decision.source, decision.target
        assert source == self._rt.position, "decision made on a stale position"
        moved = (source.phase, source.rollout_percent) != (target.phase, target.rollout_percent)
        # Before the new state is written nobody can act on it: the earliest moment an
        # operation can be answered under `target`.
        published_at = workflow.now()
        if moved:
            await self._publish(target, published_at)
        self._rt.position = target
        if moved:
            self._rt.position_since = workflow.now()
            if source.phase == Phase.LEGACY or (
                    (source.phase in TB_ANSWERS) != (target.phase in TB_ANSWERS)):
                # Into tb_primary, TigerBeetle may answer from the moment the state is
                # written (what it answers is owed to MongoDB); forward switches count from
                # when every worker follows (MongoDB-only answers before that owe nothing).
                self._rt.write_switch_at = (published_at if target.phase == Phase.TB_PRIMARY
                                            else self._rt.position_since)
        why = clip_reason(reason.strip() or decision.reason)
        if reason.strip() and decision.reason and decision.reason != reason.strip():
            why = clip_reason(f"{reason.strip()} ({decision.reason})")
        record = await self._record(
            decision.action.value, actor=actor, source=source, target=target, reason=why,
            automatic=automatic, gates=[g.reason for g in decision.gates], request=request,
            update_id=update_id)
        if moved and target.phase == Phase.COMPLETE:
            await self._complete(published_at)
        self._run_actions += 1
        if moved:
            self._evidence = None  # evidence of the old position does not speak for the new one
        self._wake = True
        self._refresh_ui()
        return self.status().model_copy(update={"summary": _action_summary(record)})

    async def _publish(self, target: Position, published_at: datetime) -> None:
        self._rt.epoch += 1
        await workflow.execute_activity(
            ACTIVITY_PUBLISH_STATE,
            PublishStateInput(states=[
                MigrationState(scope=scope, phase=target.phase,
                               rollout_percent=target.rollout_percent, epoch=self._rt.epoch,
                               migration_id=self._config.migration_id, updated_at=published_at)
                for scope in self._config.scopes
            ]),
            start_to_close_timeout=ACTIVITY_TIMEOUT, retry_policy=ACTIVITY_RETRY,
        )
        # Readers cache the state briefly: once this returns, every worker follows it.
        if self._config.state_cache_ttl_s > 0:
            await workflow.sleep(timedelta(seconds=self._config.state_cache_ttl_s))

    async def _record(self, action: str, *, actor: str, source: Position, target: Position,
                      reason: str, automatic: bool, gates: list[str],
                      request: dict[str, Any] | None = None,
                      update_id: str | None = None) -> ActionRecord:
        """Remember the action and write it to the audit log (who, why, the input as sent)."""
        self._rt.audit_seq += 1
        record = ActionRecord(
            seq=self._rt.audit_seq, at=workflow.now(), actor=actor, action=action,
            from_position=source, to_position=target, epoch=self._rt.epoch, reason=reason,
            automatic=automatic, update_id=update_id,
        )
        self._rt.recent_actions = [*self._rt.recent_actions, record][-RECENT_ACTIONS_MAX:]
        await workflow.execute_activity(
            ACTIVITY_WRITE_AUDIT,
            AuditEntry(
                migration_id=self._config.migration_id, seq=record.seq, at=record.at,
                actor=actor, action=record.action, from_phase=source.phase,
                to_phase=target.phase, from_rollout=source.rollout_percent,
                to_rollout=target.rollout_percent, paused=target.paused, epoch=self._rt.epoch,
                reason=reason, automatic=automatic, gates=gates,
                evidence=None if self._evidence is None else self._evidence.model_dump(
                    mode="json"),
                request=request, position_since=self._rt.position_since,
                write_switch_at=self._rt.write_switch_at, update_id=update_id,
            ),
            start_to_close_timeout=ACTIVITY_TIMEOUT, retry_policy=ACTIVITY_RETRY,
        )
        return record

    async def _complete(self, published_at: datetime) -> None:
        unprojected = None
        if workflow.patched(PATCH_DRAIN_BEFORE_ARCHIVE):
            unprojected = await self._drain_reverse_projection(cutoff=published_at)
        archive: ArchiveInfo = await workflow.execute_activity(
            ACTIVITY_ARCHIVE_LEGACY,
            ArchiveRequest(migration_id=self._config.migration_id,
                           scopes=self._config.scopes, archive_dir=self._config.archive_dir),
            result_type=ArchiveInfo, start_to_close_timeout=ARCHIVE_TIMEOUT,
            retry_policy=ACTIVITY_RETRY,
        )
        self._rt.archive = (archive if unprojected is None else
                            archive.model_copy(update={"unprojected_writes": unprojected}))

    async def _drain_reverse_projection(self, cutoff: datetime) -> int | None:
        """complete is published and every reader follows it, so no operation is answered
        under tb_primary any more; wait until the wallet workflows' reverse projection has
        written all of them to MongoDB, so that the archive holds every operation.

        `cutoff` is when complete was published: what TigerBeetle answered before it was
        answered under tb_primary and is owed to MongoDB; after it, an operation may have been
        answered under complete, which owes MongoDB nothing (counting those would wait for
        writes that never come). The few tb_primary answers of the workers' cache interval
        after it are still projected by their wallet workflows, only not waited for here."""
        switch_at = self._rt.write_switch_at
        if switch_at is None or self._rt.position_since is None:
            return None  # never ran tb_primary under this workflow: nothing to wait for
        timeout = timedelta(seconds=self._config.complete_drain_timeout_s)
        self._draining = True
        self._refresh_ui()
        try:
            result: ReverseDrainResult = await workflow.execute_activity(
                ACTIVITY_AWAIT_REVERSE_DRAIN,
                ReverseDrainRequest(scopes=self._config.scopes, switch_at=switch_at,
                                    cutoff=cutoff, deadline=workflow.now() + timeout),
                result_type=ReverseDrainResult, start_to_close_timeout=timeout + DRAIN_SLACK,
                heartbeat_timeout=DRAIN_HEARTBEAT, retry_policy=ACTIVITY_RETRY,
            )
        finally:
            self._draining = False
        if result.unapplied:
            workflow.logger.warning(
                "migration %s: %s operation(s) answered by TigerBeetle in tb_primary are not "
                "in MongoDB after %s: archived without them (see reconciliation)",
                self._config.migration_id, result.unapplied, timeout)
        return result.unapplied

    async def _decide_and_apply(self, decide: Callable[[], Decision], req: UpdateRequest,
                                reason: str) -> MigrationStatus:
        await workflow.wait_condition(lambda: self._rt.initialized)
        async with self._lock:
            if self._console():  # decide on the published position, not a stale memory
                await self._catch_up(await self._sync())
            info = workflow.current_update_info()
            uid = None if info is None else info.id
            done = next((r for r in self._rt.recent_actions
                         if uid is not None and r.update_id == uid), None)
            if done is not None and self._console():  # re-delivered by a reset
                raise Refusal(f"{done.action} already applied as audit entry #{done.seq} "
                              f"(update {uid}): not applied twice", type=REJECTED_ERROR_TYPE)
            decision: Decision = decide()
            if not decision.allowed:  # the position changed since the validator ran
                raise _reject(decision)
            if self._needs_approval(decision):
                return await self._request_approval(decision, req, reason, uid)
            return await self._apply(decision, actor=req.actor, reason=reason,
                                     request=sent_fields(req), update_id=uid)

    # ---- four eyes ----------------------------------------------------------------------------

    def _needs_approval(self, decision: Decision) -> bool:
        """force_advance skips gates and complete cannot be undone: both need a second engineer
        when the migration asks for it (patched: see PATCH_FOUR_EYES)."""
        gated = decision.action.value == UPDATE_FORCE_ADVANCE or (
            decision.target.phase == Phase.COMPLETE and decision.source.phase != Phase.COMPLETE)
        return (gated and self._config.approvals_required > 0
                and workflow.patched(PATCH_FOUR_EYES))

    async def _request_approval(self, decision: Decision, req: UpdateRequest, reason: str,
                                uid: str | None) -> MigrationStatus:
        """Record who asked and why; nothing moves until another engineer approves."""
        pending = self._rt.pending_approval
        if pending is not None:
            raise Refusal(f"{decision.action.value} refused: {pending.update} by {pending.actor} "
                          f"(audit #{pending.seq}) already awaits `approve`",
                          type=REJECTED_ERROR_TYPE)
        update = decision.action.value
        why = clip_reason(f"{update} to {describe(decision.target)} awaits another engineer's "
                          f"approve: {reason.strip() or req.reason or decision.reason}")
        record = await self._record(
            "approval_requested", actor=req.actor, source=decision.source,
            target=decision.source, reason=why, automatic=False,
            gates=[g.reason for g in decision.gates], request=sent_fields(req), update_id=uid)
        self._rt.pending_approval = PendingApproval(
            update=update, request=sent_fields(req), actor=req.actor, reason=req.reason,
            seq=record.seq, from_position=decision.source, to_position=decision.target)
        self._refresh_ui()
        return self.status().model_copy(update={"summary": (
            f"{update} to {describe(decision.target)} awaits approval by an engineer other "
            f"than {req.actor} (audit #{record.seq}): send `approve`")})

    def _check_approver(self, r: ApproveRequest) -> PendingApproval:
        pending = self._rt.pending_approval
        if pending is None:
            raise Refusal("approve refused: nothing awaits approval", type=REJECTED_ERROR_TYPE)
        if r.actor == ACTOR_UNNAMED:
            raise Refusal('approve refused: name the approver, e.g. {"actor": "bob"}',
                          type=REJECTED_ERROR_TYPE)
        if r.actor == pending.actor:
            raise Refusal(f"approve refused: {pending.actor} asked for {pending.update} "
                          f"(audit #{pending.seq}); another engineer must approve it",
                          type=REJECTED_ERROR_TYPE)
        return pending

    @workflow.update(name=UPDATE_APPROVE, description=UPDATE_DESCRIPTIONS[UPDATE_APPROVE])
    async def approve(self, req: Any = None) -> MigrationStatus:
        r = _input(UPDATE_APPROVE, ApproveRequest, req)
        await workflow.wait_condition(lambda: self._rt.initialized)
        async with self._lock:
            pending = self._check_approver(r)
            self._rt.pending_approval = None  # approved or stale: either way it is used up
            force = pending.update == UPDATE_FORCE_ADVANCE
            asked: AdvanceRequest | ForceAdvanceRequest = (
                ForceAdvanceRequest if force else AdvanceRequest).model_validate(pending.request)
            decision = self._advance_decision(asked, force)
            if not decision.allowed:
                raise _reject(decision)
            if (decision.source, decision.target) != (pending.from_position,
                                                      pending.to_position):
                raise Refusal(f"approve refused: the migration moved since audit #{pending.seq}; "
                              f"{pending.actor} must ask again", type=REJECTED_ERROR_TYPE)
            info = workflow.current_update_info()
            approval = f"approved by {r.actor}" + (f": {r.reason.strip()}" if r.reason.strip()
                                                  else "")
            return await self._apply(
                decision, actor=pending.actor,
                reason=f"{pending.reason.strip() or decision.reason}; {approval}",
                request={**pending.request, "approved_by": r.actor,
                         "approval_reason": r.reason, "approval_of": pending.seq},
                update_id=None if info is None else info.id)

    @approve.validator
    def _validate_approve(self, req: Any = None) -> None:
        r = _input(UPDATE_APPROVE, ApproveRequest, req)
        if self._rt.initialized:
            self._check_approver(r)

    # ---- updates ------------------------------------------------------------------------------
    # Inputs are `Any` on purpose: the Web UI sends no payload for empty Data and whatever JSON
    # was typed; parse_update_input answers a misfit in one line instead of a decoding failure.

    def _ev(self) -> Evidence:
        return self._evidence or Evidence()

    def _advance_decision(self, req: AdvanceRequest | ForceAdvanceRequest, force: bool) -> Decision:
        return decide_advance(self._rt.position, self._ev(), self._config.thresholds,
                              confirm=req.confirm, force=force, reason=req.reason)

    @workflow.update(name=UPDATE_ADVANCE, description=UPDATE_DESCRIPTIONS[UPDATE_ADVANCE])
    async def advance(self, req: Any = None) -> MigrationStatus:
        r = _input(UPDATE_ADVANCE, AdvanceRequest, req)
        return await self._decide_and_apply(lambda: self._advance_decision(r, False), r,
                                            r.reason)

    @advance.validator
    def _validate_advance(self, req: Any = None) -> None:
        self._validate(self._advance_decision(_input(UPDATE_ADVANCE, AdvanceRequest, req),
                                              False))

    @workflow.update(name=UPDATE_FORCE_ADVANCE,
                     description=UPDATE_DESCRIPTIONS[UPDATE_FORCE_ADVANCE])
    async def force_advance(self, req: Any = None) -> MigrationStatus:
        r = _input(UPDATE_FORCE_ADVANCE, ForceAdvanceRequest, req)
        return await self._decide_and_apply(lambda: self._advance_decision(r, True), r, "")

    @force_advance.validator
    def _validate_force_advance(self, req: Any = None) -> None:
        self._validate(self._advance_decision(
            _input(UPDATE_FORCE_ADVANCE, ForceAdvanceRequest, req), True))

    @workflow.update(name=UPDATE_ROLLBACK, description=UPDATE_DESCRIPTIONS[UPDATE_ROLLBACK])
    async def rollback(self, req: Any = None) -> MigrationStatus:
        r = _input(UPDATE_ROLLBACK, RollbackRequest, req)
        return await self._decide_and_apply(
            lambda: decide_rollback(self._rt.position, r.to, r.rollout_percent), r, r.reason)

    @rollback.validator
    def _validate_rollback(self, req: Any = None) -> None:
        r = _input(UPDATE_ROLLBACK, RollbackRequest, req)
        self._validate(decide_rollback(self._rt.position, r.to, r.rollout_percent))

    @workflow.update(name=UPDATE_SET_ROLLOUT,
                     description=UPDATE_DESCRIPTIONS[UPDATE_SET_ROLLOUT])
    async def set_rollout(self, req: Any = None) -> MigrationStatus:
        r = _input(UPDATE_SET_ROLLOUT, SetRolloutRequest, req)
        return await self._decide_and_apply(
            lambda: decide_set_rollout(self._rt.position, r.percent, self._ev(),
                                       self._config.thresholds), r, r.reason)

    @set_rollout.validator
    def _validate_set_rollout(self, req: Any = None) -> None:
        r = _input(UPDATE_SET_ROLLOUT, SetRolloutRequest, req)
        self._validate(decide_set_rollout(self._rt.position, r.percent, self._ev(),
                                          self._config.thresholds))

    @workflow.update(name=UPDATE_PAUSE, description=UPDATE_DESCRIPTIONS[UPDATE_PAUSE])
    async def pause(self, req: Any = None) -> MigrationStatus:
        r = _input(UPDATE_PAUSE, PauseRequest, req)
        return await self._decide_and_apply(
            lambda: decide_pause(self._rt.position, True), r, r.reason)

    @pause.validator
    def _validate_pause(self, req: Any = None) -> None:
        _input(UPDATE_PAUSE, PauseRequest, req)
        self._validate(decide_pause(self._rt.position, True))

    @workflow.update(name=UPDATE_RESUME, description=UPDATE_DESCRIPTIONS[UPDATE_RESUME])
    async def resume(self, req: Any = None) -> MigrationStatus:
        r = _input(UPDATE_RESUME, PauseRequest, req)
        return await self._decide_and_apply(
            lambda: decide_pause(self._rt.position, False), r, r.reason)

    @resume.validator
    def _validate_resume(self, req: Any = None) -> None:
        _input(UPDATE_RESUME, PauseRequest, req)
        self._validate(decide_pause(self._rt.position, False))

    def _validate(self, decision: Decision) -> None:
        if not self._rt.initialized:
            return  # the handler waits for the published state, then decides under the lock
        if not decision.allowed:
            raise _reject(decision)

    # ---- queries and UI -----------------------------------------------------------------------

    def _next_gates(self) -> tuple[str | None, list[GateResult]]:
        pos = self._rt.position
        target = next_position(pos)
        if target is None:
            return None, []
        return describe(target), gates_for_move(pos, target, self._ev(), self._config.thresholds)

    @workflow.query(name=QUERY_STATUS, description=QUERY_DESCRIPTIONS[QUERY_STATUS])
    def status(self) -> MigrationStatus:
        step, gates = self._next_gates()
        return MigrationStatus(
            summary=self._headline(markdown=False),
            migration_id=self._config.migration_id, scopes=self._config.scopes,
            phase=self._rt.position.phase, rollout_percent=self._rt.position.rollout_percent,
            paused=self._rt.position.paused, epoch=self._rt.epoch,
            position_since=self._rt.position_since, evidence=self._evidence,
            next_gates=gates, next_step=step, recent_actions=self._rt.recent_actions,
            archive=self._rt.archive, auto_rollbacks=self._rt.auto_rollbacks,
            run_actions=self._run_actions, runs=self._rt.runs,
            pending_approval=self._rt.pending_approval,
        )

    @workflow.query(name=QUERY_GATES, description=QUERY_DESCRIPTIONS[QUERY_GATES])
    def gates(self) -> GatesView:
        step, gates = self._next_gates()
        return GatesView(next_step=step, all_passed=bool(gates) and not failed_reasons(gates),
                         gates=gates, evidence=self._evidence)

    def _refresh_ui(self) -> None:
        pos = self._rt.position
        if not self._console() or self._search_attributes_differ(pos):
            workflow.upsert_search_attributes([
                MIGRATION_PHASE.value_set(pos.phase.value),
                ROLLOUT_PERCENT.value_set(pos.rollout_percent),
            ])
        workflow.set_current_details(self._details_markdown())

    @staticmethod
    def _search_attributes_differ(pos: Position) -> bool:
        """What the workflow last wrote (carried across continue-as-new by the server)."""
        current = workflow.info().typed_search_attributes
        return (current.get(MIGRATION_PHASE) != pos.phase.value
                or current.get(ROLLOUT_PERCENT) != pos.rollout_percent)

    def _headline(self, *, markdown: bool) -> str:
        """Phase, rollout, paused, since, epoch, evidence age: the details' first line and the
        status query's summary."""
        pos, ev, now = self._rt.position, self._evidence, workflow.now()
        phase = f"**{pos.phase.value}**" if markdown else pos.phase.value
        parts = [phase, f"rollout {pos.rollout_percent}%",
                 ("**PAUSED**" if markdown else "PAUSED") if pos.paused else "running"]
        since = self._rt.position_since
        if since is not None:
            parts.append(f"since {_utc(since)} ({_duration((now - since).total_seconds())})")
        parts.append(f"epoch {self._rt.epoch}")
        if ev is not None and ev.collected_at is not None:
            age = _duration((now - ev.collected_at).total_seconds())
            parts.append(f"evidence {_utc(ev.collected_at)} ({age} old)")
        else:
            parts.append("evidence: collecting…" if self._last_evidence_error is None
                         else "evidence unavailable")
        return " · ".join(parts)

    def _details_markdown(self) -> str:
        """The workflow page's Current Details: lists only (the UI's renderer draws tables
        without cell padding), blank lines around every block, PASS/FAIL as words."""
        lines = [self._headline(markdown=True), ""]
        if self._last_evidence_error is not None:
            lines += [f"_Evidence unavailable: {self._last_evidence_error}_", ""]
        lines += self._gates_markdown()
        if self._draining:
            lines += ["**Completing:** waiting for the reverse projection to write every "
                      "operation answered in tb_primary to MongoDB, then archiving", ""]
        if self._rt.archive is not None:
            a = self._rt.archive
            lines += [f"**Archive:** `{a.path}` sha256 `{a.sha256[:16]}…` "
                      f"({a.wallets} wallets, {a.transactions} transactions)", ""]
            if a.unprojected_writes:
                lines += [f"**WARNING:** {a.unprojected_writes} operation(s) answered by "
                          "TigerBeetle never reached MongoDB (divergences): not in the "
                          "archive", ""]
        lines += self._evidence_markdown() + self._actions_markdown()
        lines += [
            f"**Act:** More Actions → Send an Update: `advance` (Data optional, e.g. "
            f"`{UPDATE_EXAMPLES[UPDATE_ADVANCE]}`), `rollback` `{{\"to\": \"...\"}}`, "
            "`set_rollout` `{\"percent\": 50}`, `pause`, `resume`, `force_advance` "
            "`{\"reason\": \"...\"}`; put your name in `actor`.",
            "",
            f"Migration `{self._config.migration_id}` · scopes "
            f"{', '.join(self._config.scopes)} · run {self._rt.runs}",
        ]
        return "\n".join(lines)

    def _gates_markdown(self) -> list[str]:
        step, gates = self._next_gates()
        if step is None:
            return ["**Complete:** no next step.", ""]
        failed = [g for g in gates if not g.passed]
        verdict = (f"{len(failed)} of {len(gates)} gate(s) FAIL" if failed
                   else "all gates PASS" if gates else "no gates")
        lines = [f"**Next: {step}** ({verdict})", ""]
        for g in gates:
            line = (f"- **{'PASS' if g.passed else 'FAIL'}** {g.name}: {g.measured} "
                    f"(threshold {g.threshold})")
            if not g.passed:
                hint = next_steps(Decision(action=ActionKind.ADVANCE, allowed=False,
                                           source=self._rt.position,
                                           target=self._rt.position, gates=[g]))
                line += f". Next: {hint.split('; or ')[0]}"
            lines.append(line)
        return [*lines, ""] if gates else lines

    def _evidence_markdown(self) -> list[str]:
        ev = self._evidence
        if ev is None:
            return []
        ratio = ev.latency_ratio
        recon = pct(ev.reconciliation_match_rate)
        if ev.reconciliation_at is not None:
            recon += f" at {_utc(ev.reconciliation_at)}"
        if ev.reconciliation is not None:
            recon += f" (report {ev.reconciliation.run_id})"
        return [
            "**Evidence**", "",
            f"- shadow match rate: {pct(ev.shadow_match_rate)} ({ev.shadow_compared} "
            f"compared, {ev.shadow_in_flight} in flight)",
            f"- fallback rate: {pct(ev.fallback_rate)} ({ev.cutover_reads} cutover reads)",
            f"- TigerBeetle read errors: {pct(ev.error_rate)} ({ev.tb_reads} reads)",
            "- latency ratio, TigerBeetle p95 / MongoDB p95: "
            + ("no data" if ratio is None else f"{ratio:.3f}"),
            "- unapplied writes: "
            + ("unknown" if ev.unapplied_writes is None else str(ev.unapplied_writes)),
            f"- reconciliation: {recon}",
            f"- backfill: {'complete' if ev.backfill_complete else 'not complete'}",
            "",
        ]

    def _actions_markdown(self) -> list[str]:
        shown = self._rt.recent_actions[-DETAILS_ACTIONS_SHOWN:][::-1]
        if not shown:
            return []
        lines = ["**Recent actions** (newest first)", ""]
        for r in shown:
            why = r.reason if len(r.reason) <= DETAILS_REASON_MAX else (
                r.reason[: DETAILS_REASON_MAX - 1] + "…")
            lines.append(f"- {_utc(r.at)} **{r.actor}**: {_action_summary(r)}: {why}")
        return [*lines, ""]


def _record_of(entry: AuditEntry) -> ActionRecord:
    """An audit entry as the recent action it was (the source's pause flag is not kept)."""
    return ActionRecord(
        seq=entry.seq, at=entry.at, actor=entry.actor, action=entry.action,
        from_position=Position(phase=entry.from_phase, rollout_percent=entry.from_rollout),
        to_position=Position(phase=entry.to_phase, rollout_percent=entry.to_rollout,
                             paused=entry.paused),
        epoch=entry.epoch, reason=entry.reason, automatic=entry.automatic,
        update_id=entry.update_id,
    )
