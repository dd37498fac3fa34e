"""The legacy wallet store on MongoDB: `wallets` and `wallet_transactions`.

Every write is one MongoDB transaction covering the wallet update and the transaction insert.
The wallet update is conditional on the `version` read in the same transaction (optimistic
concurrency), so two writers can never both apply on the same version: the loser gets a
write conflict or a zero match, re-reads and tries again (bounded, jittered). The transaction
id is the `_id` of `wallet_transactions`, which makes replays detectable and duplicates
impossible; a unique (wallet, wallet_version) index is a second guard against lost updates.

Hot path: this process remembers the wallet document its last write produced (bounded cache).
A credit or debit is then decided from that snapshot and written as a compare-and-swap: the
update's filter holds every field the decision used (version, balances, overdraft flag), so it
matches only a document still exactly as remembered, and the transaction insert's unique `_id`
catches a replayed id (its error aborts the transaction, wallet update included). Two round
trips (one bulkWrite carrying the update and the insert, then commit) instead of five; any
surprise (no match, duplicate key, a refusal by the snapshot) forgets the snapshot and runs
the full read-decide-write attempt. Voids and a wallet's first write always take that path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import bson
from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING, DESCENDING, IndexModel, InsertOne, UpdateMany, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.cursor import AsyncCursor
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ClientBulkWriteException, DuplicateKeyError, PyMongoError

from mongobase.mongo import (
    PAGE_LIMIT_MAX,
    TXN_ATTEMPTS_MAX,
    abort_quietly,
    as_utc,
    backoff,
    commit,
    decimal128_to_minor,
    duplicate_key_indexes,
    int_to_bson,
    is_retryable_txn_error,
    minor_to_decimal128,
    now_ms,
)
from mongobase.queries import (
    Created,
    find_in,
    find_keys,
    pair_fields_filter,
    scope_regex,
    wallet_key_filter,
)
from stores.group_commit import GROUP_OPS_MAX, GroupCommitter
from stores.outbox import Outbox, OutboxIntent
from stores.store_metrics import instrument_wallet_store, operation_label
from walletcore.balances import MinorBalance, WalletBalance
from walletcore.errors import (
    AlreadyVoidedError,
    DuplicateTransactionError,
    InsufficientFundsError,
    InvalidInputError,
    NotFoundError,
    NotVoidableError,
    StoreUnavailableError,
    WalletError,
)
from walletcore.keys import WalletKey
from walletcore.ledgers import DEFAULT_LEDGER_TABLE, LedgerTable
from walletcore.money import from_minor
from walletcore.operations import (
    HISTORY_LIMIT_MAX,
    AddCredit,
    HistoryEntry,
    OperationResult,
    OperationType,
    SubtractCredit,
    Void,
    WalletOperation,
    validate_operation,
)
from walletcore.write_facts import LegacyFacts, OriginalFacts

log = logging.getLogger(__name__)

WALLETS = "wallets"
WALLET_TRANSACTIONS = "wallet_transactions"
SOURCE = "mongodb"
MULTI_BALANCE_LIMIT_MAX = 1000  # wallets of one client: (country, currency, issuer) combos
SNAPSHOTS_MAX = 10_000  # wallets remembered per process for the compare-and-swap hot path
GAP_OPERATIONS_MAX = 64  # operations one gap fill reads (see movements_between)
LOG_ORDER_INDEX = "history_order"  # the log in (created_at, wallet, wallet_version) order
# Transaction attempts in flight per process. More buys nothing (the server applies them one
# core's worth at a time) and costs: each concurrent attempt holds its own server session, and
# SecantusDB keeps every session that ever ran a transaction and scans them all on each
# statement, so a wide fan-out makes every later write slower for the server's lifetime.
SESSIONS_MAX_DEFAULT = 16
# Operations one batched reverse-projection transaction writes (apply_reverse_batch): bounds
# the transaction's size and how long it holds its wallets' documents.
BATCH_OPERATIONS_MAX = 512
# Hot-path writes (credits and debits decided from a snapshot, with their dual-write outbox
# record) arriving while another is being committed share the next transaction
# (stores.group_commit: one bulkWrite and one commit for up to GROUP_OPS_MAX wallets; alone
# again when that transaction fails). WALLETMIG_LEGACY_GROUP_COMMIT=off switches it off for a
# process (the benchmarks' before runs): every write is its own transaction, as before.
GROUP_COMMIT_DEFAULT = os.environ.get("WALLETMIG_LEGACY_GROUP_COMMIT", "on").lower() != "off"

Document = dict[str, Any]
Applied = tuple[OperationResult, LegacyFacts]


class HistoryCursor(BaseModel):
    """A position in the legacy log's (created_at, wallet, wallet_version) order."""

    model_config = ConfigDict(frozen=True)

    created_at: datetime
    wallet: str
    wallet_version: int = Field(ge=0)


@dataclass(frozen=True)
class LoggedTransaction:
    """One `wallet_transactions` document as the history import reads it. The amount stays
    encoded: the importer decodes it with the wallet's currency and counts a bad one as a
    failed transaction, not a failed page."""

    transaction_id: str
    wallet: str  # canonical key
    type: str
    amount: Any  # Decimal128 as stored
    reference_id: str | None
    original_transaction_id: str | None
    wallet_version: int
    created_at: datetime

    @property
    def position(self) -> HistoryCursor:
        return HistoryCursor(created_at=self.created_at, wallet=self.wallet,
                             wallet_version=self.wallet_version)

    def amount_minor(self, currency: str) -> int:
        return decimal128_to_minor(self.amount, currency, field="amount")


class _VersionConflict(Exception):
    """Another writer changed the wallet (or the voided original) since this attempt read it."""


@dataclass(frozen=True)
class _Snapshot:
    """A wallet document as this process last wrote or read it: what a write decides from."""

    balance: MinorBalance
    fields: Document  # the stored Decimal128 balance fields, matched verbatim by the CAS
    version: int
    allow_overdraft: bool


@dataclass(frozen=True)
class _SnapshotPlan:
    """A hot-path write decided from a snapshot: its compare-and-swap update and inserts, what
    it answers once committed, and the wallet after it."""

    canonical: str
    writes: list[UpdateOne | InsertOne[Document]]  # the CAS update first, then the inserts
    applied: Applied
    snapshot: _Snapshot
    sized: tuple[Document, ...]  # its documents and filter: what the group's byte bound counts

    def size(self) -> int:
        """Bytes of its documents and filter (asked only when it queues for a group)."""
        return sum(len(bson.encode(d)) for d in self.sized)


@dataclass
class _ChainPlan:
    """One wallet's part of a batched reverse-projection transaction (apply_reverse_batch)."""

    canonical: str
    version: int  # the wallet's version as read (the compare-and-swap's condition)
    count: int  # operations written (the chain's first `count`)
    docs: list[Document]  # their wallet_transactions documents, in order
    snapshot: _Snapshot | None  # the wallet after them


