"""In flight or real? The durable evidence for the wallets whose stores differ.

We look at the stores' own records, not at the wallet workflows: a legacy operation (newer
than the wallet's imported version) whose deterministic TigerBeetle transfer id does not exist
yet may be in the dual-write backlog; a TigerBeetle transfer with no legacy operation may be in
the reverse projection. "May", because a write path must exist that carries it:
- a transfer counts only if the platform made it: a Transfer Registry record of this wallet
  under its id, with operation_leg's accounts, code and amount; any other is `unknown_transfer`;
- a registered transfer whose legacy operation is missing and that has a reverse outbox record
  (tb_primary's intent) is in flight iff that record is pending; without one it is reverse
  projection only where TigerBeetle answers (tb_primary since it was published, complete's
  drain): elsewhere MongoDB lost a write it answered (`lost_legacy_write`); one whose legacy
  operation is newer than the
  legacy snapshot was applied by both meanwhile (in flight in any phase);
- a legacy operation missing from TigerBeetle with a transactional outbox record is in flight
  iff that record is pending; without one it is backlog only in the dual-write phases (and
  tb_primary for what MongoDB answered before it): elsewhere `unapplied_legacy_operation`.
If exactly the carried operations close the difference, and none is older than
`in_flight_max_age_s`, the difference is in flight (walletcore.reconcile.classify decides).
Why not query each wallet workflow's `status`: a query needs a worker to replay that workflow
(costly for thousands of wallets), says nothing once the workflow closed, and is not what the
balances are made of.

Changes when what counts as "in flight" is read differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import tigerbeetle as tb

from activities.reconciliation.scan import Subject
from messages.reconciliation import PAGE_MAX
from mongobase.mongo import IN_CHUNK_MAX, as_utc, u128_to_hex
from registries.transfer_registry import TransferRecord
from stores.backfill_imports import ImportLedger, ImportStatus
from stores.legacy_store import LegacyStore, LoggedTransaction
from stores.migration_state import MigrationStateStore
from stores.tigerbeetle_store import TigerBeetleStore
from walletcore.balances import MinorBalance
from walletcore.ids import transfer_id, void_transfer_id
from walletcore.reconcile import (
    OPERATION_CODES,
    REGISTRATION_GRACE_S,
    ZERO_BALANCE,
    IssueKind,
    OpEffect,
    PhaseWindow,
    RegisteredOperation,
    TransferView,
    legacy_op_effect,
    legacy_op_may_be_in_flight,
    made_by_platform,
    tb_op_may_be_in_flight,
    transfer_effect,
)

RECENT_OPS_MAX = 32  # evidence window per differing wallet (each side)
Document = dict[str, Any]


@dataclass
class Evidence:
    legacy_only: list[OpEffect] = field(default_factory=list)
    tb_only: list[OpEffect] = field(default_factory=list)
    legacy_ops: list[Document] = field(default_factory=list)  # as reported
    tb_transfers: list[Document] = field(default_factory=list)  # as reported
    tb_balance: MinorBalance | None = None  # at the cut (None: no TigerBeetle account)


@dataclass
class TigerBeetleCut:
    """One consistent view of a TigerBeetle account: its balance right after the transfer at
    `timestamp` and its recent transfers up to that one (newest first)."""

    balance: MinorBalance | None
    timestamp: int
    transfers: list[tb.Transfer]


@dataclass
class _LegacySide:
    ops: dict[str, list[LoggedTransaction]]  # per wallet: in (imported version, V]
    original_types: dict[str, str]  # void originals' types
    derived: dict[str, int]  # transaction id -> its deterministic transfer id


@dataclass
class _Registered:
    """What the Transfer Registry and the legacy log say of the transfers one side lacks."""

    records: dict[int, TransferRecord]  # transfer id -> its record (registered ones)
    versions: dict[str, int]  # the records' transaction ids the legacy log holds -> version
    # the records' transaction ids with a reverse outbox record -> its state (read first)
    reverse_states: dict[str, str] = field(default_factory=dict)


def _age_s(at: datetime, now: datetime) -> float:
    return max((now - as_utc(at)).total_seconds(), 0.0)


def _reported_op(op: LoggedTransaction, imported: int) -> Document:
    return {"transaction_id": op.transaction_id, "type": op.type, "amount": str(op.amount),
            "version": op.wallet_version, "created_at": op.created_at,
            "in_opening": op.wallet_version <= imported}


class EvidenceReader:
    """Operations one store has and the other has not yet, for each differing wallet, on
    ONE consistent cut per side (traffic keeps running while we read):

    - legacy: the balance and version V read together; only operations with a version in
      (imported version, V] count (anything newer is not in that balance);
    - TigerBeetle: the account's most recent transfers, and its balance exactly at the
      newest of them (the account's history), so transfers and balance agree;
    - legacy_only: legacy operations <= V whose transfer was not in TigerBeetle at the cut;
      tb_only: transfers at the cut whose legacy operation (found by transaction id through
      the Transfer Registry) is not among the versions <= V: the reverse projection, or
      an operation both stores applied after the legacy snapshot."""

    def __init__(
        self, legacy: LegacyStore, tigerbeetle: TigerBeetleStore, imports: ImportLedger,
        migration: MigrationStateStore,
    ) -> None:
        self._legacy = legacy
        self._client = tigerbeetle.client
        self._transfers = tigerbeetle.transfers
        self._ledgers = tigerbeetle.ledgers
        self._imports = imports
        self._migration = migration

    async def collect(self, subjects: list[Subject]) -> dict[str, Evidence]:
        found: dict[str, Evidence] = {s.canonical: Evidence() for s in subjects}
        if not subjects:
            return found
        assert len(subjects) <= PAGE_MAX
        now = datetime.now(UTC)
        windows = await self._windows(subjects)
        side = await self._legacy_side(subjects, found)
        cuts = {s.canonical: await self._tb_cut(s) for s in subjects}
        # Outbox records before TigerBeetle (see legacy_op_may_be_in_flight).
        outbox_states = await self._legacy.outbox.states_of(list(side.derived))
        id_list = list(set(side.derived.values()))
        # transfer id -> TigerBeetle timestamp (the client cuts the ids to its request limit)
        in_tb = {t.id: t.timestamp for t in await self._client.lookup_transfers(id_list)
                 } if id_list else {}
        snapshots = {s.canonical: {side.derived[op.transaction_id] for op in side.ops[s.canonical]}
                     for s in subjects}
        registered = await self._registered([
            t for s in subjects for t in cuts[s.canonical].transfers
            if t.code in OPERATION_CODES and t.id not in snapshots[s.canonical]])
        for s in subjects:
            ev, cut = found[s.canonical], cuts[s.canonical]
            window = windows[s.key.ledger_pair]
            ev.tb_balance = cut.balance
            for op in side.ops[s.canonical]:
                at = in_tb.get(side.derived[op.transaction_id])
                if at is None or at > cut.timestamp:
                    carried = legacy_op_may_be_in_flight(
                        window, as_utc(op.created_at).timestamp(),
                        outbox_state=outbox_states.get(op.transaction_id),
                        in_tigerbeetle=at is not None)
                    ev.legacy_only.append(legacy_op_effect(
                        op.type, op.amount_minor(s.key.currency),
                        original_type=side.original_types.get(op.original_transaction_id or ""),
                        age_s=_age_s(op.created_at, now), transaction_id=op.transaction_id,
                        real_kind=None if carried else IssueKind.UNAPPLIED_LEGACY_OPERATION))
            ledger = self._ledgers.ledger_of(s.key.currency, s.key.country)
            _tigerbeetle_only(s, cut, snapshots[s.canonical], registered, ev, now,
                              window=window, ledger=ledger)
        return found

    async def _windows(self, subjects: list[Subject]) -> dict[str, PhaseWindow]:
        """Each pair's phase now, read fresh (not cached): a phase switched since the page was
        read must not make an operation the old phase carried look stray, nor the reverse."""
        windows: dict[str, PhaseWindow] = {}
        for pair in sorted({s.key.ledger_pair for s in subjects}):
            state = await self._migration.resolve(pair, fresh=True)
            windows[pair] = PhaseWindow(
                phase=state.phase,
                since_s=None if state.updated_at is None else as_utc(state.updated_at).timestamp())
        return windows

    async def _legacy_side(
        self, subjects: list[Subject], found: dict[str, Evidence]
    ) -> _LegacySide:
        """Each wallet's recent legacy operations above its imported version (and all of them,
        as reported), the types of the originals its voids reverse, the derived ids."""
        imports = await self._imports.get_many([s.canonical for s in subjects])
        side = _LegacySide(ops={}, original_types={}, derived={})
        originals: set[str] = set()
        for s in subjects:
            record = imports.get(s.canonical)
            imported = record.version if record and record.status is ImportStatus.DONE else 0
            ops = await self._legacy.recent_transactions(
                s.canonical, max_version=s.version, limit=RECENT_OPS_MAX)
            side.ops[s.canonical] = [op for op in ops if op.wallet_version > imported]
            found[s.canonical].legacy_ops = [_reported_op(op, imported) for op in ops]
            originals.update(op.original_transaction_id for op in ops
                             if op.type == "void" and op.original_transaction_id)
        wanted = sorted(originals)
        for start in range(0, len(wanted), IN_CHUNK_MAX):  # scattered ids: key lookups
            side.original_types.update(await self._legacy.transaction_types(
                wanted[start:start + IN_CHUNK_MAX]))
        for ops in side.ops.values():
            for op in ops:
                side.derived[op.transaction_id] = (
                    void_transfer_id(op.original_transaction_id)
                    if op.type == "void" and op.original_transaction_id
                    else transfer_id(op.transaction_id))
        return side

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
            return TigerBeetleCut(
                balance=MinorBalance.from_posted(s.account.credits_posted,
                                                 s.account.debits_posted),
                timestamp=s.account.timestamp, transfers=[])
        at = balances[0]
        return TigerBeetleCut(
            balance=MinorBalance.from_posted(at.credits_posted, at.debits_posted),
            timestamp=newest, transfers=transfers)

    async def _registered(self, transfers: list[tb.Transfer]) -> _Registered:
        """The Transfer Registry records of `transfers` (by transfer id) and the legacy
        versions of the records' transactions (those the legacy log holds)."""
        ids = sorted({t.id for t in transfers})
        if not ids:
            return _Registered(records={}, versions={})
        records = await self._transfers.records_of_transfers(ids)
        txns = sorted({r.transaction_id for r in records.values()})
        # Reverse outbox records before the legacy log (see tb_op_may_be_in_flight).
        reverse_states = await self._legacy.outbox.reverse_states_of(txns)
        versions = await self._legacy.transaction_versions(txns)
        return _Registered(records=records, versions=versions, reverse_states=reverse_states)


