"""In flight or real? The durable evidence for the wallets whose stores differ.

We look at the stores' own records, not at the wallet workflows: a legacy operation (newer
than the wallet's imported version) whose deterministic TigerBeetle transfer id does not exist
yet is in the dual-write backlog; a TigerBeetle transfer with no legacy operation is in the
reverse projection. If exactly those operations close the difference, and none is older than
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
from stores.backfill_imports import ImportLedger, ImportStatus
from stores.legacy_store import LegacyStore, LoggedTransaction
from stores.tigerbeetle_store import TigerBeetleStore
from walletcore.balances import MinorBalance
from walletcore.ids import transfer_id, void_transfer_id
from walletcore.reconcile import (
    OPERATION_CODES,
    ZERO_BALANCE,
    OpEffect,
    legacy_op_effect,
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
        self, legacy: LegacyStore, tigerbeetle: TigerBeetleStore, imports: ImportLedger
    ) -> None:
        self._legacy = legacy
        self._client = tigerbeetle.client
        self._transfers = tigerbeetle.transfers
        self._imports = imports

    async def collect(self, subjects: list[Subject]) -> dict[str, Evidence]:
        found: dict[str, Evidence] = {s.canonical: Evidence() for s in subjects}
        if not subjects:
            return found
        assert len(subjects) <= PAGE_MAX
        now = datetime.now(UTC)
        side = await self._legacy_side(subjects, found)
        cuts = {s.canonical: await self._tb_cut(s) for s in subjects}
        id_list = list(set(side.derived.values()))
        # transfer id -> TigerBeetle timestamp (the client cuts the ids to its request limit)
        in_tb = {t.id: t.timestamp for t in await self._client.lookup_transfers(id_list)
                 } if id_list else {}
        twins = await self._legacy_twins([t for cut in cuts.values() for t in cut.transfers])
        for s in subjects:
            ev, cut = found[s.canonical], cuts[s.canonical]
            ev.tb_balance = cut.balance
            ops = side.ops[s.canonical]
            for op in ops:
                at = in_tb.get(side.derived[op.transaction_id])
                if at is None or at > cut.timestamp:
                    ev.legacy_only.append(legacy_op_effect(
                        op.type, op.amount_minor(s.key.currency),
                        original_type=side.original_types.get(op.original_transaction_id or ""),
                        age_s=_age_s(op.created_at, now), transaction_id=op.transaction_id))
            in_snapshot = {side.derived[op.transaction_id] for op in ops}
            _tigerbeetle_only(s, cut, in_snapshot, twins, ev, now)
        return found

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

    async def _legacy_twins(self, transfers: list[tb.Transfer]) -> dict[int, int]:
        """Transfer id -> the legacy version of the same transaction (by transaction id, via
        the Transfer Registry), for the transfers whose legacy twin exists."""
        ids = sorted({t.id for t in transfers if t.code in OPERATION_CODES})
        if not ids:
            return {}
        txn_of = await self._transfers.transactions_of(ids)
        versions = await self._legacy.transaction_versions(sorted(txn_of.values()))
        return {tid: versions[txn] for tid, txn in txn_of.items() if txn in versions}


def _tigerbeetle_only(
    s: Subject, cut: TigerBeetleCut, in_snapshot: set[int], twins: dict[int, int],
    ev: Evidence, now: datetime,
) -> None:
    """The cut's transfers that the legacy snapshot (versions <= V) does not hold."""
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
        twin_version = twins.get(t.id)
        if twin_version is not None and twin_version <= s.version:
            continue  # legacy holds it at or below V (older than the window)
        ev.tb_only.append(transfer_effect(
            customer_id=account_id, debit_account_id=t.debit_account_id,
            credit_account_id=t.credit_account_id, amount=t.amount,
            age_s=max(now.timestamp() - t.timestamp / 1e9, 0.0)))
