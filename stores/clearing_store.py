"""The credit terminal's system of reference: one document per external transaction.

Collection `clearing_transactions`, `_id` = the caller's external id, so recording is
idempotent and a second transaction under the same id cannot exist: the same content again is
a replay (the stored record is returned), other content is a ConflictError naming the
external id. Written first and read first by every step ("write last, read first" for the
other systems: TigerBeetle and the ledger follow what is recorded here).

States move only forward (walletcore.clearing.TRANSITIONS); every write is a guarded update
whose filter holds the states it may come from, so a late retry can never move a transaction
back. Amounts are int64 minor units (exact, summable by the server for velocity reads).

Batch operations are one statement per batch where the server allows it (insert_many,
update_many on `batch_id`, one bulk_write of per-id updates); reads by many ids go through
mongobase.queries.find_in (chunked `$in`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING, IndexModel, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from mongobase.mongo import IN_CHUNK_MAX, as_utc, bson_to_int, insert_new, now_ms
from mongobase.queries import find_in
from walletcore.clearing import (
    LIVE_STATES,
    ClearingRecord,
    ClearingState,
    ExternalTransaction,
    ancestors_of,
    post_transfer_id,
)
from walletcore.clearing_checks import (
    REFERENCE_HOLDERS_MAX,
    VelocityQuery,
    VelocityWindow,
    reference_key,
)
from walletcore.errors import ConflictError, InvalidInputError
from walletcore.journal import INT64_MAX, entry_id_of
from walletcore.money import from_minor

CLEARING_TRANSACTIONS = "clearing_transactions"
BATCH_MAX = 8189  # one TigerBeetle request
FIND_LIMIT_MAX = 8189
AGGREGATE_CONCURRENCY = 4  # velocity/reference chunks in flight

Document = dict[str, Any]


class StateChange(BaseModel):
    """One transaction's move: the reason (void, rejection) and the post's TigerBeetle
    timestamp travel with it."""

    model_config = ConfigDict(frozen=True)

    external_id: str = Field(min_length=1, max_length=128)
    reason: str | None = Field(default=None, max_length=256)
    tb_timestamp: int | None = Field(default=None, gt=0, le=INT64_MAX)


@dataclass
class RecordBatch:
    """What record_many did: `records` in input order for every transaction now stored (new
    or an identical replay), `new` the ids this call recorded, `conflicts` the ids already used
    for other content (a ConflictError each, naming external_id)."""

    records: list[ClearingRecord] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    conflicts: dict[str, ConflictError] = field(default_factory=dict)

    def raise_conflicts(self) -> None:
        for error in self.conflicts.values():
            raise error


@dataclass
class TransitionResult:
    """`done`: in the target state now (by this call or an earlier one: idempotent);
    `refused`: id -> its current state (None: unknown id), which cannot move to the target."""

    done: list[str] = field(default_factory=list)
    refused: dict[str, ClearingState | None] = field(default_factory=dict)
    changed: int = 0  # documents this call modified


class ClearingStore:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._txns: AsyncCollection[Any] = db[CLEARING_TRANSACTIONS]

    async def ensure_indexes(self) -> None:
        """Each index is paid on every intake insert; these four serve the batch steps,
        sweeps, velocity windows and duplicate references."""
        await self._txns.create_indexes([
            IndexModel([("batch_id", ASCENDING), ("ix", ASCENDING)], name="batch"),
            IndexModel([("state", ASCENDING), ("received_at", ASCENDING)], name="state_received"),
            IndexModel(
                [("counterparty", ASCENDING), ("received_at", ASCENDING)], name="party_received"
            ),
            # One field (counterparty|reference), so many references are one chunked `$in`
            # (an `$or` of pairs scans per branch on SecantusDB). Sparse, not partial: SecantusDB
            # does not use a partial index for `$in`.
            IndexModel([("ref_key", ASCENDING)], name="ref_key", sparse=True),
            # The ledger sync and its rebuild find a posted transfer's transaction by the
            # transfer's id (a hash of the external id, which TigerBeetle cannot carry).
            IndexModel([("post_id", ASCENDING)], name="post_id"),
        ])

    # ---- intake ------------------------------------------------------------------------------

    async def record_many(
        self, txns: Sequence[ExternalTransaction], batch_id: str
    ) -> RecordBatch:
        """Record a batch in one unordered insert. Ids taken already (a retried batch, the
        same id in two batches or twice in one, a concurrent writer) are compared by content
        fingerprint: same is a replay, different a conflict."""
        _check_batch(len(txns))
        now = now_ms()
        docs = [_doc_of(txn, batch_id, index, now) for index, txn in enumerate(txns)]
        taken = await insert_new(self._txns, docs)
        existing = await self.get_many([txns[i].external_id for i in sorted(taken)])
        result = RecordBatch()
        for index, txn in enumerate(txns):
            if index not in taken:
                result.new.append(txn.external_id)
                result.records.append(_record_of(docs[index]))
                continue
            stored = existing.get(txn.external_id)
            if stored is None:  # taken by a unique key other than _id: cannot happen today
                raise ConflictError(f"{txn.external_id!r} could not be recorded",
                                    field="external_id")
            if stored.transaction.fingerprint != txn.fingerprint:
                result.conflicts[txn.external_id] = ConflictError(
                    f"{txn.external_id!r} was recorded with different content",
                    field="external_id",
                )
                continue
            result.records.append(stored)
        return result

    async def record(self, txn: ExternalTransaction, batch_id: str) -> ClearingRecord:
        """One transaction: the stored record, or ConflictError for other content."""
        batch = await self.record_many([txn], batch_id)
        batch.raise_conflicts()
        assert len(batch.records) == 1
        return batch.records[0]

    # ---- reads -------------------------------------------------------------------------------

    async def get(self, external_id: str) -> ClearingRecord | None:
        doc = await self._txns.find_one({"_id": external_id})
        return None if doc is None else _record_of(doc)

    async def get_many(self, external_ids: Sequence[str]) -> dict[str, ClearingRecord]:
        _check_batch(len(external_ids))
        if not external_ids:
            return {}
        docs = await find_in(self._txns, "_id", list(dict.fromkeys(external_ids)))
        return {doc["_id"]: _record_of(doc) for doc in docs}

    async def by_batch(
        self, batch_id: str, *, state: ClearingState | None = None, limit: int = BATCH_MAX
    ) -> list[ClearingRecord]:
        """A batch's transactions in intake order (optionally those in `state`)."""
        _check_limit(limit)
        query: Document = {"batch_id": batch_id}
        if state is not None:
            query["state"] = state.value
        cursor = self._txns.find(query).sort("ix", ASCENDING).limit(limit)
        return [_record_of(doc) async for doc in cursor]

    async def find_by_state(
        self, state: ClearingState, limit: int, *, received_before: datetime | None = None
    ) -> list[ClearingRecord]:
        """Oldest first: what a sweeper resumes (e.g. transactions stuck in `pending`)."""
        _check_limit(limit)
        query: Document = {"state": state.value}
        if received_before is not None:
            query["received_at"] = {"$lt": received_before}
        cursor = self._txns.find(query).sort("received_at", ASCENDING).limit(limit)
        return [_record_of(doc) async for doc in cursor]

    async def count_by_state(self) -> dict[ClearingState, int]:
        pipeline: list[Document] = [{"$group": {"_id": "$state", "n": {"$sum": 1}}}]
        counts = {state: 0 for state in ClearingState}
        async for row in await self._txns.aggregate(pipeline):
            counts[ClearingState(row["_id"])] = int(row["n"])
        return counts

    # ---- state transitions -------------------------------------------------------------------

    async def transition_many(
        self, target: ClearingState, changes: Sequence[StateChange]
    ) -> TransitionResult:
        """Move each transaction to `target` from any state with a forward path to it
        (walletcore.clearing.ancestors_of), with its own reason/timestamp: one unordered bulk
        write. Idempotent: one already in `target` is done. Only when some did not move are
        their states read (to tell done from refused). Costs ~2 ms per transaction on
        SecantusDB: prefer transition_batch when a batch moves alike."""
        _check_batch(len(changes))
        ids = [c.external_id for c in changes]
        if len(set(ids)) != len(ids):
            raise InvalidInputError("an external id appears twice", field="external_ids")
        if not changes:
            return TransitionResult()
        guard = {"$in": [s.value for s in ancestors_of(target)]}
        now = now_ms()
        ops = [
            UpdateOne({"_id": c.external_id, "state": guard},
                      {"$set": _change_fields(target, now, c.reason, c.tb_timestamp)})
            for c in changes
        ]
        written = await self._txns.bulk_write(ops, ordered=False)
        if written.matched_count == len(ops):
            return TransitionResult(done=ids, changed=written.modified_count)
        return await self._classify(ids, target, written.modified_count)

    async def transition_batch(
        self, batch_id: str, source: ClearingState, target: ClearingState,
        *, reason: str | None = None,
    ) -> int:
        """Move every transaction of the batch that is in `source` to `target` (one update_many
        on the batch index, ~0.7 ms per transaction on SecantusDB): the fast path when a whole
        batch moves alike. `source` may be any state ahead of which `target` lies. Returns how
        many moved; the others were elsewhere (callers read `by_batch` when that matters)."""
        if source not in ancestors_of(target):
            raise ConflictError(f"{source} cannot become {target}", field="state")
        updated = await self._txns.update_many(
            {"batch_id": batch_id, "state": source.value},
            {"$set": _change_fields(target, now_ms(), reason, None)},
        )
        return updated.modified_count

    async def _classify(
        self, ids: list[str], target: ClearingState, changed: int
    ) -> TransitionResult:
        docs = await find_in(self._txns, "_id", ids, {"state": 1})
        states = {doc["_id"]: ClearingState(doc["state"]) for doc in docs}
        result = TransitionResult(changed=changed)
        for external_id in ids:
            state = states.get(external_id)
            if state is target:
                result.done.append(external_id)
            else:
                result.refused[external_id] = state
        return result

    # ---- what the checks read ----------------------------------------------------------------

    async def velocity(
        self, queries: Sequence[VelocityQuery], *, now: datetime, exclude_batch: str | None
    ) -> dict[str, VelocityWindow]:
        """Live transactions per (kind, counterparty, currency) received within each query's
        window before `now`, leaving out `exclude_batch` (the batch being checked: run_checks
        adds its transactions in order). Keys: VelocityQuery.key; absent keys are empty."""
        _check_batch(len(queries))
        by_window: dict[int, list[VelocityQuery]] = {}
        for query in queries:
            by_window.setdefault(query.window_s, []).append(query)
        gate = asyncio.Semaphore(AGGREGATE_CONCURRENCY)
        parts = [
            self._velocity_chunk(group[i:i + IN_CHUNK_MAX], now, exclude_batch, gate)
            for group in by_window.values()
            for i in range(0, len(group), IN_CHUNK_MAX)
        ]
        windows: dict[str, VelocityWindow] = {}
        for part in await asyncio.gather(*parts):
            windows.update(part)
        return windows

    async def _velocity_chunk(
        self, queries: list[VelocityQuery], now: datetime, exclude_batch: str | None,
        gate: asyncio.Semaphore,
    ) -> dict[str, VelocityWindow]:
        wanted = {q.key for q in queries}
        match: Document = {
            "counterparty": {"$in": sorted({q.counterparty for q in queries})},
            "received_at": {"$gte": now - timedelta(seconds=queries[0].window_s), "$lte": now},
            "state": {"$in": [s.value for s in LIVE_STATES]},
        }
        if exclude_batch is not None:
            match["batch_id"] = {"$ne": exclude_batch}
        pipeline: list[Document] = [
            {"$match": match},
            {"$group": {
                "_id": {"k": "$kind", "p": "$counterparty", "c": "$currency"},
                "n": {"$sum": 1}, "amount": {"$sum": "$amount_minor"},
            }},
        ]
        found: dict[str, VelocityWindow] = {}
        async with gate:
            async for row in await self._txns.aggregate(pipeline):
                group = row["_id"]
                key = VelocityQuery(kind=group["k"], counterparty=group["p"],
                                    currency=group["c"], window_s=1).key
                if key in wanted:  # same counterparty, another kind/currency: not asked
                    found[key] = VelocityWindow(count=int(row["n"]),
                                                amount_minor=bson_to_int(row["amount"]))
        return found

    async def reference_holders(
        self, references: Sequence[tuple[str, str]]
    ) -> dict[str, list[str]]:
        """Live transactions holding each (counterparty, reference), oldest first (intake
        time, batch, position in the batch), at most REFERENCE_HOLDERS_MAX per reference.
        Keys: walletcore.clearing_checks.reference_key."""
        _check_batch(len(references))
        keys = list(dict.fromkeys(reference_key(party, ref) for party, ref in references))
        projection = {"ref_key": 1, "state": 1, "received_at": 1, "batch_id": 1, "ix": 1}
        docs = await find_in(self._txns, "ref_key", keys, projection)
        live = {s.value for s in LIVE_STATES}
        docs = [doc for doc in docs if doc["state"] in live]
        docs.sort(key=lambda d: (as_utc(d["received_at"]), d["batch_id"], d["ix"], d["_id"]))
        holders: dict[str, list[str]] = {}
        for doc in docs:
            ids = holders.setdefault(doc["ref_key"], [])
            if len(ids) < REFERENCE_HOLDERS_MAX:
                ids.append(doc["_id"])
        return holders

    # ---- reads by TigerBeetle transfer (the ledger sync) ---------------------------------

    async def get_by_post_ids(self, post_ids: Sequence[int]) -> dict[int, ClearingRecord]:
        """The transactions whose post transfer is one of `post_ids` (walletcore.clearing
        post_transfer_id), keyed by that id: one chunked `$in` on the `post_id` index."""
        _check_batch(len(post_ids))
        if not post_ids:
            return {}
        keys = list(dict.fromkeys(entry_id_of(post_id) for post_id in post_ids))
        docs = await find_in(self._txns, "post_id", keys)
        return {int(doc["post_id"], 16): _record_of(doc) for doc in docs}


