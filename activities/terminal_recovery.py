"""Recovery both ways: the ledger from TigerBeetle, TigerBeetle from the ledger; each verified.

**Ledger lost** (`rebuild_ledger_from_tigerbeetle`): the ledger is the sync's replay from
timestamp 0: every posted clearing transfer becomes the entry the pipeline wrote (same id, same
content, same TigerBeetle timestamp; the transaction's memo and external id come from the
system of reference). Chain order becomes TigerBeetle time order, so chain hashes may differ
from the lost ledger's; the entries do not: `ledger_digest` is an order-free digest of every
(entry id, content hash) pair, taken before a drop and compared after. Verified: caught up,
trial balance zero, whole chain re-hashed, a reconciliation without findings. Lost with the
ledger: account statuses (frozen/closed) in `gl_accounts`; the chart comes back open.

**TigerBeetle lost** (`rebuild_tigerbeetle_from_ledger`, into a fresh cluster): TigerBeetle
accepts history only as `imported` events, each newer than everything in the cluster, accounts
older than their transfers, no timestamp twice. So: the chart's mirrors are imported first with
the timestamps just below the oldest entry's (one ns apart), then every entry, oldest first
(`GeneralLedger.entries_by_timestamp`), as one single-phase imported transfer at the entry's
own timestamp under the post transfer's id (the sync and reconciliation find it as posted;
`user_data_128` as the pipeline set it). Posted balances and their history come back exactly;
pending holds in flight when the cluster was lost do not (the ledger never saw them). Replays
are idempotent: a transfer already there with the same content counts as existing. Balance
limits hold on replay: at every timestamp the replayed posted amounts are at most what the
original posted plus reserved. Verified: every mirror's posted pair equals its GL balance.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import tigerbeetle as tb
from pymongo.asynchronous.database import AsyncDatabase

from activities.terminal_reconcile import TerminalReconcileActivities, TerminalReconciler
from activities.terminal_sync import LedgerSync, TerminalSyncActivities
from messages.clearing import (
    REFUSED_SAMPLE_MAX,
    AccountMismatch,
    LedgerRebuildResult,
    TerminalReconcileInput,
    TigerBeetleRebuildResult,
)
from stores.clearing_store import ClearingStore
from stores.clearing_tb import mirror_account
from stores.general_ledger import PAGE_MAX, GeneralLedger
from stores.history_import import create_accounts_allowing_imported
from stores.tb_batches import chunks
from stores.terminal_reports import (
    KIND_LEDGER_REBUILD,
    KIND_TIGERBEETLE_REBUILD,
    TerminalReports,
)
from stores.tigerbeetle_client import TigerBeetleClient
from walletcore.clearing import DEFAULT_CLEARING_TABLE, ClearingTable, external_ref
from walletcore.errors import ConflictError, InvalidInputError
from walletcore.gl_chart import ChartOfAccounts, MirrorAccount
from walletcore.journal import ChainVerification, JournalEntry, posting_key
from walletcore.tb_limits import BatchLimits

DIGEST_MOD = 2**256
CHAIN_PAGES_MAX = 1_000_000  # verify_whole_chain: 8189 entries a page
_CTS = tb.CreateTransferStatus
_CAS = tb.CreateAccountStatus


# ---- shared helpers ----------------------------------------------------------------------------


def imported_mirror(mirror: MirrorAccount, timestamp: int) -> tb.Account:
    """The pipeline's mirror account (stores.clearing_tb), imported at `timestamp` (normal
    when 0)."""
    account = mirror_account(mirror)
    if timestamp:
        account.flags = tb.AccountFlags(int(account.flags) | int(tb.AccountFlags.IMPORTED))
        account.timestamp = timestamp
    return account


async def ledger_digest(ledger: GeneralLedger) -> tuple[int, str]:
    """(entries, digest): the sum mod 2^256 of sha256(entry id:content hash) over every entry,
    so two ledgers holding the same entries in any chain order have the same digest."""
    total, count, after = 0, 0, 0
    while True:
        page = await ledger.entries_page(after_seq=after, limit=PAGE_MAX)
        for link in page:
            pair = f"{link.entry.entry_id}:{link.entry.content_hash}".encode()
            total = (total + int.from_bytes(hashlib.sha256(pair).digest(), "big")) % DIGEST_MOD
        count += len(page)
        if len(page) < PAGE_MAX:
            return count, f"{total:064x}"
        after = page[-1].seq


async def verify_whole_chain(ledger: GeneralLedger) -> ChainVerification:
    """verify_chain page after page to the head (each page re-hashes up to 8189 links)."""
    after = 0
    checked = 0
    for _ in range(CHAIN_PAGES_MAX):
        result = await ledger.verify_chain(after_seq=after)
        checked += result.checked
        if not result.ok or result.checked < PAGE_MAX:
            return result.model_copy(update={"checked": checked})
        after = result.last.seq
    raise AssertionError("chain longer than CHAIN_PAGES_MAX pages")


# ---- the ledger from TigerBeetle ---------------------------------------------------------------


async def rebuild_ledger_from_tigerbeetle(
    sync: LedgerSync, reconciler: TerminalReconciler, *, drop_existing: bool, run_id: str,
) -> LedgerRebuildResult:
    """Replay the sync from 0 into the ledger (after dropping it when `drop_existing`, with
    a digest taken first) and verify the result (module docstring)."""
    started = time.monotonic()
    ledger = sync.ledger
    before: tuple[int, str] | None = None
    if drop_existing:
        before = await ledger_digest(ledger)
        await ledger.drop_all()
    await ledger.ensure_indexes()
    await ledger.ensure_chart()
    outcome = await sync.run_until_caught_up(replay=True)
    count, digest = await ledger_digest(ledger)
    trial = await ledger.trial_balance()
    chain = await verify_whole_chain(ledger)
    report = await reconciler.run(TerminalReconcileInput(run_id=run_id, catch_up=False))
    return LedgerRebuildResult(
        entries_before=None if before is None else before[0], entries_after=count,
        digest_before=None if before is None else before[1], digest_after=digest,
        equal=None if before is None else before == (count, digest), sync=outcome,
        trial_balance_zero=trial.zero, chain_ok=chain.ok, reconcile_ok=report.ok,
        reconcile_run_id=report.run_id, seconds=time.monotonic() - started,
    )


# ---- TigerBeetle from the ledger ---------------------------------------------------------------


class TigerBeetleRebuild:
    """Imports the mirrors and every entry into `target` (module docstring)."""

    def __init__(
        self, ledger: GeneralLedger, target: TigerBeetleClient, *, limits: BatchLimits,
    ) -> None:
        self._ledger = ledger
        self._chart: ChartOfAccounts = ledger.chart
        self._target = target
        self._limits = limits
        self._failed: list[str] = []
        self._failed_count = 0
        self._counts = {"accounts_created": 0, "accounts_existing": 0,
                        "transfers_imported": 0, "transfers_existing": 0}

    async def run(self) -> TigerBeetleRebuildResult:
        started = time.monotonic()
        first = await self._ledger.entries_by_timestamp(after_timestamp=0, limit=1)
        if first:
            await self._check_target(first[0].entry)
        await self._accounts(first[0].entry.tb_timestamp if first else 0)
        after = 0
        page_size = min(self._limits.create_batch_max, PAGE_MAX)
        while True:
            page = await self._ledger.entries_by_timestamp(after_timestamp=after,
                                                           limit=page_size)
            if not page:
                break
            await self._transfers([link.entry for link in page])
            after = page[-1].entry.tb_timestamp
        mirrors = self._chart.mirrors()
        mismatched = await self._verify(mirrors)
        return TigerBeetleRebuildResult(
            **self._counts, failed=self._failed, failed_count=self._failed_count,
            mirrors_checked=len(mirrors), mismatched_accounts=mismatched[:REFUSED_SAMPLE_MAX],
            seconds=time.monotonic() - started)

    def _fail(self, what: str) -> None:
        self._failed_count += 1
        if len(self._failed) < REFUSED_SAMPLE_MAX:
            self._failed.append(what[:256])

    async def _newest(self, accounts: bool) -> int:
        query = tb.QueryFilter(user_data_128=0, user_data_64=0, user_data_32=0, ledger=0,
                               code=0, timestamp_min=0, timestamp_max=0, limit=1,
                               flags=tb.QueryFilterFlags.REVERSED)
        rows: Sequence[tb.Account | tb.Transfer] = await (
            self._target.query_accounts(query) if accounts
            else self._target.query_transfers(query))
        return rows[0].timestamp if rows else 0

    async def _check_target(self, oldest: JournalEntry) -> None:
        """Refuse before writing anything when the oldest entry can no longer be imported:
        the cluster holds a newer transfer and not the entry's own (a resumed rebuild has)."""
        if await self._newest(accounts=False) < oldest.tb_timestamp:
            return
        if await self._target.lookup_transfers([oldest.transfer_id]):
            return
        raise InvalidInputError(
            "the target cluster holds transfers newer than the ledger's oldest entry: "
            "TigerBeetle imports history only into a cluster holding nothing newer; rebuild "
            "into a fresh cluster", field="target_addresses")

    async def _accounts(self, first_transfer_ts: int) -> None:
        """Missing mirrors, imported just below the oldest entry (normal when there is none)."""
        mirrors = self._chart.mirrors()
        present: set[int] = set()
        for part in chunks([m.id for m in mirrors], self._limits.lookup_batch_max):
            present.update(a.id for a in await self._target.lookup_accounts(list(part)))
        self._counts["accounts_existing"] = len(present)
        missing = [m for m in mirrors if m.id not in present]
        if not missing:
            return
        base = first_transfer_ts - len(missing)
        if first_transfer_ts and base <= await self._newest(accounts=True):
            raise InvalidInputError(
                "the target cluster holds accounts newer than the ledger's oldest entry: "
                "imported mirrors must predate it; rebuild into a fresh cluster",
                field="target_addresses")
        accounts = [imported_mirror(m, base + i if first_transfer_ts else 0)
                    for i, m in enumerate(missing)]
        for batch in chunks(accounts, self._limits.create_batch_max):
            statuses = await create_accounts_allowing_imported(self._target, list(batch))
            for account, status in zip(batch, statuses, strict=True):
                if status is _CAS.CREATED:
                    self._counts["accounts_created"] += 1
                elif status is _CAS.EXISTS:
                    self._counts["accounts_existing"] += 1
                else:
                    raise ConflictError(f"mirror {account.id:032x} (code {account.code}, "
                                        f"ledger {account.ledger}): {status.name}",
                                        field="target_addresses")

    def _transfer_of(self, entry: JournalEntry) -> tb.Transfer | None:
        if len(entry.lines) != 2:
            return None
        debit, credit = sorted(entry.lines, key=lambda line: line.credit_minor)
        if debit.currency != credit.currency or debit.debit_minor != credit.credit_minor:
            return None
        debit_mirror = self._chart.mirror(debit.account, debit.currency)
        credit_mirror = self._chart.mirror(credit.account, credit.currency)
        return tb.Transfer(
            id=entry.transfer_id, debit_account_id=debit_mirror.id,
            credit_account_id=credit_mirror.id, amount=debit.debit_minor, pending_id=0,
            user_data_128=external_ref(entry.external_id) if entry.external_id else 0,
            user_data_64=0, user_data_32=0, timeout=0, ledger=debit_mirror.ledger,
            code=entry.code, flags=tb.TransferFlags.IMPORTED, timestamp=entry.tb_timestamp)

    async def _transfers(self, entries: list[JournalEntry]) -> None:
        planned: list[tb.Transfer] = []
        for entry in entries:
            transfer = self._transfer_of(entry)
            if transfer is None:
                self._fail(f"{entry.entry_id}: not one debit and one credit in one currency")
            else:
                planned.append(transfer)
        existing: dict[int, tb.Transfer] = {}
        for part in chunks([t.id for t in planned], self._limits.lookup_batch_max):
            existing.update({t.id: t for t in await self._target.lookup_transfers(list(part))})
        fresh: list[tb.Transfer] = []
        for transfer in planned:
            found = existing.get(transfer.id)
            if found is None:
                fresh.append(transfer)
            elif _same_import(found, transfer):
                self._counts["transfers_existing"] += 1
            else:
                self._fail(f"{transfer.id:032x}: exists in the target with other content")
        if not fresh:
            return
        results = await self._target.create_transfers(fresh)
        assert len(results) == len(fresh)
        for transfer, result in zip(fresh, results, strict=True):
            if result.status is _CTS.CREATED:
                self._counts["transfers_imported"] += 1
            elif result.status is _CTS.EXISTS:
                self._counts["transfers_existing"] += 1
            else:
                self._fail(f"{transfer.id:032x}: {result.status.name}")

    async def _verify(self, mirrors: list[MirrorAccount]) -> list[AccountMismatch]:
        """Every mirror's posted pair against its stored GL balance (a missing mirror shows
        as -1, -1). Pending amounts are holds in flight, not books."""
        balances = {posting_key(b.account, b.currency): b for b in await self._ledger.balances()}
        found: dict[int, tb.Account] = {}
        for part in chunks([m.id for m in mirrors], self._limits.lookup_batch_max):
            found.update({a.id: a for a in await self._target.lookup_accounts(list(part))})
        out: list[AccountMismatch] = []
        for mirror in mirrors:
            gl = balances.get(posting_key(mirror.gl_number, mirror.currency))
            gl_pair = (gl.debits_minor, gl.credits_minor) if gl else (0, 0)
            account = found.get(mirror.id)
            tb_pair = ((account.debits_posted, account.credits_posted) if account else (-1, -1))
            if gl_pair != tb_pair:
                out.append(AccountMismatch(
                    account=mirror.gl_number, currency=mirror.currency,
                    gl_debits_minor=gl_pair[0], gl_credits_minor=gl_pair[1],
                    tb_debits_posted=tb_pair[0], tb_credits_posted=tb_pair[1]))
        return out


