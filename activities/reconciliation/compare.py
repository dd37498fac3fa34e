"""Comparing legacy wallets with TigerBeetle, page by page, and deciding what each difference is.

Per wallet page: one MongoDB cursor page of wallets, one registry range read, ONE
`lookup_accounts` request: a page holds at most `BatchLimits.reconcile_wallets_per_page_max`
wallets of the connected cluster (8189 at 1 MiB, 2031 at 32 KiB, 239 at 4 KiB), whatever size
the workflow asks for. Only wallets that differ cost more: their evidence (evidence.py).
Every decision ("equal?", "in flight or real?") is walletcore.reconcile's.

Changes when what is compared, or how a difference is recorded, changes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import tigerbeetle as tb

from activities.reconciliation.evidence import Evidence, EvidenceReader
from activities.reconciliation.scan import Subject, WalletScans, attach_tigerbeetle, subjects_of
from messages.reconciliation import (
    PAGE_MAX,
    RecheckInput,
    RecheckOutput,
    WalletPageInput,
    WalletPageOutput,
)
from registries.account_registry import RegistryEntry
from stores.backfill_imports import ImportLedger
from stores.legacy_store import LegacyStore
from stores.migration_state import MigrationStateStore
from stores.reports import MismatchDoc, ReportStore
from stores.tigerbeetle_store import TigerBeetleStore
from walletcore.balances import MinorBalance
from walletcore.keys import WalletKey
from walletcore.reconcile import (
    AccountView,
    Classification,
    IssueKind,
    RegistryView,
    Verdict,
    check_wallet_account,
    classify,
    still_pending,
    wallet_agrees,
)

REPORTED_OPS_MAX = 10
# In-flight wallets whose pending operations a first read remembers for its re-check (the
# re-check runs on this worker right after; one that does not find them judges "not cleared").
FIRST_PENDING_MAX = 4 * PAGE_MAX
FirstPending = dict[str, frozenset[str] | None]  # wallet -> operations pending at the first read
Document = dict[str, Any]


@dataclass
class Evaluation:
    matched: int = 0
    real: int = 0
    max_real_diff_minor: int = 0
    in_flight: list[str] = field(default_factory=list)
    pending: dict[str, frozenset[str]] = field(default_factory=dict)  # of the in-flight ones
    repairable: list[str] = field(default_factory=list)
    findings: Counter[str] = field(default_factory=Counter)
    docs: list[MismatchDoc] = field(default_factory=list)

    def add(self, run_id: str, kind: str, subject: str, detail: str) -> None:
        self.findings[kind] += 1
        self.docs.append(MismatchDoc(run_id=run_id, kind=kind, subject=subject, detail=detail))


def balance_doc(balance: MinorBalance | None) -> Document | None:
    if balance is None:
        return None
    return {"credit_minor": balance.credit_minor, "debit_minor": balance.debit_minor,
            "historical_credit_minor": balance.historical_credit_minor}


def tb_balance(account: tb.Account) -> MinorBalance:
    return MinorBalance.from_posted(account.credits_posted, account.debits_posted)


def _registry_view(entry: RegistryEntry | None) -> RegistryView | None:
    return None if entry is None else RegistryView(
        account_id=entry.account_id, ledger=entry.ledger, allow_overdraft=entry.allow_overdraft)


def _account_view(account: tb.Account | None) -> AccountView | None:
    return None if account is None else AccountView(
        id=account.id, ledger=account.ledger, code=account.code, flags=int(account.flags),
        credits_posted=account.credits_posted, debits_posted=account.debits_posted)


class WalletCheck:
    """Legacy wallets against their registry entries and TigerBeetle accounts."""

    def __init__(
        self, legacy: LegacyStore, tigerbeetle: TigerBeetleStore, imports: ImportLedger,
        reports: ReportStore, migration: MigrationStateStore,
    ) -> None:
        self._legacy = legacy
        self._client = tigerbeetle.client
        self._limits = tigerbeetle.limits
        self._accounts = tigerbeetle.accounts
        self._ledgers = tigerbeetle.ledgers
        self._reports = reports
        self._scans = WalletScans(legacy, tigerbeetle.accounts)
        self._evidence = EvidenceReader(legacy, tigerbeetle, imports, migration)
        self._first_pending: dict[tuple[str, str], frozenset[str]] = {}  # (run, wallet) ->

    async def wallet_page(self, inp: WalletPageInput) -> WalletPageOutput:
        currency, _, country = inp.pair.partition(":")
        ledger = self._ledgers.ledger_of(currency, country)
        # The workflow's size (recorded histories keep theirs), cut to one lookup request.
        limit = min(inp.limit, self._limits.reconcile_wallets_per_page_max)
        inp = inp.model_copy(update={"limit": limit})
        subjects, in_range = await self._scans.page(inp, ledger)
        evaluation = await self.evaluate(inp.run_id, subjects, inp.in_flight_max_age_s,
                                         in_range=in_range)
        self._remember(inp.run_id, evaluation.pending)
        await self._orphans(inp, subjects, in_range, evaluation)
        await self._reports.add_mismatches(evaluation.docs)
        return WalletPageOutput(
            scanned=len(subjects), last_key=subjects[-1].canonical if subjects else inp.after,
            exhausted=len(subjects) < inp.limit, matched=evaluation.matched,
            real=evaluation.real, max_real_diff_minor=evaluation.max_real_diff_minor,
            in_flight=evaluation.in_flight, repairable=evaluation.repairable,
            findings=dict(evaluation.findings),
        )

    async def _orphans(
        self, inp: WalletPageInput, subjects: list[Subject],
        in_range: dict[str, RegistryEntry], out: Evaluation,
    ) -> None:
        """Registry entries in this page's key range with no legacy wallet behind them. A
        wallet of the pair created after its page was read may be registered by the time the
        range is read: one whose wallet exists now is not an orphan."""
        page_keys = {s.canonical for s in subjects}
        orphans = [key for key in in_range if key not in page_keys][:PAGE_MAX]
        if not orphans:
            return
        pair = inp.pair
        created_since = await self._legacy.overdraft_policies(
            [k for k in orphans if WalletKey.from_canonical(k).ledger_pair == pair])
        for orphan in orphans:
            if orphan not in created_since:
                out.add(inp.run_id, IssueKind.REGISTRY_WITHOUT_WALLET, orphan,
                        "Account Registry entry without a legacy wallet")

    def _remember(self, run_id: str, pending: dict[str, frozenset[str]]) -> None:
        """The first read's pending operations of its in-flight wallets, for the re-check
        (bounded: the oldest are forgotten first, and then count as not cleared)."""
        for wallet, ops in pending.items():
            while len(self._first_pending) >= FIRST_PENDING_MAX:
                del self._first_pending[next(iter(self._first_pending))]
            self._first_pending[(run_id, wallet)] = ops

    async def recheck(self, inp: RecheckInput) -> RecheckOutput:
        """A later read: what was in flight must have cleared. A wallet still pending one of
        the operations the first read saw pending is real (in_flight_not_cleared); one that
        is in flight only with operations written since stays in flight."""
        first = {w: self._first_pending.pop((inp.run_id, w), None) for w in inp.wallets}
        evaluation = await self.evaluate(
            inp.run_id, await self.subjects_of(inp.wallets), inp.in_flight_max_age_s,
            first_pending=first)
        await self._reports.add_mismatches(evaluation.docs)
        return RecheckOutput(
            matched=evaluation.matched, in_flight=len(evaluation.in_flight),
            real=evaluation.real, max_real_diff_minor=evaluation.max_real_diff_minor,
            repairable=evaluation.repairable, findings=dict(evaluation.findings))

    async def subjects_of(self, wallets: list[str]) -> list[Subject]:
        return await subjects_of(self._legacy, wallets)

    async def evaluate(
        self, run_id: str, subjects: list[Subject], max_age_s: float,
        *, in_range: dict[str, RegistryEntry] | None = None,
        first_pending: FirstPending | None = None,
    ) -> Evaluation:
        """Match, in flight or real, for each subject (with its findings and mismatch docs).
        `first_pending`: this is a re-check, and what the first read saw pending."""
        await attach_tigerbeetle(self._client, self._accounts, subjects, in_range)
        out = Evaluation()
        differing: list[Subject] = []
        ledgers: dict[tuple[str, str], int] = {}
        for s in subjects:
            pair = (s.key.currency, s.key.country)
            ledger = ledgers.get(pair)
            if ledger is None:
                ledger = ledgers[pair] = self._ledgers.ledger_of(*pair)
            registry = s.registry
            if wallet_agrees(  # the common case on plain values: same checks as below
                s, expected_ledger=ledger, allow_overdraft=s.allow_overdraft,
                registry_ledger=None if registry is None else registry.ledger,
                registry_allow_overdraft=None if registry is None else registry.allow_overdraft,
                account=s.account,
            ):
                out.matched += 1
                continue
            balance = None if s.account is None else tb_balance(s.account)
            if classify(s.balance, balance, in_flight_max_age_s=max_age_s).verdict is Verdict.MATCH:
                self._count_match(run_id, s, out)
            else:
                differing.append(s)
        evidence = await self._evidence.collect(differing)
        for s in differing:
            self._judge(run_id, s, evidence[s.canonical], max_age_s, out, first_pending)
        return out

    def _judge(
        self, run_id: str, s: Subject, ev: Evidence, max_age_s: float, out: Evaluation,
        first_pending: FirstPending | None,
    ) -> None:
        """A wallet whose balances differ, on the consistent cut its evidence was read on."""
        result = classify(s.balance, ev.tb_balance, legacy_only=ev.legacy_only,
                          tigerbeetle_only=ev.tb_only, in_flight_max_age_s=max_age_s)
        if result.verdict is Verdict.MATCH:  # equal on the consistent cut
            self._count_match(run_id, s, out)
            return
        pending = frozenset(op.transaction_id or "" for op in (*ev.legacy_only, *ev.tb_only))
        not_cleared = result.verdict is Verdict.IN_FLIGHT and first_pending is not None and (
            still_pending(first_pending.get(s.canonical), pending))
        if result.verdict is Verdict.IN_FLIGHT and not not_cleared:
            out.in_flight.append(s.canonical)
            out.pending[s.canonical] = pending
            return
        if not_cleared:
            result = result.model_copy(update={
                "verdict": Verdict.REAL,
                "reason": f"in flight at the first read, not cleared at the re-check "
                f"({result.reason})"})
            out.add(run_id, IssueKind.NOT_CLEARED, s.canonical, result.reason)
        for op in (*ev.legacy_only, *ev.tb_only):
            if op.real_kind is not None:
                out.add(run_id, op.real_kind, s.canonical,
                        f"{op.transaction_id}: {op.kind} of {op.amount_minor} minor units "
                        f"{STRAY_DETAIL.get(op.real_kind, '')}")
        out.real += 1
        out.repairable.append(s.canonical)
        out.max_real_diff_minor = max(out.max_real_diff_minor, result.max_diff_minor
                                      or s.balance.credit_minor + s.balance.debit_minor)
        kind = IssueKind.BALANCE_MISMATCH if s.account is not None else (
            IssueKind.MISSING_TB_ACCOUNT if s.registry is not None
            else IssueKind.MISSING_REGISTRY)
        out.findings[kind] += 1
        out.docs.append(_difference_doc(run_id, kind, s, ev, result))
        if s.account is not None:
            self._account_findings(run_id, s, out)

    def _count_match(self, run_id: str, s: Subject, out: Evaluation) -> None:
        """Equal balances: a match unless the registry or the account itself is wrong."""
        docs_before = len(out.docs)
        self._account_findings(run_id, s, out)
        if len(out.docs) == docs_before:
            out.matched += 1
        else:
            out.real += 1
            out.repairable.append(s.canonical)

    def _account_findings(self, run_id: str, s: Subject, out: Evaluation) -> None:
        ledger = self._ledgers.ledger_of(s.key.currency, s.key.country)
        for finding in check_wallet_account(
            s.canonical, expected_ledger=ledger, allow_overdraft=s.allow_overdraft,
            registry=_registry_view(s.registry), account=_account_view(s.account),
        ):
            out.add(run_id, finding.kind, finding.subject, finding.detail)

    async def close(self) -> None:
        await self._scans.close()


STRAY_DETAIL: dict[IssueKind, str] = {
    IssueKind.UNKNOWN_TRANSFER: "in TigerBeetle on the wallet's account, but not a transfer "
    "the platform made (no Transfer Registry record of this wallet with its id, accounts, "
    "code and amount)",
    IssueKind.LOST_LEGACY_WRITE: "registered and in TigerBeetle, missing from MongoDB, and no "
    "reverse projection carries it in this phase (a lost MongoDB write)",
    IssueKind.UNAPPLIED_LEGACY_OPERATION: "in MongoDB, not in TigerBeetle, and no dual-write "
    "backlog carries it in this phase",
}


def _difference_doc(
    run_id: str, kind: str, s: Subject, ev: Evidence, result: Classification
) -> MismatchDoc:
    return MismatchDoc(
        run_id=run_id, kind=kind, subject=s.canonical, detail=result.reason,
        legacy={**(balance_doc(s.balance) or {}), "version": s.version},
        tigerbeetle=balance_doc(ev.tb_balance),
        diffs=[{**d.model_dump(), "diff_minor": d.diff_minor} for d in result.diffs],
        recent_legacy_ops=ev.legacy_ops[:REPORTED_OPS_MAX],
        recent_tb_transfers=ev.tb_transfers[:REPORTED_OPS_MAX],
        max_diff_minor=result.max_diff_minor,
    )
