"""The credit terminal's system of reference: one document per external transaction, one per
intake batch.

Collection `clearing_transactions`, `_id` = the caller's external id, so recording is
idempotent and a second transaction under the same id cannot exist: the same content again is
a replay (the stored record is returned), other content is a ConflictError naming the
external id. Written first and read first by every step ("write last, read first" for the
other systems: TigerBeetle and the ledger follow what is recorded here).

Collection `clearing_batches`, `_id` = the batch id: `open` (some transaction of the batch is
not final), `parts` (a counter every intake call into the batch bumps: the compare-and-swap
that closes a batch loses to a concurrent intake), and `settled`, the batch's settled ids. A
transaction document is written once at intake and never again when it settles: its state is
`received` with its id in its batch's `settled` list (one `$push` per batch). On the embedded
SecantusDB a document update costs ~1.1 ms whatever it changes (twice an insert), and that
update per transaction was ~40 % of the pipeline's MongoDB CPU. Readers here resolve the
state (`_records_of`), so callers see `settled` either way; rejections (few) still move their
documents per id, which keeps the velocity and reference reads (live states) one query.

States move only forward (walletcore.clearing.TRANSITIONS); every write is a guarded update
whose filter holds the states it may come from, so a late retry can never move a transaction
back (a transaction settled by its batch's list counts as settled there too). Amounts are int64
minor units (exact, summable by the server for velocity reads).

Batch operations are one statement per batch where the server allows it (insert_many, one bulk
write of per-id updates, one `$push`); reads by many ids go through mongobase.queries.find_in
(chunked `$in`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING, IndexModel, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from mongobase.mongo import as_utc, bson_to_int, insert_new, now_ms
from mongobase.queries import find_in
from walletcore.clearing import (
    FINAL_STATES,
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
from walletcore.errors import ConflictError, InvalidInputError, StoreUnavailableError
from walletcore.journal import INT64_MAX, entry_id_of
from walletcore.money import from_minor

CLEARING_TRANSACTIONS = "clearing_transactions"
CLEARING_BATCHES = "clearing_batches"
BATCH_MAX = 8189  # one TigerBeetle request
FIND_LIMIT_MAX = 8189
AGGREGATE_CONCURRENCY = 4  # velocity/reference chunks in flight
# Counterparties per velocity aggregate: its `$in` costs SecantusDB more per value the longer
# the list (server CPU per query, batches of 2000: 16-32 ~0.30 ms, 64 0.35, 128 0.48, 2000
# 6.5), and below 16 the per-command overhead takes over.
VELOCITY_CHUNK_MAX = 32
OPEN_BATCHES_MAX = 1000  # open batches find_by_state reads (in flight + crashed submitters)
CLOSE_ATTEMPTS_MAX = 16  # settle_batch's compare-and-swap against concurrent intakes
# Indexes of earlier versions that no query needs any more (each costs ~0.1-0.3 ms per insert
# on SecantusDB): dropped by ensure_indexes.
OBSOLETE_INDEXES = ("state_received",)

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
class SettleResult:
    """What settle_batch did: `settled` of the given ids are settled now (by this call or an
    earlier one; `changed` by this call), `refused` id -> state for those that cannot settle,
    `closed` whether every transaction of the batch is final now."""

    settled: int = 0
    changed: int = 0
    refused: dict[str, ClearingState | None] = field(default_factory=dict)
    closed: bool = False


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
        self._batches: AsyncCollection[Any] = db[CLEARING_BATCHES]

    async def ensure_indexes(self) -> None:
        """Each index is paid on every intake insert (~0.1-0.3 ms each on SecantusDB); these
        serve the batch steps, velocity windows, duplicate references and the ledger sync.
        Sweeps (find_by_state) go through the open batches instead of a state index."""
        existing = {ix["name"] async for ix in await self._txns.list_indexes()}
        for name in OBSOLETE_INDEXES:
            if name in existing:
                await self._txns.drop_index(name)
        await self._batches.create_indexes([
            IndexModel([("open", ASCENDING), ("received_at", ASCENDING)], name="open_received"),
        ])
        await self._txns.create_indexes([
            IndexModel([("batch_id", ASCENDING), ("ix", ASCENDING)], name="batch"),
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
        # The batch is open before any of its transactions exists: a crash after the insert
        # leaves them where find_by_state looks (the open batches).
        before = await self._open_batch(batch_id, now)
        taken = await insert_new(self._txns, docs)
        if len(taken) < len(docs):
            # New transactions: open again, in case the batch closed during the insert (its
            # compare-and-swap on `parts` loses to this bump when it read before it).
            await self._open_batch(batch_id, now)
        elif before is None or not before["open"]:
            # Only replays, into a batch that was closed or new: it owns nothing open (a new one
            # owns nothing), close it again unless another intake bumped `parts` since. Left
            # open, such batches would crowd the open ones find_by_state reads.
            parts = 1 if before is None else before["parts"] + 1
            await self._batches.update_one({"_id": batch_id, "parts": parts},
                                           {"$set": {"open": False}})
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

    async def _open_batch(self, batch_id: str, now: datetime) -> Document | None:
        """Mark the batch open and bump its `parts` (created at its first intake). Returns the
        batch document as it was (None: new)."""
        for attempt in range(2):  # two first intakes racing: one upsert meets the other's
            try:
                doc: Document | None = await self._batches.find_one_and_update(
                    {"_id": batch_id},
                    {"$set": {"open": True, "updated_at": now}, "$inc": {"parts": 1},
                     "$setOnInsert": {"received_at": now, "settled": [], "settled_n": 0}},
                    projection={"open": 1, "parts": 1}, upsert=True,
                )
                return doc
            except DuplicateKeyError:
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    async def record(self, txn: ExternalTransaction, batch_id: str) -> ClearingRecord:
        """One transaction: the stored record, or ConflictError for other content."""
        batch = await self.record_many([txn], batch_id)
        batch.raise_conflicts()
        assert len(batch.records) == 1
        return batch.records[0]

    # ---- reads -------------------------------------------------------------------------------

    async def get(self, external_id: str) -> ClearingRecord | None:
        doc = await self._txns.find_one({"_id": external_id})
        return None if doc is None else (await self._records_of([doc]))[0]

    async def get_many(self, external_ids: Sequence[str]) -> dict[str, ClearingRecord]:
        _check_batch(len(external_ids))
        if not external_ids:
            return {}
        docs = await find_in(self._txns, "_id", list(dict.fromkeys(external_ids)))
        return {r.external_id: r for r in await self._records_of(docs)}

    async def by_batch(
        self, batch_id: str, *, state: ClearingState | None = None, limit: int = BATCH_MAX
    ) -> list[ClearingRecord]:
        """A batch's transactions in intake order (optionally those in `state`)."""
        _check_limit(limit)
        query: Document = {"batch_id": batch_id}
        if state is ClearingState.SETTLED:  # settled by the batch's list: still `received`
            query["state"] = {"$in": [ClearingState.RECEIVED.value, state.value]}
        elif state is not None:
            query["state"] = state.value
        # Sorted here: a server-side sort costs SecantusDB ~0.02-0.035 ms CPU per document
        # (measured on batches of 2000), a third of the read itself.
        docs = await self._txns.find(query).to_list(None)
        docs.sort(key=lambda d: d["ix"])
        records = await self._records_of(docs)
        return [r for r in records if state is None or r.state is state][:limit]

    async def find_by_state(
        self, state: ClearingState, limit: int, *, received_before: datetime | None = None
    ) -> list[ClearingRecord]:
        """Oldest first: what a sweeper resumes (transactions still `received`, holds stuck in
        `pending`). Only open states: a transaction that is not final keeps its batch open,
        so the open batches (the oldest OPEN_BATCHES_MAX) hold every one of them."""
        _check_limit(limit)
        if state in FINAL_STATES:
            raise InvalidInputError(f"{state} is final: find_by_state reads open batches",
                                    field="state")
        cursor = self._batches.find({"open": True}, {"_id": 1}).sort("received_at", ASCENDING)
        found: list[ClearingRecord] = []
        async for batch in cursor.limit(OPEN_BATCHES_MAX):
            found.extend(r for r in await self.by_batch(batch["_id"], state=state)
                         if received_before is None or r.received_at < received_before)
            if len(found) >= limit:
                break
        found.sort(key=lambda r: (r.received_at, r.batch_id))
        return found[:limit]

    async def count_by_state(self) -> dict[ClearingState, int]:
        pipeline: list[Document] = [{"$group": {"_id": "$state", "n": {"$sum": 1}}}]
        counts = {state: 0 for state in ClearingState}
        async for row in await self._txns.aggregate(pipeline):
            counts[ClearingState(row["_id"])] = int(row["n"])
        # Settled by their batch's list: stored `received` (settle_batch lists only those).
        listed: list[Document] = [{"$group": {"_id": None, "n": {"$sum": "$settled_n"}}}]
        async for row in await self._batches.aggregate(listed):
            counts[ClearingState.RECEIVED] -= int(row["n"])
            counts[ClearingState.SETTLED] += int(row["n"])
        return counts

    async def _records_of(self, docs: Sequence[Document]) -> list[ClearingRecord]:
        """Records of transaction documents, a `received` one settled when its batch lists
        it (one read of those batches' lists)."""
        batch_ids = sorted({d["batch_id"] for d in docs
                            if d["state"] == ClearingState.RECEIVED.value})
        settled: dict[str, set[str]] = {}
        if batch_ids:
            for batch in await find_in(self._batches, "_id", batch_ids, {"settled": 1}):
                settled[batch["_id"]] = set(batch.get("settled", ()))
        return [_record_of(d, listed=d["_id"] in settled.get(d["batch_id"], ()))
                for d in docs]

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
        # Settled by their batch's list (stored `received`): final, never moved by a guard
        # that lets `received` through.
        listed = {r.external_id for r in (await self.get_many(ids)).values()
                  if r.state is ClearingState.SETTLED}
        guard = {"$in": [s.value for s in ancestors_of(target)]}
        now = now_ms()
        ops = [
            UpdateOne({"_id": c.external_id, "state": guard},
                      {"$set": _change_fields(target, now, c.reason, c.tb_timestamp)})
            for c in changes if c.external_id not in listed
        ]
        written = await self._txns.bulk_write(ops, ordered=False) if ops else None
        changed = 0 if written is None else written.modified_count
        if not listed and written is not None and written.matched_count == len(ops):
            return TransitionResult(done=ids, changed=changed)
        return await self._classify(ids, target, changed)

    async def transition_batch(
        self, batch_id: str, source: ClearingState, target: ClearingState,
        *, reason: str | None = None,
    ) -> int:
        """Move every transaction of the batch that is in `source` to `target` (one update_many
        on the batch index, ~1.1 ms per transaction on SecantusDB: settle_batch is the
        pipeline's way to settle). `source` may be any state ahead of which `target` lies.
        Returns how many moved; the others were elsewhere (callers read `by_batch`)."""
        if source not in ancestors_of(target):
            raise ConflictError(f"{source} cannot become {target}", field="state")
        query: Document = {"batch_id": batch_id, "state": source.value}
        if source is ClearingState.RECEIVED:  # not those settled by the batch's list
            batch = await self._batches.find_one({"_id": batch_id}, {"settled": 1})
            if batch is not None and batch.get("settled"):
                query["_id"] = {"$nin": list(batch["settled"])}
        updated = await self._txns.update_many(
            query, {"$set": _change_fields(target, now_ms(), reason, None)})
        return updated.modified_count

    async def settle_batch(self, batch_id: str, external_ids: Sequence[str]) -> SettleResult:
        """Settle the batch's posted transactions: one `$push` of those still `received` onto
        the batch's `settled` list (their documents are not written), closing the batch when
        every transaction it owns is final. One still `pending`/`posted` (written by hand or
        an older version) moves per id; one final otherwise, or not the batch's, is refused.
        Idempotent; the close is a compare-and-swap on `parts` (a concurrent intake wins)."""
        _check_batch(len(external_ids))
        wanted = list(dict.fromkeys(external_ids))
        for _ in range(CLOSE_ATTEMPTS_MAX):
            batch = await self._batches.find_one_and_update(
                {"_id": batch_id}, {"$setOnInsert": {  # a batch recorded by an older version
                    "open": True, "parts": 0, "received_at": now_ms(), "settled": [],
                    "settled_n": 0}},
                projection={"parts": 1, "settled": 1}, upsert=True,
                return_document=ReturnDocument.AFTER)
            assert batch is not None, "upserted"
            listed = set(batch.get("settled", ()))
            docs = await self._txns.find({"batch_id": batch_id}, {"state": 1}).to_list(None)
            states = {d["_id"]: ClearingState(d["state"]) for d in docs}
            result, to_list, to_move = _settle_plan(wanted, states, listed)
            moved_n = 0
            if to_move:
                moved = await self.transition_many(
                    ClearingState.SETTLED, [StateChange(external_id=x) for x in to_move])
                result.refused.update(moved.refused)
                result.settled += len(moved.done)
                moved_n = moved.changed
                states.update((x, ClearingState.SETTLED) for x in moved.done)
            now_listed = listed | set(to_list)
            result.closed = all(
                state in FINAL_STATES or (state is ClearingState.RECEIVED and x in now_listed)
                for x, state in states.items())
            update: Document = {"$set": {"open": not result.closed, "updated_at": now_ms()}}
            if to_list:
                update["$push"] = {"settled": {"$each": to_list}}
                update["$inc"] = {"settled_n": len(to_list)}
            written = await self._batches.update_one(
                {"_id": batch_id, "parts": batch["parts"]}, update)
            if written.matched_count == 1:
                result.changed = len(to_list) + moved_n
                return result
        raise StoreUnavailableError(f"batch {batch_id} kept changing while it settled",
                                    field="batch_id")

    async def _classify(
        self, ids: list[str], target: ClearingState, changed: int
    ) -> TransitionResult:
        states = {x: r.state for x, r in (await self.get_many(ids)).items()}
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
            self._velocity_chunk(group[i:i + VELOCITY_CHUNK_MAX], now, exclude_batch, gate)
            for group in by_window.values()
            for i in range(0, len(group), VELOCITY_CHUNK_MAX)
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
        records = await self._records_of(docs)
        return {int(doc["post_id"], 16): r for doc, r in zip(docs, records, strict=True)}


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


