"""Concurrent balance reads sent to their store as one request.

The gateway serves many callers at once; each balance read used to send a request of one
key: a TigerBeetle `lookup_accounts` of one id (the client's encode, send, reply and decode,
a timed request, and a request the cluster, a process of its own, parses), or a MongoDB
`find_one` (pymongo's command round trip, and the server's). A process that answers many
readers pays that per batch instead: the reads that ask in one pass of the event loop (the
requests uvicorn read in that pass reach their store read together) go as one request of
every key they asked, and each caller gets its own answer, as its own request would have.

- `CoalescedLookups`: the bundle's BatchedClient whose `lookup_accounts` calls are coalesced
  (one lookup of every id, cut to the cluster's request limit as before; each caller gets
  the rows of its own ids, in its order; an id not found: no row).
- `CoalescedLegacyReads`: a LegacyStore whose `get_wallet_version` (what its get_balance
  reads) is coalesced into `get_wallet_versions` (`find` with `$in` on `_id`, in
  mongobase.queries.find_in's chunks: each wallet's balance and version still come from its
  one document).

- `CoalescedIdempotency`: the Idempotency-Key store whose leases are taken and final
  documents read and inserted in batches, one of each kind in flight (FlightBatcher: what
  arrives while a batch is out leaves as the next one): the claims send their Redis scripts as
  one pipeline and read their keys' documents with one `find`
  (`$in` on `_id`), the answers recorded go as one unordered `insert_many` (a key
  that already has its document answers False, as its own insert would: the first stands).
  Its reads and inserts share one lane with the audit appender (`mongo_lane`: one MongoDB
  batch of the three kinds in flight at a time), so under load each kind's batch holds what
  arrived while any of them was out: fewer, larger commands (session 11: 32 concurrent
  credits, finds 0.62-0.72 -> 0.45-0.53 and inserts 0.40-0.51 -> 0.25-0.32 per credit; audit
  batches of ~3 -> ~7 records), at most one round trip more of waiting per stage under load
  and none for a lone request.

What it changes: a read waits at most one more loop pass (the batch leaves from a task
scheduled by the first read of the pass); a failed request fails every read of its batch
with the same error (each would have failed alike: one server, one connection pool); a
caller that is cancelled (its read's timeout) leaves the others' request running; a lone
read pays a future and a task more (~20 us). Only reads are coalesced: writes keep their
order and their own requests, except the Idempotency-Key's final documents (each is
inserted once, under its own unique `_id`, so their order does not matter).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import tigerbeetle as tb
from redis.exceptions import NoScriptError

from mongobase.mongo import insert_new
from mongobase.queries import find_in
from stores.idempotency_keys import IdempotencyStore
from stores.legacy_store import LegacyStore
from stores.tb_batches import BatchedClient, batched
from stores.tigerbeetle_client import TigerBeetleClient
from walletcore.balances import MinorBalance
from walletcore.keys import WalletKey
from walletcore.tb_limits import BatchLimits

PENDING_MAX = 4096  # reads waiting for one batch; past it a read goes alone (bounded)
BATCH_KEYS_MAX = 1024  # keys one FlightBatcher batch sends (a bounded command)

_Version = tuple[MinorBalance, int]  # a wallet's balance and version (one document)
K = TypeVar("K")
V = TypeVar("V")


class PassBatcher(Generic[K, V]):
    """Keys asked in one loop pass fetched together: `fetch(keys)` answers a dict of the keys
    found (each key once, in first-asked order); each caller gets its own keys' entries."""

    def __init__(self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]]) -> None:
        self._fetch = fetch
        self._pending: list[tuple[list[K], asyncio.Future[dict[K, V]]]] = []
        self._sending: set[asyncio.Task[None]] = set()  # referenced until done
        self.requests = 0  # observability and tests: batches fetched
        self.reads = 0  # reads answered through a batch

    @property
    def full(self) -> bool:
        return len(self._pending) >= PENDING_MAX

    async def get(self, keys: list[K]) -> dict[K, V]:
        assert keys and not self.full
        future: asyncio.Future[dict[K, V]] = asyncio.get_running_loop().create_future()
        if not self._pending:  # the first of this pass: its task fetches the batch next pass
            task = asyncio.ensure_future(self._send_pending())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        self._pending.append((keys, future))
        # A cancelled caller cancels its own future only; _send_pending skips it.
        return await future

    async def _send_pending(self) -> None:
        batch, self._pending = self._pending, []
        await self._send(batch)

    async def _send(self, batch: list[tuple[list[K], asyncio.Future[dict[K, V]]]]) -> None:
        assert 0 < len(batch) <= PENDING_MAX
        keys = list(dict.fromkeys(k for asked, _ in batch for k in asked))  # once, in order
        try:
            found = await self._fetch(keys)
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise  # cancellation (shutdown): the callers got it too
            return
        self.requests += 1
        self.reads += len(batch)
        for asked, future in batch:
            if not future.done():
                future.set_result({k: found[k] for k in asked if k in found})


