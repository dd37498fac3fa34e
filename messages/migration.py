"""Messages of the migration workflow, its Updates/Queries and its activities (no I/O).

Update inputs are small JSON objects so an engineer can type them into the Temporal Web UI's
"Send an Update" form, e.g. `advance` with `{"actor": "ana", "reason": "gates green"}` or
`rollback` with `{"to": "shadow_read", "actor": "ana", "reason": "p95 regression"}`. The
workflow receives them loosely typed and checks them here (`parse_update_input`), so a mistyped
form gets a one-line answer naming the field and the allowed values instead of a decoding
failure. The texts an engineer reads in the UI (Update descriptions, the workflow's summary and
details, the next step after a refusal) live here too: the CLI, the demo and the workflow share
them.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from walletcore.gates import Evidence, GateResult, GateThresholds
from walletcore.keys import ID_PATTERN
from walletcore.phases import PHASE_ORDER, MigrationState, Phase
from walletcore.transitions import Decision, Position

MIGRATION_WORKFLOW = "MigrationWorkflow"
WORKFLOW_ID_PREFIX = "migration/"

# Activity names (the workflow never imports store code).
ACTIVITY_LOAD_STATE = "migration_load_state"
ACTIVITY_PUBLISH_STATE = "migration_publish_state"
ACTIVITY_COLLECT_EVIDENCE = "migration_collect_evidence"
ACTIVITY_WRITE_AUDIT = "migration_write_audit"
ACTIVITY_ARCHIVE_LEGACY = "migration_archive_legacy"
ACTIVITY_AWAIT_REVERSE_DRAIN = "migration_await_reverse_drain"
ACTIVITY_SYNC = "migration_sync"
ACTIVITY_OBSERVE = "migration_observe"

# Update / query names, as they appear in the Web UI.
UPDATE_ADVANCE = "advance"
UPDATE_FORCE_ADVANCE = "force_advance"
UPDATE_ROLLBACK = "rollback"
UPDATE_SET_ROLLOUT = "set_rollout"
UPDATE_PAUSE = "pause"
UPDATE_RESUME = "resume"
UPDATE_APPROVE = "approve"
QUERY_STATUS = "status"
QUERY_GATES = "gates"

SCOPES_MAX = 64
ACTOR_MAX = 128
APPROVALS_MAX = 1  # one second engineer; more would need a list of approvers per request
REASON_MAX = 500
RECENT_ACTIONS_MAX = 20
ACTIONS_PER_RUN_MAX = 200  # continue-as-new after this many accepted actions (or when suggested)
# ... or after this many history events, whatever the server suggests: an idle migration grows
# by about 11 events per evidence round (activity 3, timer 2, two workflow tasks 6), so at the
# default 15 s a run lasts about 45 minutes and a worker replays at most this many events.
HISTORY_EVENTS_PER_RUN_MAX = 2_000
# Who acted, when an Update's input names nobody (typed JSON: the Web UI, `temporal workflow
# update`); the audit also keeps the input as sent, so an absent actor stays visible.
ACTOR_UNNAMED = "web-ui (no actor given)"
ACTOR_WORKFLOW = "migration-workflow"  # the workflow's own actions (automatic rollback, ...)
ACTOR_CANCEL = "temporal cancel request"
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
    history_events_per_run_max: int = Field(default=HISTORY_EVENTS_PER_RUN_MAX, ge=200,
                                            le=40_000)
    # Four eyes: how many engineers other than the requester approve a `force_advance` or an
    # entry into `complete` before it runs. 0 (the default) keeps what recorded histories,
    # fixtures and the demo did; `walletmig migration start` asks for 1 (see its --help).
    approvals_required: int = Field(default=0, ge=0, le=APPROVALS_MAX)


# ---- updates -----------------------------------------------------------------------------------


class UpdateRequest(_Frozen):
    # Field order is the order the one-line answers list them in ("allowed: reason, actor").
    reason: str = Field(default="", max_length=REASON_MAX)
    actor: str = Field(default=ACTOR_UNNAMED, min_length=1, max_length=ACTOR_MAX)
    # Allowed values per field when they are fewer than the field's type admits.
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}


class AdvanceRequest(UpdateRequest):
    # Strict: "yes" or "1" typed into the UI must not enter complete.
    confirm: bool = Field(default=False, strict=True, description="required to enter `complete`")


class ForceAdvanceRequest(UpdateRequest):
    reason: str = Field(min_length=1, max_length=REASON_MAX)
    confirm: bool = Field(default=False, strict=True)


ROLLBACK_TARGETS: tuple[str, ...] = tuple(p.value for p in PHASE_ORDER if p != Phase.COMPLETE)


class RollbackRequest(UpdateRequest):
    to: Phase
    rollout_percent: int | None = Field(default=None, ge=0, le=100, strict=True)
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"to": ROLLBACK_TARGETS}

    @field_validator("to")
    @classmethod
    def _not_complete(cls, to: Phase) -> Phase:
        if to == Phase.COMPLETE:  # nothing comes back from complete: not a rollback target
            raise PydanticCustomError("enum", "not a rollback target")
        return to


class SetRolloutRequest(UpdateRequest):
    percent: int = Field(ge=0, le=100, strict=True)


class PauseRequest(UpdateRequest):
    pass


class ApproveRequest(UpdateRequest):
    """A second engineer approves the pending request; `actor` must differ from its requester."""


class PendingApproval(_Frozen):
    """A gated request (force_advance, entry into complete) waiting for a second engineer."""

    update: str  # UPDATE_ADVANCE or UPDATE_FORCE_ADVANCE
    request: dict[str, Any]  # the input as sent (sent_fields), decided again when approved
    actor: str
    reason: str
    seq: int  # the audit entry that recorded the request
    from_position: Position
    to_position: Position


# One example per Update, as typed into the Web UI's Data field (all fields optional unless
# the example says otherwise).
UPDATE_EXAMPLES: dict[str, str] = {
    UPDATE_ADVANCE: '{"actor": "ana", "reason": "gates green"}',
    UPDATE_FORCE_ADVANCE: '{"reason": "why the failed gates may be skipped", "actor": "ana"}',
    UPDATE_ROLLBACK: '{"to": "shadow_read", "actor": "ana", "reason": "p95 regression"}',
    UPDATE_SET_ROLLOUT: '{"percent": 50, "actor": "ana", "reason": "fallbacks flat"}',
    UPDATE_PAUSE: '{"actor": "ana", "reason": "incident 123"}',
    UPDATE_RESUME: '{"actor": "ana", "reason": "incident closed"}',
    UPDATE_APPROVE: '{"actor": "bob", "reason": "checked the evidence"}',
}
# What each Update does (the details page lists them with their example as code, so the UI's
# typography leaves the quotes straight for copy and paste).
UPDATE_PURPOSES: dict[str, str] = {
    UPDATE_ADVANCE: "Next phase or rollout step if every gate passes; add \"confirm\": true to "
                    "enter complete.",
    UPDATE_FORCE_ADVANCE: "Next step past failed gates (audited; reason required).",
    UPDATE_ROLLBACK: f"Back to an earlier phase: \"to\" is one of {', '.join(ROLLBACK_TARGETS)}; "
                     "\"rollout_percent\" for read_cutover.",
    UPDATE_SET_ROLLOUT: "Read-cutover percentage (raising it is gated).",
    UPDATE_PAUSE: "Stop advancing and automatic rollback.",
    UPDATE_RESUME: "Undo pause.",
    UPDATE_APPROVE: "Run the pending force_advance or complete (four eyes: another engineer).",
}
# The Web UI's Update list shows these as plain text under each name.
UPDATE_DESCRIPTIONS: dict[str, str] = {
    name: f"{UPDATE_PURPOSES[name]} Data (JSON, optional fields): {UPDATE_EXAMPLES[name]}"
    for name in UPDATE_EXAMPLES
}
QUERY_DESCRIPTIONS: dict[str, str] = {
    QUERY_STATUS: "Phase, rollout, epoch, evidence, next gates and recent actions.",
    QUERY_GATES: "The next step's gates: measured value, threshold, passed.",
}


# ---- checking an Update's input ---------------------------------------------------------------

R = TypeVar("R", bound=UpdateRequest)
INPUT_SHOWN_MAX = 60  # characters of a rejected value quoted back
INPUT_PROBLEMS_SHOWN_MAX = 3


class UpdateInputError(ValueError):
    """An Update's input does not fit its model; the message is one line for the UI."""


