"""Terminal reconciliation: the general ledger against TigerBeetle, both ways, as of one time.

The time is T = the sync cursor (after an optional bounded catch-up sync): every posted
clearing transfer at or below T must have its entry by the cursor's definition, and the mirrors
carry HISTORY, so TigerBeetle's balances *as of T* are one `get_account_balances` each while
transfers keep flowing. Stages, each a bounded page (TerminalReconcileState travels between
them, so a workflow can run them as activities and continue as new):

- start: catch-up sync; T; the stored GL balances with the chain head they belong to (read
  between two equal head reads: post_entries moves both in one transaction).
- entries: the chain in seq order, pages of `page_size`: every link re-hashed
  (walletcore.journal.verify_segment, continuing from the last page); sums per
  (account, currency) of the entries up to the head (must equal the stored balances: else
  `balance_drift`) and of those after T (GL as of T = stored - after T); every entry's
  transfer looked up (chunks of the cluster's lookup max): absent -> entry without transfer,
  other amount/accounts/code/timestamp or not a post -> transfer mismatch; an entry whose
  external id derives another post id is a second entry for one transaction (duplicated).
- transfers: posted clearing transfers with timestamp <= T (activities.terminal_sync's merged
  scan): each must have its entry (`posted_without_entry`).
- holds: the system of reference's transactions still received/pending past their route's
  timeout, their pending/post/void transfers looked up: a hold TigerBeetle still has (or had)
  with neither post nor void and its timeout passed is an expired hold (one page, the oldest).
- finish: every mirror looked up (missing ones reported); GL as of T against TigerBeetle's
  posted balances as of T per mirror; trial balance of the stored balances; the stored chain
  head against the last link; the sync lag; the report saved (stores.terminal_reports).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import tigerbeetle as tb
from temporalio import activity

from activities.terminal_sync import Clock, LedgerSync, is_posted
from messages.clearing import (
    ACTIVITY_RECONCILE_FINISH,
    ACTIVITY_RECONCILE_PAGE,
    REFUSED_SAMPLE_MAX,
    AccountMismatch,
    BalanceDrift,
    TerminalReconcileInput,
    TerminalReconcileReport,
    TerminalReconcileState,
)
from mongobase.mongo import now_ms
from observability.terminal import observe_trial_balance
from stores.clearing_store import ClearingStore
from stores.general_ledger import GeneralLedger
from stores.tb_batches import chunks
from stores.terminal_reports import TerminalReports
from stores.tigerbeetle_client import TigerBeetleClient
from walletcore.clearing import (
    ClearingRecord,
    ClearingState,
    pending_transfer_id,
    post_transfer_id,
    void_transfer_id,
)
from walletcore.errors import InvalidInputError, StoreUnavailableError
from walletcore.gl_chart import MirrorAccount
from walletcore.journal import (
    NS_PER_S,
    AccountBalance,
    ChainedEntry,
    ChainHead,
    posting_key,
    trial_balance,
    verify_segment,
)
from walletcore.reconcile import FLAG_HISTORY
from walletcore.tb_limits import BatchLimits

CATCH_UP_PAGES_MAX = 256  # the start stage's sync: bounded, T is wherever it got to
HEAD_READS_MAX = 20  # tries to read balances between two equal chain heads
HEAD_RETRY_S = 0.05
HOLD_STATES = (ClearingState.RECEIVED, ClearingState.PENDING)
Sums = dict[str, list[int]]


def _add(sums: Sums, key: str, debit: int, credit: int) -> None:
    pair = sums.setdefault(key, [0, 0])
    pair[0] += debit
    pair[1] += credit


def _sample(items: list[str], more: Sequence[str]) -> list[str]:
    return (items + list(more))[:REFUSED_SAMPLE_MAX]


class TerminalReconciler:
    """Runs the stages; `run` does them all in-process (the CLI), the activities page by page."""

    def __init__(
        self, client: TigerBeetleClient, sync: LedgerSync, clearing: ClearingStore, *,
        reports: TerminalReports | None = None, limits: BatchLimits | None = None,
        clock: Clock = time.time_ns,
    ) -> None:
        self._client = client
        self._sync = sync
        self._ledger: GeneralLedger = sync.ledger
        self._table = sync.table
        self._chart = sync.table.chart
        self._clearing = clearing
        self._reports = reports
        self._lookup_max = (limits or BatchLimits()).lookup_batch_max
        self._clock = clock

    async def run(self, inp: TerminalReconcileInput) -> TerminalReconcileReport:
        state = inp.state or TerminalReconcileState(
            run_id=inp.run_id, page_size=inp.page_size, catch_up=inp.catch_up)
        while state.stage != "finish":
            state = await self.step(state)
        return await self.finish(state)

    async def step(self, state: TerminalReconcileState) -> TerminalReconcileState:
        if state.stage == "start":
            return await self._start(state)
        if state.stage == "entries":
            return await self._entries(state)
        if state.stage == "transfers":
            return await self._transfers(state)
        if state.stage == "holds":
            return await self._holds(state)
        return state

    # ---- start -------------------------------------------------------------------------------

    async def _start(self, state: TerminalReconcileState) -> TerminalReconcileState:
        pages = 0
        if state.catch_up:
            outcome = await self._sync.run_until_caught_up(pages_max=CATCH_UP_PAGES_MAX)
            pages = outcome.totals.pages
        snapshot = (await self._ledger.read_cursor()).timestamp
        head, stored = await self._stored_balances()
        return state.model_copy(update={
            "stage": "entries", "started_at": state.started_at or now_ms(),
            "snapshot_timestamp": snapshot, "head_seq": head.seq, "stored": stored,
            "synced_pages": pages,
        })

    async def _stored_balances(self) -> tuple[ChainHead, Sums]:
        """Balances that belong to one chain head (read between two equal head reads)."""
        for _ in range(HEAD_READS_MAX):
            before = await self._ledger.chain_head()
            balances = await self._ledger.balances()
            if await self._ledger.chain_head() == before:
                sums: Sums = {}
                for b in balances:
                    _add(sums, posting_key(b.account, b.currency), b.debits_minor,
                         b.credits_minor)
                return before, sums
            await asyncio.sleep(HEAD_RETRY_S)
        raise StoreUnavailableError(
            f"the ledger's head moved during {HEAD_READS_MAX} balance reads", field=None)

    # ---- entries -----------------------------------------------------------------------------

    async def _entries(self, state: TerminalReconcileState) -> TerminalReconcileState:
        limit = state.page_size
        try:
            page = await self._ledger.entries_page(after_seq=state.after_seq, limit=limit)
        except (ValueError, KeyError, TypeError, InvalidInputError) as err:
            return await self._unreadable(state, str(err))
        check = verify_segment(ChainHead(seq=state.after_seq, hash=state.chain_hash), page)
        update = {
            "chain_ok": state.chain_ok and check.ok,
            "chain_reason": state.chain_reason or (
                None if check.ok else f"seq {check.first_bad_seq}: {check.reason}"),
        }
        sums, after_t = _copy(state.entries_sum), _copy(state.after_t)
        for link in page:
            for line in link.entry.lines:
                key = posting_key(line.account, line.currency)
                if link.seq <= state.head_seq:
                    _add(sums, key, line.debit_minor, line.credit_minor)
                    if link.entry.tb_timestamp > state.snapshot_timestamp:
                        _add(after_t, key, line.debit_minor, line.credit_minor)
        missing, differing, duplicated = await self._against_transfers(page)
        last = page[-1] if page else None
        return state.model_copy(update={
            **update, "entries_sum": sums, "after_t": after_t,
            "after_seq": last.seq if last else state.after_seq,
            "chain_hash": last.hash if last else state.chain_hash,
            "entries_checked": state.entries_checked + len(page),
            "entries_without_transfer": _sample(state.entries_without_transfer, missing),
            "entries_without_transfer_count": state.entries_without_transfer_count
            + len(missing),
            "transfer_mismatches": _sample(state.transfer_mismatches, differing),
            "transfer_mismatch_count": state.transfer_mismatch_count + len(differing),
            "duplicated_entries": state.duplicated_entries + duplicated,
            "stage": "entries" if len(page) == limit else "transfers",
        })

    async def _unreadable(self, state: TerminalReconcileState, err: str) -> TerminalReconcileState:
        """A stored entry that is no longer an entry (edited into an invalid shape): the
        chain is broken there; the rest of the chain cannot be summed, so the entries stage
        ends (the report fails on the chain)."""
        reason = f"entry after seq {state.after_seq} unreadable: {err}"[:256]
        return state.model_copy(update={
            "chain_ok": False, "chain_reason": state.chain_reason or reason,
            "stage": "transfers",
        })

    async def _against_transfers(
        self, page: list[ChainedEntry]
    ) -> tuple[list[str], list[str], int]:
        """(entries without transfer, entries whose transfer differs, duplicated entries)."""
        found: dict[int, tb.Transfer] = {}
        for part in chunks([link.entry.transfer_id for link in page], self._lookup_max):
            found.update({t.id: t for t in await self._client.lookup_transfers(list(part))})
        missing: list[str] = []
        differing: list[str] = []
        duplicated = 0
        for link in page:
            entry = link.entry
            if entry.external_id and post_transfer_id(entry.external_id) != entry.transfer_id:
                duplicated += 1
            transfer = found.get(entry.transfer_id)
            if transfer is None:
                missing.append(entry.entry_id)
            elif not self._same(link, transfer):
                differing.append(entry.entry_id)
        return missing, differing, duplicated

    def _same(self, link: ChainedEntry, transfer: tb.Transfer) -> bool:
        entry = link.entry
        if len(entry.lines) != 2 or not is_posted(transfer):
            return False
        debit, credit = sorted(entry.lines, key=lambda line: line.credit_minor)
        try:
            debit_mirror = self._chart.mirror(debit.account, debit.currency)
            credit_mirror = self._chart.mirror(credit.account, credit.currency)
        except InvalidInputError:
            return False
        return (transfer.timestamp == entry.tb_timestamp and transfer.code == entry.code
                and transfer.amount == debit.debit_minor == credit.credit_minor
                and transfer.debit_account_id == debit_mirror.id
                and transfer.credit_account_id == credit_mirror.id)

    # ---- transfers ---------------------------------------------------------------------------

    async def _transfers(self, state: TerminalReconcileState) -> TerminalReconcileState:
        if state.snapshot_timestamp == 0:
            return state.model_copy(update={"stage": "holds"})
        scan = await self._sync.scan.page(
            state.after_timestamp, state.page_size, until=state.snapshot_timestamp)
        posts = self._sync.posts_of(scan)
        ids = [f"{t.id:032x}" for t in posts]
        held = await self._ledger.existing_entry_ids(ids)
        missing = [i for i in ids if i not in held]
        return state.model_copy(update={
            "after_timestamp": scan.last_timestamp,
            "transfers_checked": state.transfers_checked + len(posts),
            "posted_without_entry": _sample(state.posted_without_entry, missing),
            "posted_without_entry_count": state.posted_without_entry_count + len(missing),
            "stage": "holds" if scan.exhausted else "transfers",
        })

    # ---- holds -------------------------------------------------------------------------------

    async def _holds(self, state: TerminalReconcileState) -> TerminalReconcileState:
        timeouts = {r.kind: r.pending_timeout_s for r in self._table.routes}
        now = now_ms()
        oldest_due = now - timedelta(seconds=min(timeouts.values()))
        records: list[ClearingRecord] = []
        for hold_state in HOLD_STATES:
            records.extend(await self._clearing.find_by_state(
                hold_state, state.page_size, received_before=oldest_due))
        due = [r for r in records if r.transaction.kind in timeouts
               and r.received_at + timedelta(seconds=timeouts[r.transaction.kind]) <= now]
        expired = await self._expired(due, timeouts)
        return state.model_copy(update={
            "holds_checked": len(due), "expired_holds": expired[:REFUSED_SAMPLE_MAX],
            "expired_hold_count": len(expired), "stage": "finish",
        })

    async def _expired(
        self, due: list[ClearingRecord], timeouts: dict[str, int]
    ) -> list[str]:
        """External ids whose pending transfer has neither post nor void and whose timeout
        has passed in TigerBeetle time."""
        if not due:
            return []
        ids = [f(r.external_id) for r in due
               for f in (pending_transfer_id, post_transfer_id, void_transfer_id)]
        found: dict[int, tb.Transfer] = {}
        for part in chunks(ids, self._lookup_max):
            found.update({t.id: t for t in await self._client.lookup_transfers(list(part))})
        now_ns = self._clock()
        expired: list[str] = []
        for record in due:
            ext = record.external_id
            pending = found.get(pending_transfer_id(ext))
            resolved = post_transfer_id(ext) in found or void_transfer_id(ext) in found
            if pending is None or resolved:
                continue
            # The hold's own timeout (the route's, as the pipeline set it) in TigerBeetle time.
            timeout_s = pending.timeout or timeouts[record.transaction.kind]
            if pending.timestamp + timeout_s * NS_PER_S <= now_ns:
                expired.append(ext)
        return expired

    # ---- finish ------------------------------------------------------------------------------

    async def finish(self, state: TerminalReconcileState) -> TerminalReconcileReport:
        mirrors = self._chart.mirrors()
        present = await self._lookup_mirrors(mirrors)
        mismatched = await self._compare_mirrors(state, mirrors, present)
        drift = _drift(state)
        head = await self._ledger.chain_head()
        chain_ok, chain_reason = state.chain_ok, state.chain_reason
        if head.seq < state.after_seq or (
                head.seq == state.after_seq and head.hash != state.chain_hash):
            chain_ok = False
            chain_reason = chain_reason or f"stored head {head.seq} differs from the last entry"
        balances = [AccountBalance(account=int(k.split(":")[0]), currency=k.split(":")[1],
                                   debits_minor=v[0], credits_minor=v[1])
                    for k, v in state.stored.items()]
        lag_s, _exact = await self._sync.measure_lag()
        balanced = trial_balance(balances).zero
        observe_trial_balance(balanced)
        report = TerminalReconcileReport(
            run_id=state.run_id, accounts_checked=len(mirrors),
            mismatched_accounts=mismatched[:REFUSED_SAMPLE_MAX],
            transfers_checked=state.transfers_checked, entries_checked=state.entries_checked,
            posted_without_entry=state.posted_without_entry,
            entries_without_transfer=state.entries_without_transfer,
            duplicated_entries=state.duplicated_entries, expired_holds=state.expired_holds,
            trial_balance_zero=balanced, chain_ok=chain_ok,
            sync_lag_s=lag_s, started_at=state.started_at, finished_at=now_ms(),
            snapshot_timestamp=state.snapshot_timestamp, balance_drift=drift,
            transfer_mismatches=state.transfer_mismatches,
            posted_without_entry_count=state.posted_without_entry_count,
            entries_without_transfer_count=state.entries_without_transfer_count,
            transfer_mismatch_count=state.transfer_mismatch_count,
            expired_hold_count=state.expired_hold_count, holds_checked=state.holds_checked,
            missing_mirrors=[f"{m.gl_number}:{m.currency}" for m in mirrors
                             if m.id not in present][:REFUSED_SAMPLE_MAX],
            chain_reason=chain_reason,
        )
        if self._reports is not None:
            await self._reports.save_reconcile(report)
        return report

    async def _lookup_mirrors(self, mirrors: list[MirrorAccount]) -> dict[int, tb.Account]:
        found: dict[int, tb.Account] = {}
        for part in chunks([m.id for m in mirrors], self._lookup_max):
            found.update({a.id: a for a in await self._client.lookup_accounts(list(part))})
        return found

    async def _compare_mirrors(
        self, state: TerminalReconcileState, mirrors: list[MirrorAccount],
        present: dict[int, tb.Account],
    ) -> list[AccountMismatch]:
        """GL as of T (stored - entries after T) against each mirror's posted pair as of T."""
        out: list[AccountMismatch] = []
        for mirror in mirrors:
            key = posting_key(mirror.gl_number, mirror.currency)
            stored = state.stored.get(key, [0, 0])
            later = state.after_t.get(key, [0, 0])
            gl = (stored[0] - later[0], stored[1] - later[1])
            account = present.get(mirror.id)
            tb_pair = await self._posted_at(mirror, account, state.snapshot_timestamp)
            if gl != tb_pair:
                out.append(AccountMismatch(
                    account=mirror.gl_number, currency=mirror.currency,
                    gl_debits_minor=gl[0], gl_credits_minor=gl[1],
                    tb_debits_posted=tb_pair[0], tb_credits_posted=tb_pair[1]))
        return out

    async def _posted_at(
        self, mirror: MirrorAccount, account: tb.Account | None, timestamp: int
    ) -> tuple[int, int]:
        """The mirror's (debits_posted, credits_posted) as of `timestamp` (its history row at
        or before it); without HISTORY, its balances now (exact only while nothing moves)."""
        if account is None or timestamp == 0:
            return (0, 0)
        if not int(account.flags) & FLAG_HISTORY:
            return (account.debits_posted, account.credits_posted)
        flags = (tb.AccountFilterFlags.DEBITS | tb.AccountFilterFlags.CREDITS
                 | tb.AccountFilterFlags.REVERSED)
        rows = await self._client.get_account_balances(tb.AccountFilter(
            account_id=mirror.id, user_data_128=0, user_data_64=0, user_data_32=0, code=0,
            timestamp_min=0, timestamp_max=timestamp, limit=1, flags=flags))
        return (rows[0].debits_posted, rows[0].credits_posted) if rows else (0, 0)


