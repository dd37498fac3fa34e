"""Shared set-up of the terminal sync/reconciliation/recovery tests: a chart on terminal ledgers
of the test's own (mirror ids derive from the ledger, so tests sharing the session's TigerBeetle
never see each other's balances), its stores on a database of its own, and clearing flows
written straight to TigerBeetle with walletcore.clearing's spec builders (no pipeline)."""

from __future__ import annotations

import itertools
import random
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import tigerbeetle as tb
from pymongo.asynchronous.database import AsyncDatabase

from activities.terminal_reconcile import TerminalReconciler
from activities.terminal_sync import LedgerSync
from stores.clearing_store import ClearingStore
from stores.clearing_tb import ensure_mirrors, transfer_of
from stores.general_ledger import GeneralLedger
from stores.terminal_reports import TerminalReports
from stores.tigerbeetle_client import TigerBeetleClient
from walletcore.clearing import (
    DEFAULT_CLEARING_TABLE,
    ClearingTable,
    ExternalTransaction,
    pending_spec,
    post_spec,
    settlement_entry,
    void_spec,
)
from walletcore.gl_chart import DEFAULT_GL_ACCOUNTS, ChartOfAccounts
from walletcore.journal import JournalEntry

_ids = itertools.count(1)


def own_table() -> ClearingTable:
    base = random.randrange(10_000, 2**31, 2)
    chart = ChartOfAccounts(accounts=DEFAULT_GL_ACCOUNTS, ledgers={"USD": base, "USDC": base + 1})
    return ClearingTable(chart=chart, routes=DEFAULT_CLEARING_TABLE.routes)


def txn(kind: str = "ach_credit_in", amount: str = "10.00", currency: str = "USD",
        memo: str | None = None) -> ExternalTransaction:
    return ExternalTransaction(
        external_id=f"ext-{uuid.uuid4().hex[:10]}-{next(_ids)}", kind=kind,
        amount=Decimal(amount), currency=currency, counterparty="bank-1", memo=memo)


@dataclass
class Terminal:
    """One test's terminal: stores, TigerBeetle, the sync and the reconciler over them."""

    db: AsyncDatabase[dict[str, Any]]
    client: TigerBeetleClient
    table: ClearingTable
    ledger: GeneralLedger
    clearing: ClearingStore
    reports: TerminalReports
    sync: LedgerSync
    reconciler: TerminalReconciler

    async def create_mirrors(self) -> None:
        created = await ensure_mirrors(self.client, self.table.chart)
        assert created == len(self.table.chart.mirrors())

    async def create(self, transfers: list[tb.Transfer]) -> None:
        results = await self.client.create_transfers(transfers)
        bad = [r for r in results if r.status is not tb.CreateTransferStatus.CREATED]
        assert not bad, bad

    async def clear(
        self, txns: list[ExternalTransaction], *, outcome: str = "post", batch: str | None = None,
        record: bool = True,
    ) -> dict[str, int]:
        """Record (unless not `record`), reserve, then post/void (or leave pending). Returns
        external id -> the post transfer's timestamp (posted ones)."""
        if record:
            recorded = await self.clearing.record_many(txns, batch or uuid.uuid4().hex[:12])
            assert len(recorded.records) == len(txns)
        await self.create([transfer_of(pending_spec(t, self.table)) for t in txns])
        if outcome == "pending":
            return {}
        spec = post_spec if outcome == "post" else void_spec
        await self.create([transfer_of(spec(t, self.table)) for t in txns])
        if outcome != "post":
            return {}
        found = await self.client.lookup_transfers([spec(t, self.table).id for t in txns])
        by_id = {f.id: f.timestamp for f in found}
        return {t.external_id: by_id[spec(t, self.table).id] for t in txns}

    def entries(
        self, txns: list[ExternalTransaction], stamps: dict[str, int]
    ) -> list[JournalEntry]:
        """What the pipeline would settle."""
        return [settlement_entry(t, self.table, stamps[t.external_id]) for t in txns]


async def make_terminal(
    db: AsyncDatabase[dict[str, Any]], client: TigerBeetleClient,
    table: ClearingTable | None = None, *, clock: Any = None,
) -> Terminal:
    table = table or own_table()
    ledger = GeneralLedger(db, chart=table.chart)
    await ledger.ensure_indexes()
    await ledger.ensure_chart()
    clearing = ClearingStore(db)
    await clearing.ensure_indexes()
    reports = TerminalReports(db)
    await reports.ensure_indexes()
    kwargs = {} if clock is None else {"clock": clock}
    sync = LedgerSync(client, ledger, clearing, table=table, reports=reports, **kwargs)
    reconciler = TerminalReconciler(client, sync, clearing, reports=reports, **kwargs)
    return Terminal(db=db, client=client, table=table, ledger=ledger, clearing=clearing,
                    reports=reports, sync=sync, reconciler=reconciler)


def mix() -> list[ExternalTransaction]:
    """A realistic little mix: money in (ACH, Stripe, USDC), money out, expenses, capital."""
    return [
        *[txn("capital_contribution", "50000.00", memo="seed") for _ in range(2)],
        *[txn("ach_credit_in", f"{100 + i}.25") for i in range(12)],
        *[txn("stripe_settlement", f"{20 + i}.10", memo="payout") for i in range(6)],
        *[txn("usdc_vault_deposit", f"{5 + i}.000001", currency="USDC") for i in range(6)],
        *[txn("ops_expense", "12.34") for _ in range(3)],
    ]


def spend() -> list[ExternalTransaction]:
    """Money out, after the mix funded (posted: reservations count against limits) the
    accounts it draws on."""
    return [
        *[txn("payroll_run", "1500.00") for _ in range(2)],
        *[txn("ach_debit_out", "25.00") for _ in range(4)],
        *[txn("usdc_vault_withdrawal", "1.5", currency="USDC") for _ in range(2)],
    ]
