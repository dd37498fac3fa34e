"""Messages of the credit terminal's workflows and activities: pydantic models, no I/O.

The pipeline works on batches. A batch is recorded once (intake, the system of reference
first); every later step names the batch and the external ids it moves, so the transactions'
content travels through Temporal once (payloads are limited to 2 MB: an ExternalTransaction
is ~300 bytes of JSON, an id ~40). Every step is idempotent by external id: a retried activity
or a resumed workflow lands on the same TigerBeetle transfers and journal entries.

    intake -> pending -> checks -> post/void -> settle (posted) / confirm (voided, expired)
    sync (TigerBeetle -> ledger by timestamp cursor) and reconcile run on their own.

Names: the workflows call activities by these names and clients start workflows by name, so
neither imports the other's code. Changing a name breaks recorded histories.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from walletcore.clearing import ExternalId, ExternalTransaction
from walletcore.clearing_checks import CheckOutcome
from walletcore.journal import INT64_MAX

# ---- names ----------------------------------------------------------------------------------

CLEARING_BATCH_WORKFLOW = "ClearingBatchWorkflow"
LEDGER_SYNC_WORKFLOW = "LedgerSyncWorkflow"
TERMINAL_RECONCILE_WORKFLOW = "TerminalReconcileWorkflow"
LEDGER_REBUILD_WORKFLOW = "LedgerRebuildWorkflow"
TIGERBEETLE_REBUILD_WORKFLOW = "TigerBeetleRebuildWorkflow"

ACTIVITY_INTAKE = "terminal_intake"
ACTIVITY_PENDING = "terminal_pending"
ACTIVITY_CHECKS = "terminal_checks"
ACTIVITY_POST_VOID = "terminal_post_void"
ACTIVITY_SETTLE = "terminal_settle"
ACTIVITY_CONFIRM = "terminal_confirm"
ACTIVITY_SYNC_PAGE = "ledger_sync_page"
ACTIVITY_RECONCILE_PAGE = "terminal_reconcile_page"
ACTIVITY_RECONCILE_FINISH = "terminal_reconcile_finish"

SYNC_SCHEDULE_ID = "ledger-sync-schedule"
SYNC_EVERY_S_DEFAULT = 300  # the plan's catch-up sync (the continuous sync runs meanwhile)
SYNC_LAG_TARGET_S = 60.0

# ---- bounds ---------------------------------------------------------------------------------

TB_BATCH_MAX = 8189  # TigerBeetle's events per request
# Transactions carried in one message (~300 B each in JSON: ~600 KB, far below 2 MB).
INTAKE_BATCH_MAX = 2000
IDS_MAX = TB_BATCH_MAX  # ids carried in one message (~40 B each: ~330 KB)
REFUSED_SAMPLE_MAX = 100  # error samples a report keeps
REASON_MAX = 256

BatchId = Annotated[str, Field(min_length=1, max_length=128)]
Reason = Annotated[str, Field(min_length=1, max_length=REASON_MAX)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---- intake ---------------------------------------------------------------------------------


class IntakeBatch(_Model):
    """Transactions to record under `batch_id` (the batch id is the caller's, idempotent)."""

    batch_id: BatchId
    transactions: list[ExternalTransaction] = Field(min_length=1, max_length=INTAKE_BATCH_MAX)


class RefusedItem(_Model):
    """A transaction a step refused: `error` is the walletcore error class, `field` the input
    field at fault (intake) or None."""

    external_id: str = Field(max_length=128)
    error: str = Field(max_length=64)
    field: str | None = Field(default=None, max_length=64)
    message: str = Field(max_length=1024)


class ReplayedItem(_Model):
    """An external id recorded before (same content): its state when the batch came."""

    external_id: ExternalId
    batch_id: BatchId  # the batch that owns it (drives it to the end)
    state: str


class IntakeResult(_Model):
    """`accepted`: recorded now, owned by this batch (the next steps move exactly these)."""

    batch_id: BatchId
    accepted: list[ExternalId] = Field(default_factory=list, max_length=INTAKE_BATCH_MAX)
    replayed: list[ReplayedItem] = Field(default_factory=list, max_length=INTAKE_BATCH_MAX)
    refused: list[RefusedItem] = Field(default_factory=list, max_length=INTAKE_BATCH_MAX)


# ---- pending, checks, post/void -------------------------------------------------------------


class StepInput(_Model):
    """A step over some of a batch's transactions (read from the system of reference)."""

    batch_id: BatchId
    external_ids: list[ExternalId] = Field(min_length=1, max_length=IDS_MAX)


class VoidItem(_Model):
    external_id: ExternalId
    reason: Reason


class PendingResult(_Model):
    """`pending`: reservations in TigerBeetle (new or found); `rejected`: TigerBeetle refused
    the reservation (reason `pending_refused:<result>`), now final."""

    batch_id: BatchId
    pending: list[ExternalId] = Field(default_factory=list, max_length=IDS_MAX)
    rejected: list[VoidItem] = Field(default_factory=list, max_length=IDS_MAX)


class CheckResults(_Model):
    batch_id: BatchId
    outcomes: list[CheckOutcome] = Field(default_factory=list, max_length=IDS_MAX)

    @property
    def passed(self) -> list[str]:
        return [o.external_id for o in self.outcomes if o.passed]

    @property
    def failed(self) -> list[VoidItem]:
        return [
            VoidItem(external_id=o.external_id, reason=str(o.reason))
            for o in self.outcomes
            if not o.passed
        ]


class PostVoidBatch(_Model):
    batch_id: BatchId
    post: list[ExternalId] = Field(default_factory=list, max_length=IDS_MAX)
    void: list[VoidItem] = Field(default_factory=list, max_length=IDS_MAX)


class PostedItem(_Model):
    """A posted transaction: the post transfer's TigerBeetle timestamp goes into its entry."""

    external_id: ExternalId
    tb_timestamp: int = Field(gt=0, le=INT64_MAX)


class PostVoidResult(_Model):
    """`expired`: the hold ran out before the post/void (TigerBeetle answered
    pending_transfer_expired); it becomes rejected with reason `expired`."""

    batch_id: BatchId
    posted: list[PostedItem] = Field(default_factory=list, max_length=IDS_MAX)
    voided: list[VoidItem] = Field(default_factory=list, max_length=IDS_MAX)
    expired: list[ExternalId] = Field(default_factory=list, max_length=IDS_MAX)


# ---- settlement and confirmation ------------------------------------------------------------


class SettleBatch(_Model):
    batch_id: BatchId
    posted: list[PostedItem] = Field(min_length=1, max_length=IDS_MAX)


class SettledItem(_Model):
    external_id: ExternalId
    entry_id: str = Field(pattern=r"^[0-9a-f]{32}$")


class SettleResult(_Model):
    """`settled`: entries written now or found (idempotent); `chain_seq`: the chain head after."""

    batch_id: BatchId
    settled: list[SettledItem] = Field(default_factory=list, max_length=IDS_MAX)
    new_entries: int = Field(default=0, ge=0)
    chain_seq: int = Field(default=0, ge=0)


class ConfirmBatch(_Model):
    """Voided and expired transactions become rejected with their reason (final)."""

    batch_id: BatchId
    rejected: list[VoidItem] = Field(min_length=1, max_length=IDS_MAX)


class ConfirmResult(_Model):
    batch_id: BatchId
    rejected: int = Field(ge=0)
    already: int = Field(default=0, ge=0)


class TransactionOutcome(_Model):
    """What a caller is told: settled (with the entry) or rejected (with the reason), or the
    state it is in while neither."""

    external_id: ExternalId
    state: str
    entry_id: str | None = None
    reason: str | None = None
    batch_id: str | None = None


class BatchOutcome(_Model):
    """The result of a ClearingBatchWorkflow (what a waiting caller receives)."""

    batch_id: BatchId
    settled: int = Field(ge=0)
    rejected: int = Field(ge=0)
    replayed: int = Field(default=0, ge=0)
    refused: list[RefusedItem] = Field(default_factory=list, max_length=INTAKE_BATCH_MAX)
    reasons: dict[str, int] = Field(default_factory=dict)  # rejection reason -> count


# ---- sync -----------------------------------------------------------------------------------


class SyncCursor(_Model):
    """The last TigerBeetle timestamp whose posted clearing transfers are all in the ledger."""

    timestamp: int = Field(default=0, ge=0, le=INT64_MAX)
    updated_at: datetime | None = None


class SyncPageInput(_Model):
    cursor: SyncCursor
    limit: int = Field(default=TB_BATCH_MAX, ge=1, le=TB_BATCH_MAX)


class SyncPageResult(_Model):
    """`lag_s`: now - the oldest posted transfer not yet in the ledger (0 when none)."""

    cursor: SyncCursor
    scanned: int = Field(ge=0)
    new_entries: int = Field(ge=0)
    exhausted: bool
    lag_s: float = Field(ge=0)


# ---- reconciliation -------------------------------------------------------------------------


class AccountMismatch(_Model):
    account: int
    currency: str
    gl_debits_minor: int
    gl_credits_minor: int
    tb_debits_posted: int
    tb_credits_posted: int


class TerminalReconcileSummary(_Model):
    """A terminal reconciliation run: the ledger against TigerBeetle, both ways."""

    run_id: str = Field(min_length=1, max_length=128)
    accounts_checked: int = Field(ge=0)
    mismatched_accounts: list[AccountMismatch] = Field(
        default_factory=list, max_length=REFUSED_SAMPLE_MAX
    )
    transfers_checked: int = Field(ge=0)
    entries_checked: int = Field(ge=0)
    posted_without_entry: list[str] = Field(default_factory=list, max_length=REFUSED_SAMPLE_MAX)
    entries_without_transfer: list[str] = Field(
        default_factory=list, max_length=REFUSED_SAMPLE_MAX
    )
    duplicated_entries: int = Field(default=0, ge=0)
    expired_holds: list[str] = Field(default_factory=list, max_length=REFUSED_SAMPLE_MAX)
    trial_balance_zero: bool
    chain_ok: bool
    sync_lag_s: float = Field(ge=0)
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def ok(self) -> bool:
        return (
            not self.mismatched_accounts and not self.posted_without_entry
            and not self.entries_without_transfer and self.duplicated_entries == 0
            and self.trial_balance_zero and self.chain_ok
        )