def _copy(sums: Sums) -> Sums:
    return {key: list(pair) for key, pair in sums.items()}


def _drift(state: TerminalReconcileState) -> list[BalanceDrift]:
    """Stored balances that differ from the entries up to the head they were read with (only
    meaningful when the whole chain was read: an unreadable entry already fails the chain)."""
    out: list[BalanceDrift] = []
    for key in sorted(state.stored.keys() | state.entries_sum.keys()):
        stored = state.stored.get(key, [0, 0])
        summed = state.entries_sum.get(key, [0, 0])
        if stored != summed:
            account, currency = key.split(":")
            out.append(BalanceDrift(
                account=int(account), currency=currency, stored_debits_minor=stored[0],
                stored_credits_minor=stored[1], entries_debits_minor=summed[0],
                entries_credits_minor=summed[1]))
    return out[:REFUSED_SAMPLE_MAX]


class TerminalReconcileActivities:
    """The stages as activities (TerminalReconcileWorkflow calls them by name)."""

    def __init__(self, reconciler: TerminalReconciler) -> None:
        self._reconciler = reconciler

    @activity.defn(name=ACTIVITY_RECONCILE_PAGE)
    async def reconcile_page(self, state: TerminalReconcileState) -> TerminalReconcileState:
        return await self._reconciler.step(state)

    @activity.defn(name=ACTIVITY_RECONCILE_FINISH)
    async def reconcile_finish(self, state: TerminalReconcileState) -> TerminalReconcileReport:
        return await self._reconciler.finish(state)

    def all(self) -> list[Callable[..., object]]:
        return [self.reconcile_page, self.reconcile_finish]