def _check_batch(size: int) -> None:
    if size > BATCH_MAX:
        raise InvalidInputError(f"at most {BATCH_MAX} per call, got {size}", field="batch")


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= FIND_LIMIT_MAX:
        raise InvalidInputError(f"must be 1..{FIND_LIMIT_MAX}, got {limit}", field="limit")


def _change_fields(
    target: ClearingState, now: datetime, reason: str | None, tb_timestamp: int | None
) -> Document:
    fields: Document = {"state": target.value, "updated_at": now}
    if reason is not None:
        fields["reason"] = reason
    if tb_timestamp is not None:
        fields["tb_timestamp"] = tb_timestamp
    return fields


def _doc_of(txn: ExternalTransaction, batch_id: str, index: int, now: datetime) -> Document:
    doc: Document = {
        "_id": txn.external_id,
        "batch_id": batch_id,
        "ix": index,
        "kind": txn.kind,
        "amount_minor": txn.amount_minor,
        "currency": txn.currency,
        "counterparty": txn.counterparty,
        "occurred_at": txn.occurred_at,
        "memo": txn.memo,
        "fingerprint": txn.fingerprint,
        "post_id": entry_id_of(post_transfer_id(txn.external_id)),
        "state": ClearingState.RECEIVED.value,
        "received_at": now,
        "updated_at": now,
    }
    if txn.reference is not None:  # absent, not null: the reference index is sparse
        doc["reference"] = txn.reference
        doc["ref_key"] = reference_key(txn.counterparty, txn.reference)
    return doc


def _record_of(doc: Document) -> ClearingRecord:
    currency = doc["currency"]
    occurred_at = doc.get("occurred_at")
    txn = ExternalTransaction(
        external_id=doc["_id"], kind=doc["kind"],
        amount=from_minor(bson_to_int(doc["amount_minor"]), currency), currency=currency,
        counterparty=doc["counterparty"], reference=doc.get("reference"),
        occurred_at=None if occurred_at is None else as_utc(occurred_at), memo=doc.get("memo"),
    )
    if txn.fingerprint != doc["fingerprint"]:
        raise ConflictError(
            f"stored transaction {doc['_id']!r} does not match its fingerprint",
            field="external_id",
        )
    state = ClearingState(doc["state"])
    settled = state is ClearingState.SETTLED
    return ClearingRecord(
        transaction=txn, batch_id=doc["batch_id"], state=state, reason=doc.get("reason"),
        received_at=as_utc(doc["received_at"]), updated_at=as_utc(doc["updated_at"]),
        entry_id=entry_id_of(post_transfer_id(txn.external_id)) if settled else None,
        tb_timestamp=doc.get("tb_timestamp"),
    )
