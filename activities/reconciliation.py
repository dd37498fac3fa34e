"""Reconciliation activities: read both stores page by page, let walletcore.reconcile decide.

Per wallet page: one MongoDB cursor page of wallets, one registry `$in` query, ONE
`lookup_accounts` batch (<= 8189 ids). Only wallets that differ cost more: their recent legacy
operations, one `lookup_transfers` batch for the whole page and `get_account_transfers` each.

In flight or real? We look at the durable evidence, not at the wallet workflows: a legacy
operation (newer than the wallet's imported version) whose deterministic TigerBeetle transfer
id does not exist yet is in the dual-write backlog; a TigerBeetle transfer with no legacy
operation is in the reverse projection. If exactly those operations close the difference, and
none is older than `in_flight_max_age_s`, the difference is in flight. Why not query each
wallet workflow's `status`: a query needs a worker to replay that workflow (costly for thousands
of wallets), says nothing once the workflow closed, and is not what the balances are made of.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import tigerbeetle as tb
from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.cursor import AsyncCursor
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import CursorNotFound
from temporalio import activity

from messages.errors import wallet_errors_as_application_errors
from messages.reconciliation import (
    ACTIVITY_ACCOUNT_PAGE,
    ACTIVITY_FINISH,
    ACTIVITY_RECHECK,
    ACTIVITY_REPAIR,
    ACTIVITY_START,
    ACTIVITY_TRANSFER_PAGE,
    ACTIVITY_WALLET_PAGE,
    PAGE_MAX,
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
from mongobase.mongo import as_utc, decimal128_to_minor, hex_to_u128, u128_to_hex
from registries.account_registry import ACCOUNT_REGISTRY, AccountRegistry
from registries.transfer_registry import TRANSFER_REGISTRY, TransferRegistry
from stores.backfill_imports import ImportLedger, ImportStatus
from stores.legacy_store import WALLET_TRANSACTIONS, WALLETS, LegacyStore
from stores.migration_state import MigrationStateStore
from stores.reports import MismatchDoc, ReportStore, find_in, find_keys
from stores.tb_errors import Outcome, transfer_rule
from stores.tigerbeetle_client import TigerBeetleClient
from stores.tigerbeetle_store import (
    TYPE_CREDIT,
    TYPE_CREDIT_IN_OPENING,
    TYPE_DEBIT,
    TYPE_DEBIT_IN_OPENING,
    TigerBeetleStore,
)
from walletcore.balances import MinorBalance
from walletcore.codes import CUSTOMER_ACCOUNT_CODE, SystemAccount, TransferCode
from walletcore.errors import InvalidInputError
from walletcore.ids import system_account_id, transfer_id, void_transfer_id
from walletcore.keys import WalletKey
from walletcore.ledgers import DEFAULT_LEDGER_TABLE, LedgerTable
from walletcore.phases import Phase
from walletcore.reconcile import (
    OPERATION_CODES,
    ZERO_BALANCE,
    AccountView,
    ExpectedTransfer,
    Finding,
    IssueKind,
    OpEffect,
    RegistryView,
    TransferView,
    Verdict,
    alerts,
    check_absent_transfer,
    check_conservation,
    check_transfer,
    check_wallet_account,
    classify,
    correction_transfer_id,
    legacy_op_effect,
    match_rate,
    plan_to_reach,
    transfer_effect,
    wallet_agrees,
)
from walletcore.transfer_map import operation_leg, void_code

IN_OPENING_TYPES = frozenset({TYPE_CREDIT_IN_OPENING, TYPE_DEBIT_IN_OPENING})
CHECKED_TYPES = frozenset({TYPE_CREDIT, TYPE_DEBIT, *IN_OPENING_TYPES})  # voids: via originals
RECENT_OPS_MAX = 32  # evidence window per differing wallet (each side)
REPORTED_OPS_MAX = 10
SCANS_MAX = 8  # wallet cursors kept open between pages (one per pair being reconciled)
REGISTRY_RANGE_MAX = 2 * PAGE_MAX  # a page's registry entries plus as many orphans
Document = dict[str, Any]


@dataclass
class Subject:
    """One legacy wallet under comparison: its balance fields as read (plain ints; the
    MinorBalance, with its invariants, is built when a wallet needs more than the fast check,
    whose equalities already imply those invariants)."""

    key: WalletKey
    credit_minor: int
    debit_minor: int
    historical_credit_minor: int
    version: int
    allow_overdraft: bool
    registry: Document | None = None
    account: tb.Account | None = None
    canonical: str = ""  # key.canonical, computed once (the hot loop uses it a lot)

    def __post_init__(self) -> None:
        if not self.canonical:
            self.canonical = self.key.canonical
        assert self.canonical == self.key.canonical

    @classmethod
    def of(cls, key: WalletKey, balance: MinorBalance, version: int,
           allow_overdraft: bool) -> Subject:
        return cls(key=key, credit_minor=balance.credit_minor, debit_minor=balance.debit_minor,
                   historical_credit_minor=balance.historical_credit_minor, version=version,
                   allow_overdraft=allow_overdraft)

    @cached_property
    def balance(self) -> MinorBalance:
        return MinorBalance(credit_minor=self.credit_minor, debit_minor=self.debit_minor,
                            historical_credit_minor=self.historical_credit_minor)


@dataclass
class Evidence:
    legacy_only: list[OpEffect] = field(default_factory=list)
    tb_only: list[OpEffect] = field(default_factory=list)
    legacy_ops: list[Document] = field(default_factory=list)
    tb_transfers: list[Document] = field(default_factory=list)
    tb_balance: MinorBalance | None = None  # at the cut (None: no TigerBeetle account)


@dataclass
class TigerBeetleCut:
    """One consistent view of a TigerBeetle account: its balance right after the transfer at
    `timestamp` and its recent transfers up to that one (newest first)."""

    balance: MinorBalance | None
    timestamp: int
    transfers: list[tb.Transfer]


@dataclass
class Evaluation:
    matched: int = 0
    real: int = 0
    max_real_diff_minor: int = 0
    in_flight: list[str] = field(default_factory=list)
    repairable: list[str] = field(default_factory=list)
    findings: Counter[str] = field(default_factory=Counter)
    docs: list[MismatchDoc] = field(default_factory=list)


def _balance_doc(balance: MinorBalance | None) -> Document | None:
    if balance is None:
        return None
    return {"credit_minor": balance.credit_minor, "debit_minor": balance.debit_minor,
            "historical_credit_minor": balance.historical_credit_minor}


def _tb_balance(account: tb.Account) -> MinorBalance:
    return MinorBalance.from_posted(account.credits_posted, account.debits_posted)


def _account_view(account: tb.Account) -> AccountView:
    return AccountView(id=account.id, ledger=account.ledger, code=account.code,
                       flags=int(account.flags), credits_posted=account.credits_posted,
                       debits_posted=account.debits_posted)


def _age_s(at: datetime, now: datetime) -> float:
    return max((now - as_utc(at)).total_seconds(), 0.0)


def _subject_of(doc: Document, currency: str) -> Subject:
    """A `wallets` document as a Subject (what LegacyStore.page_wallets reads, minus the
    timestamps reconciliation does not use)."""
    key = WalletKey.from_canonical(doc["_id"])
    assert key.client_id == doc["client_id"] and key.currency == doc["currency"] == currency
    return Subject(
        key=key,
        credit_minor=decimal128_to_minor(doc["credit"], currency, field="credit"),
        debit_minor=decimal128_to_minor(doc["debit"], currency, field="debit"),
        historical_credit_minor=decimal128_to_minor(
            doc["historical_credit"], currency, field="historical_credit"),
        version=int(doc["version"]),
        allow_overdraft=bool(doc["allow_overdraft"]),
        canonical=doc["_id"],
    )


PageRead = tuple[list[Document], dict[str, Document]]  # wallets, registry entries in range


async def registry_in_range(
    registry: AsyncCollection[Any], ledger: int, after: str | None, last_key: str | None,
    exhausted: bool,
) -> dict[str, Document]:
    """A ledger's registry entries in a page's key range (after, last_key], or (after, end)
    on the last page: ONE bounded `(ledger, _id)` index range read gives both the page's
    entries and the orphans. A closed range matters on servers that materialise a query's
    whole result before applying `limit` (SecantusDB)."""
    key_range: Document = {"$gt": after or ""}
    if not exhausted:
        key_range["$lte"] = last_key
    cursor = registry.find(  # no projection: it costs SecantusDB more than it saves
        {"ledger": ledger, "_id": key_range}).limit(REGISTRY_RANGE_MAX).batch_size(
        REGISTRY_RANGE_MAX)
    return {d["_id"]: d async for d in cursor}


@dataclass
class _Scan:
    cursor: AsyncCursor[Any]
    opened_s: float  # time.monotonic() when the query ran
    ahead: asyncio.Task[PageRead] | None = None  # the next page, read meanwhile


class WalletScans:
    """One wallet cursor per pair, continued from page to page, one page read ahead.

    Pages are contiguous: the next page starts after this page's last key. Re-running
    `{_id > after} sort _id limit N` for every page makes a server that materialises the
    whole result before the limit (SecantusDB does) read the rest of the pair each time:
    quadratic in the number of wallets. So the worker keeps the open server cursor keyed by
    (pair, last key, limit); the page that starts there continues it, and its getMore and
    registry range read have been running while the previous page was checked (the servers
    read while we compare). Any other `after` (a retry, another worker, a new run) opens a
    new cursor; so does a cursor older than half the in-flight age limit: its documents may
    be a snapshot from when it was opened, and a much older legacy read could turn in-flight
    operations into stale ones. Bounded: at most SCANS_MAX open cursors, each holding at
    most one page read ahead."""

    def __init__(self, wallets: AsyncCollection[Any], registry: AsyncCollection[Any]) -> None:
        self._wallets = wallets
        self._registry = registry
        self._open: dict[tuple[str, str, int], _Scan] = {}

    async def page(
        self, inp: WalletPageInput, currency: str, country: str, ledger: int
    ) -> PageRead:
        """The page's wallets (in key order) and the ledger's registry entries in its range."""
        assert 1 <= inp.limit <= PAGE_MAX
        scan = self._open.pop((inp.pair, inp.after or "", inp.limit), None)
        if scan is not None and time.monotonic() - scan.opened_s > inp.in_flight_max_age_s / 2:
            await _close(scan)
            scan = None
        read: PageRead | None = None
        if scan is not None:
            assert scan.ahead is not None
            try:
                read = await scan.ahead
            except CursorNotFound:  # the server timed it out: query again
                await _close(scan)
            except BaseException:
                await _close(scan)
                raise
        if read is None:
            query: Document = {"currency": currency, "country": country}
            if inp.after is not None:
                query["_id"] = {"$gt": inp.after}
            scan = _Scan(cursor=self._wallets.find(query).sort("_id", ASCENDING)
                         .batch_size(inp.limit), opened_s=time.monotonic())
            try:
                read = await self._read(scan.cursor, inp.after, inp.limit, ledger)
            except BaseException:
                await _close(scan)
                raise
        assert scan is not None and len(read[0]) <= inp.limit
        docs = read[0]
        if len(docs) < inp.limit:
            await _close(scan)
        else:
            last_key = docs[-1]["_id"]
            scan.ahead = asyncio.create_task(self._read(scan.cursor, last_key, inp.limit, ledger))
            await self._keep((inp.pair, last_key, inp.limit), scan)
        return read

    async def _read(
        self, cursor: AsyncCursor[Any], after: str | None, limit: int, ledger: int
    ) -> PageRead:
        docs = await cursor.to_list(limit)
        last_key = docs[-1]["_id"] if docs else after
        return docs, await registry_in_range(
            self._registry, ledger, after, last_key, exhausted=len(docs) < limit)

    async def _keep(self, key: tuple[str, str, int], scan: _Scan) -> None:
        evicted = []
        while len(self._open) >= SCANS_MAX:
            oldest = min(self._open, key=lambda k: self._open[k].opened_s)
            evicted.append(self._open.pop(oldest))
        self._open[key] = scan
        for old in evicted:
            await _close(old)

    async def close(self) -> None:
        while self._open:
            await _close(self._open.popitem()[1])


async def _close(scan: _Scan) -> None:
    """Stop the read-ahead (its error, if any, is dropped with it) and the server cursor."""
    ahead, scan.ahead = scan.ahead, None
    if ahead is not None:
        ahead.cancel()
        await asyncio.wait([ahead])  # unlike `await ahead`, leaves our own cancellation alone
        if not ahead.cancelled():
            ahead.exception()  # retrieved: no "never retrieved" warning
    await scan.cursor.close()


class Reconciler:
    def __init__(
        self,
        db: AsyncDatabase[Any],
        legacy: LegacyStore,
        tb_store: TigerBeetleStore,
        client: TigerBeetleClient,
        accounts: AccountRegistry,
        transfers: TransferRegistry,
        imports: ImportLedger,
        reports: ReportStore,
        migration: MigrationStateStore,
        ledgers: LedgerTable = DEFAULT_LEDGER_TABLE,
    ) -> None:
        self._db = db
        self._legacy = legacy
        self._tb_store = tb_store
        self._client = client
        self._accounts = accounts
        self._transfers = transfers
        self._imports = imports
        self._reports = reports
        self._migration = migration
        self._ledgers = ledgers
        self._scans = WalletScans(db[WALLETS], db[ACCOUNT_REGISTRY])

    # ---- start / finish ---------------------------------------------------------------------

    def _ledger_ids(self, pairs: Sequence[str]) -> list[int]:
        return sorted(set(self._ledgers.parse_scope(list(pairs)).values()))

    async def _system_snapshot(self, pairs: Sequence[str]) -> dict[str, dict[str, list[int]]]:
        ids = {
            system_account_id(ledger, account): (ledger, account)
            for ledger in self._ledger_ids(pairs) for account in SystemAccount
        }
        snapshot: dict[str, dict[str, list[int]]] = {}
        for account in await self._client.lookup_accounts(list(ids)):
            ledger, which = ids[account.id]
            snapshot.setdefault(str(ledger), {})[which.name] = [
                account.credits_posted, account.debits_posted]
        return snapshot

    async def start(self, inp: StartInput) -> StartOutput:
        await self._reports.start(inp.run_id, {"pairs": inp.pairs, "repair": inp.repair,
                                               "actor": inp.actor, "reason": inp.reason})
        return StartOutput(system=await self._system_snapshot(inp.pairs))

    async def finish(self, inp: FinishInput) -> ReconcileSummary:
        end = await self._system_snapshot(inp.pairs)
        conservation = []
        for ledger in self._ledger_ids(inp.pairs):
            before = inp.system_start.get(str(ledger), {})
            after = end.get(str(ledger), {})
            nets = {name: c - d for name, (c, d) in after.items()}
            activity_minor = sum(
                abs(c - before.get(name, [0, 0])[0]) + abs(d - before.get(name, [0, 0])[1])
                for name, (c, d) in after.items()
            )
            conservation.append(check_conservation(
                ledger, customer_net_minor=inp.customer_net.get(str(ledger), 0),
                system_nets_minor=nets, activity_minor=activity_minor))
        counts = inp.counts
        failures = sum(1 for c in conservation if not c.ok)
        rate = match_rate(counts.wallets, counts.real)
        reasons = alerts(rate=rate, threshold=inp.threshold,
                         max_real_diff_minor=counts.max_real_diff_minor,
                         findings=sum(v for k, v in counts.findings.items()
                                      if k != IssueKind.BALANCE_MISMATCH),
                         conservation_failures=failures)
        summary = ReconcileSummary(
            run_id=inp.run_id, pairs=inp.pairs, wallets=counts.wallets, matched=counts.matched,
            in_flight=counts.in_flight, resolved_on_recheck=counts.resolved_on_recheck,
            real=counts.real, match_rate=rate, findings=dict(counts.findings),
            conservation_ok=failures == 0, alerts=reasons, repaired=counts.repaired,
            repair_failed=counts.repair_failed,
        )
        await self._reports.finish(inp.run_id, {
            **summary.model_dump(mode="python"), "counts": counts.model_dump(mode="python"),
            "threshold": inp.threshold, "alert": bool(reasons),
            "conservation": [c.model_dump(mode="python") for c in conservation],
        })
        for reason in reasons:
            activity.logger.warning("reconciliation %s ALERT: %s", inp.run_id, reason)
        return summary

    # ---- wallets ----------------------------------------------------------------------------

    async def wallet_page(self, inp: WalletPageInput) -> WalletPageOutput:
        currency, _, country = inp.pair.partition(":")
        ledger = self._ledgers.ledger_of(currency, country)
        docs, in_range = await self._scans.page(inp, currency, country, ledger)
        subjects = [_subject_of(d, currency) for d in docs]
        exhausted = len(docs) < inp.limit
        last_key: str | None = docs[-1]["_id"] if docs else inp.after
        evaluation = await self._evaluate(inp.run_id, subjects, inp.in_flight_max_age_s,
                                          registry_in_range=in_range)
        # Registry entries in this page's key range with no legacy wallet behind them.
        page_keys = {s.canonical for s in subjects}
        orphans = [key for key in in_range if key not in page_keys][:PAGE_MAX]
        for orphan in orphans:
            evaluation.findings[IssueKind.REGISTRY_WITHOUT_WALLET] += 1
            evaluation.docs.append(MismatchDoc(
                run_id=inp.run_id, kind=IssueKind.REGISTRY_WITHOUT_WALLET, subject=orphan,
                detail="Account Registry entry without a legacy wallet"))
        await self._reports.add_mismatches(evaluation.docs)
        return WalletPageOutput(
            scanned=len(subjects), last_key=last_key, exhausted=exhausted,
            matched=evaluation.matched, real=evaluation.real,
            max_real_diff_minor=evaluation.max_real_diff_minor,
            in_flight=evaluation.in_flight, repairable=evaluation.repairable,
            findings=dict(evaluation.findings),
        )

    async def recheck(self, inp: RecheckInput) -> RecheckOutput:
        subjects = await self._subjects_of(inp.wallets)
        evaluation = await self._evaluate(inp.run_id, subjects, inp.in_flight_max_age_s)
        await self._reports.add_mismatches(evaluation.docs)
        return RecheckOutput(
            matched=evaluation.matched, in_flight=len(evaluation.in_flight),
            real=evaluation.real, max_real_diff_minor=evaluation.max_real_diff_minor,
            repairable=evaluation.repairable, findings=dict(evaluation.findings))

    async def _subjects_of(self, wallets: Sequence[str]) -> list[Subject]:
        subjects = []
        for canonical in wallets:
            key = WalletKey.from_canonical(canonical)
            found = await self._legacy.get_wallet_version(key)
            if found is None:
                continue
            doc = await self._db[WALLETS].find_one({"_id": canonical}, {"allow_overdraft": 1})
            subjects.append(Subject.of(key, found[0], found[1],
                                       allow_overdraft=bool(doc and doc["allow_overdraft"])))
        return subjects

    async def _load_tb_side(
        self, subjects: list[Subject], registry_in_range: dict[str, Document] | None = None
    ) -> None:
        """Registry entries, then ONE lookup_accounts batch of the ids they hold."""
        assert len(subjects) <= PAGE_MAX
        if not subjects:
            return
        registry = await self._registry_of(subjects, registry_in_range)
        ids = {key: hex_to_u128(doc["account_id"]) for key, doc in registry.items()}
        wanted = list(ids.values())
        accounts = {a.id: a for a in await self._client.lookup_accounts(wanted)} if wanted else {}
        for s in subjects:
            s.registry = registry.get(s.canonical)
            found_id = ids.get(s.canonical)
            s.account = None if found_id is None else accounts.get(found_id)

    async def _registry_of(
        self, subjects: list[Subject], registry_in_range: dict[str, Document] | None
    ) -> dict[str, Document]:
        """Registry documents by wallet key: from the page's range read when there is one,
        then by key for the rest (an entry with another ledger, or no range read)."""
        registry = {} if registry_in_range is None else {
            s.canonical: doc for s in subjects
            if (doc := registry_in_range.get(s.canonical)) is not None}
        missing = [s.canonical for s in subjects if s.canonical not in registry]
        if missing:
            registry.update(await find_keys(self._db[ACCOUNT_REGISTRY], missing))
        return registry

    async def _evaluate(
        self, run_id: str, subjects: list[Subject], max_age_s: float,
        *, registry_in_range: dict[str, Document] | None = None,
    ) -> Evaluation:
        await self._load_tb_side(subjects, registry_in_range)
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
                registry_ledger=None if registry is None else int(registry["ledger"]),
                registry_allow_overdraft=None if registry is None
                else bool(registry["allow_overdraft"]),
                account=s.account,
            ):
                out.matched += 1
                continue
            tb_balance = None if s.account is None else _tb_balance(s.account)
            first = classify(s.balance, tb_balance, in_flight_max_age_s=max_age_s)
            if first.verdict is Verdict.MATCH:
                self._count_match(run_id, s, out)
            else:
                differing.append(s)
        evidence = await self._evidence(differing)
        for s in differing:
            ev = evidence[s.canonical]
            tb_balance = ev.tb_balance
            result = classify(s.balance, tb_balance, legacy_only=ev.legacy_only,
                              tigerbeetle_only=ev.tb_only, in_flight_max_age_s=max_age_s)
            if result.verdict is Verdict.MATCH:  # equal on the consistent cut
                self._count_match(run_id, s, out)
                continue
            if result.verdict is Verdict.IN_FLIGHT:
                out.in_flight.append(s.canonical)
                continue
            out.real += 1
            out.repairable.append(s.canonical)
            out.max_real_diff_minor = max(out.max_real_diff_minor,
                                          result.max_diff_minor or s.balance.credit_minor
                                          + s.balance.debit_minor)
            kind = IssueKind.BALANCE_MISMATCH if s.account is not None else (
                IssueKind.MISSING_TB_ACCOUNT if s.registry is not None
                else IssueKind.MISSING_REGISTRY)
            out.findings[kind] += 1
            out.docs.append(MismatchDoc(
                run_id=run_id, kind=kind, subject=s.canonical, detail=result.reason,
                legacy={**(_balance_doc(s.balance) or {}), "version": s.version},
                tigerbeetle=_balance_doc(tb_balance),
                diffs=[{**d.model_dump(), "diff_minor": d.diff_minor} for d in result.diffs],
                recent_legacy_ops=ev.legacy_ops[:REPORTED_OPS_MAX],
                recent_tb_transfers=ev.tb_transfers[:REPORTED_OPS_MAX],
                max_diff_minor=result.max_diff_minor,
            ))
            if s.account is not None:
                self._account_findings(run_id, s, out)
        return out

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
        registry = None if s.registry is None else RegistryView(
            account_id=hex_to_u128(s.registry["account_id"]), ledger=int(s.registry["ledger"]),
            allow_overdraft=bool(s.registry["allow_overdraft"]))
        account = None if s.account is None else _account_view(s.account)
        for finding in check_wallet_account(
            s.canonical, expected_ledger=ledger, allow_overdraft=s.allow_overdraft,
            registry=registry, account=account,
        ):
            self._add_finding(run_id, finding, out)

    @staticmethod
    def _add_finding(run_id: str, finding: Finding, out: Evaluation) -> None:
        out.findings[finding.kind] += 1
        out.docs.append(MismatchDoc(run_id=run_id, kind=finding.kind, subject=finding.subject,
                                    detail=finding.detail))

    async def _evidence(self, subjects: list[Subject]) -> dict[str, Evidence]:
        """Operations one store has and the other has not yet, for each differing wallet, on
        ONE consistent cut per side (traffic keeps running while we read):

        - legacy: the balance and version V read together; only operations with a version in
          (imported version, V] count (anything newer is not in that balance);
        - TigerBeetle: the account's most recent transfers, and its balance exactly at the
          newest of them (the account's history), so transfers and balance agree;
        - legacy_only: legacy operations <= V whose transfer was not in TigerBeetle at the cut;
          tb_only: transfers at the cut whose legacy operation (found by transaction id through
          the Transfer Registry) is not among the versions <= V: the reverse projection, or
          an operation both stores applied after the legacy snapshot.
        """
        found: dict[str, Evidence] = {s.canonical: Evidence() for s in subjects}
        if not subjects:
            return found
        now = datetime.now(UTC)
        imports = await self._imports.get_many([s.canonical for s in subjects])
        ops_by_wallet: dict[str, list[Document]] = {}
        originals: set[str] = set()
        for s in subjects:
            record = imports.get(s.canonical)
            imported = record.version if record and record.status is ImportStatus.DONE else 0
            cursor = self._db[WALLET_TRANSACTIONS].find(
                {"wallet": s.canonical, "wallet_version": {"$lte": s.version}},
            ).sort("created_at", DESCENDING).limit(RECENT_OPS_MAX)
            ops = [op async for op in cursor]
            ops_by_wallet[s.canonical] = [
                op for op in ops if int(op["wallet_version"]) > imported]
            found[s.canonical].legacy_ops = [
                {"transaction_id": op["_id"], "type": op["type"],
                 "amount": str(op["amount"]), "version": op["wallet_version"],
                 "created_at": op["created_at"], "in_opening": int(op["wallet_version"])
                 <= imported} for op in ops]
            originals.update(op["original_transaction_id"] for op in ops
                             if op["type"] == "void")
        original_types = {d["_id"]: d["type"] for d in await find_in(
            self._db[WALLET_TRANSACTIONS], "_id", sorted(originals), {"type": 1})}
        derived: dict[str, int] = {}
        for ops in ops_by_wallet.values():
            for op in ops:
                derived[op["_id"]] = (void_transfer_id(op["original_transaction_id"])
                                      if op["type"] == "void" else transfer_id(op["_id"]))
        cuts = {s.canonical: await self._tb_cut(s) for s in subjects}
        in_tb: dict[int, int] = {}  # transfer id -> TigerBeetle timestamp
        id_list = list(set(derived.values()))
        for start in range(0, len(id_list), PAGE_MAX):
            in_tb.update((t.id, t.timestamp) for t in await self._client.lookup_transfers(
                id_list[start:start + PAGE_MAX]))
        twins = await self._legacy_twins(
            [t for cut in cuts.values() for t in cut.transfers])
        for s in subjects:
            ev, cut = found[s.canonical], cuts[s.canonical]
            ev.tb_balance = cut.balance
            ops = ops_by_wallet[s.canonical]
            for op in ops:
                at = in_tb.get(derived[op["_id"]])
                if at is not None and at <= cut.timestamp:
                    continue
                ev.legacy_only.append(legacy_op_effect(
                    op["type"], decimal128_to_minor(op["amount"], s.key.currency,
                                                    field="amount"),
                    original_type=original_types.get(op.get("original_transaction_id") or ""),
                    age_s=_age_s(op["created_at"], now), transaction_id=op["_id"]))
            if s.account is None:
                continue
            in_snapshot = {derived[op["_id"]] for op in ops}
            ev.tb_transfers = [
                {"id": u128_to_hex(t.id), "code": t.code, "amount": t.amount,
                 "side": "credit" if t.credit_account_id == s.account.id else "debit",
                 "timestamp": t.timestamp} for t in cut.transfers]
            for t in cut.transfers:
                if t.code not in OPERATION_CODES or t.id in in_snapshot:
                    continue
                twin_version = twins.get(t.id)
                if twin_version is not None and twin_version <= s.version:
                    continue  # legacy holds it at or below V (older than the window)
                ev.tb_only.append(transfer_effect(
                    customer_id=s.account.id, debit_account_id=t.debit_account_id,
                    credit_account_id=t.credit_account_id, amount=t.amount,
                    age_s=max(now.timestamp() - t.timestamp / 1e9, 0.0)))
        return found

    async def _tb_cut(self, s: Subject) -> TigerBeetleCut:
        """The account's recent transfers and its balance at the newest of them."""
        if s.account is None:
            return TigerBeetleCut(balance=None, timestamp=0, transfers=[])
        account_id = s.account.id
        transfers = await self._client.get_account_transfers(tb.AccountFilter(
            account_id=account_id, user_data_128=0, user_data_64=0, user_data_32=0,
            code=0, timestamp_min=0, timestamp_max=0, limit=RECENT_OPS_MAX,
            flags=tb.AccountFilterFlags.DEBITS | tb.AccountFilterFlags.CREDITS
            | tb.AccountFilterFlags.REVERSED))
        if not transfers:
            return TigerBeetleCut(balance=ZERO_BALANCE, timestamp=0, transfers=[])
        newest = transfers[0].timestamp
        balances = await self._client.get_account_balances(tb.AccountFilter(
            account_id=account_id, user_data_128=0, user_data_64=0, user_data_32=0,
            code=0, timestamp_min=newest, timestamp_max=newest, limit=1,
            flags=tb.AccountFilterFlags.DEBITS | tb.AccountFilterFlags.CREDITS))
        if not balances:  # no history (never for customer accounts): the lookup's balance
            return TigerBeetleCut(balance=_tb_balance(s.account),
                                  timestamp=s.account.timestamp, transfers=[])
        at = balances[0]
        return TigerBeetleCut(
            balance=MinorBalance.from_posted(at.credits_posted, at.debits_posted),
            timestamp=newest, transfers=transfers)

    async def _legacy_twins(self, transfers: list[tb.Transfer]) -> dict[int, int]:
        """Transfer id -> the legacy version of the same transaction (by transaction id, via
        the Transfer Registry), for the transfers whose legacy twin exists."""
        hexes = sorted({u128_to_hex(t.id) for t in transfers if t.code in OPERATION_CODES})
        if not hexes:
            return {}
        txn_of = {d["_id"]: hex_to_u128(d["transfer_id"]) for d in await find_in(
            self._db[TRANSFER_REGISTRY], "transfer_id", hexes, {"transfer_id": 1})}
        legacy = await find_in(self._db[WALLET_TRANSACTIONS], "_id", sorted(txn_of),
                               {"wallet_version": 1})
        return {txn_of[d["_id"]]: int(d["wallet_version"]) for d in legacy}

    # ---- TigerBeetle accounts and transfers -------------------------------------------------

    async def account_page(self, inp: AccountPageInput) -> AccountPageOutput:
        """Customer accounts of one ledger in the run's scope. Only this deployment's (its tag
        in user_data_64, see TigerBeetleStore) must be in its Account Registry: deployments
        sharing a cluster (tests, demo runs, staging) own the others. The net sums every
        customer account, because the ledger's system accounts are shared by all of them.
        Untagged deployments (tag 0) on one cluster cannot be told apart."""
        tag = self._tb_store.deployment_tag
        accounts = await self._client.query_accounts(tb.QueryFilter(
            user_data_128=0, user_data_64=0, user_data_32=0, ledger=inp.ledger,
            code=CUSTOMER_ACCOUNT_CODE, timestamp_min=inp.timestamp_after + 1, timestamp_max=0,
            limit=inp.limit, flags=tb.QueryFilterFlags(0)))
        ours = [a for a in accounts if a.user_data_64 == tag]
        hexes = [u128_to_hex(a.id) for a in ours]
        registered = {d["account_id"] for d in await find_in(
            self._db[ACCOUNT_REGISTRY], "account_id", hexes, {"account_id": 1})}
        docs = [
            MismatchDoc(run_id=inp.run_id, kind=IssueKind.UNREGISTERED_TB_ACCOUNT,
                        subject=h, detail=f"customer account on ledger {inp.ledger} "
                        f"(deployment tag {tag}) missing from the Account Registry")
            for h in hexes if h not in registered
        ]
        await self._reports.add_mismatches(docs)
        return AccountPageOutput(
            scanned=len(ours),
            foreign=len(accounts) - len(ours),
            net_minor=sum(a.credits_posted - a.debits_posted for a in accounts),
            last_timestamp=accounts[-1].timestamp if accounts else inp.timestamp_after,
            exhausted=len(accounts) < inp.limit,
            findings={IssueKind.UNREGISTERED_TB_ACCOUNT: len(docs)} if docs else {})

    async def transfer_page(self, inp: TransferPageInput) -> TransferPageOutput:
        scope = self._ledgers.parse_scope(inp.pairs)
        page = await self._transfers.page(after=inp.after, limit=inp.limit)
        records = page.records
        expected: list[ExpectedTransfer] = []
        # `<type>_in_opening`: a pre-migration original the opening balance holds, registered
        # when it was voided. Its own transfer must NOT exist (it would count it twice).
        absent: list[ExpectedTransfer] = []
        for rec in records:
            ledger = scope.get(rec.wallet.ledger_pair)
            if ledger is None or rec.type not in CHECKED_TYPES:
                continue  # other scope, or a void: checked through its original below
            is_credit = rec.type in (TYPE_CREDIT, TYPE_CREDIT_IN_OPENING)
            leg = operation_leg(ledger, rec.account_id,
                                TransferCode.CREDIT if is_credit else TransferCode.DEBIT)
            (absent if rec.type in IN_OPENING_TYPES else expected).append(ExpectedTransfer(
                transaction_id=rec.transaction_id, id=rec.transfer_id,
                debit_account_id=leg.debit_account_id, credit_account_id=leg.credit_account_id,
                amount=rec.amount_minor, code=int(leg.code)))
            if rec.voided and rec.void_transfer_id is not None:
                vleg = operation_leg(ledger, rec.account_id, void_code(is_credit))
                expected.append(ExpectedTransfer(
                    transaction_id=f"{rec.void_transaction_id} (void of {rec.transaction_id})",
                    id=rec.void_transfer_id, debit_account_id=vleg.debit_account_id,
                    credit_account_id=vleg.credit_account_id, amount=rec.amount_minor,
                    code=int(vleg.code)))
        assert len(expected) + len(absent) <= PAGE_MAX
        wanted = [e.id for e in (*expected, *absent)]
        actual = {t.id: t for t in await self._client.lookup_transfers(wanted)} if wanted else {}
        docs = [
            MismatchDoc(run_id=inp.run_id, kind=IssueKind.MALFORMED_REGISTRY, subject=txn,
                        detail=f"Transfer Registry document is not a valid record ({why})")
            for txn, why in page.malformed
        ]
        findings: Counter[str] = Counter()
        if docs:
            findings[IssueKind.MALFORMED_REGISTRY] = len(docs)
        checks = [(e, check_transfer) for e in expected]
        checks += [(e, check_absent_transfer) for e in absent]
        for e, check in checks:
            t = actual.get(e.id)
            view = None if t is None else TransferView(
                id=t.id, debit_account_id=t.debit_account_id,
                credit_account_id=t.credit_account_id, amount=t.amount, code=t.code)
            for f in check(e, view):
                findings[f.kind] += 1
                docs.append(MismatchDoc(run_id=inp.run_id, kind=f.kind, subject=f.subject,
                                        detail=f.detail))
        await self._reports.add_mismatches(docs)
        return TransferPageOutput(
            scanned=page.scanned, checked=len(expected) + len(absent),
            last_key=page.last_key if page.last_key is not None else inp.after,
            exhausted=page.scanned < inp.limit, findings=dict(findings))

    # ---- repair -----------------------------------------------------------------------------

    async def repair(self, inp: RepairInput) -> RepairOutput:
        """Correction transfers (never edits): bring TigerBeetle to the legacy balance."""
        repaired: list[str] = []
        failed: dict[str, str] = {}
        subjects = await self._subjects_of(inp.wallets)
        fresh = await self._evaluate(inp.run_id, subjects, inp.in_flight_max_age_s)
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
        before = _tb_balance(account)
        plan = plan_to_reach(account.credits_posted, account.debits_posted, s.balance)
        if plan is None:
            raise InvalidInputError(
                "TigerBeetle holds more credits or debits than legacy: a correction cannot "
                "take them back without editing history; manual review", field="wallet")
        correction = system_account_id(record.ledger, SystemAccount.CORRECTION)
        transfers = []
        if plan.credit_minor:
            transfers.append(tb.Transfer(
                id=correction_transfer_id(s.canonical, inp.run_id, "credit"),
                debit_account_id=correction, credit_account_id=record.account_id,
                amount=plan.credit_minor, user_data_64=s.version, ledger=record.ledger,
                code=int(TransferCode.CORRECTION)))
        if plan.debit_minor:
            transfers.append(tb.Transfer(
                id=correction_transfer_id(s.canonical, inp.run_id, "debit"),
                debit_account_id=record.account_id, credit_account_id=correction,
                amount=plan.debit_minor, user_data_64=s.version, ledger=record.ledger,
                code=int(TransferCode.CORRECTION)))
        if len(transfers) == 2:
            transfers[0].flags = tb.TransferFlags.LINKED
        statuses: list[str] = []
        if transfers:
            results = await self._client.create_transfers(transfers)
            statuses = [r.status.name for r in results]
            if any(transfer_rule(r.status).outcome is Outcome.FAILED for r in results):
                raise InvalidInputError(f"correction refused: {statuses}", field="wallet")
        (after_account,) = await self._client.lookup_accounts([record.account_id])
        after = _tb_balance(after_account)
        await self._reports.audit({
            "run_id": inp.run_id, "wallet": s.canonical, "actor": inp.actor,
            "reason": inp.reason, "legacy": _balance_doc(s.balance),
            "legacy_version": s.version, "tigerbeetle_before": _balance_doc(before),
            "tigerbeetle_after": _balance_doc(after),
            "transfers": [{"id": u128_to_hex(t.id), "amount": t.amount,
                           "direction": "credit" if t.credit_account_id == record.account_id
                           else "debit"} for t in transfers],
            "statuses": statuses, "ok": after == s.balance,
        })
        return after == s.balance


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
