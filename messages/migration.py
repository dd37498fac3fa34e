"""Messages of the migration workflow, its Updates/Queries and its activities (no I/O).

Update inputs are small JSON objects so an engineer can type them into the Temporal Web UI's
"Send an Update" form, e.g. `advance` with `{"actor": "ana", "reason": "gates green"}` or
`rollback` with `{"to": "shadow_read", "actor": "ana", "reason": "p95 regression"}`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from walletcore.gates import Evidence, GateResult, GateThresholds
from walletcore.keys import ID_PATTERN
from walletcore.phases import MigrationState, Phase
from walletcore.transitions import Position

MIGRATION_WORKFLOW = "MigrationWorkflow"
WORKFLOW_ID_PREFIX = "migration/"

# Activity names (the workflow never imports store code).
ACTIVITY_LOAD_STATE = "migration_load_state"
ACTIVITY_PUBLISH_STATE = "migration_publish_state"
ACTIVITY_COLLECT_EVIDENCE = "migration_collect_evidence"
ACTIVITY_WRITE_AUDIT = "migration_write_audit"
ACTIVITY_ARCHIVE_LEGACY = "migration_archive_legacy"
ACTIVITY_AWAIT_REVERSE_DRAIN = "migration_await_reverse_drain"

# Update / query names, as they appear in the Web UI.
UPDATE_ADVANCE = "advance"
UPDATE_FORCE_ADVANCE = "force_advance"
UPDATE_ROLLBACK = "rollback"
UPDATE_SET_ROLLOUT = "set_rollout"
UPDATE_PAUSE = "pause"
UPDATE_RESUME = "resume"
QUERY_STATUS = "status"
QUERY_GATES = "gates"

SCOPES_MAX = 64
ACTOR_MAX = 128
REASON_MAX = 500
RECENT_ACTIONS_MAX = 20
ACTIONS_PER_RUN_MAX = 200  # continue-as-new after this many accepted actions (or when suggested)
EVIDENCE_INTERVAL_S_DEFAULT = 15.0
STATE_CACHE_TTL_S_DEFAULT = 1.0  # MigrationStateStore's reader cache: wait this before acting
# complete waits this long for the reverse projection to reach MongoDB before it archives; an
# operation MongoDB refused (a divergence) never arrives: it is counted in the archive info.
COMPLETE_DRAIN_TIMEOUT_S_DEFAULT = 300.0


def migration_workflow_id(name: str) -> str:
    return f"{WORKFLOW_ID_PREFIX}{name}"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MigrationConfig(_Frozen):
    migration_id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)
    scopes: list[str] = Field(default_factory=lambda: ["*"], min_length=1, max_length=SCOPES_MAX)
    thresholds: GateThresholds = Field(default_factory=GateThresholds)
    evidence_interval_s: float = Field(default=EVIDENCE_INTERVAL_S_DEFAULT, gt=0, le=3600)
    state_cache_ttl_s: float = Field(default=STATE_CACHE_TTL_S_DEFAULT, ge=0, le=60)
    archive_dir: str = Field(default=".walletmig/archive", max_length=1024)
    actions_per_run_max: int = Field(default=ACTIONS_PER_RUN_MAX, ge=1, le=10_000)
    complete_drain_timeout_s: float = Field(default=COMPLETE_DRAIN_TIMEOUT_S_DEFAULT, gt=0,
                                            le=24 * 3600)


# ---- updates -----------------------------------------------------------------------------------


class _Request(_Frozen):
    actor: str = Field(default="web-ui", min_length=1, max_length=ACTOR_MAX)
    reason: str = Field(default="", max_length=REASON_MAX)


class AdvanceRequest(_Request):
    confirm: bool = Field(default=False, description="required to enter `complete`")


class ForceAdvanceRequest(_Request):
    reason: str = Field(min_length=1, max_length=REASON_MAX)
    confirm: bool = False


class RollbackRequest(_Request):
    to: Phase
    rollout_percent: int | None = Field(default=None, ge=0, le=100)


class SetRolloutRequest(_Request):
    percent: int = Field(ge=0, le=100)


class PauseRequest(_Request):
    pass


# ---- status ------------------------------------------------------------------------------------


class ActionRecord(_Frozen):
    seq: int
    at: datetime
    actor: str
    action: str
    from_position: Position
    to_position: Position
    epoch: int
    reason: str
    automatic: bool = False


class ArchiveInfo(_Frozen):
    path: str
    sha256: str
    wallets: int
    transactions: int
    bytes: int
    # Operations TigerBeetle answered in tb_primary still missing from MongoDB when the
    # archive was written (after the drain timed out); None: recorded before the drain existed.
    unprojected_writes: int | None = None


class MigrationStatus(_Frozen):
    migration_id: str
    scopes: list[str]
    phase: Phase
    rollout_percent: int
    paused: bool
    epoch: int
    position_since: datetime | None
    evidence: Evidence | None
    next_gates: list[GateResult]
    next_step: str | None
    recent_actions: list[ActionRecord]
    archive: ArchiveInfo | None
    auto_rollbacks: int
    run_actions: int
    runs: int


class GatesView(_Frozen):
    next_step: str | None
    all_passed: bool
    gates: list[GateResult]
    evidence: Evidence | None


# ---- workflow state ------------------------------------------------------------------------------


class MigrationRuntime(BaseModel):
    """Carried across continue-as-new."""

    position: Position = Field(default_factory=Position)
    epoch: int = 0
    position_since: datetime | None = None
    write_switch_at: datetime | None = None  # writes last switched direction (see evidence)
    audit_seq: int = 0
    recent_actions: list[ActionRecord] = Field(default_factory=list)
    archive: ArchiveInfo | None = None
    auto_rollbacks: int = 0
    runs: int = 1
    initialized: bool = False


class MigrationInput(_Frozen):
    config: MigrationConfig
    runtime: MigrationRuntime | None = None


# ---- activities ------------------------------------------------------------------------------


class LoadStateInput(_Frozen):
    scopes: list[str]


class PublishStateInput(_Frozen):
    states: list[MigrationState]


class EvidenceRequest(_Frozen):
    migration_id: str
    scopes: list[str]
    phase: Phase
    since: datetime  # max(now - window, when the current position began)
    window_s: int
    # When the write path last switched direction (entered dual_write or tb_primary):
    # operations since then are the ones that must reach the other store.
    write_switch_at: datetime | None = None


class AuditEntry(_Frozen):
    migration_id: str
    seq: int = Field(ge=1)
    at: datetime
    actor: str
    action: str
    from_phase: Phase
    to_phase: Phase
    from_rollout: int
    to_rollout: int
    paused: bool
    epoch: int
    reason: str
    automatic: bool = False
    gates: list[str] = Field(default_factory=list)
    evidence: dict[str, Any] | None = None


class ArchiveRequest(_Frozen):
    migration_id: str
    scopes: list[str]
    archive_dir: str


class ReverseDrainRequest(_Frozen):
    """Wait until every operation TigerBeetle answered between `switch_at` (tb_primary began)
    and `cutoff` (complete was published and the readers' cache expired) is in MongoDB."""

    scopes: list[str]
    switch_at: datetime
    cutoff: datetime
    deadline: datetime


class ReverseDrainResult(_Frozen):
    unapplied: int | None  # 0 = drained; None = could not be counted
    polls: int
