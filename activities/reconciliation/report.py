"""A run's report: opened with its scope and kind, closed with money conservation per ledger,
the match rate ("no data" when nothing was compared), findings by class and alerts.

What a report records is what the migration gates judge (walletcore.gates.ReconciliationFacts):
changes here change what a gate can accept.
"""

from __future__ import annotations

from collections.abc import Sequence

from temporalio import activity

from messages.reconciliation import FinishInput, ReconcileSummary, StartInput, StartOutput
from observability.metrics import observe_reconciliation
from stores.reports import ReportStore, RunOpened
from stores.tigerbeetle_store import TigerBeetleStore
from walletcore.codes import SystemAccount
from walletcore.ids import system_account_id
from walletcore.reconcile import (
    ConservationResult,
    IssueKind,
    ReportKind,
    alerts,
    check_conservation,
    match_rate,
)

SystemSnapshot = dict[str, dict[str, list[int]]]  # ledger -> account name -> [credits, debits]


class RunReport:
    def __init__(self, tigerbeetle: TigerBeetleStore, reports: ReportStore) -> None:
        self._client = tigerbeetle.client
        self._ledgers = tigerbeetle.ledgers
        self._reports = reports

    def _ledger_ids(self, pairs: Sequence[str]) -> list[int]:
        return sorted(set(self._ledgers.parse_scope(list(pairs)).values()))

    def _covers_all_pairs(self, pairs: Sequence[str]) -> bool:
        """The run compares every pair of the deployment's table (a '*' migration's scope)."""
        return set(pairs) >= set(self._ledgers.ledgers())

    async def _system_snapshot(self, pairs: Sequence[str]) -> SystemSnapshot:
        ids = {
            system_account_id(ledger, account): (ledger, account)
            for ledger in self._ledger_ids(pairs) for account in SystemAccount
        }
        snapshot: SystemSnapshot = {}
        for account in await self._client.lookup_accounts(list(ids)):
            ledger, which = ids[account.id]
            snapshot.setdefault(str(ledger), {})[which.name] = [
                account.credits_posted, account.debits_posted]
        return snapshot

    async def start(self, inp: StartInput) -> StartOutput:
        await self._reports.start(inp.run_id, RunOpened(
            pairs=sorted(inp.pairs), covers_all_pairs=self._covers_all_pairs(inp.pairs),
            kind=(ReportKind.REPAIR if inp.repair else ReportKind.CHECK).value,
            full=inp.check_transfers, actor=inp.actor, reason=inp.reason))
        return StartOutput(system=await self._system_snapshot(inp.pairs))

    async def _conservation(self, inp: FinishInput) -> list[ConservationResult]:
        """Per ledger: customers' nets against the system accounts' (the system accounts'
        movement during the run bounds the drift of a sum taken page by page)."""
        end = await self._system_snapshot(inp.pairs)
        results = []
        for ledger in self._ledger_ids(inp.pairs):
            before = inp.system_start.get(str(ledger), {})
            after = end.get(str(ledger), {})
            nets = {name: c - d for name, (c, d) in after.items()}
            activity_minor = sum(
                abs(c - before.get(name, [0, 0])[0]) + abs(d - before.get(name, [0, 0])[1])
                for name, (c, d) in after.items()
            )
            results.append(check_conservation(
                ledger, customer_net_minor=inp.customer_net.get(str(ledger), 0),
                system_nets_minor=nets, activity_minor=activity_minor))
        return results

    async def finish(self, inp: FinishInput) -> ReconcileSummary:
        conservation = await self._conservation(inp)
        counts = inp.counts
        failures = sum(1 for c in conservation if not c.ok)
        findings = dict(counts.findings)
        if failures:
            findings[IssueKind.CONSERVATION] = failures
        rate = match_rate(counts.wallets, counts.real)
        reasons = alerts(rate=rate, threshold=inp.threshold,
                         max_real_diff_minor=counts.max_real_diff_minor,
                         findings=sum(v for k, v in counts.findings.items()
                                      if k != IssueKind.BALANCE_MISMATCH),
                         conservation_failures=failures)
        summary = ReconcileSummary(
            run_id=inp.run_id, pairs=sorted(inp.pairs), wallets=counts.wallets,
            matched=counts.matched, in_flight=counts.in_flight,
            resolved_on_recheck=counts.resolved_on_recheck, real=counts.real, match_rate=rate,
            findings=findings, conservation_ok=failures == 0, alerts=reasons,
            repaired=counts.repaired, repair_failed=counts.repair_failed,
            kind=(ReportKind.REPAIR if inp.repair else ReportKind.CHECK).value,
            full=inp.check_transfers, covers_all_pairs=self._covers_all_pairs(inp.pairs),
        )
        await self._reports.finish(summary, counts, threshold=inp.threshold,
                                   conservation=conservation)
        observe_reconciliation(
            "*" if summary.covers_all_pairs else ",".join(summary.pairs),
            wallets=counts.wallets, match_ratio=rate,
            findings={str(kind): n for kind, n in findings.items()},
            conservation_ok=failures == 0)
        for reason in reasons:
            activity.logger.warning("reconciliation %s ALERT: %s", inp.run_id, reason)
        return summary
