"""The audit chain: money-moving requests and migration changes in an append-only log that
cannot be edited silently.

Chains (one per writer kind, each with its own head):
- `api` and `cli` in `audit_records`: one document per money-moving request (the HTTP API's
  add_credit / subtract_credit / void_transaction / submit_transaction(s), the CLI's wallet and
  terminal money commands), written *before* the operation runs: a request whose record cannot
  be written is refused (503) and never runs unaudited.
- `migration:<id>` in `migration_audit` (stores.audit_log): the migration workflow's entries,
  chained in place, so the documents the workflow reads back are the ones verified.
- `audit_heads`: `_id` = chain name, the collection, the last `chain_seq` and `hash`.

Every chained document carries `chain`, `chain_seq` (1, 2, ...), `prev_hash` (the previous
document's `hash`, GENESIS_HASH for the first) and `hash` = walletcore.journal.chain_hash(
prev_hash, chain_seq, sha256(canonical form)), the general ledger's link rule. The canonical
form is sorted-key compact JSON of every stored field but `prev_hash` and `hash` (times at
BSON's millisecond resolution, UTC). Editing any field of any document breaks its hash; deleting
one leaves a gap in `chain_seq` (or, for the last, a head beyond the last document); both are
named by `walletmig audit verify`. Deleting a whole chain *and* its head is not detectable from
inside the database (anchor the heads elsewhere for that: see the README).

Who: `actor` is the API key's name or the engineer (never a secret); wallets appear as their
keyed pseudonym (walletcore.wallet_ids.wallet_ref, the hash in their workflow id), never their
client id; terminal counterparties, references and memos are left out.

Throughput (group commit): one MongoDB transaction per append would serialise every request
on the chain head. An AuditAppender batches the records that arrive while the previous batch
commits (or within `linger_ms`) into one append; each request awaits its batch's commit
before it proceeds. In `audit_records` (chains `api`, `cli`) a record's `_id` is (chain,
seq), so the unique `_id` keeps the chain from forking and an append needs no transaction (the
batch inserted after the tail in order, then the head moved forward, never back:
`_append_by_seq`; one ordered client-level bulk write for one record, an `insert` and the
head's update for more: `_write_linked`); records beyond the head (their writer died
or lost a race) are chained after by the next append, which moves the head over them; verify
checks that they link on from the head too (`beyond_head` in its report). The
migration chains, whose `_id`s are their own, append in one transaction (read head,
compare-and-swap it, insert).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import Any

from bson.decimal128 import Decimal128
from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING, DESCENDING, IndexModel, InsertOne, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    ClientBulkWriteException,
    DuplicateKeyError,
    PyMongoError,
)

from mongobase.mongo import (
    abort_quietly,
    backoff,
    commit,
    duplicate_insert_indexes,
    duplicate_key_indexes,
    is_retryable_txn_error,
    now_ms,
)
from walletcore.clearing import ExternalTransaction
from walletcore.errors import StoreUnavailableError
from walletcore.journal import ChainHead, chain_hash
from walletcore.operations import AddCredit, SubtractCredit, Void, WalletOperation
from walletcore.wallet_ids import ID_HASH_HEX_CHARS

log = logging.getLogger(__name__)

AUDIT_RECORDS = "audit_records"
AUDIT_HEADS = "audit_heads"
MIGRATION_AUDIT = "migration_audit"  # stores.audit_log's collection (chained in place)
CHAINED_COLLECTIONS = (AUDIT_RECORDS, MIGRATION_AUDIT)
CHAIN_API = "api"
CHAIN_CLI = "cli"
MIGRATION_CHAIN_PREFIX = "migration:"
CHAIN_NAME_MAX = 160
BATCH_MAX = 256  # records per transaction (group commit)
SPLIT_RECORDS_MIN = 2  # audit_records batches from this size: an insert, then the head's update
PENDING_MAX = 10_000  # records waiting for a batch; beyond it appends are refused (503)
# Natural group commit: what arrives while a batch commits forms the next batch; a linger
# would only add latency at low load (measured: see the README's audit section).
LINGER_MS_DEFAULT = 0.0
ATTEMPTS_MAX = 100  # transaction attempts per batch (write conflicts with other processes)
PAGE_MAX = 1000  # documents per verify read
CHAINS_MAX = 10_000  # chains one verify walks
# Records beyond a chain's head one verify checks: a writer stopped mid-batch leaves at most a
# batch; a live chain appended to while verify walks adds its new records there too.
BEYOND_HEAD_MAX = 4 * BATCH_MAX
TERMINAL_ITEMS_MAX = 250  # transactions listed in one terminal record (gateway's batch max)
CANONICAL_BYTES_MAX = 1_000_000
HASH_FIELDS = ("prev_hash", "hash")
WALLET_REF_PATTERN = rf"^[0-9a-f]{{{ID_HASH_HEX_CHARS}}}$"


def migration_chain(migration_id: str) -> str:
    return f"{MIGRATION_CHAIN_PREFIX}{migration_id}"


def record_id(chain: str, seq: int) -> str:
    return f"{chain}:{seq:012d}"


# ---- the canonical form ------------------------------------------------------------------------


def storable(value: Any) -> Any:
    """`value` as it is stored and read back unchanged: times UTC at millisecond resolution,
    enums as their values, decimals as plain strings, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v) for v in value]
    if isinstance(value, datetime):
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return aware.replace(microsecond=aware.microsecond // 1000 * 1000)
    if isinstance(value, Enum):
        return storable(value.value)
    if isinstance(value, Decimal128):
        return format(value.to_decimal(), "f")
    if isinstance(value, Decimal):
        return format(value, "f")
    assert value is None or isinstance(value, (str, int, float, bool)), type(value)
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return storable(value).isoformat(timespec="milliseconds")
    raise TypeError(f"not canonical: {type(value).__name__}")


def content_hash(doc: dict[str, Any]) -> str:
    """sha256 of the canonical form: every field but the link fields, sorted-key JSON."""
    body = {k: storable(v) for k, v in doc.items() if k not in HASH_FIELDS}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=_json_default)  # fmt: skip
    encoded = text.encode()
    assert len(encoded) <= CANONICAL_BYTES_MAX, "an audit record is bounded"
    return hashlib.sha256(encoded).hexdigest()