def parse_update_input(update: str, model: type[R], payload: object) -> R:
    """The Update's input as `model`: absent (`None`, the UI's empty Data) means every default;
    otherwise a JSON object (or the model itself, from a Python caller)."""
    if isinstance(payload, model):
        return payload
    if payload is None:
        payload = {}
    elif isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    if not isinstance(payload, dict):
        raise UpdateInputError(f"{update}: Data must be a JSON object such as "
                               f"{UPDATE_EXAMPLES[update]} (got {_shown(payload)})")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        problems = [_problem(update, model, e) for e in exc.errors()]
        raise UpdateInputError(f"{update}: " + "; ".join(
            problems[:INPUT_PROBLEMS_SHOWN_MAX])) from None


def sent_fields(request: UpdateRequest) -> dict[str, Any]:
    """What the caller put in the input (the audit keeps it as sent)."""
    return request.model_dump(mode="json", exclude_unset=True)


def _shown(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= INPUT_SHOWN_MAX else text[: INPUT_SHOWN_MAX - 1] + "…"


def _problem(update: str, model: type[UpdateRequest], err: ErrorDetails) -> str:
    field = ".".join(str(part) for part in err["loc"]) or "input"
    kind, got = err["type"], _shown(err.get("input"))
    info = model.model_fields.get(field)
    if kind == "extra_forbidden":
        return f'unknown field "{field}"; allowed: {", ".join(model.model_fields)}'
    if kind == "missing":
        return f'"{field}" is required, e.g. {UPDATE_EXAMPLES[update]}'
    if kind == "enum":
        allowed = model.CHOICES.get(field) or tuple(p.value for p in Phase)
        return f'"{field}" must be one of {", ".join(allowed)} (got {got})'
    if kind.startswith(("bool_",)):
        return f'"{field}" must be true or false (got {got})'
    if kind.startswith(("int_", "greater_than", "less_than")):
        low, high = _bounds(info)
        return f'"{field}" must be an integer {low}..{high} (got {got})'
    if kind == "string_too_long":
        return f'"{field}" has at most {err.get("ctx", {}).get("max_length")} characters'
    if kind == "string_too_short":
        return f'"{field}" must not be empty'
    if kind == "string_type":
        return f'"{field}" must be a string (got {got})'
    return f'"{field}": {err["msg"]} (got {got})'


def _bounds(info: Any) -> tuple[object, object]:
    low: object = "-inf"
    high: object = "inf"
    for meta in getattr(info, "metadata", []):
        low = getattr(meta, "ge", low) if getattr(meta, "ge", None) is not None else low
        high = getattr(meta, "le", high) if getattr(meta, "le", None) is not None else high
    return low, high


# ---- what an engineer reads ------------------------------------------------------------------

# How to open each gate (gate name -> next step). The refusal names the measured value and the
# threshold (walletcore.gates); this says what unblocks it.
GATE_NEXT_STEPS: dict[str, str] = {
    "history_import_finished": "wait for `walletmig backfill start --with-history` to finish "
                               "(`walletmig backfill status`)",
    "backfill_complete": "run `walletmig backfill start` for the scope (`walletmig backfill "
                         "status` shows progress)",
    "unapplied_tb_writes": "keep the workers running until the wallet workflows' TigerBeetle "
                           "backlog drains (the evidence refreshes by itself)",
    "reconciliation_match_rate": "run `walletmig reconcile run` and resolve its findings "
                                 "(`walletmig reconcile report`)",
    "last_full_reconciliation": "run `walletmig reconcile run` and resolve its findings "
                                "(`walletmig reconcile report`)",
    "shadow_match_rate": "let shadow reads accumulate and look into mismatches "
                         "(`walletmig reconcile run`)",
    "tb_read_p95_ratio": "TigerBeetle reads must get faster than the threshold: check the "
                         "cluster and the read path",
    "fallback_rate": "let cutover reads accumulate and look into their fallbacks (TigerBeetle "
                     "read errors)",
    "rollout_percent": 'raise the rollout to 100% first (`advance`, or `set_rollout` '
                       '{"percent": 100})',
    "tb_primary_stable": "let tb_primary run for the stable window without TigerBeetle errors",
    "unapplied_mongodb_writes": "wait for the reverse projection to write TigerBeetle's "
                                "operations to MongoDB (workers running)",
}
FORCE_HINT = 'or `force_advance` {"reason": "..."} to go past the failed gates (audited)'


def next_steps(decision: Decision) -> str:
    """What unblocks a refused decision, as one clause ("" when the reason says it all)."""
    failed = [g.name for g in decision.gates if not g.passed]
    if failed:
        steps = list(dict.fromkeys(GATE_NEXT_STEPS.get(name, f"open gate {name}")
                                   for name in failed))
        if decision.action.value == UPDATE_ADVANCE:
            steps.append(FORCE_HINT)
        return "; ".join(steps)
    reason = decision.reason
    if reason.startswith("migration is paused"):
        return "send `resume` (or `walletmig migration resume`)"
    if "confirm=true" in reason:
        return f'send `{decision.action.value}` with {{"confirm": true}} once you are sure'
    if reason == "force_advance needs a reason":
        return f"send `force_advance` with {UPDATE_EXAMPLES[UPDATE_FORCE_ADVANCE]}"
    return ""


def refusal_text(decision: Decision) -> str:
    """One line: what blocks (the rule or the gates with measured value and threshold) and
    what unblocks it."""
    steps = next_steps(decision)
    text = f"{decision.action.value} refused: {decision.reason}"
    return f"{text}. Next: {steps}" if steps else text


def static_summary(config: MigrationConfig) -> str:
    """The workflow's one-line summary in the Web UI (set when it is started)."""
    return (f"Wallet migration **{config.migration_id}**: MongoDB → TigerBeetle, scopes "
            f"{', '.join(config.scopes)}. Status: User Metadata → Current Details.")


def static_details(config: MigrationConfig) -> str:
    """What the workflow is and how to operate it from the Web UI (markdown)."""
    updates = "\n".join(f"- `{name}`: {UPDATE_PURPOSES[name]} Data: `{UPDATE_EXAMPLES[name]}`"
                        for name in UPDATE_EXAMPLES)
    return "\n".join([
        f"One workflow per migration (`{config.migration_id}`) owns the phase (legacy → "
        "dual_write → shadow_read → read_cutover 10/50/90/100 % → tb_primary → complete), "
        "the rollout and the gate evidence, refreshed every "
        f"{config.evidence_interval_s:g} s. Every accepted action is audited "
        "(`migration_audit`) with the actor and the input as sent.",
        "",
        "**Act:** More Actions → Send an Update, pick the name, type the Data as JSON "
        "(always give your `actor`):",
        "",
        updates,
        "",
        "**Read:** this tab's Current Details (press R to refresh), the Search Attributes "
        "tab (`MigrationPhase`, `RolloutPercent`), Queries `status` and `gates`.",
        "",
        "**Cancel / Terminate / Reset:** a cancellation request is refused (the migration "
        "keeps its phase and says so); Terminate stops the workflow while the phase stays "
        "published (`walletmig migration start` resumes it); Reset never rolls the phase "
        "back: the workflow re-reads the published phase (use `rollback`).",
    ])


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
    # The Update that asked for it: a reset re-delivers the Updates after its point, and one
    # already applied is refused instead of moving the migration twice.
    update_id: str | None = None


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
    # First, so the Web UI shows it first: an Update's outcome ("advanced legacy → dual_write
    # (epoch 1)") or, from the `status` query, where the migration stands.
    summary: str = ""
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
    pending_approval: PendingApproval | None = None  # four eyes: what awaits `approve`


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
    cancel_refusals: int = 0  # cancellation requests refused (the last one is in recent_actions)
    # The run decided for the Web UI console behaviour (workflows.migration.PATCH_UI_CONSOLE):
    # its continuations inherit the decision instead of recording the patch again (each
    # patch marker also writes the TemporalChangeVersion search attribute).
    console: bool = False
    pending_approval: PendingApproval | None = None


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
    # Where the migration stands and its thresholds: the activity judges the next step's gates
    # on the evidence it collected for the gate gauges (issue 11). None from a workflow
    # scheduled before they were sent: no gauges.
    position: Position | None = None
    position_since: datetime | None = None
    thresholds: GateThresholds | None = None


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
    # The Update's input as the caller sent it (None: the workflow acted by itself).
    request: dict[str, Any] | None = None
    # The workflow's clocks after the action: a workflow started again (after a terminate) or
    # reset continues with them (None in entries written before they were recorded).
    position_since: datetime | None = None
    write_switch_at: datetime | None = None
    update_id: str | None = None  # the Update's id (None: the workflow acted by itself)


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


class SyncRequest(_Frozen):
    """Read what is published and audited for a migration: a workflow started again (after a
    terminate) or reset continues from there instead of from its own memory."""

    migration_id: str
    scopes: list[str]
    recent_max: int = Field(default=RECENT_ACTIONS_MAX, ge=1, le=RECENT_ACTIONS_MAX)


class SyncResult(_Frozen):
    states: list[MigrationState]
    audit_tail: list[AuditEntry]  # the newest entries, oldest first

    @property
    def last_seq(self) -> int:
        return self.audit_tail[-1].seq if self.audit_tail else 0


class Observation(_Frozen):
    """One evidence round: the gate evidence and where the published state and the audit log
    stand, so a workflow behind them (reset to an earlier point, or another writer) notices
    within a round."""

    evidence: Evidence
    published_epoch: int = Field(ge=0)
    last_audit_seq: int = Field(ge=0)


class ReverseDrainResult(_Frozen):
    unapplied: int | None  # 0 = drained; None = could not be counted
    polls: int
