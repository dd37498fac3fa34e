"""Messages of the wallet workflow and its activities: pydantic models, no I/O.

Shared by the workflow (inside the sandbox), the activities and the client library, so this
module imports only pydantic and walletcore.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from walletcore.balances import WalletBalance
from walletcore.keys import WalletKey
from walletcore.operations import (
    AddCredit,
    GetBalance,
    GetMultiBalance,
    OperationResult,
    OperationType,
    SubtractCredit,
    Void,
    WalletOperation,
)
from walletcore.phases import Phase
from walletcore.write_facts import LegacyFacts

# Activity names: the workflow refers to activities by name so it never imports store code.
# Workflow, Update and Query names: the client library calls them by name (it never imports the
# workflows); the workflows declare them with these names. They are the class and method
# names they always had, so recorded histories replay.
WALLET_WORKFLOW = "WalletWorkflow"
WALLET_UPDATE_APPLY = "apply"
WALLET_QUERY_STATUS = "status"
GET_BALANCE_WORKFLOW = "GetBalanceWorkflow"
GET_MULTI_BALANCE_WORKFLOW = "GetMultiBalanceWorkflow"

ACTIVITY_APPLY_PRIMARY = "apply_primary"
ACTIVITY_APPLY_TIGERBEETLE = "apply_tigerbeetle"
ACTIVITY_APPLY_MONGODB = "apply_mongodb_projection"  # tb_primary's reverse projection
ACTIVITY_READ_BALANCE = "read_balance"
ACTIVITY_READ_MULTI_BALANCE = "read_multi_balance"
# The transactional outbox (stores.outbox): the shard drainers apply its records to TigerBeetle.
ACTIVITY_DRAIN_OUTBOX = "drain_outbox_shard"
OUTBOX_DRAIN_WORKFLOW = "OutboxDrainWorkflow"

# Validator rejection while a run is about to continue-as-new: the client retries it and lands
# on the next run. Not a walletcore error: callers never see it.
ROTATING_ERROR_TYPE = "WalletWorkflowRotating"

IDLE_TIMEOUT_S_DEFAULT = 300.0
IDLE_TIMEOUT_S_MAX = 7 * 24 * 3600.0
MAX_OPS_PER_RUN_DEFAULT = 500
MAX_OPS_PER_RUN_MAX = 10_000
# The backlog travels in the continue-as-new input (2 MB payload limit): ~300 bytes per item.
BACKLOG_MAX_DEFAULT = 2000
BACKLOG_MAX_MAX = 4000
RECENT_RESULTS_MAX = 128  # idempotency guard entries carried across runs (~1 KB each)
DIVERGENCES_KEPT_MAX = 20
DRAIN_BATCH_MAX = 32  # backlog items per TigerBeetle activity call (bounded by its timeout)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CreditRequest(_Frozen):
    kind: Literal["credit"] = "credit"
    op: AddCredit


class DebitRequest(_Frozen):
    kind: Literal["debit"] = "debit"
    op: SubtractCredit


class VoidRequest(_Frozen):
    kind: Literal["void"] = "void"
    op: Void


WalletRequest = Annotated[CreditRequest | DebitRequest | VoidRequest, Field(discriminator="kind")]


class WalletCommand(_Frozen):
    """The one input of the `apply` update: a credit, a debit or a void (tagged by `kind`)."""

    request: WalletRequest

    @classmethod
    def of(cls, op: WalletOperation) -> WalletCommand:
        # SubtractCredit subclasses AddCredit: test it first.
        if isinstance(op, SubtractCredit):
            return cls(request=DebitRequest(op=op))
        if isinstance(op, AddCredit):
            return cls(request=CreditRequest(op=op))
        return cls(request=VoidRequest(op=op))

    @property
    def op(self) -> WalletOperation:
        return self.request.op

    @property
    def kind(self) -> OperationType:
        return OperationType(self.request.kind)

    @property
    def transaction_id(self) -> str:
        return self.request.op.transaction_id

    @property
    def wallet(self) -> WalletKey:
        return self.request.op.wallet


# ---- activities ------------------------------------------------------------------------------

# Where a backlog item goes: the store that did not answer the operation.
BacklogDirection = Literal["to_tigerbeetle", "to_mongodb"]


class ApplyPrimaryInput(_Frozen):
    command: WalletCommand
    # Direction of the items still in the backlog (None: empty). If the store that would
    # answer now is the one they travel to, the activity writes nothing and asks to drain.
    pending_direction: BacklogDirection | None = None
    # The migration state this workflow last acted on (scope and epoch): a worker whose cache
    # is older reads through it, so the phase a wallet follows never goes back.
    floor_scope: str | None = None
    floor_epoch: int | None = None
    # The workflow takes the outbox path (workflow.patched): a dual-write operation's TigerBeetle
    # side may then go to the outbox in the legacy write's transaction instead of the backlog.
    outbox_ok: bool = False
    since_version: int | None = None  # WalletState.tracked_since_version (outbox records)
    # The workflow takes the reverse outbox path (workflow.patched): a tb_primary operation's
    # MongoDB side may then be recorded as intent before the TigerBeetle write (stores.outbox,
    # wallet_outbox_to_mongodb) instead of a `to_mongodb` backlog item.
    reverse_outbox_ok: bool = False


class PrimaryOutcome(_Frozen):
    """The answer, and the migration state it was applied under."""

    result: OperationResult | None = None  # None only with drain_first
    phase: Phase
    epoch: int
    scope: str | None = None  # the migration state document's scope (None: older histories)
    # Histories recorded before backlog_direction existed carry only this flag:
    # True = to_tigerbeetle. Kept equal to (backlog_direction == "to_tigerbeetle").
    writes_tigerbeetle: bool
    backlog_direction: BacklogDirection | None = None
    drain_first: bool = False  # nothing written: drain the whole backlog, then call again
    legacy: LegacyFacts | None = None  # set when MongoDB answered
    # The other store's side is in the outbox: no backlog item. backlog_direction says which:
    # to_tigerbeetle (written with the legacy write) or to_mongodb (tb_primary: the intent
    # recorded before the TigerBeetle write).
    outbox: bool = False
    # With drain_first: the wallet's outbox records still pending towards the store that
    # would answer (the drainers apply them; the workflow asks again after a pause).
    # 0: drain_first is about the backlog.
    outbox_pending: int = Field(default=0, ge=0)


class BacklogItem(_Frozen):
    seq: int = Field(ge=1, description="position in the wallet's backlog, increasing")
    command: WalletCommand
    phase: Phase
    epoch: int
    accepted_at: datetime
    direction: BacklogDirection = "to_tigerbeetle"  # items recorded before tb_primary existed
    legacy: LegacyFacts | None = None  # to_tigerbeetle: MongoDB's facts (None: read them)


class ApplyTigerBeetleInput(_Frozen):
    wallet: WalletKey
    items: list[BacklogItem] = Field(min_length=1, max_length=DRAIN_BATCH_MAX)
    # WalletState.tracked_since_version when the batch was sent (see there).
    since_version: int | None = None


class TigerBeetleItemOutcome(_Frozen):
    seq: int
    transaction_id: str
    replayed: bool = False
    in_opening: bool = False  # skipped: the imported opening balance already holds it
    error_type: str | None = None  # a domain error retrying cannot fix: a divergence
    error_message: str | None = None


class ApplyTigerBeetleOutput(_Frozen):
    outcomes: list[TigerBeetleItemOutcome]


class OutboxDrainInput(_Frozen):
    """The input of one shard drainer workflow (workflows.outbox)."""

    shard: int = Field(ge=0)
    shards: int = Field(ge=1, le=64)


class DrainOutboxInput(_Frozen):
    shard: int = Field(ge=0)
    shards: int = Field(ge=1, le=64)
    run_s: float = Field(gt=0, le=3600)  # the activity returns after this (then runs again)


class DrainOutboxOutput(_Frozen):
    applied: int = Field(ge=0)
    passes: int = Field(ge=0)


class ReadBalanceInput(_Frozen):
    query: GetBalance


class ReadMultiBalanceInput(_Frozen):
    query: GetMultiBalance


class MultiBalance(_Frozen):
    balances: list[WalletBalance]


# ---- workflow state ----------------------------------------------------------------------------


class Divergence(_Frozen):
    """MongoDB accepted an operation that TigerBeetle refused: reconciliation repairs it."""

    seq: int
    transaction_id: str
    kind: OperationType
    error_type: str
    message: str
    at: datetime


class RecentResult(_Frozen):
    command: WalletCommand
    result: OperationResult


class WalletState(BaseModel):
    """Everything a run carries to the next one (continue-as-new). Mutable: workflow-owned."""

    backlog: list[BacklogItem] = Field(default_factory=list)
    recent: dict[str, RecentResult] = Field(default_factory=dict)  # insertion-ordered, bounded
    next_seq: int = 1
    ops_applied: int = 0  # operations answered (MongoDB applied), all runs
    tb_applied: int = 0  # backlog items applied to TigerBeetle, all runs (not the outbox's)
    mongo_applied: int = 0  # reverse-projection items applied to MongoDB, all runs
    # The legacy version after which every MongoDB-answered operation is in this backlog (or
    # applied from it): a wallet not imported yet may be imported at this version, so its
    # dual-write operations become TigerBeetle transfers of their own. None: unknown (an
    # operation was answered without a backlog item since).
    tracked_since_version: int | None = None
    divergence_count: int = 0
    divergences: list[Divergence] = Field(default_factory=list)  # the last few
    phase_seen: Phase | None = None
    epoch_seen: int | None = None
    scope_seen: str | None = None  # scope of epoch_seen (epochs count per scope)
    runs: int = 1
    # Operations whose TigerBeetle side went to the transactional outbox, all runs (whether
    # they are applied is the outbox's to say: Outbox.pending_count).
    outbox_ops: int = 0
    # tb_primary operations whose MongoDB side went to the reverse outbox, all runs.
    reverse_outbox_ops: int = 0


class WalletWorkflowInput(_Frozen):
    wallet: WalletKey
    idle_timeout_s: float = Field(default=IDLE_TIMEOUT_S_DEFAULT, gt=0, le=IDLE_TIMEOUT_S_MAX)
    max_ops_per_run: int = Field(default=MAX_OPS_PER_RUN_DEFAULT, ge=1, le=MAX_OPS_PER_RUN_MAX)
    backlog_max: int = Field(default=BACKLOG_MAX_DEFAULT, ge=1, le=BACKLOG_MAX_MAX)
    state: WalletState | None = None


class WalletStatus(_Frozen):
    wallet: WalletKey
    backlog_length: int
    oldest_backlog_at: datetime | None
    ops_applied: int
    ops_this_run: int
    tb_applied: int
    divergence_count: int
    divergences: list[Divergence]
    mongo_applied: int = 0
    backlog_direction: BacklogDirection | None = None  # of the head item
    phase_seen: Phase | None
    epoch_seen: int | None
    runs: int
    rotating: bool
    outbox_ops: int = 0  # not in backlog_length: see WalletState.outbox_ops
    reverse_outbox_ops: int = 0  # not in backlog_length either


class WalletWorkflowResult(_Frozen):
    ops_applied: int
    tb_applied: int
    divergence_count: int
    runs: int
