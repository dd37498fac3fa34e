"""Repair: Correction transfers (never edits) that bring TigerBeetle to the legacy balance of a
wallet whose difference is real, in dual_write only, each one audited (who, why, before, after).

Changes when how a real difference may be corrected changes.
"""

from __future__ import annotations

import tigerbeetle as tb

from activities.reconciliation.compare import WalletCheck, balance_doc, tb_balance
from activities.reconciliation.scan import Subject
from messages.reconciliation import RepairInput, RepairOutput
from mongobase.mongo import u128_to_hex
from stores.migration_state import MigrationStateStore
from stores.reports import ReportStore
from stores.tb_errors import Outcome, transfer_rule
from stores.tigerbeetle_store import TigerBeetleStore
from walletcore.codes import SystemAccount, TransferCode
from walletcore.errors import InvalidInputError
from walletcore.ids import system_account_id
from walletcore.phases import Phase
from walletcore.reconcile import PostingPlan, correction_transfer_id, plan_to_reach


def correction_transfers(
    s: Subject, run_id: str, account_id: int, ledger: int, plan: PostingPlan
) -> list[tb.Transfer]:
    """Correction -> customer for missing credits, customer -> Correction for missing debits
    (linked: both or neither); ids per (wallet, run, part), so a retried repair posts once."""
    correction = system_account_id(ledger, SystemAccount.CORRECTION)
    transfers = []
    for part, amount in (("credit", plan.credit_minor), ("debit", plan.debit_minor)):
        if not amount:
            continue
        debit, credit = (correction, account_id) if part == "credit" else (account_id, correction)
        transfers.append(tb.Transfer(
            id=correction_transfer_id(s.canonical, run_id, part), debit_account_id=debit,
            credit_account_id=credit, amount=amount, user_data_64=s.version, ledger=ledger,
            code=int(TransferCode.CORRECTION)))
    if len(transfers) == 2:
        transfers[0].flags = tb.TransferFlags.LINKED
    return transfers


class Repairer:
    def __init__(
        self, wallets: WalletCheck, tigerbeetle: TigerBeetleStore,
        migration: MigrationStateStore, reports: ReportStore,
    ) -> None:
        self._wallets = wallets
        self._tb_store = tigerbeetle
        self._client = tigerbeetle.client
        self._accounts = tigerbeetle.accounts
        self._migration = migration
        self._reports = reports

    async def repair(self, inp: RepairInput) -> RepairOutput:
        """Re-evaluated first: a wallet that caught up meanwhile is left alone."""
        repaired: list[str] = []
        failed: dict[str, str] = {}
        subjects = await self._wallets.subjects_of(inp.wallets)
        fresh = await self._wallets.evaluate(inp.run_id, subjects, inp.in_flight_max_age_s)
        still_real = set(fresh.repairable)
        for s in subjects:
            key = s.canonical
            if key not in still_real:
                continue  # caught up meanwhile: nothing to repair
            state = await self._migration.resolve(s.key.ledger_pair)
            if state.phase is not Phase.DUAL_WRITE:
                failed[key] = f"repair runs in dual_write only (phase {state.phase.value})"
                continue
            try:
                repaired_now = await self._repair_one(inp, s)
            except InvalidInputError as err:
                failed[key] = err.message
                continue
            if repaired_now:
                repaired.append(key)
            else:
                failed[key] = "still different after the correction"
        await self._reports.mark_repaired(inp.run_id, repaired)
        return RepairOutput(repaired=repaired, failed=failed)

    async def _repair_one(self, inp: RepairInput, s: Subject) -> bool:
        if s.registry is None:  # a cached copy would hide the missing document
            await self._accounts.invalidate(s.key)
        record = await self._tb_store.ensure_account(s.key, allow_overdraft=s.allow_overdraft)
        await self._tb_store.ensure_system_accounts(record.ledger)
        (account,) = await self._client.lookup_accounts([record.account_id])
        before = tb_balance(account)
        plan = plan_to_reach(account.credits_posted, account.debits_posted, s.balance)
        if plan is None:
            raise InvalidInputError(
                "TigerBeetle holds more credits or debits than legacy: a correction cannot "
                "take them back without editing history; manual review", field="wallet")
        transfers = correction_transfers(s, inp.run_id, record.account_id, record.ledger, plan)
        statuses: list[str] = []
        if transfers:
            results = await self._client.create_transfers(transfers)
            statuses = [r.status.name for r in results]
            if any(transfer_rule(r.status).outcome is Outcome.FAILED for r in results):
                raise InvalidInputError(f"correction refused: {statuses}", field="wallet")
        (after_account,) = await self._client.lookup_accounts([record.account_id])
        after = tb_balance(after_account)
        await self._reports.audit({
            "run_id": inp.run_id, "wallet": s.canonical, "actor": inp.actor,
            "reason": inp.reason, "legacy": balance_doc(s.balance),
            "legacy_version": s.version, "tigerbeetle_before": balance_doc(before),
            "tigerbeetle_after": balance_doc(after),
            "transfers": [{"id": u128_to_hex(t.id), "amount": t.amount,
                           "direction": "credit" if t.credit_account_id == record.account_id
                           else "debit"} for t in transfers],
            "statuses": statuses, "ok": after == s.balance,
        })
        return after == s.balance
