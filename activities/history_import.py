"""`backfill start --with-history`: the legacy transaction log as TigerBeetle `imported`
transfers with their original timestamps, before any opening balance.

TigerBeetle's rules for imported events shape everything here: an imported transfer must be
newer than EVERY transfer in the cluster and postdate both its accounts; imported accounts must
be newer than every account; no timestamp may be shared; a batch is all imported or none. So
the history of a scope is imported first, in one global (created_at, wallet, wallet_version)
order, while no normal write has reached TigerBeetle yet; the normal backfill then posts only
the residual between the legacy balance and what the history holds (plan_to_reach).

Timestamps (ns): legacy transactions carry milliseconds. Each millisecond m is split in two:
accounts take [m*1e6, m*1e6 + 500_000) and transfers [m*1e6 + 500_000, (m+1)*1e6), each
strictly increasing from the newest one in the cluster. So an account created for a transfer
of millisecond m is older than it, no account shares a transfer's timestamp, and
`timestamp // 1e6` of every transfer is its legacy `created_at`.

Idempotent and resumable: ids are the live path's (transfer_id / void_transfer_id), transfers
that already exist are looked up and skipped, the last-used timestamps are read back from
TigerBeetle on every page, and the cursor lives in `backfill_history` (stores/history_import.py).
A transfer TigerBeetle rejects (e.g. a debit ordered before its funding credit by clock skew)
is counted as failed: the residual opening then holds its effect, so balances stay exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import tigerbeetle as tb
from pydantic import ValidationError

from messages.backfill import HistoryPageInput, HistoryPageOutput
from mongobase.mongo import PAGE_LIMIT_MAX, as_utc, now_ms
from registries.account_registry import AccountRecord
from registries.transfer_registry import TransferRecord
from stores.backfill_imports import ImportLedger
from stores.history_import import (
    HistoryCheckpoint,
    HistoryCheckpoints,
    HistoryStatus,
    PageCounts,
    checkpoint_started,
    scope_of,
)
from stores.legacy_store import LegacyStore, LoggedTransaction
from stores.migration_state import MigrationStateStore
from stores.tigerbeetle_store import (
    TYPE_CREDIT,
    TYPE_DEBIT,
    TYPE_VOID,
    TigerBeetleStore,
    customer_account_of,
    system_accounts,
    timestamp_to_datetime,
)
from walletcore.codes import SystemAccount, TransferCode
from walletcore.errors import (
    AlreadyVoidedError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
)
from walletcore.ids import reference_hash, system_account_id, transfer_id, void_transfer_id
from walletcore.keys import WalletKey
from walletcore.phases import Phase
from walletcore.transfer_map import operation_leg, void_code

NS_PER_MS = 1_000_000
TRANSFER_SLOT_OFFSET_NS = 500_000  # accounts below it within a millisecond, transfers above
MARK_CONCURRENCY = 16  # void marks in flight per page (voids are a small share)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_CTS = tb.CreateTransferStatus
_CAS = tb.CreateAccountStatus
# The cluster holds something newer than the history: it is too late to import it.
TOO_LATE_TRANSFER = frozenset({
    _CTS.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS,
    _CTS.IMPORTED_EVENT_TIMESTAMP_MUST_POSTDATE_DEBIT_ACCOUNT,
    _CTS.IMPORTED_EVENT_TIMESTAMP_MUST_POSTDATE_CREDIT_ACCOUNT,
})


def refused(reason: str) -> InvalidInputError:
    return InvalidInputError(
        f"--with-history is no longer possible: {reason}. TigerBeetle accepts imported "
        "events only when they are newer than every transfer and account already in the "
        "cluster, so the history must be imported before dual_write or any backfill; run "
        "the backfill without --with-history",
        field="with_history",
    )


def ms_of(created_at: datetime) -> int:
    return (as_utc(created_at) - EPOCH) // timedelta(milliseconds=1)


def newest_filter() -> tb.QueryFilter:
    return tb.QueryFilter(user_data_128=0, user_data_64=0, user_data_32=0, ledger=0, code=0,
                          timestamp_min=0, timestamp_max=0, limit=1,
                          flags=tb.QueryFilterFlags.REVERSED)


@dataclass(frozen=True)
class ImportBooks:
    """What the importers consult and write beside the two sides' data: the wallets' import
    claims, the history import's checkpoints and the published migration state (the history
    is imported only while every pair is in phase legacy; read fresh every time)."""

    imports: ImportLedger
    history: HistoryCheckpoints
    migration: MigrationStateStore


@dataclass
class _Event:
    """One legacy transaction on its way to TigerBeetle and the Transfer Registry."""

    txn: str
    ms: int
    account: AccountRecord
    transfer: tb.Transfer
    record: TransferRecord
    original: str | None = None  # a void's original transaction id
    timestamp: int = 0  # assigned (new) or found (existing)
    outcome: Literal["new", "already", "failed"] = "new"


class HistoryImporter:
    """Three stores: reads the legacy log, writes TigerBeetle and its registries (the
    TigerBeetle store's client and registries), keeps its cursor in the books' checkpoints."""

    def __init__(
        self, legacy: LegacyStore, tigerbeetle: TigerBeetleStore, books: ImportBooks
    ) -> None:
        self._legacy = legacy
        self._client = tigerbeetle.client  # cut to the cluster's request limit
        self._limits = tigerbeetle.limits
        self._accounts = tigerbeetle.accounts
        self._transfers = tigerbeetle.transfers
        self._ledgers = tigerbeetle.ledgers
        self._deployment_tag = tigerbeetle.deployment_tag
        self._checkpoints = books.history
        self._migration = books.migration

    @property
    def checkpoints(self) -> HistoryCheckpoints:
        return self._checkpoints

    async def page(self, inp: HistoryPageInput) -> HistoryPageOutput:
        """Import the next page of the scope's history (starting the import if needed)."""
        for pair in inp.pairs:
            currency, _, country = pair.partition(":")
            self._ledgers.ledger_of(currency, country)  # unknown pair: clear error
        scope = scope_of(inp.pairs)
        checkpoint = await self._checkpoints.get(scope)
        if checkpoint is None:
            checkpoint = await self._start(inp, scope)
        if checkpoint.status is HistoryStatus.DONE:
            return _output(checkpoint)
        await self._check_phases(inp.pairs)
        newest_transfer_ts, newest_account_ts = await self._check_cluster()
        # The workflow's size (recorded histories keep theirs), cut to one create_transfers
        # request of the cluster: a page's transfers are imported by one request.
        limit = min(inp.limit, self._limits.history_events_per_page_max)
        docs = await self._legacy.log_page(
            checkpoint.pairs, before=checkpoint.cut, after=checkpoint.after, limit=limit)
        counts = await self._import(docs, newest_transfer_ts, newest_account_ts)
        after = docs[-1].position if docs else checkpoint.after
        advanced = await self._checkpoints.advance(
            checkpoint, after, counts, done=len(docs) < limit)
        if advanced is None:  # an earlier attempt of this page got there first
            advanced = await self._checkpoints.get(scope)
            assert advanced is not None
        return _output(advanced)

    # ---- preconditions -----------------------------------------------------------------------

    async def _start(self, inp: HistoryPageInput, scope: str) -> HistoryCheckpoint:
        if all([await self._checkpoints.done_for(pair) for pair in inp.pairs]):
            # Every pair's history came in with another scope's import (e.g. "all pairs"
            # first, then one pair again): nothing to do, even once normal writes started.
            done = checkpoint_started(scope, inp.pairs, inp.run_id, now_ms(), 0)
            return await self._checkpoints.create(done.model_copy(
                update={"status": HistoryStatus.DONE, "done_at": now_ms()}))
        await self._check_phases(inp.pairs)
        await self._check_cluster()
        await self._legacy.ensure_log_order_index()
        await self._checkpoints.ensure_indexes()
        cut = now_ms()
        total = await self._legacy.count_log(inp.pairs, before=cut)
        return await self._checkpoints.create(
            checkpoint_started(scope, inp.pairs, inp.run_id, cut, total))

    async def _check_phases(self, pairs: Sequence[str]) -> None:
        for pair in pairs:
            state = await self._migration.resolve(pair, fresh=True)
            if state.phase is not Phase.LEGACY:
                raise refused(f"ledger pair {pair} is in phase {state.phase.value} (scope "
                              f"{state.scope}), its writes already reach TigerBeetle")

    async def _check_cluster(self) -> tuple[int, int]:
        """(newest transfer timestamp, newest account timestamp), 0 when none; refuses when
        either is a normal (non-imported) event: nothing older can be imported after it."""
        transfers = await self._client.query_transfers(newest_filter())
        accounts = await self._client.query_accounts(newest_filter())
        if transfers and not transfers[0].flags & tb.TransferFlags.IMPORTED:
            raise refused(f"the cluster already holds transfers written normally (newest at "
                          f"{timestamp_to_datetime(transfers[0].timestamp).isoformat()})")
        if accounts and not accounts[0].flags & tb.AccountFlags.IMPORTED:
            raise refused(f"the cluster already holds accounts created normally (newest at "
                          f"{timestamp_to_datetime(accounts[0].timestamp).isoformat()})")
        return (transfers[0].timestamp if transfers else 0,
                accounts[0].timestamp if accounts else 0)

    # ---- one page ----------------------------------------------------------------------------

    async def _import(
        self, docs: list[LoggedTransaction], newest_transfer_ts: int, newest_account_ts: int
    ) -> PageCounts:
        if not docs:
            return PageCounts()
        failed: dict[str, str] = {}
        events, skipped = await self._events(docs, failed)
        existing = await self._existing(events, failed)
        fresh = [e for e in events if e.outcome == "new"]
        accounts = await self._plan_timestamps(fresh, newest_transfer_ts, newest_account_ts)
        await self._create_accounts(accounts)
        await self._create_transfers(fresh, failed)
        await self._record(events, failed)
        imported = sum(1 for e in fresh if e.outcome == "new")
        return PageCounts(scanned=len(docs), imported=imported, already=existing,
                          skipped=skipped, failed=failed)

    async def _events(
        self, docs: list[LoggedTransaction], failed: dict[str, str]
    ) -> tuple[list[_Event], int]:
        """The page's transactions as transfers (the live path's ids, accounts and codes)."""
        policies = await self._legacy.overdraft_policies(sorted({d.wallet for d in docs}))
        records = await self._accounts.get_or_create_many(
            [(WalletKey.from_canonical(k), allow) for k, allow in policies.items()])
        originals = await self._originals(docs)
        in_page = {d.transaction_id for d in docs}
        registered = await self._transfers.get_many(
            sorted({o for o in originals if o not in in_page}))
        events: list[_Event] = []
        built: set[str] = set()
        skipped = 0
        for doc in docs:
            txn = doc.transaction_id
            record = records.get(doc.wallet)
            if record is None:
                skipped += 1  # no wallet document: nothing to attach the transfer to
                continue
            original = doc.original_transaction_id if doc.type == TYPE_VOID else None
            original_type = None if original is None else originals.get(original)
            if original is not None and (original_type not in (TYPE_CREDIT, TYPE_DEBIT) or (
                    original not in in_page and original not in registered)):
                skipped += 1  # a void of an original the history holds no transfer of
                continue
            if original is not None and original in in_page and original not in built:
                skipped += 1  # its original was not importable
                continue
            try:
                events.append(self._event(doc, record, original, original_type))
            except (ValidationError, InvalidInputError, ConflictError) as exc:
                failed[txn] = f"legacy transaction not importable: {exc}"
                continue
            built.add(txn)
        return events, skipped

    async def _originals(self, docs: list[LoggedTransaction]) -> dict[str, str]:
        """Type of every voided original of the page (from the page or the legacy log)."""
        wanted = {str(d.original_transaction_id) for d in docs
                  if d.type == TYPE_VOID and d.original_transaction_id}
        types = {d.transaction_id: d.type for d in docs if d.transaction_id in wanted}
        missing = sorted(wanted - types.keys())
        if missing:
            types.update(await self._legacy.transaction_types(missing))
        return types

    def _event(self, doc: LoggedTransaction, record: AccountRecord, original: str | None,
               original_type: str | None) -> _Event:
        wallet = record.wallet
        ledger = self._ledgers.ledger_of(wallet.currency, wallet.country)
        if record.ledger != ledger:
            raise ConflictError(f"wallet {wallet} is registered on ledger {record.ledger}, "
                                f"its pair maps to {ledger}")
        txn = doc.transaction_id
        amount_minor = doc.amount_minor(wallet.currency)
        customer = record.account_id
        kind = doc.type
        if kind == TYPE_CREDIT:
            tid, code = transfer_id(txn), TransferCode.CREDIT
        elif kind == TYPE_DEBIT:
            tid, code = transfer_id(txn), TransferCode.DEBIT
        elif kind == TYPE_VOID and original is not None:
            tid, code = void_transfer_id(original), void_code(original_type == TYPE_CREDIT)
        else:
            raise ConflictError(f"unknown legacy transaction type {kind!r}")
        leg = operation_leg(ledger, customer, code)
        transfer = tb.Transfer(
            id=tid, debit_account_id=leg.debit_account_id,
            credit_account_id=leg.credit_account_id, amount=amount_minor,
            user_data_128=reference_hash(doc.reference_id), ledger=ledger,
            code=int(code), flags=tb.TransferFlags.IMPORTED)
        created_at = doc.created_at
        rec = TransferRecord(
            transaction_id=txn, transfer_id=tid, wallet=wallet, account_id=customer, type=kind,
            amount_minor=amount_minor, reference_id=doc.reference_id,
            created_at=created_at)
        return _Event(txn=txn, ms=ms_of(created_at), account=record, transfer=transfer,
                      record=rec, original=original)

    async def _existing(self, events: list[_Event], failed: dict[str, str]) -> int:
        """Mark the events whose transfer exists already (a retried or re-run page)."""
        if not events:
            return 0
        found = {t.id: t for t in await self._client.lookup_transfers(
            [e.transfer.id for e in events])}
        count = 0
        for event in events:
            t = found.get(event.transfer.id)
            if t is None:
                continue
            want = event.transfer
            if (t.debit_account_id, t.credit_account_id, t.amount, t.code) != (
                    want.debit_account_id, want.credit_account_id, want.amount, want.code):
                event.outcome = "failed"
                failed[event.txn] = f"transfer {want.id:032x} exists with other content"
                continue
            event.outcome, event.timestamp = "already", t.timestamp
            count += 1
        return count

    async def _plan_timestamps(
        self, fresh: list[_Event], last_transfer_ts: int, last_account_ts: int
    ) -> list[tb.Account]:
        """Timestamps for the new transfers and for the accounts they need that TigerBeetle
        does not hold yet (returned in creation order)."""
        if not fresh:
            return []
        ids = sorted({i for e in fresh
                      for i in (e.transfer.debit_account_id, e.transfer.credit_account_id)})
        present = {a.id for a in await self._client.lookup_accounts(ids)}
        planned: list[tb.Account] = []
        for event in fresh:
            base = event.ms * NS_PER_MS
            wanted: list[tb.Account] = []
            ledger = event.transfer.ledger
            if system_account_id(ledger, SystemAccount.RESERVE) not in present:
                wanted.extend(system_accounts(ledger))
            if event.record.account_id not in present:
                wanted.append(customer_account_of(event.account, self._deployment_tag))
            for account in wanted:
                account.timestamp = max(base, last_account_ts + 1)
                if account.timestamp >= base + TRANSFER_SLOT_OFFSET_NS:
                    raise refused(f"account {account.id:032x} would be created after "
                                  f"{timestamp_to_datetime(last_account_ts).isoformat()}, "
                                  "the newest account in the cluster")
                account.flags |= tb.AccountFlags.IMPORTED
                last_account_ts = account.timestamp
                present.add(account.id)
                planned.append(account)
            event.timestamp = max(base + TRANSFER_SLOT_OFFSET_NS, last_transfer_ts + 1)
            if event.timestamp >= base + NS_PER_MS:
                raise refused(f"transaction {event.txn} of "
                              f"{event.record.created_at.isoformat()} is older than "
                              f"{timestamp_to_datetime(last_transfer_ts).isoformat()}, the "
                              "newest transfer in the cluster")
            event.transfer.timestamp = event.timestamp
            last_transfer_ts = event.timestamp
        return planned

    async def _create_accounts(self, accounts: list[tb.Account]) -> None:
        """In timestamp order: the client cuts requests in order, so each imported account is
        still newer than every account before it."""
        if not accounts:
            return
        results = await self._client.create_accounts(accounts)
        assert len(results) == len(accounts)
        for account, result in zip(accounts, results, strict=True):
            if result.status in (_CAS.CREATED, _CAS.EXISTS):
                continue
            if result.status is _CAS.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS:
                raise refused("an account newer than the history appeared in the cluster")
            raise ConflictError(f"imported account {account.id:032x} (code {account.code},"
                                f" ledger {account.ledger}): {result.status.name}")

    async def _create_transfers(self, fresh: list[_Event], failed: dict[str, str]) -> None:
        if not fresh:
            return
        assert len(fresh) <= PAGE_LIMIT_MAX
        results = await self._client.create_transfers([e.transfer for e in fresh])
        assert len(results) == len(fresh)
        for event, result in zip(fresh, results, strict=True):
            status = result.status
            if status is _CTS.CREATED:
                continue
            if status is _CTS.EXISTS:
                event.outcome, event.timestamp = "already", result.timestamp
            elif status in TOO_LATE_TRANSFER:
                raise refused(f"TigerBeetle answered {status.name} for transaction {event.txn}")
            else:  # e.g. EXCEEDS_CREDITS: the residual opening balance holds its effect
                event.outcome = "failed"
                failed[event.txn] = f"imported transfer {event.transfer.id:032x}: {status.name}"

    async def _record(self, events: list[_Event], failed: dict[str, str]) -> None:
        """Transfer Registry entries like the live path writes: originals first (one bulk
        insert), then each void marks its original and is recorded itself."""
        landed = [e for e in events if e.outcome != "failed"]
        await self._record_many([e for e in landed if e.original is None], failed)
        gate = asyncio.Semaphore(MARK_CONCURRENCY)

        async def mark(event: _Event) -> _Event | None:
            assert event.original is not None
            async with gate:
                try:
                    await self._transfers.mark_voided(
                        event.original, void_transaction_id=event.txn,
                        void_transfer_id=event.transfer.id)
                except (AlreadyVoidedError, NotFoundError, InvalidInputError) as exc:
                    failed[event.txn] = f"transfer registry: {exc}"
                    return None
            return event

        marked = await asyncio.gather(*(mark(e) for e in landed if e.original is not None))
        await self._record_many([e for e in marked if e is not None], failed)

    async def _record_many(self, events: list[_Event], failed: dict[str, str]) -> None:
        """One unordered insert; records that exist already go through TransferRegistry.record,
        which accepts an identical one and refuses different content."""
        if not events:
            return
        records = [e.record.model_copy(
            update={"created_at": timestamp_to_datetime(e.timestamp)}) for e in events]
        for index, why in (await self._transfers.record_many(records)).items():
            failed[events[index].txn] = f"transfer registry: {why}"


def _output(cp: HistoryCheckpoint) -> HistoryPageOutput:
    return HistoryPageOutput(
        done=cp.status is HistoryStatus.DONE, total=cp.total, scanned=cp.scanned,
        imported=cp.imported, already=cp.already, skipped=cp.skipped, failed=cp.failed,
        failed_sample=dict(cp.failed_sample), pages=cp.pages, cut=cp.cut,
        reached=None if cp.after is None else cp.after.created_at)
