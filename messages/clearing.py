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
ACTIVITY_RESUME_RECEIVED = "terminal_resume_received"

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


# ---- sync, reconciliation and recovery (activities/terminal_*, workflows/terminal_sync) -----

SYNC_WORKFLOW_ID = "ledger-sync/continuous"  # the one continuous sync (id reused on restart)
SYNC_CATCH_UP_WORKFLOW_ID = "ledger-sync/catch-up"  # what the schedule starts
SYNC_PAGE_LIMIT_DEFAULT = 4096  # transfers scanned per page (pending, post and void alike)
SYNC_IDLE_S_DEFAULT = 5.0  # a caught-up continuous sync looks again after this (lag target 60)
SYNC_PAGES_PER_RUN_DEFAULT = 500  # pages of one run before continue-as-new
SYNC_PAGES_PER_RUN_MAX = 10_000
RECONCILE_PAGE_DEFAULT = TB_BATCH_MAX
RECONCILE_STAGES = ("start", "entries", "transfers", "holds", "finish")
# The catch-up run resumes batches left `received` (a submitter died between recording and
# starting): at most this many per run, so one run stays short.
RESUME_BATCHES_PER_RUN_DEFAULT = 100
RESUME_BATCHES_PER_RUN_MAX = 1000
RESUME_OLDER_THAN_S_MAX = 7 * 86_400.0


class SyncPageReport(SyncPageResult):
    """A sync page in detail. `posted`: posted clearing transfers scanned; `existing`: those
    the ledger held already (the pipeline settled them); `unmatched`: posted transfers without
    a transaction in the system of reference (or with other content), hex ids, never written;
    `lag_exact`: False when the page saw no missing post and did not reach the end, so
    `lag_s` is an upper bound (now - the cursor)."""

    posted: int = Field(default=0, ge=0)
    existing: int = Field(default=0, ge=0)
    unmatched: list[str] = Field(default_factory=list, max_length=REFUSED_SAMPLE_MAX)
    unmatched_count: int = Field(default=0, ge=0)
    oldest_unmatched_ts: int = Field(default=0, ge=0, le=INT64_MAX)
    lag_exact: bool = True


class SyncTotals(_Model):
    pages: int = Field(default=0, ge=0)
    scanned: int = Field(default=0, ge=0)
    new_entries: int = Field(default=0, ge=0)
    unmatched: int = Field(default=0, ge=0)


class ResumeReceivedInput(_Model):
    """Start the workflows of at most `batches_max` batches whose transactions are `received`
    longer than `older_than_s` (None: the client's owner grace, OWNER_GRACE_S)."""

    older_than_s: float | None = Field(default=None, ge=0, le=RESUME_OLDER_THAN_S_MAX)
    batches_max: int = Field(default=RESUME_BATCHES_PER_RUN_DEFAULT, ge=1,
                             le=RESUME_BATCHES_PER_RUN_MAX)


class ResumeReceivedReport(_Model):
    started: list[str] = Field(default_factory=list, max_length=RESUME_BATCHES_PER_RUN_MAX)


class LedgerSyncInput(_Model):
    """LedgerSyncWorkflow: `once` stops when caught up (the schedule's catch-up run); otherwise
    it polls every `idle_s` while caught up and continues as new every `pages_per_run` pages.
    `cursor` is a floor carried across continue-as-new (the durable cursor is in the ledger).
    A `once` run first resumes batches a dead submitter left `received` (`resume`; None: not)."""

    once: bool = False
    cursor: SyncCursor = Field(default_factory=SyncCursor)
    limit: int = Field(default=SYNC_PAGE_LIMIT_DEFAULT, ge=1, le=TB_BATCH_MAX)
    idle_s: float = Field(default=SYNC_IDLE_S_DEFAULT, ge=0.1, le=3600)
    pages_per_run: int = Field(default=SYNC_PAGES_PER_RUN_DEFAULT, ge=1,
                               le=SYNC_PAGES_PER_RUN_MAX)
    totals: SyncTotals = Field(default_factory=SyncTotals)
    resume: ResumeReceivedInput | None = Field(default_factory=ResumeReceivedInput)


class LedgerSyncOutcome(_Model):
    """A sync run until caught up (or out of pages): `lag_s` is the lag it found first (now -
    the oldest posted transfer missing from the ledger; 0 when nothing was missing and it
    reached the end)."""

    cursor: SyncCursor
    totals: SyncTotals
    caught_up: bool
    lag_s: float = Field(ge=0)
    lag_exact: bool = True
    resumed: list[str] = Field(default_factory=list, max_length=RESUME_BATCHES_PER_RUN_MAX)


class BalanceDrift(_Model):
    """A stored GL balance that differs from the sum of the entries below it (tampering or a
    lost write): the balance documents no longer follow the chain."""

    account: int
    currency: str
    stored_debits_minor: int
    stored_credits_minor: int
    entries_debits_minor: int
    entries_credits_minor: int


