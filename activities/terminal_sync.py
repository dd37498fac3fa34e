"""Sync TigerBeetle -> general ledger: every posted clearing transfer becomes its journal entry.

The pipeline settles what it posts; the sync is the safety net that works from durable state
alone (TigerBeetle, the system of reference, the ledger), so a pipeline that crashed between
the post and the entry loses nothing, and a lost ledger is rebuilt by replaying it from 0.

**What it reads.** The clearing transfers of the terminal ledgers (chart.ledgers: they carry
nothing else) in TigerBeetle timestamp order after a durable cursor (gl_sync, written in the
same MongoDB transaction as the entries). One `query_transfers` per terminal ledger (filter:
ledger, timestamp_min = cursor + 1, limit), merged: when a ledger's page is full, the merge
stops at its last timestamp (a later transfer of another ledger may not be read past an
unread one of this ledger); every transfer at or below the new cursor has then been seen,
since TigerBeetle timestamps are unique and assigned at commit in increasing order. Why not
`get_account_transfers` on the mirrors: every transfer would come twice (debit and credit
mirror) from ~20 queries instead of one per currency. Bounded: a page reads at most
ledgers x limit rows (limit <= tb_limits.QUERY_LIMIT_MAX) and keeps `limit`.

**Which are posted.** A POST_PENDING transfer, or a single-phase one (what rebuilding
TigerBeetle imports under the post id), with a route's code. Pending and void transfers
advance the cursor only.

**Their entries.** Entry id = post transfer id: `GeneralLedger.existing_entry_ids` says which
the ledger holds; for the rest the transaction comes from the system of reference by post id
(`ClearingStore.get_by_post_ids`: TigerBeetle carries only hashes of the external id) and
becomes `settlement_entry(txn, table, transfer.timestamp)`, byte for byte what the pipeline
writes. A transfer whose transaction is unknown or says something else (amount, accounts,
code) is `unmatched`: never written, counted, kept in the sync status, reported by
reconciliation as posted without entry. The sync does not move transaction states: the
pipeline's batch owns them (its final update finds the entry and settles).

**Resume.** The catch-up run (the Temporal Schedule's, `once`) also starts the workflows of
batches left `received` by a submitter that died between recording and starting
(`resume_received`: ClearingClient.resume, the oldest batches first, at most `batches_max` a
run, on this activity's task queue, where the batch workflows run too). Idempotent: the
workflow id derives from the batch id and a running workflow is never started twice, so a
resume racing a late submitter starts one workflow.

**Lag.** `sync_lag_seconds` = now - the oldest posted transfer not yet in the ledger. A page
measures it exactly when it finds a missing post (the oldest missing one is the first after
the cursor) or reaches the end (0, or the oldest unmatched transfer); otherwise it is bounded
above by now - the new cursor (`lag_exact` False).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import tigerbeetle as tb
from temporalio import activity

from messages.clearing import (
    ACTIVITY_RESUME_RECEIVED,
    ACTIVITY_SYNC_PAGE,
    REFUSED_SAMPLE_MAX,
    SYNC_PAGE_LIMIT_DEFAULT,
    LedgerSyncOutcome,
    ResumeReceivedInput,
    ResumeReceivedReport,
    SyncCursor,
    SyncPageInput,
    SyncPageReport,
    SyncTotals,
)
from mongobase.mongo import now_ms
from observability.terminal import observe_sync_lag
from stores.clearing_store import ClearingStore
from stores.general_ledger import GeneralLedger
from stores.terminal_reports import TerminalReports
from stores.tigerbeetle_client import TigerBeetleClient
from walletclient.clearing_client import OWNER_GRACE_S, ClearingClient
from walletcore.clearing import (
    DEFAULT_CLEARING_TABLE,
    TRANSFER_FLAG_PENDING,
    TRANSFER_FLAG_POST_PENDING,
    TRANSFER_FLAG_VOID_PENDING,
    ClearingRecord,
    ClearingTable,
    settlement_entry,
)
from walletcore.errors import InvalidInputError
from walletcore.journal import INT64_MAX, NS_PER_S, JournalEntry, entry_id_of
from walletcore.tb_limits import QUERY_LIMIT_MAX

SYNC_PAGES_MAX = 100_000  # one run_until_caught_up: 100k pages of <= 8189 transfers
LAG_PAGES_MAX = 16  # measure_lag reads at most this many pages ahead of the cursor
Clock = Callable[[], int]  # ns since the epoch, like TigerBeetle's timestamps


def is_posted(transfer: tb.Transfer) -> bool:
    """A transfer that moved posted balances: a post of a pending transfer, or single-phase
    (what a rebuilt cluster holds under the post id). Pending and void transfers did not."""
    flags = int(transfer.flags)
    if flags & TRANSFER_FLAG_POST_PENDING:
        return True
    return not flags & (TRANSFER_FLAG_PENDING | TRANSFER_FLAG_VOID_PENDING)


def query_after(ledger: int, after: int, limit: int, until: int = 0) -> tb.QueryFilter:
    """Transfers of `ledger` with after < timestamp (<= until when until > 0), oldest first."""
    assert 0 <= after < INT64_MAX and 1 <= limit <= QUERY_LIMIT_MAX
    return tb.QueryFilter(user_data_128=0, user_data_64=0, user_data_32=0, ledger=ledger,
                          code=0, timestamp_min=after + 1, timestamp_max=until, limit=limit,
                          flags=tb.QueryFilterFlags(0))


@dataclass
class ScanPage:
    """Transfers after the cursor in timestamp order; `last_timestamp`: the new cursor (every
    transfer of the terminal ledgers at or below it is in `transfers` or before the cursor)."""

    transfers: list[tb.Transfer]
    last_timestamp: int
    exhausted: bool


class TransferScan:
    """Reads the terminal ledgers' transfers in TigerBeetle time order (module docstring)."""

    def __init__(self, client: TigerBeetleClient, ledgers: Sequence[int]) -> None:
        assert 0 < len(ledgers) <= 64 and len(set(ledgers)) == len(ledgers)
        self._client = client
        self._ledgers = sorted(ledgers)

    async def page(self, after: int, limit: int, until: int = 0) -> ScanPage:
        assert 1 <= limit <= QUERY_LIMIT_MAX
        merged: list[tb.Transfer] = []
        bound = INT64_MAX  # the merge may not pass a full page's last transfer
        for ledger in self._ledgers:
            rows = await self._client.query_transfers(query_after(ledger, after, limit, until))
            assert len(rows) <= limit
            if len(rows) == limit:
                bound = min(bound, rows[-1].timestamp)
            merged.extend(rows)
        merged = sorted((t for t in merged if t.timestamp <= bound), key=lambda t: t.timestamp)
        taken = merged[:limit]
        exhausted = bound == INT64_MAX and len(merged) <= limit
        last = taken[-1].timestamp if taken else after
        assert all(after < t.timestamp <= last for t in taken)
        return ScanPage(transfers=taken, last_timestamp=last, exhausted=exhausted)


