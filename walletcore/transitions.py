"""The migration's transition table: which engineer actions are legal, which gates they need,
and when the workflow rolls back by itself (no I/O, deterministic, property-tested).

Every function returns a `Decision`; a rejected decision carries a reason that names the rule
or the failing gates with their measured values and thresholds.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from walletcore.gates import (
    ENTRY_GATES,
    RAISE_ROLLOUT_GATES,
    Evidence,
    GateResult,
    GateThresholds,
    evaluate,
    failed_reasons,
    pct,
    rollout_full,
)
from walletcore.phases import PHASE_ORDER, Phase

# Read cutover advances through these rollout percentages (advance = next step).
ROLLOUT_STEPS: tuple[int, ...] = (10, 50, 90, 100)
REASON_MAX = 500


class ActionKind(StrEnum):
    ADVANCE = "advance"
    FORCE_ADVANCE = "force_advance"
    ROLLBACK = "rollback"
    SET_ROLLOUT = "set_rollout"
    PAUSE = "pause"
    RESUME = "resume"
    AUTO_ROLLBACK = "auto_rollback"


class Position(BaseModel):
    """Where a migration stands."""

    model_config = ConfigDict(frozen=True)

    phase: Phase = Phase.LEGACY
    rollout_percent: int = Field(default=0, ge=0, le=100)
    paused: bool = False


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: ActionKind
    allowed: bool
    source: Position
    target: Position
    gates: list[GateResult] = Field(default_factory=list)
    reason: str = ""

    @property
    def changes_state(self) -> bool:
        return self.source != self.target


class TransitionRejectedError(ValueError):
    """An illegal or unproven transition; the message says which rule or gate."""


def require(decision: Decision) -> Decision:
    if not decision.allowed:
        raise TransitionRejectedError(decision.reason)
    return decision


def phase_index(phase: Phase) -> int:
    return PHASE_ORDER.index(phase)


def rollout_for(phase: Phase, requested: int | None = None) -> int:
    """The rollout a phase implies: 0 before read cutover, 100 from tb_primary on."""
    if phase == Phase.READ_CUTOVER:
        return ROLLOUT_STEPS[0] if requested is None else requested
    return 100 if phase_index(phase) > phase_index(Phase.READ_CUTOVER) else 0


def next_position(pos: Position) -> Position | None:
    """The position `advance` moves to (None after complete)."""
    if pos.phase == Phase.READ_CUTOVER and pos.rollout_percent < 100:
        step = next(s for s in ROLLOUT_STEPS if s > pos.rollout_percent)
        return pos.model_copy(update={"rollout_percent": step})
    index = phase_index(pos.phase)
    if index + 1 >= len(PHASE_ORDER):
        return None
    phase = PHASE_ORDER[index + 1]
    return pos.model_copy(update={"phase": phase, "rollout_percent": rollout_for(phase)})


def _reject(action: ActionKind, pos: Position, reason: str,
            gates: list[GateResult] | None = None) -> Decision:
    return Decision(action=action, allowed=False, source=pos, target=pos, reason=reason,
                    gates=gates or [])


def gates_for_move(pos: Position, target: Position, ev: Evidence,
                   t: GateThresholds) -> list[GateResult]:
    if target.phase == pos.phase:  # a rollout change inside read cutover
        if target.rollout_percent <= pos.rollout_percent:
            return []
        return evaluate(RAISE_ROLLOUT_GATES, ev, t)
    results = evaluate(ENTRY_GATES[target.phase], ev, t)
    if target.phase == Phase.TB_PRIMARY:
        results.insert(0, rollout_full(pos.rollout_percent))
    return results


def decide_advance(pos: Position, ev: Evidence, t: GateThresholds, *, confirm: bool = False,
                   force: bool = False, reason: str = "") -> Decision:
    action = ActionKind.FORCE_ADVANCE if force else ActionKind.ADVANCE
    if pos.paused:
        return _reject(action, pos, "migration is paused: resume it first")
    target = next_position(pos)
    if target is None:
        return _reject(action, pos, "migration is complete: there is no next phase")
    if force and not reason.strip():
        return _reject(action, pos, "force_advance needs a reason")
    if target.phase == Phase.COMPLETE and not confirm:
        return _reject(action, pos, "complete stops the reverse projection, archives the legacy "
                                    "wallets and makes rollback impossible: confirm it "
                                    "explicitly (confirm=true)")
    results = gates_for_move(pos, target, ev, t)
    failed = failed_reasons(results)
    if failed and not force:
        head = (f"cannot advance {describe(pos)} -> {describe(target)}: ")
        return _reject(action, pos, head + "; ".join(failed), results)
    why = reason.strip() or "all gates passed"
    if force and failed:
        why = f"forced past {len(failed)} failed gate(s): {why}"
    return Decision(action=action, allowed=True, source=pos, target=target, gates=results,
                    reason=why)


def decide_rollback(pos: Position, to: Phase, rollout_percent: int | None = None) -> Decision:
    action = ActionKind.ROLLBACK
    if pos.phase == Phase.COMPLETE:
        return _reject(action, pos, "migration is complete: rollback is no longer possible "
                                    "(legacy wallets are archived)")
    if phase_index(to) >= phase_index(pos.phase):
        hint = "; lower the rollout with set_rollout" if to == pos.phase == Phase.READ_CUTOVER \
            else ""
        return _reject(action, pos, f"rollback target {to.value} is not earlier than the current "
                                    f"phase {pos.phase.value}{hint}")
    if rollout_percent is not None and to != Phase.READ_CUTOVER:
        return _reject(action, pos, f"a rollout percentage only applies to read_cutover, "
                                    f"not {to.value}")
    if to == Phase.READ_CUTOVER:
        rollout = 100 if rollout_percent is None else rollout_percent
        if not 0 <= rollout <= 100:
            return _reject(action, pos, f"rollout {rollout} is outside 0..100")
    else:
        rollout = rollout_for(to)
    target = pos.model_copy(update={"phase": to, "rollout_percent": rollout})
    return Decision(action=action, allowed=True, source=pos, target=target,
                    reason=f"rollback {describe(pos)} -> {describe(target)}")


def decide_set_rollout(pos: Position, percent: int, ev: Evidence, t: GateThresholds) -> Decision:
    action = ActionKind.SET_ROLLOUT
    if pos.phase != Phase.READ_CUTOVER:
        return _reject(action, pos, f"set_rollout applies in read_cutover only; the migration is "
                                    f"in {pos.phase.value}")
    if not 0 <= percent <= 100:
        return _reject(action, pos, f"rollout {percent} is outside 0..100")
    if percent == pos.rollout_percent:
        return _reject(action, pos, f"rollout is already {percent}%")
    raising = percent > pos.rollout_percent
    if raising and pos.paused:
        return _reject(action, pos, "migration is paused: resume it before raising the rollout")
    target = pos.model_copy(update={"rollout_percent": percent})
    results = gates_for_move(pos, target, ev, t)
    failed = failed_reasons(results)
    if failed:
        return _reject(action, pos, f"cannot raise the rollout {pos.rollout_percent}% -> "
                                    f"{percent}%: " + "; ".join(failed), results)
    return Decision(action=action, allowed=True, source=pos, target=target, gates=results,
                    reason=("raise" if raising else "lower") + f" rollout to {percent}%")


def decide_pause(pos: Position, paused: bool) -> Decision:
    action = ActionKind.PAUSE if paused else ActionKind.RESUME
    if pos.paused == paused:
        return _reject(action, pos, f"migration is already {'paused' if paused else 'running'}")
    if pos.phase == Phase.COMPLETE:
        return _reject(action, pos, "migration is complete")
    target = pos.model_copy(update={"paused": paused})
    return Decision(action=action, allowed=True, source=pos, target=target,
                    reason="paused: no advance and no automatic rollback" if paused
                    else "resumed")


# Phases where automatic rollback watches the TigerBeetle reads.
AUTO_ROLLBACK_PHASES = frozenset({Phase.SHADOW_READ, Phase.READ_CUTOVER, Phase.TB_PRIMARY})


def decide_auto_rollback(pos: Position, ev: Evidence, t: GateThresholds) -> Decision | None:
    """One phase back when the TigerBeetle error or shadow mismatch rate in the window passes
    its threshold (with enough samples to mean something). None = nothing to do."""
    if not t.auto_rollback_enabled or pos.paused or pos.phase not in AUTO_ROLLBACK_PHASES:
        return None
    causes: list[str] = []
    error_rate = ev.error_rate
    if (error_rate is not None and ev.tb_reads >= t.auto_rollback_min_samples
            and error_rate >= t.auto_rollback_error_rate):
        causes.append(f"TigerBeetle read error rate {pct(error_rate)} over {ev.tb_reads} reads "
                      f">= {pct(t.auto_rollback_error_rate)}")
    mismatch_rate = None if ev.shadow_compared == 0 else ev.shadow_mismatches / ev.shadow_compared
    if (mismatch_rate is not None and ev.shadow_compared >= t.auto_rollback_min_samples
            and mismatch_rate >= t.auto_rollback_mismatch_rate):
        causes.append(f"shadow mismatch rate {pct(mismatch_rate)} over {ev.shadow_compared} "
                      f"comparisons >= {pct(t.auto_rollback_mismatch_rate)}")
    if not causes:
        return None
    to = PHASE_ORDER[phase_index(pos.phase) - 1]
    rollout = 100 if to == Phase.READ_CUTOVER else rollout_for(to)
    target = pos.model_copy(update={"phase": to, "rollout_percent": rollout})
    return Decision(action=ActionKind.AUTO_ROLLBACK, allowed=True, source=pos, target=target,
                    reason=f"automatic rollback {describe(pos)} -> {describe(target)}: "
                           + "; ".join(causes))


def describe(pos: Position) -> str:
    if pos.phase == Phase.READ_CUTOVER:
        return f"read_cutover {pos.rollout_percent}%"
    return pos.phase.value


def clip_reason(text: str) -> str:
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 1] + "…"