class FlightBatcher(PassBatcher[K, V]):
    """A PassBatcher with one request in flight: keys asked while a batch is being fetched
    wait for it and leave together as the next batch (the group commit's rule), instead of
    each pass sending its own. Where a request takes a round trip or a disk sync (an insert
    acknowledged once journaled: ~5-10 ms on the dev stack) the next batch holds what many
    passes asked; an answer waits at most for the batch in flight. At most BATCH_KEYS_MAX
    keys leave at once (the rest go next)."""

    def __init__(
        self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], *,
        shared: asyncio.Lock | None = None,
    ) -> None:  # fmt: skip
        super().__init__(fetch)
        self._lane: asyncio.Task[None] | None = None  # fetching, or scheduled to
        # Held while a batch is out, when given: batchers that share it (one process's
        # commands to one server) have one batch in flight between them, and each takes its
        # batch once it holds the lock (what arrived while the others' were out included).
        self._shared = shared

    async def get(self, keys: list[K]) -> dict[K, V]:
        assert keys and not self.full
        future: asyncio.Future[dict[K, V]] = asyncio.get_running_loop().create_future()
        self._pending.append((keys, future))
        if self._lane is None or self._lane.done():
            self._lane = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        """Send batches until nothing waits (a batch's failure fails only its own callers;
        cancelled, at shutdown, the lane cancels the callers still waiting)."""
        try:
            while self._pending:
                async with self._shared or contextlib.nullcontext():
                    await self._send(self._take())
        except BaseException:
            waiting, self._pending = self._pending, []
            for _, future in waiting:
                future.cancel()
            raise

    def _take(self) -> list[tuple[list[K], asyncio.Future[dict[K, V]]]]:
        """The next batch: the first waiting callers, at most BATCH_KEYS_MAX keys (one caller's
        keys are never split)."""
        count, taken = 0, 0
        for asked, _ in self._pending:
            if count and count + len(asked) > BATCH_KEYS_MAX:
                break
            count += len(asked)
            taken += 1
        batch, self._pending = self._pending[:taken], self._pending[taken:]
        return batch


class CoalescedLookups(BatchedClient):
    """`client` cut to `limits` (stores.tb_batches.batched), lookup_accounts coalesced per
    loop pass."""

    def __init__(self, client: TigerBeetleClient, limits: BatchLimits | None = None) -> None:
        cut = batched(client, limits)
        super().__init__(cut.client, cut.limits)
        self.batcher: PassBatcher[int, tb.Account] = PassBatcher(self._lookup_by_id)

    async def _lookup_by_id(self, ids: list[int]) -> dict[int, tb.Account]:
        return {row.id: row for row in await super().lookup_accounts(ids)}

    async def lookup_accounts(self, accounts: list[int]) -> list[tb.Account]:
        if not accounts or self.batcher.full:
            return await super().lookup_accounts(accounts)
        by_id = await self.batcher.get(list(accounts))
        return [by_id[i] for i in accounts if i in by_id]


