"""Inputs, outputs and state of the reconciliation workflow and its activities (no I/O).

Page sizes are bounded by what fits TigerBeetle's largest request (the default 1 MiB limit):
recorded histories carry these bounds and defaults. The activities cut a page further to the
connected cluster's limit (walletcore.tb_limits.BatchLimits: 2031 wallets, 1015 registry
records at 32 KiB), and a page output's `exhausted` compares against the size actually read.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from walletcore.reconcile import (
    IN_FLIGHT_MAX_AGE_S_DEFAULT,
    MATCH_RATE_THRESHOLD_DEFAULT,
    ReportKind,
)
from walletcore.tb_limits import BatchLimits

ACTIVITY_START = "reconcile_start"
ACTIVITY_WALLET_PAGE = "reconcile_wallet_page"
ACTIVITY_RECHECK = "reconcile_recheck"
ACTIVITY_ACCOUNT_PAGE = "reconcile_account_page"
ACTIVITY_TRANSFER_PAGE = "reconcile_transfer_page"
ACTIVITY_REPAIR = "reconcile_repair"
ACTIVITY_FINISH = "reconcile_finish"

PAGE_MAX = BatchLimits().reconcile_wallets_per_page_max  # 8189: one lookup at the largest limit
PAGES_PER_RUN_DEFAULT = 25
RECHECK_DELAY_S_DEFAULT = 5.0
SCHEDULE_ID = "reconciliation-schedule"
SCHEDULE_EVERY_S_DEFAULT = 300


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class Counts(BaseModel):
    """Running totals of a run (carried across continue-as-new)."""

    wallets: int = 0
    matched: int = 0
    in_flight: int = 0  # still in flight after the re-check
    resolved_on_recheck: int = 0  # in flight at first, equal at the re-check
    real: int = 0
    max_real_diff_minor: int = 0
    findings: dict[str, int] = Field(default_factory=dict)
    tb_accounts: int = 0
    foreign_tb_accounts: int = 0  # other deployments' accounts on the same ledgers (not checked)
    transfers_checked: int = 0
    repaired: int = 0
    repair_failed: int = 0

    def add_findings(self, findings: dict[str, int]) -> None:
        for kind, n in findings.items():
            self.findings[kind] = self.findings.get(kind, 0) + n


class ReconcileState(BaseModel):
    stage: str = "start"  # start -> wallets -> accounts -> transfers -> finish
    pair_index: int = 0
    after: str | None = None
    timestamp_after: int = 0
    counts: Counts = Field(default_factory=Counts)
    customer_net: dict[str, int] = Field(default_factory=dict)  # ledger (str) -> sum of nets
    system_start: dict[str, dict[str, list[int]]] = Field(default_factory=dict)
    pending_repair: list[str] = Field(default_factory=list)
    pages: int = 0
    runs: int = 1
    started_at: datetime | None = None


class ReconcileInput(_Model):
    run_id: str = Field(min_length=1)
    pairs: list[str] = Field(min_length=1)
    page_size: int = Field(default=PAGE_MAX, ge=1, le=PAGE_MAX)
    pages_per_run: int = Field(default=PAGES_PER_RUN_DEFAULT, ge=1, le=1000)
    recheck_delay_s: float = Field(default=RECHECK_DELAY_S_DEFAULT, ge=0, le=600)
    in_flight_max_age_s: float = Field(default=IN_FLIGHT_MAX_AGE_S_DEFAULT, gt=0)
    threshold: float = Field(default=MATCH_RATE_THRESHOLD_DEFAULT, gt=0, le=1)
    check_transfers: bool = True
    repair: bool = False
    actor: str | None = None
    reason: str | None = None
    state: ReconcileState | None = None


class StartInput(_Model):
    run_id: str
    pairs: list[str]
    repair: bool
    actor: str | None
    reason: str | None
    check_transfers: bool = True  # False: a partial run (its report opens no gate)


class StartOutput(_Model):
    system: dict[str, dict[str, list[int]]]  # ledger -> account name -> [credits, debits]


class WalletPageInput(_Model):
    run_id: str
    pair: str
    after: str | None
    limit: int = Field(ge=1, le=PAGE_MAX)
    in_flight_max_age_s: float = Field(gt=0)


class WalletPageOutput(_Model):
    scanned: int
    last_key: str | None
    exhausted: bool
    matched: int
    real: int
    max_real_diff_minor: int
    in_flight: list[str]  # canonical keys to re-check once
    repairable: list[str]  # canonical keys of real balance/account mismatches
    findings: dict[str, int]


class RecheckInput(_Model):
    run_id: str
    wallets: list[str] = Field(max_length=PAGE_MAX)
    in_flight_max_age_s: float = Field(gt=0)


class RecheckOutput(_Model):
    matched: int
    in_flight: int
    real: int
    max_real_diff_minor: int
    repairable: list[str]
    findings: dict[str, int]


class AccountPageInput(_Model):
    run_id: str
    ledger: int
    timestamp_after: int = 0
    limit: int = Field(ge=1, le=PAGE_MAX)


class AccountPageOutput(_Model):
    scanned: int  # this deployment's customer accounts (user_data_64 = its deployment tag)
    net_minor: int  # every customer account of the ledger (the system accounts are shared)
    last_timestamp: int
    exhausted: bool
    findings: dict[str, int]
    foreign: int = 0  # customer accounts of other deployments sharing the ledger


class TransferPageInput(_Model):
    run_id: str
    pairs: list[str]
    after: str | None
    limit: int = Field(ge=1, le=PAGE_MAX // 2)


class TransferPageOutput(_Model):
    scanned: int
    checked: int
    last_key: str | None
    exhausted: bool
    findings: dict[str, int]


class RepairInput(_Model):
    run_id: str
    wallets: list[str] = Field(max_length=PAGE_MAX)
    actor: str
    reason: str
    in_flight_max_age_s: float = Field(gt=0)


class RepairOutput(_Model):
    repaired: list[str]
    failed: dict[str, str]


class FinishInput(_Model):
    run_id: str
    pairs: list[str]
    counts: Counts
    customer_net: dict[str, int]
    system_start: dict[str, dict[str, list[int]]]
    threshold: float
    check_transfers: bool = True
    repair: bool = False


class ReconcileSummary(_Model):
    """A finished run, as its report records it (stores.reports) and the gates read it.
    Defaults: what summaries recorded before these fields existed meant."""

    run_id: str
    pairs: list[str]  # the run's scope
    wallets: int  # legacy wallets compared
    matched: int
    in_flight: int  # still in flight after the re-check (apart from real and matched)
    resolved_on_recheck: int
    real: int
    match_rate: float | None  # None: nothing compared ("no data", never 100 %)
    findings: dict[str, int]  # by class (walletcore.reconcile.IssueKind), conservation included
    conservation_ok: bool
    alerts: list[str]
    repaired: int
    repair_failed: int
    kind: str = ReportKind.CHECK.value
    full: bool = True  # every stage ran (wallets, accounts, transfers, conservation)
    covers_all_pairs: bool = False  # `pairs` was every pair of the deployment's ledger table