def _same_import(found: tb.Transfer, wanted: tb.Transfer) -> bool:
    return (found.debit_account_id, found.credit_account_id, found.amount, found.ledger,
            found.code, found.timestamp) == (
        wanted.debit_account_id, wanted.credit_account_id, wanted.amount, wanted.ledger,
        wanted.code, wanted.timestamp)


async def rebuild_tigerbeetle_from_ledger(
    ledger: GeneralLedger, target: TigerBeetleClient, *, limits: BatchLimits | None = None,
) -> TigerBeetleRebuildResult:
    """One call: import the ledger into `target` and verify (TigerBeetleRebuild)."""
    return await TigerBeetleRebuild(ledger, target, limits=limits or BatchLimits()).run()




# ---- one set of terminal operations over a process's stores -------------------------------


@dataclass
class TerminalOps:
    """The sync, reconciler and reports over one database and one TigerBeetle client: what
    the worker wiring, the CLI and the demo build (`terminal_ops`)."""

    client: TigerBeetleClient
    ledger: GeneralLedger
    clearing: ClearingStore
    reports: TerminalReports
    sync: LedgerSync
    reconciler: TerminalReconciler
    limits: BatchLimits

    async def ensure_indexes(self) -> None:
        await self.ledger.ensure_indexes()
        await self.ledger.ensure_chart()
        await self.clearing.ensure_indexes()
        await self.reports.ensure_indexes()

    def activities(self) -> list[Callable[..., object]]:
        """The activities LedgerSyncWorkflow and TerminalReconcileWorkflow call."""
        return [*TerminalSyncActivities(self.sync, query_limit_max=self.limits.query_limit_max)
                .all(), *TerminalReconcileActivities(self.reconciler).all()]

    async def rebuild_ledger(self, *, drop_existing: bool, run_id: str) -> LedgerRebuildResult:
        result = await rebuild_ledger_from_tigerbeetle(
            self.sync, self.reconciler, drop_existing=drop_existing, run_id=run_id)
        await self.reports.save_rebuild(KIND_LEDGER_REBUILD, run_id, result, result.ok)
        return result

    async def rebuild_tigerbeetle(
        self, target: TigerBeetleClient, *, target_limits: BatchLimits, run_id: str,
    ) -> TigerBeetleRebuildResult:
        result = await rebuild_tigerbeetle_from_ledger(self.ledger, target, limits=target_limits)
        await self.reports.save_rebuild(KIND_TIGERBEETLE_REBUILD, run_id, result, result.ok)
        return result


def terminal_ops(
    db: AsyncDatabase[Any], client: TigerBeetleClient, *, limits: BatchLimits | None = None,
    table: ClearingTable = DEFAULT_CLEARING_TABLE,
) -> TerminalOps:
    limits = limits or BatchLimits()
    ledger = GeneralLedger(db, chart=table.chart)
    clearing = ClearingStore(db)
    reports = TerminalReports(db)
    sync = LedgerSync(client, ledger, clearing, table=table, reports=reports)
    reconciler = TerminalReconciler(client, sync, clearing, reports=reports, limits=limits)
    return TerminalOps(client=client, ledger=ledger, clearing=clearing, reports=reports, sync=sync,
                       reconciler=reconciler, limits=limits)


__all__ = [
    "TerminalOps",
    "TigerBeetleRebuild",
    "imported_mirror",
    "ledger_digest",
    "rebuild_ledger_from_tigerbeetle",
    "rebuild_tigerbeetle_from_ledger",
    "terminal_ops",
    "verify_whole_chain",
]