def _settle_plan(
    wanted: list[str], states: dict[str, ClearingState], listed: set[str]
) -> tuple[SettleResult, list[str], list[str]]:
    """For settle_batch: the result so far, the ids to list, the ids to move per id."""
    result = SettleResult()
    to_list: list[str] = []
    to_move: list[str] = []
    for x in wanted:
        state = states.get(x)
        if state is ClearingState.SETTLED or (state is ClearingState.RECEIVED and x in listed):
            result.settled += 1
        elif state is ClearingState.RECEIVED:
            to_list.append(x)
            result.settled += 1
        elif state in (ClearingState.PENDING, ClearingState.POSTED):
            to_move.append(x)
        else:  # final otherwise, or not the batch's
            result.refused[x] = state
    return result, to_list, to_move


def _record_of(doc: Document, *, listed: bool = False) -> ClearingRecord:
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
    if listed and state is ClearingState.RECEIVED:  # settled by its batch's list
        state = ClearingState.SETTLED
    settled = state is ClearingState.SETTLED
    return ClearingRecord(
        transaction=txn, batch_id=doc["batch_id"], state=state, reason=doc.get("reason"),
        received_at=as_utc(doc["received_at"]), updated_at=as_utc(doc["updated_at"]),
        entry_id=entry_id_of(post_transfer_id(txn.external_id)) if settled else None,
        tb_timestamp=doc.get("tb_timestamp"),
    )
