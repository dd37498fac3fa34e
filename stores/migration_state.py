"""The published migration state (`migration_state` collection), read on every wallet write.

One document per scope: a ledger pair ("USD:USA") or "*" for every pair. A pair's own document
wins over "*"; no document at all means `legacy`. Reads are cached for a short time because
every write asks; `epoch` (monotonic per scope) lets callers tell which state they acted on.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from observability.metrics import observe_migration_state
from walletcore.errors import ConflictError
from walletcore.gates import GLOBAL_SCOPE as GLOBAL_SCOPE  # re-exported (read path)
from walletcore.phases import MigrationState

MIGRATION_STATE = "migration_state"
CACHE_TTL_S_DEFAULT = 1.0
CACHE_TTL_S_MAX = 60.0
# A read in the last half of an entry's life refreshes it in the background (see find).
REFRESH_AHEAD_FRACTION = 0.5
CACHE_SCOPES_MAX = 1024  # pairs are few (one per ledger); a bound keeps a typo loop harmless


class MigrationStateStore:
    """Reads and writes migration state documents, with a per-process read cache.

    A phase change is visible to every worker within `cache_ttl_s`: whoever changes the phase
    must wait that long before relying on it (e.g. before starting a backfill).
    """

    def __init__(self, db: AsyncDatabase[Any], *, cache_ttl_s: float = CACHE_TTL_S_DEFAULT) -> None:
        assert 0 <= cache_ttl_s <= CACHE_TTL_S_MAX
        self._collection: AsyncCollection[Any] = db[MIGRATION_STATE]
        self._cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, MigrationState | None]] = {}
        # One cache refill per scope in flight: when the entry expires under load, every
        # concurrent caller would otherwise send its own find_one (a herd each second that
        # put MongoDB's latency into the tail of TigerBeetle reads). Callers that miss join it.
        self._refills: dict[str, asyncio.Task[MigrationState | None]] = {}

    async def find(
        self, scope: str, *, fresh: bool = False, ahead: bool = True
    ) -> MigrationState | None:
        """The scope's own document (cached unless `fresh`), or None when it has none.
        `ahead=False`: no refresh ahead from this read (another read's refresh brings it)."""
        assert scope, "scope must be a ledger pair or '*'"
        now = time.monotonic()
        cached = self._cache.get(scope)
        if not fresh and cached is not None and cached[0] > now:
            if ahead and cached[0] - now < self._cache_ttl_s * REFRESH_AHEAD_FRACTION:
                # Refresh ahead, in the background: no caller waits for the read when the
                # entry runs out (at one caller every write of the second after it did:
                # issue 18's p95). The entry is still served only until it expires.
                self._refill(scope)
            return cached[1]
        if fresh:
            return await self._read(scope)  # must start after the call: never joins
        # shield: a caller cancelled (its deadline) must not cancel the others' refill.
        return await asyncio.shield(self._refill(scope))

    def _refill(self, scope: str) -> asyncio.Future[MigrationState | None]:
        """The scope's read in flight, started if none is (one per scope)."""
        refill = self._refills.get(scope)
        if refill is None or refill.get_loop() is not asyncio.get_running_loop():
            refill = asyncio.ensure_future(self._read(scope))
            self._refills[scope] = refill
            refill.add_done_callback(lambda done: self._refill_done(scope, done))
        return refill

    def _refill_done(self, scope: str, done: asyncio.Future[MigrationState | None]) -> None:
        if self._refills.get(scope) is done:
            del self._refills[scope]
        if not done.cancelled():
            done.exception()  # a failed background refresh: the next expired read retries

    async def _read(self, scope: str) -> MigrationState | None:
        # A pair's read brings '*' along in the same query: resolve asks for '*' right after
        # whenever the pair has no document of its own (most pairs), which was a second
        # round trip on a write that found the cache expired (issue 18), and a second
        # background refresh per second.
        scopes = [scope] if scope == GLOBAL_SCOPE else [scope, GLOBAL_SCOPE]
        cursor = self._collection.find({"_id": {"$in": scopes}})
        docs = {doc["_id"]: doc for doc in await cursor.to_list(length=len(scopes))}
        after = time.monotonic()
        if len(self._cache) >= CACHE_SCOPES_MAX:
            self._cache.clear()
        states = [self._cached(s, docs.get(s), after) for s in scopes]
        return states[0]

    def _cached(
        self, scope: str, doc: dict[str, Any] | None, after: float
    ) -> MigrationState | None:
        """Cache what a read found for `scope` (finished at `after`); the state to use."""
        state = None if doc is None else _state_of(doc)
        # Concurrent misses finish in any order: a read that started before a phase change
        # must not replace the newer state a later read already cached (answers would go
        # back in epoch). Only while that entry is live, so a rewritten document still shows.
        current = self._cache.get(scope)
        if (
            current is not None
            and current[0] > after
            and current[1] is not None
            and state is not None
            and current[1].epoch > state.epoch
        ):
            return current[1]
        self._cache[scope] = (after + self._cache_ttl_s, state)
        return state

    async def get(self, scope: str) -> MigrationState:
        """The scope's state; absent means legacy (epoch 0)."""
        state = await self.find(scope)
        return MigrationState(scope=scope) if state is None else state

    async def resolve(self, ledger_pair: str, *, fresh: bool = False) -> MigrationState:
        """The state a wallet of `ledger_pair` follows: its pair's document, else '*'.
        `fresh` reads through the cache (and refreshes it). The state is published as the
        `walletmig_migration_phase` gauges: what this process acts on."""
        own = await self.find(ledger_pair, fresh=fresh)
        if own is None:
            # Cached by the pair's read (see _read), which also refreshes it ahead.
            state = await self.find(GLOBAL_SCOPE, fresh=fresh, ahead=False)
            own = MigrationState(scope=GLOBAL_SCOPE) if state is None else state
        observe_migration_state(own.scope, own.phase.value, own.rollout_percent, own.epoch)
        return own

    async def set(self, state: MigrationState) -> MigrationState:
        """Publish `state`; its epoch must be above the stored one (a stale writer is refused)."""
        stamped = state.model_copy(update={"updated_at": state.updated_at or datetime.now(UTC)})
        doc = stamped.model_dump(mode="python", exclude={"scope"})
        doc["phase"] = stamped.phase.value
        try:
            # The filter only matches an older epoch; an equal or newer one makes the upsert
            # try to insert a second `_id`, which the unique key turns into a clear refusal.
            await self._collection.update_one(
                {"_id": stamped.scope, "epoch": {"$lt": stamped.epoch}},
                {"$set": doc},
                upsert=True,
            )
        except DuplicateKeyError:
            current = await self._collection.find_one({"_id": stamped.scope})
            raise ConflictError(
                f"scope {stamped.scope!r} is already at epoch "
                f"{None if current is None else current.get('epoch')}; "
                f"refusing epoch {stamped.epoch}",
                field="epoch",
            ) from None
        finally:
            self.invalidate(stamped.scope)
        observe_migration_state(
            stamped.scope, stamped.phase.value, stamped.rollout_percent, stamped.epoch)
        return stamped

    def invalidate(self, scope: str | None = None) -> None:
        """Forget cached reads (all scopes when None)."""
        if scope is None:
            self._cache.clear()
        else:
            self._cache.pop(scope, None)


def _state_of(doc: dict[str, Any]) -> MigrationState:
    return MigrationState(
        scope=str(doc["_id"]),
        phase=doc.get("phase", "legacy"),
        rollout_percent=int(doc.get("rollout_percent", 0)),
        epoch=int(doc.get("epoch", 0)),
        migration_id=doc.get("migration_id"),
        updated_at=doc.get("updated_at"),
    )