class _Snapshots:
    """Bounded LRU of wallet snapshots. Never trusted alone: every use is a compare-and-swap."""

    def __init__(self, limit: int = SNAPSHOTS_MAX) -> None:
        assert 0 < limit <= 1_000_000
        self._limit = limit
        self._items: OrderedDict[str, _Snapshot] = OrderedDict()

    def get(self, key: str) -> _Snapshot | None:
        snap = self._items.get(key)
        if snap is not None:
            self._items.move_to_end(key)
        return snap

    def put(self, key: str, snap: _Snapshot) -> None:
        current = self._items.get(key)
        if current is not None and current.version > snap.version:
            return  # a concurrent writer (serialize_local=False) already stored a newer one
        self._items[key] = snap
        self._items.move_to_end(key)
        while len(self._items) > self._limit:
            self._items.popitem(last=False)

    def forget(self, key: str) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


class _KeyedLocks:
    """One asyncio.Lock per key while anyone holds or waits for it (no unbounded growth)."""

    def __init__(self) -> None:
        self._slots: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._slots.get(key, (asyncio.Lock(), 0))
        self._slots[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._slots[key]
            if users == 1:
                del self._slots[key]
            else:
                self._slots[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._slots)


class LegacyStore:
    """walletcore.ports.WalletStore on the legacy MongoDB collections."""

    name = SOURCE

    def __init__(
        self,
        db: AsyncDatabase[Any],
        *,
        ledgers: LedgerTable | None = DEFAULT_LEDGER_TABLE,
        attempts_max: int = TXN_ATTEMPTS_MAX,
        serialize_local: bool = True,
        sessions_max: int = SESSIONS_MAX_DEFAULT,
        group_commit: bool = GROUP_COMMIT_DEFAULT,
    ) -> None:
        """`ledgers`: reject wallets whose currency:country has no ledger, exactly as the
        TigerBeetle store does (None turns the check off for legacy-only pairs).
        `serialize_local`: queue this process's writers per wallet before the transaction.
        Correctness never depends on it (the version check does that across processes); it
        turns a storm of write conflicts into an orderly queue.
        `sessions_max`: transaction attempts in flight in this process (see SESSIONS_MAX_DEFAULT).
        `group_commit`: see GROUP_COMMIT_DEFAULT (`group_commit.enabled` switches it later).
        """
        assert 0 < attempts_max <= 10_000
        assert 0 < sessions_max <= 10_000
        self._client = db.client
        self._wallets: AsyncCollection[Any] = db[WALLETS]
        self._txns: AsyncCollection[Any] = db[WALLET_TRANSACTIONS]
        # The dual-write outbox: written in the same transaction as the legacy write.
        self.outbox = Outbox(db)
        self._ledgers = ledgers
        self._attempts_max = attempts_max
        self._local_locks = _KeyedLocks() if serialize_local else None
        self._snapshots = _Snapshots()
        self._sessions_gate = asyncio.Semaphore(sessions_max)
        self.group_commit = GroupCommitter(self._commit_group, size_of=_SnapshotPlan.size)
        self.group_commit.enabled = group_commit
        self.conflict_retries = 0  # observability: how often optimistic concurrency retried
        self.attempts_peak = 0  # observability: most attempts one operation needed
        self.snapshot_misses = 0  # observability: hot-path attempts that fell back to reads

    async def ensure_indexes(self) -> None:
        """Idempotent: same names and specs every time."""
        await self._wallets.create_indexes(
            [
                IndexModel([("client_id", ASCENDING)], name="client_id"),
                IndexModel(
                    [("currency", ASCENDING), ("country", ASCENDING), ("_id", ASCENDING)],
                    name="currency_country_id",
                ),
            ]
        )
        # Only the indexes a query uses: each one is written by every operation's insert
        # (dropping `wallet_created` and `reference_id`, which no query used, cut SecantusDB's
        # CPU per hot-path write by ~10 %). A wallet's transactions are read by (wallet,
        # wallet_version) below, and by `_id`. Deployments created before keep the two indexes
        # until an operator drops them (nothing here drops an index).
        # Not here: the log-order index (ensure_log_order_index). Only a migration reads the log
        # by time (the history import, the unapplied-writes gate), so it is built when one
        # runs (the gate's first evidence round, MigrationActivities.ensure_gate_index), not
        # paid by every write of a deployment that never migrates.
        await self._txns.create_indexes(
            [
                # One transaction per wallet version: a lost update cannot be stored.
                IndexModel(
                    [("wallet", ASCENDING), ("wallet_version", ASCENDING)],
                    name="wallet_version",
                    unique=True,
                ),
            ]
        )
        await self.outbox.ensure_indexes()

    # ---- writes ------------------------------------------------------------------------------

    async def add_credit(self, op: AddCredit) -> OperationResult:
        return (await self.apply(op))[0]

    async def subtract_credit(self, op: SubtractCredit) -> OperationResult:
        return (await self.apply(op))[0]

    async def void(
        self, op: Void, *, opening_original: OriginalFacts | None = None
    ) -> OperationResult:
        # MongoDB holds every original itself: `opening_original` is for TigerBeetle.
        del opening_original
        return (await self.apply(op))[0]

    async def apply(self, op: WalletOperation, *, outbox: OutboxIntent | None = None) -> Applied:
        """Any write, with the facts the TigerBeetle side of a dual-write needs (the wallet
        version it produced, a void's original), read in the same transaction: no extra I/O.
        `outbox`: a fresh write also inserts its TigerBeetle-bound record (stores.outbox) in
        the same transaction: committed together or not at all. A replay writes nothing."""
        amount_minor = self._validate(op)
        if outbox is not None:
            assert outbox.command.op == op, "outbox intent of another operation"
        if isinstance(op, Void):
            return await self._run(op, OperationType.VOID, 0, outbox)
        kind = OperationType.DEBIT if isinstance(op, SubtractCredit) else OperationType.CREDIT
        return await self._run(op, kind, amount_minor, outbox)

    async def replay_of(self, op: WalletOperation) -> OperationResult | None:
        """The stored result if `op`'s transaction id was applied here (replayed=True), None
        if unknown; DuplicateTransactionError if the id was used for other content. Lets a
        TigerBeetle-first write path keep idempotency over transactions older than TigerBeetle.
        """
        amount_minor = self._validate(op)
        existing: Document | None = await self._txns.find_one({"_id": op.transaction_id})
        if existing is None:
            return None
        kind = (
            OperationType.VOID
            if isinstance(op, Void)
            else OperationType.DEBIT
            if isinstance(op, SubtractCredit)
            else OperationType.CREDIT
        )
        return self._replay(op, kind, amount_minor, existing)

    async def facts_of(self, transaction_id: str) -> LegacyFacts | None:
        """The facts of a stored transaction (backlog items recorded before they were carried)."""
        doc = await self._txns.find_one({"_id": transaction_id})
        if doc is None:
            return None
        return await self._facts(None, doc)

    async def movements_between(
        self, wallet: WalletKey, after_version: int, before_version: int
    ) -> list[tuple[str, AddCredit | None]]:
        """The wallet's stored operations with after_version < wallet_version <
        before_version, in version order, at most GAP_OPERATIONS_MAX: (transaction id, the
        credit or debit rebuilt as its operation, or None for a void). For the dual-write
        backlog's gap fill (activities.wallet)."""
        assert 0 <= after_version < before_version
        if before_version - after_version <= 1:
            return []
        docs = await self._txns.find({
            "wallet": wallet.canonical,
            "wallet_version": {"$gt": after_version, "$lt": before_version},
        }).sort("wallet_version", ASCENDING).limit(GAP_OPERATIONS_MAX).to_list(GAP_OPERATIONS_MAX)
        if not docs:
            return []
        allow_overdraft = await self.overdraft_allowed(wallet)
        movements: list[tuple[str, AddCredit | None]] = []
        for doc in docs:
            if doc["type"] == OperationType.VOID:
                movements.append((doc["_id"], None))
                continue
            amount_minor = decimal128_to_minor(doc["amount"], wallet.currency, field="amount")
            kind = SubtractCredit if doc["type"] == OperationType.DEBIT else AddCredit
            movements.append((doc["_id"], kind(
                wallet=wallet, transaction_id=doc["_id"],
                amount=from_minor(amount_minor, wallet.currency),
                reference_id=doc.get("reference_id"), allow_overdraft=allow_overdraft)))
        return movements

    def _validate(self, op: AddCredit | Void) -> int:
        """Everything checkable without I/O, before anything is read or written."""
        amount_minor = validate_operation(op)
        if self._ledgers is not None:
            self._ledgers.ledger_of(op.wallet.currency, op.wallet.country)
        return amount_minor

    async def _run(
        self, op: AddCredit | Void, kind: OperationType, amount_minor: int,
        outbox: OutboxIntent | None = None,
    ) -> Applied:
        """Bounded optimistic-concurrency loop around one transaction attempt."""
        if self._local_locks is None:
            return await self._run_unlocked(op, kind, amount_minor, outbox)
        async with self._local_locks.hold(op.wallet.canonical):
            return await self._run_unlocked(op, kind, amount_minor, outbox)

    async def _run_unlocked(
        self, op: AddCredit | Void, kind: OperationType, amount_minor: int,
        outbox: OutboxIntent | None,
    ) -> Applied:
        try:
            for attempt in range(self._attempts_max):
                try:
                    plan = (None if kind == OperationType.VOID
                            else self._snapshot_plan(op, kind, amount_minor, outbox))
                    if plan is not None:
                        fast = await self._write_snapshot_plan(plan)
                        if fast is not None:
                            return fast
                    # Per attempt, so a wallet stuck in conflicts backs off without a slot.
                    async with self._sessions_gate, self._client.start_session() as session:
                        return await self._attempt(session, op, kind, amount_minor, outbox)
                except _VersionConflict:
                    pass
                except PyMongoError as exc:
                    if not is_retryable_txn_error(exc):
                        raise
                self.conflict_retries += 1
                self.attempts_peak = max(self.attempts_peak, attempt + 2)
                await backoff(attempt)
        except PyMongoError as exc:
            raise StoreUnavailableError(f"MongoDB: {exc}", field=None) from exc
        raise StoreUnavailableError(
            f"{op.transaction_id}: still conflicting after {self._attempts_max} attempts",
            field="transaction_id",
        )

    async def _attempt(
        self,
        session: AsyncClientSession,
        op: AddCredit | Void,
        kind: OperationType,
        amount_minor: int,
        outbox: OutboxIntent | None = None,
    ) -> Applied:
        await session.start_transaction()
        canonical = op.wallet.canonical
        try:
            applied, snap = await self._apply(session, op, kind, amount_minor)
            if outbox is not None and not applied[0].replayed:
                await self.outbox.insert_in(session, outbox.document(applied[1], now_ms()))
        except BaseException:
            await abort_quietly(session)
            raise
        if applied[0].replayed:  # read-only: nothing to commit
            await abort_quietly(session)
            return applied
        try:
            await commit(session)
        except BaseException:
            self._snapshots.forget(canonical)  # outcome unknown: the next write reads
            raise
        assert snap is not None, "a fresh write leaves a snapshot"
        self._snapshots.put(canonical, snap)
        return applied

    def _snapshot_plan(
        self,
        op: AddCredit | Void,
        kind: OperationType,
        amount_minor: int,
        outbox: OutboxIntent | None = None,
    ) -> _SnapshotPlan | None:
        """A credit or debit decided from this process's snapshot of the wallet, as the
        compare-and-swap writes that apply it (no I/O). None when the snapshot cannot decide
        (absent, or a refusal that a fresh read must confirm): the caller runs `_attempt`."""
        assert kind in (OperationType.CREDIT, OperationType.DEBIT) and amount_minor > 0
        wallet = op.wallet
        canonical = wallet.canonical
        snap = self._snapshots.get(canonical)
        if snap is None:
            return None
        if kind == OperationType.DEBIT:
            after = snap.balance.apply_debit(amount_minor)
            if not snap.allow_overdraft and after.net_minor < 0:
                # Refusals come from a fresh read: the id may be a replay of an applied debit.
                return None
        else:
            after = snap.balance.apply_credit(amount_minor)
        now = now_ms()
        balance_fields = _balance_fields(after, wallet.currency)
        version = snap.version + 1
        txn_doc = _txn_doc(op, kind, amount_minor, balance_fields, version, now)
        # Matches only the document the decision was computed from (also an edit that
        # did not bump the version).
        cas = _cas_filter(canonical, {
            "version": snap.version,
            "allow_overdraft": snap.allow_overdraft,
            **snap.fields,
        })
        change = {"$set": {**balance_fields, "version": version, "updated_at": now}}
        facts = LegacyFacts(wallet_version=version, original=None)
        docs = [txn_doc]
        writes: list[UpdateOne | InsertOne[Document]] = [
            UpdateOne(cas, change, namespace=self._wallets.full_name),
            InsertOne(txn_doc, namespace=self._txns.full_name),
        ]
        if outbox is not None:  # the TigerBeetle-bound record, same transaction
            docs.append(outbox.document(facts, now))
            writes.append(InsertOne(docs[-1], namespace=self.outbox.namespace))
        return _SnapshotPlan(
            canonical=canonical, writes=writes, applied=(_result(txn_doc, wallet,
                                                                 replayed=False), facts),
            snapshot=_Snapshot(balance=after, fields=balance_fields, version=version,
                               allow_overdraft=snap.allow_overdraft),
            sized=(*docs, cas))

    async def _write_snapshot_plan(self, plan: _SnapshotPlan) -> Applied | None:
        """The plan in a group with other wallets' (stores.group_commit) when a commit is in
        flight, else alone at once; alone again if the group did not commit. None: the
        snapshot was stale or the id used (the caller reads and decides: `_attempt`)."""
        async with self.group_commit.turn(plan, key=plan.canonical) as committed:
            if committed:
                return plan.applied
            async with self._sessions_gate, self._client.start_session() as session:
                return await self._write_alone(session, plan)

    async def _write_alone(
        self, session: AsyncClientSession, plan: _SnapshotPlan
    ) -> Applied | None:
        """The plan's writes in one transaction of their own (two round trips)."""
        canonical = plan.canonical
        await session.start_transaction()
        matched: bool
        try:
            # All writes in one round trip (MongoDB 8 bulkWrite). Ordered: an insert error
            # stops the batch; a zero match does not, and the abort below discards the insert.
            written = await self._client.bulk_write(
                plan.writes,
                session=session,
                ordered=True,
            )
            matched = (written.matched_count == 1
                       and written.inserted_count == len(plan.writes) - 1)
        except (DuplicateKeyError, ClientBulkWriteException) as exc:
            if not _only_duplicate_keys(exc):
                self._snapshots.forget(canonical)
                await abort_quietly(session)
                # The retry policy judges the server's error (a write conflict arrives wrapped).
                cause = exc.error if isinstance(exc, ClientBulkWriteException) else None
                if isinstance(cause, PyMongoError):
                    raise cause from exc
                raise
            matched = False  # the id was used before (or a racing version): read and decide
        except BaseException:
            self._snapshots.forget(canonical)
            await abort_quietly(session)
            raise
        if not matched:
            self._snapshots.forget(canonical)
            self.snapshot_misses += 1
            await abort_quietly(session)
            return None
        try:
            await commit(session)
        except BaseException:
            self._snapshots.forget(canonical)
            raise
        self._snapshots.put(canonical, plan.snapshot)
        return plan.applied

    async def _commit_group(self, plans: list[_SnapshotPlan]) -> bool:
        """Many wallets' snapshot plans in ONE transaction: one bulkWrite (every compare-and-
        swap and insert), one commit. True iff all committed; False: nothing was written (a
        stale snapshot, a used id, any error) and each plan goes alone (GroupCommitter)."""
        assert 0 < len(plans) <= GROUP_OPS_MAX
        assert len({p.canonical for p in plans}) == len(plans), "one plan per wallet"
        writes = [w for p in plans for w in p.writes]
        inserts = len(writes) - len(plans)

        async def write(session: AsyncClientSession) -> bool:
            result = await self._client.bulk_write(writes, session=session, ordered=True)
            if result.matched_count != len(plans) or result.inserted_count != inserts:
                raise _VersionConflict
            return True

        try:
            committed = await self._all_or_nothing(write)
        except StoreUnavailableError:
            return False  # each plan alone meets the error itself, as without the group
        if not committed:
            return False
        for plan in plans:
            self._snapshots.put(plan.canonical, plan.snapshot)
        return True

    async def _all_or_nothing(
        self, write: Callable[[AsyncClientSession], Awaitable[bool]]
    ) -> bool | None:
        """`write`'s statements in ONE transaction: committed if it returns True, aborted if
        False (nothing to write). None: nothing was written and the caller can apply the
        operations one by one (a compare-and-swap that no longer matched, a duplicate key, a
        retryable error). Any other error: StoreUnavailableError."""
        try:
            async with self._sessions_gate, self._client.start_session() as session:
                await session.start_transaction()
                try:
                    written = await write(session)
                except BaseException:
                    await abort_quietly(session)
                    raise
                if not written:
                    await abort_quietly(session)
                    return False
                await commit(session)
                return True
        except (_VersionConflict, ClientBulkWriteException, DuplicateKeyError):
            return None
        except PyMongoError as exc:
            if is_retryable_txn_error(exc):
                return None
            raise StoreUnavailableError(f"MongoDB: {exc}", field=None) from exc

    async def apply_reverse_batch(
        self, chains: Sequence[Sequence[AddCredit]]
    ) -> list[int] | None:
        """tb_primary's reverse projection, batched (activities.reverse_outbox): many wallets'
        credits and debits (each chain one wallet's, in TigerBeetle's order) written in ONE
        transaction together with their `wallet_outbox_to_mongodb` marks: a record is marked
        iff its write committed, so a crash anywhere applies nothing twice and loses nothing.
        Per chain, how many of its first operations were written: a chain stops before an
        operation the batch does not decide (an id already stored: a replay or a duplicate; a
        debit the balance does not cover without overdraft; an unknown wallet); the caller
        applies the rest one by one (`apply`), after this commits. None: nothing was written (a
        concurrent write to one of the wallets, a record no longer pending, a retryable error):
        the caller applies every chain one by one, as before."""
        assert sum(len(c) for c in chains) <= BATCH_OPERATIONS_MAX
        assert len({c[0].wallet.canonical for c in chains if c}) == len([c for c in chains if c])
        planned: list[_ChainPlan] = []

        async def write(session: AsyncClientSession) -> bool:
            planned[:] = await self._plan_chains(session, chains)
            return await self._write_planned(session, planned)

        try:
            committed = await self._all_or_nothing(write)
        except StoreUnavailableError:
            self._forget_chains(chains)
            raise
        if committed is None:
            self._forget_chains(chains)
            return None
        if not committed:
            return [0] * len(chains)
        for plan in planned:
            if plan.count and plan.snapshot is not None:
                self._snapshots.put(plan.canonical, plan.snapshot)
        return [p.count for p in planned]

    def _forget_chains(self, chains: Sequence[Sequence[AddCredit]]) -> None:
        for chain in chains:
            if chain:
                self._snapshots.forget(chain[0].wallet.canonical)

    async def _plan_chains(
        self, session: AsyncClientSession, chains: Sequence[Sequence[AddCredit]]
    ) -> list[_ChainPlan]:
        """Each chain's decidable prefix from the wallets and ids as this transaction reads
        them (two reads for the whole batch)."""
        ids = [op.transaction_id for chain in chains for op in chain]
        canonicals = [chain[0].wallet.canonical for chain in chains if chain]
        stored = {d["_id"] for d in await self._txns.find(
            {"_id": {"$in": ids}}, {"_id": 1}, session=session).to_list(None)}
        wallets = {d["_id"]: d for d in await self._wallets.find(
            {"_id": {"$in": canonicals}}, session=session).to_list(None)}
        now = now_ms()
        plans: list[_ChainPlan] = []
        for chain in chains:
            wallet_doc = wallets.get(chain[0].wallet.canonical) if chain else None
            plans.append(self._plan_chain(chain, wallet_doc, stored, now))
        return plans

    def _plan_chain(
        self, chain: Sequence[AddCredit], wallet_doc: Document | None, stored: set[str],
        now: datetime,
    ) -> _ChainPlan:
        if wallet_doc is None:  # unknown wallet (or an empty chain): one by one
            return _ChainPlan(canonical="", version=0, count=0, docs=[], snapshot=None)
        wallet = chain[0].wallet
        balance = _balance_of(wallet_doc, wallet.currency)
        version = int(wallet_doc["version"])
        allow_overdraft = bool(wallet_doc["allow_overdraft"])
        fields = _balance_fields(balance, wallet.currency)
        docs: list[Document] = []
        for op in chain:
            assert not isinstance(op, Void) and op.wallet.canonical == wallet.canonical
            if op.transaction_id in stored:
                break  # a replay or a duplicate id: the one-by-one path decides
            try:
                amount_minor = self._validate(op)
            except WalletError:
                break  # refused: the one-by-one path records the refusal
            debit = isinstance(op, SubtractCredit)
            after = balance.apply_debit(amount_minor) if debit else balance.apply_credit(
                amount_minor)
            if debit and not allow_overdraft and after.net_minor < 0:
                break  # the one-by-one path reads afresh and refuses (a divergence)
            balance, fields = after, _balance_fields(after, wallet.currency)
            kind = OperationType.DEBIT if debit else OperationType.CREDIT
            docs.append(_txn_doc(op, kind, amount_minor, fields, version + len(docs) + 1, now))
        snapshot = _Snapshot(balance=balance, fields=fields, version=version + len(docs),
                             allow_overdraft=allow_overdraft)
        return _ChainPlan(canonical=wallet.canonical, version=version, count=len(docs),
                          docs=docs, snapshot=snapshot)

    async def _write_planned(
        self, session: AsyncClientSession, plans: list[_ChainPlan]
    ) -> bool:
        """One bulkWrite: each planned wallet's compare-and-swap to its last balance, its
        transaction documents, the records' marks. False: nothing planned. Raises
        _VersionConflict when a wallet moved or a record is no longer pending."""
        writes: list[UpdateOne | UpdateMany | InsertOne[Document]] = []
        applied: list[str] = []
        for plan in (p for p in plans if p.count):
            assert plan.snapshot is not None
            last = plan.docs[-1]
            writes.append(UpdateOne(
                _cas_filter(plan.canonical, {"version": plan.version}),
                {"$set": {**last["balance_after"], "version": last["wallet_version"],
                          "updated_at": last["created_at"]}},
                namespace=self._wallets.full_name))
            writes += [InsertOne(doc, namespace=self._txns.full_name) for doc in plan.docs]
            applied += [doc["_id"] for doc in plan.docs]
        if not applied:
            return False
        wallets = len(writes) - len(applied)
        writes += self.outbox.reverse_marks(applied, now_ms())
        result = await self._client.bulk_write(writes, session=session, ordered=True)
        if (result.matched_count != wallets + len(applied)
                or result.inserted_count != len(applied)):
            raise _VersionConflict
        return True

    async def _apply(
        self,
        session: AsyncClientSession,
        op: AddCredit | Void,
        kind: OperationType,
        amount_minor: int,
    ) -> tuple[Applied, _Snapshot | None]:
        """The full attempt: read, decide, write. Also the wallet snapshot it wrote (None for
        a replay, which writes nothing)."""
        wallet = op.wallet
        canonical = wallet.canonical
        existing = await self._txns.find_one({"_id": op.transaction_id}, session=session)
        if existing is not None:
            replayed = self._replay(op, kind, amount_minor, existing)
            return (replayed, await self._facts(session, existing)), None

        wallet_doc = await self._wallets.find_one({"_id": canonical}, session=session)
        original: Document | None = None
        if isinstance(op, Void):
            original = await self._voidable_original(session, op)
            assert wallet_doc is not None, "an original transaction implies its wallet"
            amount_minor = decimal128_to_minor(original["amount"], wallet.currency, field="amount")
            as_debit = original["type"] == OperationType.CREDIT
        else:
            as_debit = kind == OperationType.DEBIT
        assert amount_minor > 0

        if wallet_doc is None:
            assert isinstance(op, AddCredit)
            balance = MinorBalance(credit_minor=0, debit_minor=0, historical_credit_minor=0)
            version = 0
            allow_overdraft = op.allow_overdraft
        else:
            balance = _balance_of(wallet_doc, wallet.currency)
            version = int(wallet_doc["version"])
            allow_overdraft = bool(wallet_doc["allow_overdraft"])

        if as_debit:
            after = balance.apply_debit(amount_minor)
            if not allow_overdraft and after.net_minor < 0:
                raise InsufficientFundsError(
                    f"{canonical} holds {from_minor(balance.credit_minor, wallet.currency)}"
                    f" and does not allow overdraft",
                    field="amount",
                )
        else:
            after = balance.apply_credit(amount_minor)

        now = now_ms()
        balance_fields = _balance_fields(after, wallet.currency)
        if wallet_doc is None:
            await self._wallets.insert_one(
                {
                    "_id": canonical,
                    "client_id": wallet.client_id,
                    "country": wallet.country,
                    "currency": wallet.currency,
                    "issuer_type": wallet.issuer_type,
                    **balance_fields,
                    "allow_overdraft": allow_overdraft,
                    "version": 1,
                    "created_at": now,
                    "updated_at": now,
                },
                session=session,
            )
        else:
            updated = await self._wallets.update_one(
                _cas_filter(canonical, {"version": version}),
                {"$set": {**balance_fields, "version": version + 1, "updated_at": now}},
                session=session,
            )
            if updated.matched_count != 1:
                raise _VersionConflict
        txn_doc = _txn_doc(op, kind, amount_minor, balance_fields, version + 1, now)
        await self._txns.insert_one(txn_doc, session=session)
        if isinstance(op, Void):
            marked = await self._txns.update_one(
                {"_id": op.original_transaction_id, "voided_by": None},
                {"$set": {"voided_by": op.transaction_id}},
                session=session,
            )
            if marked.matched_count != 1:
                raise _VersionConflict
        facts = LegacyFacts(
            wallet_version=version + 1,
            original=None
            if original is None
            else _original_facts(original, wallet.currency, voided_by=op.transaction_id),
        )
        snap = _Snapshot(
            balance=after,
            fields=balance_fields,
            version=version + 1,
            allow_overdraft=allow_overdraft,
        )
        return (_result(txn_doc, wallet, replayed=False), facts), snap

    async def _facts(self, session: AsyncClientSession | None, doc: Document) -> LegacyFacts:
        original: OriginalFacts | None = None
        if doc["type"] == OperationType.VOID and doc.get("original_transaction_id"):
            found = await self._txns.find_one(
                {"_id": doc["original_transaction_id"]}, session=session
            )
            assert found is not None, "a stored void implies its original"
            currency = WalletKey.from_canonical(doc["wallet"]).currency
            original = _original_facts(found, currency, voided_by=found.get("voided_by"))
        return LegacyFacts(wallet_version=int(doc["wallet_version"]), original=original)

    async def _voidable_original(self, session: AsyncClientSession, op: Void) -> Document:
        original: Document | None = await self._txns.find_one(
            {"_id": op.original_transaction_id}, session=session
        )
        if original is None or original["wallet"] != op.wallet.canonical:
            raise NotFoundError(
                f"no transaction {op.original_transaction_id!r} in wallet {op.wallet.canonical}",
                field="original_transaction_id",
            )
        if original["type"] not in (OperationType.CREDIT, OperationType.DEBIT):
            raise NotVoidableError(
                f"{op.original_transaction_id!r} is a {original['type']}; only credits and"
                " debits can be voided",
                field="original_transaction_id",
            )
        if original.get("voided_by") is not None:
            raise AlreadyVoidedError(
                f"{op.original_transaction_id!r} was already voided by {original['voided_by']!r}",
                field="original_transaction_id",
            )
        return original

    def _replay(
        self, op: AddCredit | Void, kind: OperationType, amount_minor: int, existing: Document
    ) -> OperationResult:
        """Same id seen before: identical content replays the stored result, else a duplicate."""
        differences: list[str] = []
        if existing["wallet"] != op.wallet.canonical:
            differences.append(f"wallet {existing['wallet']}")
        if existing["type"] != kind.value:
            differences.append(f"type {existing['type']}")
        if isinstance(op, Void):
            if existing.get("original_transaction_id") != op.original_transaction_id:
                differences.append(f"original {existing.get('original_transaction_id')}")
        elif not differences:
            stored = decimal128_to_minor(existing["amount"], op.wallet.currency, field="amount")
            if stored != amount_minor:
                differences.append(f"amount {from_minor(stored, op.wallet.currency)}")
        if differences:
            raise DuplicateTransactionError(
                f"{op.transaction_id!r} was already used with {', '.join(differences)}",
                field="transaction_id",
            )
        return _result(existing, op.wallet, replayed=True)

    # ---- reads -------------------------------------------------------------------------------

    async def get_balance(self, wallet: WalletKey) -> WalletBalance:
        found = await self.get_wallet_version(wallet)
        if found is None:
            raise NotFoundError(f"no wallet {wallet.canonical}", field="wallet")
        return WalletBalance.from_minor(wallet, found[0], SOURCE)

    async def get_multi_balance(self, client_id: str) -> list[WalletBalance]:
        balances: list[WalletBalance] = []
        cursor = (
            self._wallets.find({"client_id": client_id})
            .sort("_id", ASCENDING)
            .limit(MULTI_BALANCE_LIMIT_MAX)
        )
        async for doc in cursor:
            wallet = _key_of(doc)
            balances.append(
                WalletBalance.from_minor(wallet, _balance_of(doc, wallet.currency), SOURCE)
            )
        return balances

    async def history(self, wallet: WalletKey, limit: int) -> list[HistoryEntry]:
        """Newest first (by wallet version, which orders a wallet's transactions exactly)."""
        if not 1 <= limit <= HISTORY_LIMIT_MAX:
            raise InvalidInputError(f"must be 1..{HISTORY_LIMIT_MAX}, got {limit}", field="limit")
        entries: list[HistoryEntry] = []
        cursor = (
            self._txns.find({"wallet": wallet.canonical})
            .sort("wallet_version", DESCENDING)
            .limit(limit)
        )
        async for doc in cursor:
            entries.append(
                HistoryEntry(
                    transaction_id=doc["_id"],
                    type=doc["type"],
                    amount=from_minor(
                        decimal128_to_minor(doc["amount"], wallet.currency, field="amount"),
                        wallet.currency,
                    ),
                    reference_id=doc.get("reference_id"),
                    created_at=as_utc(doc["created_at"]),
                    voided=doc.get("voided_by") is not None,
                )
            )
        return entries

    # ---- backfill reads -----------------------------------------------------------------------

    async def overdraft_allowed(self, wallet: WalletKey) -> bool:
        """The wallet's overdraft policy (False for a wallet legacy does not hold)."""
        doc = await self._wallets.find_one({"_id": wallet.canonical}, {"allow_overdraft": 1})
        return bool(doc is not None and doc.get("allow_overdraft"))

    async def overdraft_policies(self, keys: list[str]) -> dict[str, bool]:
        """{canonical key: allow_overdraft} of the wallets among `keys` that legacy holds."""
        assert len(keys) <= PAGE_LIMIT_MAX
        docs = await find_keys(self._wallets, keys, {"allow_overdraft": 1})
        return {key: bool(doc.get("allow_overdraft")) for key, doc in docs.items()}

    async def balance_after(self, wallet: WalletKey, version: int) -> MinorBalance | None:
        """The wallet's balance right after its transaction of `version` (the stored
        balance_after); None when the log holds no such transaction (seeded without one)."""
        doc = await self._txns.find_one(
            {"wallet": wallet.canonical, "wallet_version": version}, {"balance_after": 1})
        return None if doc is None else _balance_of(doc["balance_after"], wallet.currency)

    async def count_wallets(self, *, currency: str, country: str) -> int:
        return await self._wallets.count_documents({"currency": currency, "country": country})

    async def transaction_types(self, transaction_ids: list[str]) -> dict[str, str]:
        """{transaction id: type} of the ids the log holds."""
        assert len(transaction_ids) <= PAGE_LIMIT_MAX
        found = await find_keys(self._txns, transaction_ids, {"type": 1})
        return {key: str(doc["type"]) for key, doc in found.items()}

    async def ensure_log_order_index(self) -> None:
        """The log in time order: the history import's scan and the unapplied-writes gate's
        (`transactions_created`: an index range scan instead of a collection scan and an
        in-memory sort on every evidence round). ensure_indexes leaves it out: only a
        migration reads the log by time, and every write pays each index."""
        await self._txns.create_indexes([IndexModel(
            [("created_at", ASCENDING), ("wallet", ASCENDING), ("wallet_version", ASCENDING)],
            name=LOG_ORDER_INDEX)])

    async def count_log(self, pairs: Sequence[str], *, before: datetime) -> int:
        """Transactions of the pairs' wallets created before `before`."""
        return await self._txns.count_documents(
            {"wallet": {"$regex": scope_regex(pairs)}, "created_at": {"$lt": before}})

    async def log_page(
        self, pairs: Sequence[str], *, before: datetime, after: HistoryCursor | None, limit: int
    ) -> list[LoggedTransaction]:
        """The pairs' transactions created before `before`, after `after` in (created_at,
        wallet, wallet_version) order: one page of the history import."""
        assert 1 <= limit <= PAGE_LIMIT_MAX
        query: Document = {"wallet": {"$regex": scope_regex(pairs)},
                           "created_at": {"$lt": before}}
        if after is not None:
            at = after.created_at
            query["$or"] = [
                {"created_at": {"$gt": at}},
                {"created_at": at, "wallet": {"$gt": after.wallet}},
                {"created_at": at, "wallet": after.wallet,
                 "wallet_version": {"$gt": after.wallet_version}},
            ]
        cursor = self._txns.find(query).sort(
            [("created_at", 1), ("wallet", 1), ("wallet_version", 1)]).limit(limit)
        return [_logged(doc) async for doc in cursor]

    async def get_transaction(self, transaction_id: str) -> Document | None:
        """The raw stored transaction (reconciliation and tests)."""
        doc: Document | None = await self._txns.find_one({"_id": transaction_id})
        return doc

    async def original_facts(self, wallet: WalletKey, transaction_id: str) -> OriginalFacts | None:
        """A transaction of `wallet` as a void's original (None if absent or another wallet's)."""
        doc = await self._txns.find_one({"_id": transaction_id})
        if doc is None or doc["wallet"] != wallet.canonical:
            return None
        return _original_facts(doc, wallet.currency, voided_by=doc.get("voided_by"))

    async def get_wallet_version(self, wallet: WalletKey) -> tuple[MinorBalance, int] | None:
        """Balance and version read together from one document (consistent pair)."""
        doc = await self._wallets.find_one({"_id": wallet.canonical})
        if doc is None:
            return None
        return _balance_of(doc, wallet.currency), int(doc["version"])

    async def get_wallet_versions(
        self, wallets: Sequence[WalletKey]
    ) -> dict[str, tuple[MinorBalance, int]]:
        """get_wallet_version of many wallets by `_id` (find_in's bounded `$in` chunks), by
        canonical key (absent: no entry); for readers that coalesce concurrent reads
        (gateway.coalesce)."""
        by_key = {wallet.canonical: wallet for wallet in wallets}
        found: dict[str, tuple[MinorBalance, int]] = {}
        for doc in await find_in(self._wallets, "_id", list(by_key)):
            key = str(doc["_id"])
            found[key] = _balance_of(doc, by_key[key].currency), int(doc["version"])
        return found

    async def page_wallets(
        self,
        *,
        after: str | None,
        limit: int,
        currency: str | None = None,
        country: str | None = None,
    ) -> list[dict[str, Any]]:
        """Wallets ordered by canonical key after `after`. Each item: `_id` (canonical),
        `wallet` (WalletKey), `balance` (MinorBalance), `version`, `allow_overdraft`,
        `created_at`, `updated_at`."""
        if not 1 <= limit <= PAGE_LIMIT_MAX:
            raise InvalidInputError(f"must be 1..{PAGE_LIMIT_MAX}, got {limit}", field="limit")
        query: Document = {}
        if after is not None:
            query["_id"] = {"$gt": after}
        if currency is not None:
            query["currency"] = currency
        if country is not None:
            query["country"] = country
        page: list[dict[str, Any]] = []
        async for doc in self._wallets.find(query).sort("_id", ASCENDING).limit(limit):
            wallet = _key_of(doc)
            page.append(
                {
                    "_id": doc["_id"],
                    "wallet": wallet,
                    "balance": _balance_of(doc, wallet.currency),
                    "version": int(doc["version"]),
                    "allow_overdraft": bool(doc["allow_overdraft"]),
                    "created_at": as_utc(doc["created_at"]),
                    "updated_at": as_utc(doc["updated_at"]),
                }
            )
        assert len(page) <= limit
        return page

    # ---- reconciliation and migration-gate reads ----------------------------------------------

    def pair_cursor(
        self, currency: str, country: str, *, after: str | None, batch_size: int
    ) -> AsyncCursor[Document]:
        """An open server cursor over one pair's wallets in key order after `after`: the
        reconciliation continues it page by page (decode each document with scanned_wallet)."""
        assert 1 <= batch_size <= PAGE_LIMIT_MAX
        query: Document = {"currency": currency, "country": country}
        if after is not None:
            query["_id"] = {"$gt": after}
        return self._wallets.find(query).sort("_id", ASCENDING).batch_size(batch_size)

    @staticmethod
    def scanned_wallet(doc: Document) -> ScannedWallet:
        """A `wallets` document read by pair_cursor, as plain ints (the hot loop's form)."""
        currency = doc["currency"]
        return ScannedWallet(
            canonical=doc["_id"], client_id=doc["client_id"], currency=currency,
            credit_minor=decimal128_to_minor(doc["credit"], currency, field="credit"),
            debit_minor=decimal128_to_minor(doc["debit"], currency, field="debit"),
            historical_credit_minor=decimal128_to_minor(
                doc["historical_credit"], currency, field="historical_credit"),
            version=int(doc["version"]), allow_overdraft=bool(doc["allow_overdraft"]))

    async def wallet_state(self, wallet: WalletKey) -> tuple[MinorBalance, int, bool] | None:
        """Balance, version and overdraft policy read together from one document."""
        doc = await self._wallets.find_one({"_id": wallet.canonical})
        if doc is None:
            return None
        return _balance_of(doc, wallet.currency), int(doc["version"]), bool(doc["allow_overdraft"])

    async def recent_transactions(
        self, wallet: str, *, max_version: int, limit: int
    ) -> list[LoggedTransaction]:
        """The wallet's newest transactions at or below `max_version`, newest first."""
        assert 1 <= limit <= PAGE_LIMIT_MAX
        cursor = self._txns.find({"wallet": wallet, "wallet_version": {"$lte": max_version}}
                                 ).sort("created_at", DESCENDING).limit(limit)
        return [_logged(doc) async for doc in cursor]

    async def transaction_versions(self, transaction_ids: list[str]) -> dict[str, int]:
        """{transaction id: wallet_version} of the ids the log holds (scattered ids: chunked
        key lookups, never an `_id` range)."""
        docs = await find_in(self._txns, "_id", transaction_ids, {"wallet_version": 1})
        return {doc["_id"]: int(doc["wallet_version"]) for doc in docs}

    async def transactions_held(self, transaction_ids: list[str]) -> set[str]:
        """The ids among `transaction_ids` the log holds."""
        return {doc["_id"] for doc in await find_in(self._txns, "_id", transaction_ids, {"_id": 1})}

    async def count_scope_wallets(self, scopes: list[str]) -> int:
        """Wallets of a migration scope (ledger pairs, or '*')."""
        return await self._wallets.count_documents(pair_fields_filter(scopes))

    async def transactions_created(
        self, scopes: list[str], *, start: datetime, until: datetime | None, limit: int
    ) -> list[Created]:
        """The scope's transactions created in [start, until], oldest first, at most `limit`.

        Served by the log-order index (`created_at` first: bounds [start, until], the order is
        the index's): a range scan of the window, never the collection. The scope is one
        `$regex` on `wallet` (the history import's shape), the index's second field, which
        MongoDB can test on the index keys before fetching. Not an `$or` of one regex per
        pair: SecantusDB scans the whole collection for that shape even with the index (200k
        transactions: 6.7 s of server CPU vs 0.09 s; its `explain` reports a COLLSCAN for the
        regex shape too, but runs it on the index)."""
        created: Document = {"$gte": start}
        if until is not None:
            created["$lte"] = until
        cursor = self._txns.find(
            {"created_at": created, **wallet_key_filter(scopes, "wallet")},
            {"_id": 1, "wallet": 1, "wallet_version": 1, "created_at": 1},
        ).sort("created_at", ASCENDING).limit(limit)
        return [Created(id=d["_id"], wallet=d["wallet"], created_at=as_utc(d["created_at"]),
                        wallet_version=d.get("wallet_version")) async for d in cursor]

    async def archive_documents(
        self, scopes: list[str], *, limit: int
    ) -> AsyncIterator[tuple[str, Document]]:
        """Every wallet, then every transaction of the scope, in `_id` order, as stored:
        (collection name, document). For the archive `complete` writes."""
        for name, collection, query in (
            (WALLETS, self._wallets, pair_fields_filter(scopes)),
            (WALLET_TRANSACTIONS, self._txns, wallet_key_filter(scopes, "wallet")),
        ):
            async for doc in collection.find(query).sort("_id", ASCENDING).limit(limit):
                yield name, doc


# ---- helpers -----------------------------------------------------------------------------------


def _cas_filter(canonical: str, expected: Mapping[str, Any]) -> Document:
    """A compare-and-swap filter on one wallet: its `_id` and each expected field's value.

    Each field is written `{"$all": [value]}`, which MongoDB defines as the bare equality
    `{field: value}` (same match set, arrays included), because SecantusDB plans the two
    differently: a filter whose other fields are bare (or `$eq`/range) values walks every
    index picker (compound, range, partial residual; each re-reads the collection's index
    catalog) before it settles on the `_id` point lookup; with `$all` the pickers step aside
    at once. Measured (300 sequential single-update transactions, --sync-on-commit): 3.9 ->
    3.2 ms of server CPU per write; `_id` alone 2.8 ms.
    """
    assert expected and "_id" not in expected
    return {"_id": canonical, **{name: {"$all": [value]} for name, value in expected.items()}}


def _only_duplicate_keys(exc: PyMongoError) -> bool:
    """A bulk write failed only on unique keys (anything else goes up to the retry policy)."""
    if isinstance(exc, DuplicateKeyError):
        return True
    assert isinstance(exc, ClientBulkWriteException)
    return duplicate_key_indexes(exc) is not None


def _txn_doc(
    op: AddCredit | Void,
    kind: OperationType,
    amount_minor: int,
    balance_fields: Document,
    wallet_version: int,
    now: datetime,
) -> Document:
    return {
        "_id": op.transaction_id,
        "wallet": op.wallet.canonical,
        "type": kind.value,
        "amount": minor_to_decimal128(amount_minor, op.wallet.currency),
        "amount_minor": int_to_bson(amount_minor),
        "reference_id": op.reference_id,
        "original_transaction_id": op.original_transaction_id if isinstance(op, Void) else None,
        "voided_by": None,
        "balance_after": balance_fields,
        "wallet_version": wallet_version,
        "created_at": now,
    }


def _original_facts(
    doc: Mapping[str, Any], currency: str, *, voided_by: str | None
) -> OriginalFacts:
    return OriginalFacts(
        transaction_id=doc["_id"],
        type=OperationType(doc["type"]),
        amount_minor=decimal128_to_minor(doc["amount"], currency, field="amount"),
        wallet_version=int(doc["wallet_version"]),
        voided_by=voided_by,
    )


def _logged(doc: Mapping[str, Any]) -> LoggedTransaction:
    return LoggedTransaction(
        transaction_id=str(doc["_id"]),
        wallet=doc["wallet"],
        type=str(doc["type"]),
        amount=doc["amount"],
        reference_id=doc.get("reference_id"),
        original_transaction_id=doc.get("original_transaction_id"),
        wallet_version=int(doc["wallet_version"]),
        created_at=as_utc(doc["created_at"]),
    )


def _key_of(doc: Mapping[str, Any]) -> WalletKey:
    key = WalletKey.from_canonical(doc["_id"])
    assert key.client_id == doc["client_id"] and key.currency == doc["currency"]
    return key


def _balance_of(doc: Mapping[str, Any], currency: str) -> MinorBalance:
    return MinorBalance(
        credit_minor=decimal128_to_minor(doc["credit"], currency, field="credit"),
        debit_minor=decimal128_to_minor(doc["debit"], currency, field="debit"),
        historical_credit_minor=decimal128_to_minor(
            doc["historical_credit"], currency, field="historical_credit"
        ),
    )


def _balance_fields(balance: MinorBalance, currency: str) -> Document:
    return {
        "credit": minor_to_decimal128(balance.credit_minor, currency),
        "debit": minor_to_decimal128(balance.debit_minor, currency),
        "historical_credit": minor_to_decimal128(balance.historical_credit_minor, currency),
    }


def _result(txn_doc: Mapping[str, Any], wallet: WalletKey, *, replayed: bool) -> OperationResult:
    currency = wallet.currency
    after = _balance_of(txn_doc["balance_after"], currency)
    created_at: datetime = as_utc(txn_doc["created_at"])
    return OperationResult(
        transaction_id=txn_doc["_id"],
        type=OperationType(txn_doc["type"]),
        wallet=wallet,
        amount=from_minor(
            decimal128_to_minor(txn_doc["amount"], currency, field="amount"), currency
        ),
        credit=from_minor(after.credit_minor, currency),
        debit=from_minor(after.debit_minor, currency),
        historical_credit=from_minor(after.historical_credit_minor, currency),
        replayed=replayed,
        created_at=created_at,
    )


class ScannedWallet(NamedTuple):
    """One `wallets` document as reconciliation compares it (LegacyStore.scanned_wallet)."""

    canonical: str
    client_id: str
    currency: str
    credit_minor: int
    debit_minor: int
    historical_credit_minor: int
    version: int
    allow_overdraft: bool


instrument_wallet_store(LegacyStore, SOURCE, {"apply": operation_label})