class CoalescedLegacyReads(LegacyStore):
    """The legacy store (same arguments), its wallet reads coalesced per loop pass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batcher: PassBatcher[WalletKey, _Version] = PassBatcher(self._versions)

    async def _versions(self, wallets: list[WalletKey]) -> dict[WalletKey, _Version]:
        by_key = await self.get_wallet_versions(wallets)
        return {w: by_key[w.canonical] for w in wallets if w.canonical in by_key}

    async def get_wallet_version(self, wallet: WalletKey) -> tuple[MinorBalance, int] | None:
        if self.batcher.full:
            return await super().get_wallet_version(wallet)
        return (await self.batcher.get([wallet])).get(wallet)


class CoalescedIdempotency(IdempotencyStore):
    """The Idempotency-Key store (same arguments), its lease scripts, document point reads and
    inserts coalesced: a credit's key cost Redis a script call (~10 % of the API
    process's CPU per credit, the loopback send mostly) and MongoDB a `find_one` and an
    `insert_one` (~17 % of the API's CPU per credit and ~1.3 ms of the server's, session 9).
    Per loop pass, the batches held ~2 keys at 32 concurrent credits (a pass rarely holds
    more: credits finish at Temporal's pace); with one batch of a kind in flight (an insert
    waits for its journal sync) they hold what arrived meanwhile (session 10)."""

    def __init__(self, *args: Any, mongo_lane: asyncio.Lock | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One MongoDB batch in flight at a time between the key's reads and inserts and
        # whoever else holds `mongo_lane` (the gateway's audit appender: gateway.state).
        self.mongo_lane = mongo_lane or asyncio.Lock()
        self.leases: PassBatcher[tuple[str, str], Any] = FlightBatcher(self._leases_of)
        self.finds: PassBatcher[str, dict[str, Any]] = FlightBatcher(
            self._finals_of, shared=self.mongo_lane)
        self.inserts: PassBatcher[str, bool] = FlightBatcher(
            self._insert_pending, shared=self.mongo_lane)
        self._to_insert: dict[str, dict[str, Any]] = {}  # by _id, until its batch leaves

    async def _leases_of(self, asked: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        """The claims' scripts in one pipeline (one write, one read; no MULTI: each script is
        atomic alone, as its own call was). By its SHA only: a pipeline's registered scripts
        cost a SCRIPT EXISTS round trip per batch; the base class's calls load it."""
        pipe = self._redis.pipeline(transaction=False)
        for lease_key, value in asked:
            pipe.evalsha(self._claim.sha, 1, lease_key, value, self._lease_ms)
        try:
            return dict(zip(asked, await pipe.execute(), strict=True))
        except NoScriptError:  # Redis lost its script cache: each alone (loads it again)
            return {(lease_key, value): await self._take_alone(lease_key, value)
                    for lease_key, value in asked}  # fmt: skip

    async def _take_alone(self, lease_key: str, value: str) -> Any:
        taken = await super()._take_lease(lease_key, value)
        if isinstance(taken, list) and _text(taken[0]) == value:
            return 1  # the pipeline's script did run for this one: the lease is ours
        return taken

    async def _take_lease(self, lease_key: str, value: str) -> Any:
        if self.leases.full:
            return await super()._take_lease(lease_key, value)
        return (await self.leases.get([(lease_key, value)]))[lease_key, value]

    async def _finals_of(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        return {str(doc["_id"]): doc for doc in await find_in(self._collection, "_id", ids)}

    async def _find_final(self, _id: str) -> dict[str, Any] | None:
        if self.finds.full:
            return await super()._find_final(_id)
        return (await self.finds.get([_id])).get(_id)

    async def _insert_final(self, doc: dict[str, Any]) -> bool:
        _id = str(doc["_id"])
        if self.inserts.full or _id in self._to_insert:  # a second answer of one key: alone
            return await super()._insert_final(doc)
        self._to_insert[_id] = doc
        return (await self.inserts.get([_id]))[_id]

    async def _insert_pending(self, ids: list[str]) -> dict[str, bool]:
        """Insert the pass's documents; each id -> inserted (False: it had one already)."""
        taken = await insert_new(self._collection, [self._to_insert.pop(_id) for _id in ids])
        return {_id: index not in taken for index, _id in enumerate(ids)}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else bytes(value).decode()