def _registered_op(record: TransferRecord | None) -> RegisteredOperation | None:
    return None if record is None else RegisteredOperation(
        transaction_id=record.transaction_id, transfer_id=record.transfer_id,
        wallet=record.wallet.canonical, account_id=record.account_id, type=record.type,
        amount_minor=record.amount_minor)


def _tigerbeetle_only(
    s: Subject, cut: TigerBeetleCut, in_snapshot: set[int], registered: _Registered,
    ev: Evidence, now: datetime, *, window: PhaseWindow, ledger: int,
) -> None:
    """The cut's transfers that the legacy snapshot (versions <= V) does not hold, each
    judged: made by the platform? its legacy operation newer than V, or missing (carried by
    the reverse projection, or lost)?"""
    if s.account is None:
        return
    account_id = s.account.id
    ev.tb_transfers = [
        {"id": u128_to_hex(t.id), "code": t.code, "amount": t.amount,
         "side": "credit" if t.credit_account_id == account_id else "debit",
         "timestamp": t.timestamp} for t in cut.transfers]
    for t in cut.transfers:
        if t.code not in OPERATION_CODES or t.id in in_snapshot:
            continue
        record = registered.records.get(t.id)
        view = TransferView(id=t.id, debit_account_id=t.debit_account_id,
                            credit_account_id=t.credit_account_id, amount=t.amount, code=t.code)
        real_kind: IssueKind | None = None
        age_s = max(now.timestamp() - t.timestamp / 1e9, 0.0)
        if record is None and age_s < REGISTRATION_GRACE_S:
            ref = f"transfer:{u128_to_hex(t.id)}"  # its registration may still be on its way
        elif record is None or not made_by_platform(
                _registered_op(record), view, wallet=s.canonical, ledger=ledger):
            real_kind, ref = IssueKind.UNKNOWN_TRANSFER, f"transfer:{u128_to_hex(t.id)}"
        else:
            ref = record.transaction_id
            version = registered.versions.get(record.transaction_id)
            if version is not None and version <= s.version:
                continue  # legacy holds it at or below V (older than the window)
            if version is None and not tb_op_may_be_in_flight(
                    window, t.timestamp / 1e9,
                    reverse_state=registered.reverse_states.get(record.transaction_id)):
                real_kind = IssueKind.LOST_LEGACY_WRITE
        ev.tb_only.append(transfer_effect(
            customer_id=account_id, debit_account_id=t.debit_account_id,
            credit_account_id=t.credit_account_id, amount=t.amount,
            age_s=age_s, transaction_id=ref, real_kind=real_kind))