@dataclass
class _Matched:
    entries: list[JournalEntry] = field(default_factory=list)
    unmatched: list[tb.Transfer] = field(default_factory=list)


class LedgerSync:
    """The sync engine. `reports`: where each page's figures go (sync status), optional."""

    def __init__(
        self, client: TigerBeetleClient, ledger: GeneralLedger, clearing: ClearingStore, *,
        table: ClearingTable = DEFAULT_CLEARING_TABLE, reports: TerminalReports | None = None,
        clock: Clock = time.time_ns,
    ) -> None:
        assert table.chart == ledger.chart, "the sync and the ledger need the same chart"
        self._client = client
        self._ledger = ledger
        self._clearing = clearing
        self._table = table
        self._reports = reports
        self._clock = clock
        self.scan = TransferScan(client, list(table.chart.ledgers.values()))

    @property
    def ledger(self) -> GeneralLedger:
        return self._ledger

    @property
    def table(self) -> ClearingTable:
        return self._table

    @property
    def clearing(self) -> ClearingStore:
        return self._clearing

    async def page(
        self, floor: int = 0, limit: int = SYNC_PAGE_LIMIT_DEFAULT, *,
        replay_after: int | None = None,
    ) -> SyncPageReport:
        """One page after the durable cursor (or `floor`, whichever is later): write the
        missing entries and advance the cursor in one ledger transaction. `replay_after`
        scans after that timestamp instead (a replay from 0 fills any gap below the cursor;
        the cursor itself never moves back)."""
        cursor = replay_after if replay_after is not None else max(
            floor, (await self._ledger.read_cursor()).timestamp)
        scan = await self.scan.page(cursor, min(limit, QUERY_LIMIT_MAX))
        posts = self.posts_of(scan)
        missing = await self._missing(posts, cursor, scan.last_timestamp)
        now_ns = self._clock()
        matched = await self._match(missing)
        new_entries = 0
        if matched.entries:
            posted = await self._ledger.post_entries(
                matched.entries, cursor_timestamp=scan.last_timestamp)
            new_entries = len(posted.new)
        elif scan.last_timestamp > cursor:
            await self._ledger.advance_cursor(scan.last_timestamp)
        report = self._report(scan, posts, missing, matched, new_entries, now_ns)
        observe_sync_lag(report.lag_s)  # an upper bound when not exact: an alert errs high
        if self._reports is not None:
            await self._reports.save_sync_page(report)
        return report

    def posts_of(self, scan: ScanPage) -> list[tb.Transfer]:
        """The scan's posted clearing transfers (a route's code)."""
        return [t for t in scan.transfers
                if is_posted(t) and self._table.route_by_code(t.code) is not None]

    async def _missing(
        self, posts: list[tb.Transfer], after: int, last: int
    ) -> list[tb.Transfer]:
        """The posts without an entry. First one index count of the entries in the scanned
        time range (an entry carries its post's unique timestamp): when it equals the posts,
        all are there (~3x cheaper than reading ids on SecantusDB, the steady state where the
        pipeline settled everything); else the ids are read."""
        if not posts:
            return []
        if await self._ledger.count_entries_between(after, last) == len(posts):
            return []
        held = await self._ledger.existing_entry_ids([entry_id_of(t.id) for t in posts])
        return [t for t in posts if entry_id_of(t.id) not in held]

    async def _match(self, missing: list[tb.Transfer]) -> _Matched:
        """Each missing post's entry from its transaction; unknown or differing: unmatched."""
        out = _Matched()
        if not missing:
            return out
        records = await self._clearing.get_by_post_ids([t.id for t in missing])
        for transfer in missing:
            entry = self._entry_of(transfer, records.get(transfer.id))
            if entry is None:
                out.unmatched.append(transfer)
            else:
                out.entries.append(entry)
        return out

    def _entry_of(
        self, transfer: tb.Transfer, record: ClearingRecord | None
    ) -> JournalEntry | None:
        if record is None:
            return None
        txn = record.transaction
        try:
            entry = settlement_entry(txn, self._table, transfer.timestamp)
        except InvalidInputError:  # a kind or currency the table no longer carries
            return None
        debit = self._table.chart.mirror(entry.lines[0].account, txn.currency)
        credit = self._table.chart.mirror(entry.lines[1].account, txn.currency)
        same = (transfer.amount == txn.amount_minor and transfer.code == entry.code
                and transfer.ledger == debit.ledger and transfer.debit_account_id == debit.id
                and transfer.credit_account_id == credit.id)
        return entry if same else None

    def _report(
        self, scan: ScanPage, posts: list[tb.Transfer], missing: list[tb.Transfer],
        matched: _Matched, new_entries: int, now_ns: int,
    ) -> SyncPageReport:
        if missing:
            lag_ns, exact = now_ns - missing[0].timestamp, True
        elif scan.exhausted:
            lag_ns, exact = 0, True
        else:
            lag_ns, exact = now_ns - scan.last_timestamp, False
        unmatched = matched.unmatched
        return SyncPageReport(
            cursor=SyncCursor(timestamp=scan.last_timestamp, updated_at=now_ms()),
            scanned=len(scan.transfers), new_entries=new_entries, exhausted=scan.exhausted,
            lag_s=max(lag_ns, 0) / NS_PER_S, lag_exact=exact, posted=len(posts),
            existing=len(posts) - len(missing),
            unmatched=[entry_id_of(t.id) for t in unmatched[:REFUSED_SAMPLE_MAX]],
            unmatched_count=len(unmatched),
            oldest_unmatched_ts=unmatched[0].timestamp if unmatched else 0,
        )

    async def run_until_caught_up(
        self, *, limit: int = SYNC_PAGE_LIMIT_DEFAULT, pages_max: int = SYNC_PAGES_MAX,
        floor: int = 0, replay: bool = False,
    ) -> LedgerSyncOutcome:
        """Pages until one reaches the end (or `pages_max`). The lag reported is the first
        exact one a page measured: the lag as it was when the run started. `replay`: from
        timestamp 0 whatever the cursor says (rebuilding the ledger)."""
        assert 1 <= pages_max <= SYNC_PAGES_MAX
        totals = SyncTotals()
        lag: tuple[float, bool] | None = None
        page = await self.page(floor, limit, replay_after=0 if replay else None)
        while True:
            totals = add_page(totals, page)
            if lag is None and (page.lag_exact or page.exhausted):
                lag = (page.lag_s, True)
            if page.exhausted or totals.pages >= pages_max:
                break
            after = page.cursor.timestamp
            page = await self.page(after, limit, replay_after=after if replay else None)
        lag_s, exact = lag if lag is not None else (page.lag_s, False)
        return LedgerSyncOutcome(cursor=page.cursor, totals=totals, caught_up=page.exhausted,
                                 lag_s=lag_s, lag_exact=exact)

    async def measure_lag(self, *, limit: int = SYNC_PAGE_LIMIT_DEFAULT,
                          pages_max: int = LAG_PAGES_MAX) -> tuple[float, bool]:
        """(lag_s, exact) without writing: the first posted transfer after the cursor that
        the ledger lacks, read at most `pages_max` pages ahead (an upper bound beyond)."""
        assert 1 <= pages_max <= SYNC_PAGES_MAX
        after = (await self._ledger.read_cursor()).timestamp
        for _ in range(pages_max):
            now_ns = self._clock()
            scan = await self.scan.page(after, min(limit, QUERY_LIMIT_MAX))
            missing = await self._missing(self.posts_of(scan), after, scan.last_timestamp)
            if missing:
                lag_s = max(now_ns - missing[0].timestamp, 0) / NS_PER_S
                observe_sync_lag(lag_s)
                return lag_s, True
            if scan.exhausted:
                observe_sync_lag(0.0)
                return 0.0, True
            after = scan.last_timestamp
        return max(self._clock() - after, 0) / NS_PER_S, False


