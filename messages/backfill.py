"""Inputs, outputs and state of the backfill workflow and its activities (no I/O: the
workflow imports this module).

Page sizes are bounded by what fits TigerBeetle's largest request (the default 1 MiB limit):
recorded histories carry these bounds and defaults. The activities cut a page further to the
connected cluster's limit (walletcore.tb_limits.BatchLimits: e.g. 126 wallets at 32 KiB), and
a page output's `exhausted` compares against the size actually read.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from walletcore.balances import MinorBalance
from walletcore.keys import WalletKey
from walletcore.tb_limits import BatchLimits

ACTIVITY_COUNT = "backfill_count"
ACTIVITY_PAGE = "backfill_page"
ACTIVITY_ENSURE_IMPORTED = "backfill_ensure_imported"
ACTIVITY_HISTORY_PAGE = "backfill_history_page"
LARGEST_LIMITS = BatchLimits()  # the default (and largest) request limit: 1 MiB
WALLETS_PER_PAGE_MAX = LARGEST_LIMITS.backfill_wallets_per_page_max  # 4094: two openings each
PAGES_PER_RUN_DEFAULT = 50  # continue-as-new after this many pages: bounded history
PAGES_PER_RUN_MAX = 1000
HISTORY_EVENTS_PER_PAGE_MAX = LARGEST_LIMITS.history_events_per_page_max  # 8189: one create
HISTORY_EVENTS_PER_PAGE_DEFAULT = 4096
FAILED_SAMPLE_MAX = 20
# Pacing (BackfillInput.wallets_per_s_max): a budget, not a target. The bound keeps a typo
# from meaning "unpaced" silently; 1 wallet/s is the slowest a backfill may crawl.
WALLETS_PER_S_MIN = 1.0
WALLETS_PER_S_MAX = 1_000_000.0
PATCH_PACING = "backfill-pacing"  # workflow.patched id: a paced run's timers between pages
# History pacing (BackfillInput.history_txns_per_s_max), the same rule for `--with-history`'s
# transaction-log pages: a budget in transactions/s, 1..1e6 (None: unpaced).
HISTORY_TXNS_PER_S_MIN = 1.0
HISTORY_TXNS_PER_S_MAX = 1_000_000.0
PATCH_HISTORY_PACING = "backfill-history-pacing"  # timers between history pages


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class LegacyWallet(_Model):
    """What the import needs of one legacy wallet (from LegacyStore.page_wallets)."""

    wallet: WalletKey
    balance: MinorBalance
    version: int = Field(ge=0)
    allow_overdraft: bool


class ImportOutcome(_Model):
    imported: list[str] = Field(default_factory=list)  # opening posted now
    already: int = 0  # imported before (done claim or TigerBeetle already equal)
    busy: int = 0  # claimed by a live importer (its wallet workflow): it finishes them
    failed: dict[str, str] = Field(default_factory=dict)
    transfers: int = 0  # opening transfers created


class BackfillCountInput(_Model):
    pairs: list[str]


class BackfillCountOutput(_Model):
    totals: dict[str, int]


class BackfillPageInput(_Model):
    run_id: str = Field(min_length=1)
    pair: str
    after: str | None = None
    limit: int = Field(default=WALLETS_PER_PAGE_MAX, ge=1, le=WALLETS_PER_PAGE_MAX)
    with_history: bool = False


class BackfillPageOutput(_Model):
    scanned: int
    last_key: str | None
    imported: int
    already: int
    busy: int
    failed: dict[str, str]
    transfers: int
    exhausted: bool  # fewer wallets than the limit: the pair is done


class HistoryPageInput(_Model):
    """Import the next page of a scope's legacy transaction log (--with-history)."""

    run_id: str = Field(min_length=1)
    pairs: list[str] = Field(min_length=1)
    limit: int = Field(
        default=HISTORY_EVENTS_PER_PAGE_DEFAULT, ge=1, le=HISTORY_EVENTS_PER_PAGE_MAX)


class HistoryPageOutput(_Model):
    """The history import's checkpoint after the page: cumulative, exact across retries."""

    done: bool
    total: int  # scope transactions created before the cut (counted when it started)
    scanned: int
    imported: int  # imported transfers created
    already: int  # found in TigerBeetle (a retried or re-run page)
    skipped: int  # no wallet document / void of an original the history does not hold
    failed: int  # rejected by TigerBeetle: the residual opening balance holds their effect
    failed_sample: dict[str, str] = Field(default_factory=dict)
    pages: int
    cut: datetime  # transactions created at or after it reach TigerBeetle in the opening
    reached: datetime | None = None  # created_at of the last transaction handled


