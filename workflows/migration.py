"""MigrationWorkflow: one long-running workflow per migration, operated from the Temporal Web UI.

It owns the phase, the rollout percentage and the gate thresholds. Engineers act through
Updates (`advance`, `force_advance`, `rollback`, `set_rollout`, `pause`, `resume`); each
validator decides with the evidence the workflow last collected and rejects an illegal or
unproven step with the rule or gate that failed (rejected updates leave no history and write
nothing). An accepted step bumps the epoch, publishes MigrationState for every scope, waits out
the readers' state cache, writes the audit log, and refreshes the search attributes and the
markdown details shown on the workflow's page. A loop collects evidence every
`evidence_interval_s` and rolls back one phase by itself when the error or mismatch rate passes
its threshold. The run continues-as-new after a bounded number of actions, carrying its state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from messages.migration import (
        ACTIVITY_ARCHIVE_LEGACY,
        ACTIVITY_AWAIT_REVERSE_DRAIN,
        ACTIVITY_COLLECT_EVIDENCE,
        ACTIVITY_LOAD_STATE,
        ACTIVITY_PUBLISH_STATE,
        ACTIVITY_WRITE_AUDIT,
        QUERY_GATES,
        QUERY_STATUS,
        RECENT_ACTIONS_MAX,
        UPDATE_ADVANCE,
        UPDATE_FORCE_ADVANCE,
        UPDATE_PAUSE,
        UPDATE_RESUME,
        UPDATE_ROLLBACK,
        UPDATE_SET_ROLLOUT,
        ActionRecord,
        AdvanceRequest,
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
        PauseRequest,
        PublishStateInput,
        ReverseDrainRequest,
        ReverseDrainResult,
        RollbackRequest,
        SetRolloutRequest,
    )
    from walletcore.gates import Evidence, GateResult, failed_reasons, pct
    from walletcore.phases import MigrationState, Phase
    from walletcore.transitions import (
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

MIGRATION_PHASE = SearchAttributeKey.for_keyword("MigrationPhase")
ROLLOUT_PERCENT = SearchAttributeKey.for_int("RolloutPercent")
REJECTED_ERROR_TYPE = "TransitionRejected"

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
DRAIN_SLACK = timedelta(seconds=60)
DRAIN_HEARTBEAT = timedelta(seconds=30)
# Phases whose write path answers from TigerBeetle (a switch in/out of these drains first).
TB_ANSWERS = frozenset({Phase.TB_PRIMARY, Phase.COMPLETE})


def _reject(reason: str) -> ApplicationError:
    return ApplicationError(reason, type=REJECTED_ERROR_TYPE, non_retryable=True)


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

    # ---- run loop --------------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: MigrationInput) -> MigrationStatus:
        if not self._rt.initialized:
            await self._adopt_published_state()
        self._refresh_ui()
        while self._rt.position.phase != Phase.COMPLETE:
            await self._collect_evidence()
            auto = (None if self._evidence is None else
                    decide_auto_rollback(self._rt.position, self._evidence,
                                         self._config.thresholds))
            if auto is not None:
                async with self._lock:
                    # Re-decide under the lock: an engineer's action may have landed meanwhile.
                    again = (None if self._evidence is None else decide_auto_rollback(
                        self._rt.position, self._evidence, self._config.thresholds))
                    if again is not None:
                        self._rt.auto_rollbacks += 1
                        await self._apply(again, actor="migration-workflow", automatic=True)
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
        await workflow.wait_condition(workflow.all_handlers_finished)
        self._refresh_ui()
        return self.status()

    def _should_continue_as_new(self) -> bool:
        return (self._run_actions >= self._config.actions_per_run_max
                or workflow.info().is_continue_as_new_suggested())

    async def _adopt_published_state(self) -> None:
        """Start from what is published (a restarted migration resumes where it stands)."""
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

    async def _collect_evidence(self) -> None:
        now = workflow.now()
        since = now - timedelta(seconds=self._config.thresholds.window_s)
        if self._rt.position_since is not None and self._rt.position_since > since:
            since = self._rt.position_since
        try:
            evidence: Evidence = await workflow.execute_activity(
                ACTIVITY_COLLECT_EVIDENCE,
                EvidenceRequest(
                    migration_id=self._config.migration_id, scopes=self._config.scopes,
                    phase=self._rt.position.phase, since=since,
                    window_s=self._config.thresholds.window_s,
                    write_switch_at=self._write_switch_at(),
                ),
                result_type=Evidence, start_to_close_timeout=ACTIVITY_TIMEOUT,
                retry_policy=EVIDENCE_RETRY,
            )
        except Exception as exc:  # keep the last evidence; the UI shows why it is stale
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
                     reason: str = "") -> MigrationStatus:
        assert decision.allowed, decision.reason
        source, target = decision.source, decision.target
        assert source == self._rt.position, "decision made on a stale position"
        moved = (source.phase, source.rollout_percent) != (target.phase, target.rollout_percent)
        # Before the new state is written nobody can act on it: the earliest moment an
        # operation can be answered under `target`.
        published_at = workflow.now()
        if moved:
            self._rt.epoch += 1
            now = published_at
            await workflow.execute_activity(
                ACTIVITY_PUBLISH_STATE,
                PublishStateInput(states=[
                    MigrationState(scope=scope, phase=target.phase,
                                   rollout_percent=target.rollout_percent, epoch=self._rt.epoch,
                                   migration_id=self._config.migration_id, updated_at=now)
                    for scope in self._config.scopes
                ]),
                start_to_close_timeout=ACTIVITY_TIMEOUT, retry_policy=ACTIVITY_RETRY,
            )
            # Readers cache the state briefly: once this returns, every worker follows it.
            if self._config.state_cache_ttl_s > 0:
                await workflow.sleep(timedelta(seconds=self._config.state_cache_ttl_s))
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
        self._rt.audit_seq += 1
        why = clip_reason(reason.strip() or decision.reason)
        if reason.strip() and decision.reason and decision.reason != reason.strip():
            why = clip_reason(f"{reason.strip()} ({decision.reason})")
        record = ActionRecord(
            seq=self._rt.audit_seq, at=workflow.now(), actor=actor, action=decision.action.value,
            from_position=source, to_position=target, epoch=self._rt.epoch, reason=why,
            automatic=automatic,
        )
        self._rt.recent_actions = [*self._rt.recent_actions, record][-RECENT_ACTIONS_MAX:]
        await workflow.execute_activity(
            ACTIVITY_WRITE_AUDIT,
            AuditEntry(
                migration_id=self._config.migration_id, seq=record.seq, at=record.at,
                actor=actor, action=record.action, from_phase=source.phase,
                to_phase=target.phase, from_rollout=source.rollout_percent,
                to_rollout=target.rollout_percent, paused=target.paused, epoch=self._rt.epoch,
                reason=why, automatic=automatic,
                gates=[g.reason for g in decision.gates],
                evidence=None if self._evidence is None else self._evidence.model_dump(
                    mode="json"),
            ),
            start_to_close_timeout=ACTIVITY_TIMEOUT, retry_policy=ACTIVITY_RETRY,
        )
        if moved and target.phase == Phase.COMPLETE:
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
        self._run_actions += 1
        if moved:
            self._evidence = None  # evidence of the old position does not speak for the new one
        self._wake = True
        self._refresh_ui()
        return self.status()

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

    async def _decide_and_apply(self, decide: Callable[[], Decision], actor: str,
                                reason: str) -> MigrationStatus:
        await workflow.wait_condition(lambda: self._rt.initialized)
        async with self._lock:
            decision: Decision = decide()
            if not decision.allowed:  # the position changed since the validator ran
                raise _reject(decision.reason)
            return await self._apply(decision, actor=actor, reason=reason)

    # ---- updates ------------------------------------------------------------------------------

    def _ev(self) -> Evidence:
        return self._evidence or Evidence()

    def _advance_decision(self, req: AdvanceRequest | ForceAdvanceRequest, force: bool) -> Decision:
        return decide_advance(self._rt.position, self._ev(), self._config.thresholds,
                              confirm=req.confirm, force=force, reason=req.reason)

    @workflow.update(name=UPDATE_ADVANCE)
    async def advance(self, req: AdvanceRequest) -> MigrationStatus:
        return await self._decide_and_apply(
            lambda: self._advance_decision(req, False), req.actor, req.reason)

    @advance.validator
    def _validate_advance(self, req: AdvanceRequest) -> None:
        self._validate(self._advance_decision(req, False))

    @workflow.update(name=UPDATE_FORCE_ADVANCE)
    async def force_advance(self, req: ForceAdvanceRequest) -> MigrationStatus:
        return await self._decide_and_apply(
            lambda: self._advance_decision(req, True), req.actor, "")

    @force_advance.validator
    def _validate_force_advance(self, req: ForceAdvanceRequest) -> None:
        self._validate(self._advance_decision(req, True))

    @workflow.update(name=UPDATE_ROLLBACK)
    async def rollback(self, req: RollbackRequest) -> MigrationStatus:
        return await self._decide_and_apply(
            lambda: decide_rollback(self._rt.position, req.to, req.rollout_percent),
            req.actor, req.reason)

    @rollback.validator
    def _validate_rollback(self, req: RollbackRequest) -> None:
        self._validate(decide_rollback(self._rt.position, req.to, req.rollout_percent))

    @workflow.update(name=UPDATE_SET_ROLLOUT)
    async def set_rollout(self, req: SetRolloutRequest) -> MigrationStatus:
        return await self._decide_and_apply(
            lambda: decide_set_rollout(self._rt.position, req.percent, self._ev(),
                                       self._config.thresholds), req.actor, req.reason)

    @set_rollout.validator
    def _validate_set_rollout(self, req: SetRolloutRequest) -> None:
        self._validate(decide_set_rollout(self._rt.position, req.percent, self._ev(),
                                          self._config.thresholds))

    @workflow.update(name=UPDATE_PAUSE)
    async def pause(self, req: PauseRequest) -> MigrationStatus:
        return await self._decide_and_apply(
            lambda: decide_pause(self._rt.position, True), req.actor, req.reason)

    @pause.validator
    def _validate_pause(self, req: PauseRequest) -> None:
        self._validate(decide_pause(self._rt.position, True))

    @workflow.update(name=UPDATE_RESUME)
    async def resume(self, req: PauseRequest) -> MigrationStatus:
        return await self._decide_and_apply(
            lambda: decide_pause(self._rt.position, False), req.actor, req.reason)

    @resume.validator
    def _validate_resume(self, req: PauseRequest) -> None:
        self._validate(decide_pause(self._rt.position, False))

    def _validate(self, decision: Decision) -> None:
        if not self._rt.initialized:
            return  # the handler waits for the published state, then decides under the lock
        if not decision.allowed:
            raise _reject(decision.reason)

    # ---- queries and UI -----------------------------------------------------------------------

    def _next_gates(self) -> tuple[str | None, list[GateResult]]:
        pos = self._rt.position
        target = next_position(pos)
        if target is None:
            return None, []
        return describe(target), gates_for_move(pos, target, self._ev(), self._config.thresholds)

    @workflow.query(name=QUERY_STATUS)
    def status(self) -> MigrationStatus:
        step, gates = self._next_gates()
        return MigrationStatus(
            migration_id=self._config.migration_id, scopes=self._config.scopes,
            phase=self._rt.position.phase, rollout_percent=self._rt.position.rollout_percent,
            paused=self._rt.position.paused, epoch=self._rt.epoch,
            position_since=self._rt.position_since, evidence=self._evidence,
            next_gates=gates, next_step=step, recent_actions=self._rt.recent_actions,
            archive=self._rt.archive, auto_rollbacks=self._rt.auto_rollbacks,
            run_actions=self._run_actions, runs=self._rt.runs,
        )

    @workflow.query(name=QUERY_GATES)
    def gates(self) -> GatesView:
        step, gates = self._next_gates()
        return GatesView(next_step=step, all_passed=bool(gates) and not failed_reasons(gates),
                         gates=gates, evidence=self._evidence)

    def _refresh_ui(self) -> None:
        pos = self._rt.position
        workflow.upsert_search_attributes([
            MIGRATION_PHASE.value_set(pos.phase.value),
            ROLLOUT_PERCENT.value_set(pos.rollout_percent),
        ])
        workflow.set_current_details(self._details_markdown())

    def _details_markdown(self) -> str:
        pos, ev = self._rt.position, self._evidence
        lines = [
            f"## Migration `{self._config.migration_id}`",
            f"**Phase:** `{describe(pos)}`{' — **PAUSED**' if pos.paused else ''}  ",
            f"**Epoch:** {self._rt.epoch} · **Scopes:** {', '.join(self._config.scopes)}  ",
        ]
        if ev is None:
            lines.append("_Evidence: collecting…_" if self._last_evidence_error is None
                         else f"_Evidence unavailable: {self._last_evidence_error}_")
        else:
            ratio = ev.latency_ratio
            lines += [
                "",
                "| measure | value |",
                "|---|---|",
                f"| shadow match rate | {pct(ev.shadow_match_rate)} "
                f"({ev.shadow_compared} compared, {ev.shadow_in_flight} in flight) |",
                f"| fallback rate | {pct(ev.fallback_rate)} ({ev.cutover_reads} cutover reads) |",
                f"| TB read error rate | {pct(ev.error_rate)} ({ev.tb_reads} reads) |",
                "| latency ratio (TB p95 / MongoDB p95) | "
                + ("no data" if ratio is None else f"{ratio:.3f}") + " |",
                f"| unapplied writes | "
                f"{'unknown' if ev.unapplied_writes is None else ev.unapplied_writes} |",
                f"| last reconciliation | {pct(ev.reconciliation_match_rate)}"
                f"{'' if ev.reconciliation_at is None else f' at {ev.reconciliation_at:%H:%M:%S}'}"
                f" (last full {pct(ev.last_full_reconciliation_match_rate)}) |",
                f"| backfill | {'complete' if ev.backfill_complete else 'not complete'} |",
            ]
        step, gates = self._next_gates()
        if step is not None:
            lines += ["", f"**Next:** `{step}`"]
            lines += [f"- {'✅' if g.passed else '❌'} {g.reason}" for g in gates] or \
                ["- no gates"]
        if self._draining:
            lines += ["", "**Completing:** waiting for the reverse projection to write every "
                          "operation answered in tb_primary to MongoDB, then archiving"]
        if self._rt.archive is not None:
            a = self._rt.archive
            lines += ["", f"**Archive:** `{a.path}` sha256 `{a.sha256[:16]}…` "
                          f"({a.wallets} wallets, {a.transactions} transactions)"]
            if a.unprojected_writes:
                lines.append(f"⚠️ {a.unprojected_writes} operation(s) answered by TigerBeetle "
                             "never reached MongoDB (divergences): not in the archive")
        if self._rt.recent_actions:
            lines += ["", "**Recent actions**"]
            for r in self._rt.recent_actions[-5:][::-1]:
                lines.append(f"- {r.at:%H:%M:%S} {r.actor}: {r.action} "
                             f"{describe(r.from_position)} → {describe(r.to_position)} — "
                             f"{r.reason}")
        return "\n".join(lines)