class TerminalReconcileState(_Model):
    """Progress of one terminal reconciliation, passed page to page (small: sums per
    (account, currency) key, counters and bounded samples)."""

    run_id: str = Field(min_length=1, max_length=128)
    page_size: int = Field(default=RECONCILE_PAGE_DEFAULT, ge=1, le=TB_BATCH_MAX)
    catch_up: bool = True
    stage: str = Field(default="start", pattern="^(start|entries|transfers|holds|finish)$")
    started_at: datetime | None = None
    snapshot_timestamp: int = Field(default=0, ge=0, le=INT64_MAX)  # T: the sync cursor
    head_seq: int = Field(default=0, ge=0)  # the chain head the stored balances belong to
    stored: dict[str, list[int]] = Field(default_factory=dict)  # key -> [debits, credits]
    entries_sum: dict[str, list[int]] = Field(default_factory=dict)  # entries seq <= head
    after_t: dict[str, list[int]] = Field(default_factory=dict)  # seq <= head, ts > T
    after_seq: int = Field(default=0, ge=0)
    chain_hash: str = Field(default="0" * 64, pattern=r"^[0-9a-f]{64}$")
    chain_ok: bool = True
    chain_reason: str | None = None
    entries_checked: int = Field(default=0, ge=0)
    after_timestamp: int = Field(default=0, ge=0, le=INT64_MAX)
    transfers_checked: int = Field(default=0, ge=0)
    posted_without_entry: list[str] = Field(default_factory=list, max_length=REFUSED_SAMPLE_MAX)
    posted_without_entry_count: int = Field(default=0, ge=0)
    entries_without_transfer: list[str] = Field(
        default_factory=list, max_length=REFUSED_SAMPLE_MAX)
    entries_without_transfer_count: int = Field(default=0, ge=0)
    transfer_mismatches: list[str] = Field(default_factory=list, max_length=REFUSED_SAMPLE_MAX)
    transfer_mismatch_count: int = Field(default=0, ge=0)
    duplicated_entries: int = Field(default=0, ge=0)
    holds_checked: int = Field(default=0, ge=0)
    expired_holds: list[str] = Field(default_factory=list, max_length=REFUSED_SAMPLE_MAX)
    expired_hold_count: int = Field(default=0, ge=0)
    synced_pages: int = Field(default=0, ge=0)


class TerminalReconcileInput(_Model):
    """TerminalReconcileWorkflow / `walletmig ledger reconcile`: `catch_up` runs the sync first
    (bounded), then everything is compared as of the sync cursor's TigerBeetle timestamp.
    `state`: the progress carried across continue-as-new."""

    run_id: str = Field(min_length=1, max_length=128)
    catch_up: bool = True
    page_size: int = Field(default=RECONCILE_PAGE_DEFAULT, ge=1, le=TB_BATCH_MAX)
    state: TerminalReconcileState | None = None


class TerminalReconcileReport(TerminalReconcileSummary):
    """The summary plus what it has no field for: balance documents that drifted from the
    entries, entries whose transfer says something else, full counts behind the samples."""

    snapshot_timestamp: int = Field(default=0, ge=0, le=INT64_MAX)
    balance_drift: list[BalanceDrift] = Field(default_factory=list, max_length=REFUSED_SAMPLE_MAX)
    transfer_mismatches: list[str] = Field(default_factory=list, max_length=REFUSED_SAMPLE_MAX)
    posted_without_entry_count: int = Field(default=0, ge=0)
    entries_without_transfer_count: int = Field(default=0, ge=0)
    transfer_mismatch_count: int = Field(default=0, ge=0)
    expired_hold_count: int = Field(default=0, ge=0)
    holds_checked: int = Field(default=0, ge=0)
    missing_mirrors: list[str] = Field(default_factory=list, max_length=REFUSED_SAMPLE_MAX)
    chain_reason: str | None = None

    @property
    def ok(self) -> bool:
        return (super().ok and not self.balance_drift and not self.transfer_mismatches
                and not self.missing_mirrors)


class LedgerRebuildResult(_Model):
    """`walletmig ledger rebuild-from-tigerbeetle`: the ledger replayed from TigerBeetle (sync
    from cursor 0) and verified. `digest_*`: order-free digest of (entry id, content hash)
    over every entry; `equal` compares them (None when nothing was taken before)."""

    entries_before: int | None = None
    entries_after: int = Field(ge=0)
    digest_before: str | None = None
    digest_after: str
    equal: bool | None = None
    sync: LedgerSyncOutcome
    trial_balance_zero: bool
    chain_ok: bool
    reconcile_ok: bool
    reconcile_run_id: str
    seconds: float = Field(ge=0)

    @property
    def ok(self) -> bool:
        """The rebuilt ledger verifies (whether it equals the one before is `equal`)."""
        return (self.trial_balance_zero and self.chain_ok and self.reconcile_ok
                and self.sync.caught_up)


class TigerBeetleRebuildResult(_Model):
    """`walletmig ledger rebuild-tigerbeetle`: mirrors and posted balances imported into a
    fresh cluster from the ledger, with the entries' timestamps, then compared."""

    accounts_created: int = Field(ge=0)
    accounts_existing: int = Field(ge=0)
    transfers_imported: int = Field(ge=0)
    transfers_existing: int = Field(ge=0)
    failed: list[str] = Field(default_factory=list, max_length=REFUSED_SAMPLE_MAX)
    failed_count: int = Field(default=0, ge=0)
    mirrors_checked: int = Field(ge=0)
    mismatched_accounts: list[AccountMismatch] = Field(
        default_factory=list, max_length=REFUSED_SAMPLE_MAX)
    seconds: float = Field(ge=0)

    @property
    def ok(self) -> bool:
        return self.failed_count == 0 and not self.mismatched_accounts