class EnsureImportedInput(_Model):
    wallet: WalletKey
    claimer: str = "wallet-workflow"


class EnsureImportedOutput(_Model):
    version: int  # backlog operations with legacy version <= this are in the opening balance


class BackfillState(BaseModel):
    """Carried across continue-as-new: the cursor and the counters. Bounded in size."""

    pair_index: int = 0
    after: str | None = None
    totals: dict[str, int] = Field(default_factory=dict)
    scanned: int = 0
    imported: int = 0
    already: int = 0
    busy: int = 0
    failed: int = 0
    failed_sample: dict[str, str] = Field(default_factory=dict)
    transfers: int = 0
    pages: int = 0
    runs: int = 1
    history_done: bool = False
    history: HistoryPageOutput | None = None
    paused_s: float = Field(default=0.0, ge=0)  # pacing: time spent waiting between pages
    started_at: datetime | None = None
    finished_at: datetime | None = None


class BackfillInput(_Model):
    run_id: str = Field(min_length=1, description="claims and audit name this backfill")
    pairs: list[str] = Field(description="ledger pairs (`USD:USA`) in order; empty = all")
    page_size: int = Field(default=WALLETS_PER_PAGE_MAX, ge=1, le=WALLETS_PER_PAGE_MAX)
    pages_per_run: int = Field(default=PAGES_PER_RUN_DEFAULT, ge=1, le=PAGES_PER_RUN_MAX)
    with_history: bool = Field(
        default=False, description="first import the transaction log as imported transfers")
    history_page_size: int = Field(
        default=HISTORY_EVENTS_PER_PAGE_DEFAULT, ge=1, le=HISTORY_EVENTS_PER_PAGE_MAX)
    wallets_per_s_max: float | None = Field(
        default=None, ge=WALLETS_PER_S_MIN, le=WALLETS_PER_S_MAX,
        description="pace the wallet pages to at most this many wallets per second (a "
        "pause after each page; a page holds at most one second of it); None: unpaced")
    # Unpaced by default, as the wallet pages: the right budget is what the deployment's
    # MongoDB can spare beside its live writes, which the workflow cannot know (the history
    # import runs in phase legacy, where every live write is MongoDB's).
    history_txns_per_s_max: float | None = Field(
        default=None, ge=HISTORY_TXNS_PER_S_MIN, le=HISTORY_TXNS_PER_S_MAX,
        description="pace the history pages (--with-history) to at most this many "
        "transactions per second (a pause after each page; a page holds at most one second "
        "of it); None: unpaced")
    state: BackfillState | None = None

    def wallet_page_limit(self) -> int:
        """Wallets the next page asks for: page_size, and when paced at most one second of
        the budget, so the load the import puts on MongoDB and TigerBeetle comes in small
        steps rather than in one large page followed by a long pause."""
        return _paced_page(self.page_size, self.wallets_per_s_max)

    def history_page_limit(self) -> int:
        """Transactions the next history page asks for: history_page_size, and when paced
        at most one second of the budget (the wallet pages' rule)."""
        return _paced_page(self.history_page_size, self.history_txns_per_s_max)


def _paced_page(page_size: int, per_s_max: float | None) -> int:
    """`page_size`, or at most one second of the `per_s_max` budget when there is one."""
    if per_s_max is None:
        return page_size
    return max(1, min(page_size, int(per_s_max)))


class BackfillProgress(_Model):
    run_id: str
    pairs: list[str]
    pair: str | None  # the pair being imported now (None when finished)
    total: int
    done: int
    imported: int
    already: int
    busy: int
    failed: int
    failed_sample: dict[str, str]
    transfers: int
    pages: int
    runs: int
    rate_per_s: float
    eta_s: float | None
    elapsed_s: float
    finished: bool
    stage: str = "wallets"  # "history" (--with-history, first), "wallets", "finished"
    history: HistoryPageOutput | None = None
    wallets_per_s_max: float | None = None  # the pacing budget (None: unpaced)
    paused_s: float = 0.0  # spent pausing between pages for the budget (both budgets)
    history_txns_per_s_max: float | None = None  # the history pages' budget (None: unpaced)