def add_page(totals: SyncTotals, page: SyncPageReport) -> SyncTotals:
    return SyncTotals(pages=totals.pages + 1, scanned=totals.scanned + page.scanned,
                      new_entries=totals.new_entries + page.new_entries,
                      unmatched=totals.unmatched + page.unmatched_count)


class TerminalSyncActivities:
    """The sync page and the resume as Temporal activities (LedgerSyncWorkflow calls them by
    name)."""

    def __init__(self, sync: LedgerSync, *, query_limit_max: int = QUERY_LIMIT_MAX) -> None:
        self._sync = sync
        self._limit_max = query_limit_max

    @activity.defn(name=ACTIVITY_SYNC_PAGE)
    async def sync_page(self, inp: SyncPageInput) -> SyncPageReport:
        return await self._sync.page(inp.cursor.timestamp, min(inp.limit, self._limit_max))

    @activity.defn(name=ACTIVITY_RESUME_RECEIVED)
    async def resume_received(self, inp: ResumeReceivedInput) -> ResumeReceivedReport:
        """Start the batches left `received` (module docstring, Resume) with the worker's own
        Temporal client, on this activity's task queue."""
        clearing = ClearingClient(activity.client(), self._sync.clearing,
                                  activity.info().task_queue, table=self._sync.table)
        older_than_s = OWNER_GRACE_S if inp.older_than_s is None else inp.older_than_s
        started = await clearing.resume(older_than_s=older_than_s,
                                        batches_max=inp.batches_max)
        return ResumeReceivedReport(started=started)

    def all(self) -> list[Callable[..., object]]:
        return [self.sync_page, self.resume_received]