def link(head: ChainHead, chain: str, docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`docs` chained after `head`, in order (an `_id` is given when the document has none)."""
    assert 0 < len(chain) <= CHAIN_NAME_MAX
    linked: list[dict[str, Any]] = []
    prev_hash, seq = head.hash, head.seq
    for doc in docs:
        seq += 1
        stored = {**storable(doc), "chain": chain, "chain_seq": seq, "prev_hash": prev_hash}
        stored.setdefault("_id", record_id(chain, seq))
        stored["hash"] = chain_hash(prev_hash, seq, content_hash(stored))
        prev_hash = stored["hash"]
        linked.append(stored)
    return linked


# ---- what a record says ------------------------------------------------------------------------


def wallet_operation_record(
    op: WalletOperation, *, wallet_ref: str, source: str, actor: str, operation: str,
    caller: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The record of a wallet write request (credit, debit, void). `wallet_ref` is the wallet's
    keyed pseudonym (walletcore.wallet_ids.wallet_ref: its workflow id's hash), never its
    client id: the record can be matched to the wallet's workflow, not to a customer, without
    the deployment's id key."""
    assert re.fullmatch(WALLET_REF_PATTERN, wallet_ref), "a keyed wallet pseudonym"
    record: dict[str, Any] = {
        "at": now_ms(), "source": source, "actor": actor, "operation": operation,
        "transaction_id": op.transaction_id, "wallet": wallet_ref,
        "ledger": op.wallet.ledger_pair, **(caller or {}),
    }  # fmt: skip
    if isinstance(op, (AddCredit, SubtractCredit)):
        record["amount"] = format(op.amount, "f")
    if isinstance(op, Void):
        record["original_transaction_id"] = op.original_transaction_id
    return record


def terminal_record(
    txns: Sequence[ExternalTransaction], *, source: str, actor: str, operation: str,
    batch_id: str | None, caller: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The record of a credit-terminal submit: each transaction's external id, kind, currency
    and amount (counterparties, references and memos left out: they may name a customer)."""
    assert 0 < len(txns) <= TERMINAL_ITEMS_MAX
    return {
        "at": now_ms(), "source": source, "actor": actor, "operation": operation,
        "batch_id": batch_id, **(caller or {}),
        "transactions": [
            {"external_id": t.external_id, "kind": t.kind, "currency": t.currency,
             "amount": format(t.amount, "f")}
            for t in txns
        ],
    }  # fmt: skip


# ---- the chain store ---------------------------------------------------------------------------


class RecordExistsError(Exception):
    """An insert met a document with the same `_id` (the caller decides: replay or conflict)."""


class _HeadMovedError(Exception):
    """Another writer extended the chain since this attempt read its head: retry."""


class ChainReport(BaseModel):
    """One chain's walk: `ok` False at the first broken link, which `bad_id`/`bad_seq` name."""

    model_config = ConfigDict(frozen=True)

    chain: str
    collection: str
    checked: int = Field(ge=0)
    head_seq: int = Field(ge=0)
    ok: bool
    bad_seq: int | None = None
    bad_id: str | None = None
    reason: str | None = None
    # Records after the head, linked on from it (a writer that stopped between its insert and
    # the head's move; the next append chains after them): at most BEYOND_HEAD_MAX checked,
    # `beyond_head_more` when more lie beyond those.
    beyond_head: int = Field(default=0, ge=0)
    beyond_head_more: bool = False


class AuditVerification(BaseModel):
    model_config = ConfigDict(frozen=True)

    ok: bool
    chains: list[ChainReport]
    problems: list[str] = Field(default_factory=list)  # outside any chain's walk


class AuditChain:
    """The chained collections and their heads."""

    def __init__(self, db: AsyncDatabase[Any], *, attempts_max: int = ATTEMPTS_MAX) -> None:
        assert 1 <= attempts_max <= 10_000
        self._db = db
        self._client = db.client
        self._heads: AsyncCollection[Any] = db[AUDIT_HEADS]
        self._attempts_max = attempts_max
        # The head each chain had after this object's last commit: the next append's first
        # attempt skips reading it (one round trip less inside the transaction). The
        # compare-and-swap checks seq *and* hash, so a stale entry only costs a retry.
        self._known: dict[str, ChainHead] = {}
        self.conflict_retries = 0  # observability

    async def ensure_indexes(self) -> None:
        for name in CHAINED_COLLECTIONS:
            await self._db[name].create_indexes(
                [IndexModel([("chain", ASCENDING), ("chain_seq", ASCENDING)])])

    async def append(
        self, collection: str, chain: str, docs: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Chain `docs` after the head and insert them, in one transaction; retries write
        conflicts (bounded, jittered). RecordExistsError when a document's `_id` exists."""
        assert collection in CHAINED_COLLECTIONS and 0 < len(docs) <= BATCH_MAX
        if collection == AUDIT_RECORDS and all("_id" not in doc for doc in docs):
            return await self._append_by_seq(chain, docs)
        for attempt in range(self._attempts_max):
            known = self._known.pop(chain, None) if attempt == 0 else None
            try:
                async with self._client.start_session() as session:
                    linked = await self._append_attempt(session, collection, chain, docs, known)
                self._known[chain] = ChainHead(seq=linked[-1]["chain_seq"],
                                               hash=linked[-1]["hash"])  # fmt: skip
                return linked
            except _HeadMovedError:
                if known is not None:
                    continue  # the cached head was stale: read it (no backoff)
            except PyMongoError as exc:
                if not is_retryable_txn_error(exc):
                    raise StoreUnavailableError(f"MongoDB (audit log): {exc}", field=None) from exc
            self.conflict_retries += 1
            await backoff(attempt)
        raise StoreUnavailableError(
            f"MongoDB (audit log): chain {chain!r} still conflicting after "
            f"{self._attempts_max} attempts",
            field=None,
        )

    async def _append_by_seq(
        self, chain: str, docs: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """`audit_records`' documents are keyed by (chain, seq) (record_id), so the unique
        `_id` is the fork guard and an append needs no transaction: one ordered client-level
        bulk write inserts the batch linked after the tail, then moves the head forward to its
        last record (never back). A transaction cost MongoDB ~2.2 ms and the writer ~1.4 ms
        per batch, three round trips (session 10). A duplicate `_id` means another writer took
        that seq first: the records before it stay (the head not moved for them), the rest is
        linked again after the tail read anew. Records left beyond the head (a writer that
        stopped there, or died) are chained after by the next append, which moves the head
        over them."""
        stored: list[dict[str, Any]] = []
        rest = list(docs)
        tail = self._known.pop(chain, None)
        for attempt in range(self._attempts_max):
            cached = tail is not None
            if tail is None:
                tail = await self._tail(chain)
            linked = link(tail, chain, rest)
            inserted = await self._write_linked(chain, linked)
            stored += linked[:inserted]
            rest = rest[inserted:]
            if not rest:
                break
            tail = None
            self.conflict_retries += 1
            if not cached:  # a cached head gone stale (another process wrote): read it now
                await backoff(attempt)
        if rest:
            raise StoreUnavailableError(
                f"MongoDB (audit log): chain {chain!r} still conflicting after "
                f"{self._attempts_max} attempts", field=None,
            )  # fmt: skip
        assert len(stored) == len(docs)
        self._known[chain] = ChainHead(seq=stored[-1]["chain_seq"], hash=stored[-1]["hash"])
        return stored

    async def _tail(self, chain: str) -> ChainHead:
        """What the next record links after: the head, or the last record when records lie
        beyond it. Records deleted from under the head leave the head as the tail, so their
        gap stays visible."""
        try:
            head = await self.head(chain)
            last = await self._db[AUDIT_RECORDS].find_one(
                {"chain": chain, "chain_seq": {"$gt": head.seq}}, {"chain_seq": 1, "hash": 1},
                sort=[("chain_seq", DESCENDING)],
            )  # fmt: skip
        except PyMongoError as exc:
            raise StoreUnavailableError(f"MongoDB (audit log): {exc}", field=None) from exc
        return head if last is None else ChainHead(seq=int(last["chain_seq"]), hash=last["hash"])

    async def _write_linked(self, chain: str, linked: list[dict[str, Any]]) -> int:
        """Insert `linked` in order, then move the head to its last record; how many records
        went in before a duplicate `_id` (all: len(linked), and the head moved, or was at or
        beyond it already: its upsert met it). One record: one ordered client-level bulk write
        (one command). More: one ordered `insert` of them all, then the head's update (one
        command more): SecantusDB runs each write of a bulk write as a storage transaction of
        its own, each synced to its journal, and an `insert` of many documents as one, so a
        batch of k records costs it 2 journal syncs instead of k + 1 (session 11: ~0.5 ms of
        its CPU per sync; batches of ~3-8 records at 32 concurrent credits)."""
        if len(linked) < SPLIT_RECORDS_MIN:
            return await self._bulk_write_linked(chain, linked)
        try:
            await self._db[AUDIT_RECORDS].insert_many(linked, ordered=True)
        except BulkWriteError as exc:
            taken = duplicate_insert_indexes(exc)  # ordered: the insert it stopped at, alone
            if taken is None or len(taken) != 1:
                raise StoreUnavailableError(f"MongoDB (audit log): {exc}", field=None) from exc
            return taken[0]  # the head is not moved for the records before it (as a bulk write)
        except PyMongoError as exc:
            raise StoreUnavailableError(f"MongoDB (audit log): {exc}", field=None) from exc
        try:
            await self._heads.update_one(*_head_forward(chain, linked[-1]), upsert=True)
        except DuplicateKeyError:
            pass  # the head is at or beyond the batch already: left there
        except PyMongoError as exc:  # the records stay beyond the head (the next append
            # moves it over them); the batch's requests are refused (503), as in a bulk write
            raise StoreUnavailableError(f"MongoDB (audit log): {exc}", field=None) from exc
        return len(linked)

    async def _bulk_write_linked(self, chain: str, linked: list[dict[str, Any]]) -> int:
        """_write_linked as one ordered client-level bulk write (the records, then the head)."""
        records, heads = (f"{self._db.name}.{name}" for name in (AUDIT_RECORDS, AUDIT_HEADS))
        writes: list[InsertOne[Any] | UpdateOne] = [
            InsertOne(doc, namespace=records) for doc in linked]
        writes.append(UpdateOne(*_head_forward(chain, linked[-1]), upsert=True, namespace=heads))
        try:
            await self._client.bulk_write(writes, ordered=True)
        except ClientBulkWriteException as exc:
            taken = duplicate_key_indexes(exc)  # ordered: the write it stopped at, alone
            if taken is None or len(taken) != 1:
                raise StoreUnavailableError(f"MongoDB (audit log): {exc}", field=None) from exc
            return min(taken[0], len(linked))
        except PyMongoError as exc:
            raise StoreUnavailableError(f"MongoDB (audit log): {exc}", field=None) from exc
        return len(linked)

    async def _append_attempt(
        self, session: AsyncClientSession, collection: str, chain: str,
        docs: Sequence[dict[str, Any]], known: ChainHead | None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        await session.start_transaction()
        try:
            head = known if known is not None else await self.head(chain, session)
            linked = link(head, chain, docs)
            new_head = ChainHead(seq=linked[-1]["chain_seq"], hash=linked[-1]["hash"])
            await self._swap_head(session, chain, collection, head, new_head)
            await self._insert(session, collection, linked)
            await commit(session)
        except BaseException:
            await abort_quietly(session)
            raise
        return linked

    async def head(self, chain: str, session: AsyncClientSession | None = None) -> ChainHead:
        doc = await self._heads.find_one({"_id": chain}, session=session)
        return ChainHead() if doc is None else ChainHead(seq=int(doc["seq"]), hash=doc["hash"])

    async def _swap_head(
        self, session: AsyncClientSession, chain: str, collection: str, old: ChainHead,
        new: ChainHead,
    ) -> None:  # fmt: skip
        """Compare-and-swap on the head's seq; the first append creates it (a concurrent
        creator makes that a duplicate key, which retries)."""
        updated = await self._heads.update_one(
            {"_id": chain, "seq": old.seq, "hash": old.hash},
            {"$set": {"seq": new.seq, "hash": new.hash, "collection": collection,
                      "updated_at": now_ms()}},
            upsert=old.seq == 0, session=session,
        )  # fmt: skip
        if updated.matched_count == 0 and updated.upserted_id is None:
            raise _HeadMovedError()

    async def _insert(
        self, session: AsyncClientSession, collection: str, linked: list[dict[str, Any]]
    ) -> None:
        try:
            await self._db[collection].insert_many(linked, ordered=True, session=session)
        except BulkWriteError as exc:
            if duplicate_insert_indexes(exc) is not None:
                raise RecordExistsError(str(exc.details["writeErrors"][0].get("keyValue"))) from exc
            raise

    # ---- verify ----------------------------------------------------------------------------

    async def verify(self, *, page: int = PAGE_MAX, chains_max: int = CHAINS_MAX
                     ) -> AuditVerification:  # fmt: skip
        """Walk every chain from its first document to its head, in pages of `page`, then
        the records beyond its head (at most BEYOND_HEAD_MAX per chain)."""
        assert 1 <= page <= PAGE_MAX and 1 <= chains_max <= CHAINS_MAX
        heads = await self._heads.find({}).sort("_id", ASCENDING).to_list(chains_max + 1)
        problems: list[str] = []
        if len(heads) > chains_max:
            problems.append(f"more than {chains_max} chains: only the first were walked")
        reports = [await self._walk(doc, page) for doc in heads[:chains_max]]
        problems += await self._outside_chains({str(d["_id"]) for d in heads})
        ok = not problems and all(r.ok for r in reports)
        return AuditVerification(ok=ok, chains=reports, problems=problems)

    async def _walk(self, head_doc: dict[str, Any], page: int) -> ChainReport:
        chain, collection = str(head_doc["_id"]), str(head_doc.get("collection"))
        head = ChainHead(seq=int(head_doc["seq"]), hash=str(head_doc["hash"]))
        if collection not in CHAINED_COLLECTIONS:
            return ChainReport(chain=chain, collection=collection, checked=0, head_seq=head.seq,
                               ok=False, reason=f"the head names {collection!r}")  # fmt: skip
        # Up to the head: seqs only grow by one, so at most head.seq documents.
        prev, checked, fault = await self._links(collection, chain, ChainHead(), page,
                                                 upto_seq=head.seq, count_max=head.seq)
        if fault is None and prev != head:
            missing = prev.seq + 1
            fault = (missing, _expected_id(collection, chain, missing),
                     f"documents {missing}..{head.seq} missing (the head says {head.seq}, the "
                     f"last document is {prev.seq})")  # fmt: skip
        report = ChainReport(chain=chain, collection=collection, checked=checked,
                             head_seq=head.seq, ok=fault is None)  # fmt: skip
        if fault is None:
            # Beyond the head: records a stopped writer left (or a live append's): they must
            # link on from the head as every other record does.
            last, beyond, fault = await self._links(collection, chain, head, page,
                                                    upto_seq=None, count_max=BEYOND_HEAD_MAX)
            more = beyond == BEYOND_HEAD_MAX and fault is None and await self._has_after(
                collection, chain, last.seq)  # fmt: skip
            report = report.model_copy(update={"beyond_head": beyond, "beyond_head_more": more,
                                               "ok": fault is None})  # fmt: skip
            if fault is not None:
                fault = (fault[0], fault[1], f"beyond the head ({head.seq}): {fault[2]}")
        if fault is None:
            return report
        return report.model_copy(update={"bad_seq": fault[0], "bad_id": fault[1],
                                         "reason": fault[2]})  # fmt: skip

    async def _has_after(self, collection: str, chain: str, seq: int) -> bool:
        after = {"chain": chain, "chain_seq": {"$gt": seq}}
        return await self._db[collection].find_one(after, {"_id": 1}) is not None

    async def _links(
        self, collection: str, chain: str, prev: ChainHead, page: int, *,
        upto_seq: int | None, count_max: int,
    ) -> tuple[ChainHead, int, tuple[int, str | None, str] | None]:  # fmt: skip
        """Check that the documents after `prev` link on from it, in pages of `page`, up to
        seq `upto_seq` (None: to the last), at most `count_max`: the last linked document,
        how many linked, the first fault."""
        assert count_max >= 0 and (upto_seq is None or upto_seq >= prev.seq)
        checked = 0
        fault: tuple[int, str | None, str] | None = None
        while fault is None and checked < count_max and (upto_seq is None or prev.seq < upto_seq):
            seqs: dict[str, int] = {"$gt": prev.seq}
            if upto_seq is not None:
                seqs["$lte"] = upto_seq
            limit = min(page, count_max - checked)
            cursor = self._db[collection].find({"chain": chain, "chain_seq": seqs}).sort(
                "chain_seq", ASCENDING).limit(limit)  # fmt: skip
            docs = await cursor.to_list(limit)
            if not docs:
                break
            for doc in docs:
                fault = _link_fault(prev, doc)
                if fault is not None:
                    break
                prev = ChainHead(seq=int(doc["chain_seq"]), hash=str(doc["hash"]))
                checked += 1
        return prev, checked, fault

    async def _outside_chains(self, chains: set[str]) -> list[str]:
        """Documents no head accounts for: chained under an unknown chain, or not chained."""
        problems = []
        for name in CHAINED_COLLECTIONS:
            collection = self._db[name]
            found = await collection.distinct("chain")
            for chain in sorted(str(c) for c in found if c is not None)[:CHAINS_MAX]:
                if chain not in chains:
                    problems.append(f"{name}: chain {chain!r} has documents but no head")
            loose = await collection.find_one({"chain": {"$exists": False}}, {"_id": 1})
            if loose is not None:
                count = await collection.count_documents({"chain": {"$exists": False}})
                problems.append(f"{name}: {count} document(s) outside any chain, e.g. "
                                f"{loose['_id']!r}")  # fmt: skip
        return problems


def _head_forward(chain: str, last: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The filter and update that move `chain`'s head to `last`, never back (upsert: the
    first append creates it; a head at or beyond `last` makes the upsert a duplicate key)."""
    return (
        {"_id": chain, "seq": {"$lt": last["chain_seq"]}},
        {"$set": {"seq": last["chain_seq"], "hash": last["hash"], "collection": AUDIT_RECORDS,
                  "updated_at": now_ms()}},
    )  # fmt: skip


def _expected_id(collection: str, chain: str, seq: int) -> str | None:
    return record_id(chain, seq) if collection == AUDIT_RECORDS else None


def _link_fault(prev: ChainHead, doc: dict[str, Any]) -> tuple[int, str | None, str] | None:
    """(bad seq, bad id, reason) when `doc` does not follow `prev`."""
    seq, doc_id = int(doc.get("chain_seq", -1)), str(doc.get("_id"))
    if seq != prev.seq + 1:
        return prev.seq + 1, None, (f"document {prev.seq + 1} missing (after {prev.seq} comes "
                                    f"{seq}, {doc_id!r})")  # fmt: skip
    if doc.get("prev_hash") != prev.hash:
        return seq, doc_id, f"{doc_id!r}: prev_hash is not the hash of document {prev.seq}"
    try:
        recomputed = chain_hash(str(doc["prev_hash"]), seq, content_hash(doc))
    except (AssertionError, TypeError, ValueError, KeyError) as err:
        return seq, doc_id, f"{doc_id!r}: not canonical ({err})"
    if doc.get("hash") != recomputed:
        return seq, doc_id, f"{doc_id!r}: content changed (hash does not match)"
    return None


# ---- group commit ------------------------------------------------------------------------------


class AuditAppender:
    """One process's appender to one chain of `audit_records`: records arriving while a batch
    commits (or within `linger_ms` of the first, or while `shared` is held by another batcher)
    are committed together; `append` returns once its record's batch is committed (its
    chain_seq)."""

    def __init__(
        self, chain: AuditChain, name: str, *, linger_ms: float = LINGER_MS_DEFAULT,
        batch_max: int = BATCH_MAX, pending_max: int = PENDING_MAX,
        shared: asyncio.Lock | None = None,
    ) -> None:  # fmt: skip
        assert 0 <= linger_ms <= 1000 and 1 <= batch_max <= BATCH_MAX
        assert batch_max <= pending_max <= PENDING_MAX
        self._chain = chain
        self._name = name
        self._linger_s = linger_ms / 1000
        self._batch_max = batch_max
        self._pending_max = pending_max
        self._pending: deque[tuple[dict[str, Any], asyncio.Future[int]]] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # Held while a batch commits, when given (gateway.coalesce.FlightBatcher's `shared`):
        # the batch is taken once it is held, so it includes what arrived meanwhile.
        self._shared = shared
        self.batches = 0  # observability: transactions committed
        self.records = 0  # observability: records committed

    def start(self) -> asyncio.Task[None]:
        """The committing task (the owner cancels it at shutdown). A task that died of a bug is
        replaced (logged), so waiters are never left without a committer."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            log.error("audit appender %s stopped: %r; restarting", self._name,
                      self._task.exception())  # fmt: skip
            self._task = None
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name=f"audit-appender-{self._name}")
        return self._task

    async def append(self, record: dict[str, Any]) -> int:
        if len(self._pending) >= self._pending_max:
            raise StoreUnavailableError(
                f"MongoDB (audit log): {self._pending_max} records await a commit", field=None
            )
        self.start()
        assert self._wake is not None
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._linger_s > 0:
                await asyncio.sleep(self._linger_s)
            while self._pending:
                async with self._shared or contextlib.nullcontext():
                    count = min(self._batch_max, len(self._pending))
                    batch = [self._pending.popleft() for _ in range(count)]
                    await self._commit(batch)

    async def _commit(self, batch: list[tuple[dict[str, Any], asyncio.Future[int]]]) -> None:
        try:
            linked = await self._chain.append(AUDIT_RECORDS, self._name, [r for r, _ in batch])
        except Exception as exc:  # every waiter gets the failure; the task goes on
            log.warning("audit batch of %d record(s) failed: %r", len(batch), exc)
            # A refused batch (e.g. RecordExistsError: the head was removed behind the chain's
            # back) is an outage of the audit log: the request is not run unaudited.
            error = exc if isinstance(exc, StoreUnavailableError) else StoreUnavailableError(
                f"MongoDB (audit log): the batch was refused: {exc!r}", field=None)
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self.batches += 1
        self.records += len(batch)
        for (_, future), stored in zip(batch, linked, strict=True):
            if not future.done():
                future.set_result(int(stored["chain_seq"]))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(
                    StoreUnavailableError("MongoDB (audit log): closed", field=None))

