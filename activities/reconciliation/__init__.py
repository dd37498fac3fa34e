"""Reconciliation activities: read both stores page by page, let walletcore.reconcile decide.

Split by reason to change:
- scan.py: reading the legacy wallets (cursor per pair, read ahead), registry, TB accounts;
- evidence.py: in flight or real, from the stores' own records;
- compare.py: the per-wallet comparison and what a difference is recorded as;
- ledger_checks.py: TigerBeetle accounts and Transfer Registry transfers on their own;
- repair.py: correction transfers (dual_write only), audited;
- report.py: the run's report (scope, kind, full, findings by class) the gates judge.

No activity touches a collection: each store owns its documents (stores/, registries/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from temporalio import activity

from activities.reconciliation.compare import WalletCheck
from activities.reconciliation.ledger_checks import LedgerCheck
from activities.reconciliation.repair import Repairer
from activities.reconciliation.report import RunReport
from messages.errors import wallet_errors_as_application_errors
from messages.reconciliation import (
    ACTIVITY_ACCOUNT_PAGE,
    ACTIVITY_FINISH,
    ACTIVITY_RECHECK,
    ACTIVITY_REPAIR,
    ACTIVITY_START,
    ACTIVITY_TRANSFER_PAGE,
    ACTIVITY_WALLET_PAGE,
    AccountPageInput,
    AccountPageOutput,
    FinishInput,
    RecheckInput,
    RecheckOutput,
    ReconcileSummary,
    RepairInput,
    RepairOutput,
    StartInput,
    StartOutput,
    TransferPageInput,
    TransferPageOutput,
    WalletPageInput,
    WalletPageOutput,
)
from stores.backfill_imports import ImportLedger
from stores.legacy_store import LegacyStore
from stores.migration_state import MigrationStateStore
from stores.reports import ReportStore
from stores.tigerbeetle_store import TigerBeetleStore


@dataclass(frozen=True)
class Books:
    """What a run consults and writes beside the two sides' data: the backfill's import claims
    (which legacy versions the openings hold), the published migration state (repair runs in
    dual_write only) and its own reports."""

    imports: ImportLedger
    migration: MigrationStateStore
    reports: ReportStore


class Reconciler:
    """Three stores: the legacy side, the TigerBeetle side (client, registries, ledger table,
    deployment tag) and the run's books."""

    def __init__(self, legacy: LegacyStore, tigerbeetle: TigerBeetleStore, books: Books) -> None:
        self.wallets = WalletCheck(legacy, tigerbeetle, books.imports, books.reports,
                                   books.migration)
        self.ledger = LedgerCheck(tigerbeetle, books.reports)
        self.repairs = Repairer(self.wallets, tigerbeetle, books.migration, books.reports)
        self.report = RunReport(tigerbeetle, books.reports)

    async def start(self, inp: StartInput) -> StartOutput:
        return await self.report.start(inp)

    async def wallet_page(self, inp: WalletPageInput) -> WalletPageOutput:
        return await self.wallets.wallet_page(inp)

    async def recheck(self, inp: RecheckInput) -> RecheckOutput:
        return await self.wallets.recheck(inp)

    async def account_page(self, inp: AccountPageInput) -> AccountPageOutput:
        return await self.ledger.account_page(inp)

    async def transfer_page(self, inp: TransferPageInput) -> TransferPageOutput:
        return await self.ledger.transfer_page(inp)

    async def repair(self, inp: RepairInput) -> RepairOutput:
        return await self.repairs.repair(inp)

    async def finish(self, inp: FinishInput) -> ReconcileSummary:
        return await self.report.finish(inp)


class ReconcileActivities:
    """Temporal activities around Reconciler (one pydantic input model each)."""

    def __init__(self, reconciler: Reconciler) -> None:
        self._r = reconciler

    @activity.defn(name=ACTIVITY_START)
    async def start(self, inp: StartInput) -> StartOutput:
        with wallet_errors_as_application_errors():
            return await self._r.start(inp)

    @activity.defn(name=ACTIVITY_WALLET_PAGE)
    async def wallet_page(self, inp: WalletPageInput) -> WalletPageOutput:
        with wallet_errors_as_application_errors():
            return await self._r.wallet_page(inp)

    @activity.defn(name=ACTIVITY_RECHECK)
    async def recheck(self, inp: RecheckInput) -> RecheckOutput:
        with wallet_errors_as_application_errors():
            return await self._r.recheck(inp)

    @activity.defn(name=ACTIVITY_ACCOUNT_PAGE)
    async def account_page(self, inp: AccountPageInput) -> AccountPageOutput:
        with wallet_errors_as_application_errors():
            return await self._r.account_page(inp)

    @activity.defn(name=ACTIVITY_TRANSFER_PAGE)
    async def transfer_page(self, inp: TransferPageInput) -> TransferPageOutput:
        with wallet_errors_as_application_errors():
            return await self._r.transfer_page(inp)

    @activity.defn(name=ACTIVITY_REPAIR)
    async def repair(self, inp: RepairInput) -> RepairOutput:
        with wallet_errors_as_application_errors():
            return await self._r.repair(inp)

    @activity.defn(name=ACTIVITY_FINISH)
    async def finish(self, inp: FinishInput) -> ReconcileSummary:
        with wallet_errors_as_application_errors():
            return await self._r.finish(inp)

    def all(self) -> list[Any]:
        return [self.start, self.wallet_page, self.recheck, self.account_page,
                self.transfer_page, self.repair, self.finish]


__all__ = ["Books", "ReconcileActivities", "Reconciler"]
