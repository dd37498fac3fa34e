"""Idempotency-Key records of the HTTP gateway: a lease in Redis while a request runs, one
MongoDB document (`idempotency_keys` collection) per (owner, key) once it has its final answer.

The document holds the request's fingerprint, the transaction id the operation ran under and
the response to replay (status and body, byte for byte). It is written once, by one insert,
when the answer is known: a key used to cost an insert (claim) and an update (complete), ~2.8
ms of the MongoDB server's CPU per key; now an indexed point read and one insert (~1.4 ms).
While a request runs, its key is held by a Redis lease (a script: `SET NX PX`, else the
holder's value and time left; the value is token, fingerprint and transaction id). The lease
ends after `lease_s` by itself; a finished request leaves it to end (one Redis call fewer per
key), since whoever meets a lease reads the final document first. A request *claims* its key:

- the lease is held by another request: `mismatch` when that request's fingerprint differs;
  else the final document, if there is one, is replayed (`replay`), and otherwise the other
  request is still running, or its process died and the lease has not ended: `in_progress`;
- the lease is taken, and the key already has its final document (recorded after an earlier
  lease ended): `mismatch` or `replay`; the lease is let go;
- the lease is taken and no document: `acquired`: the caller runs. After a dead holder's
  lease ended that runs the operation again, which is safe because its transaction id is
  fixed by (owner, key) or the body (and a body with another id is a `mismatch`): the stores
  answer the repeat as a replay.

The lease is taken (or found) before the document is read, so a recorded answer is always
seen. Only the token holder releases a lease (compare and delete: a request whose dependency
was down lets its retry run at once); the first final answer inserted wins (a holder whose
lease ran out and a later attempt ran the same transaction id; the later one's insert finds
the first and keeps it). When Redis loses a lease (a restart without persistence), a
concurrent retry may run the same transaction id twice at once: the stores' idempotency still
applies it once. Redis down: claims fail (503, as the rate limiter of money-moving requests
fails closed by default).

Documents expire by a TTL index on `expires_at` (expireAfterSeconds=0: each document carries
its own expiry, so the retention is a setting); one found past its expiry before the TTL
monitor removed it counts as absent.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

import redis.asyncio as redis_asyncio
from pydantic import BaseModel, ConfigDict, Field
from pymongo import IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from mongobase.mongo import as_utc, now_ms

IDEMPOTENCY_KEYS = "idempotency_keys"
TTL_S_MIN = 24 * 3600  # the IETF draft and Stripe keep keys at least 24 h
TTL_S_MAX = 30 * 24 * 3600
LEASE_S_MIN = 1.0
LEASE_S_MAX = 3600.0
RESPONSE_BODY_MAX = 256 * 1024  # bytes of a stored response: far above any gateway answer
CLAIM_ATTEMPTS_MAX = 4  # each lost race means another request changed the lease meanwhile
TOKEN_BYTES = 16
LEASE_PREFIX = "walletmig-idem:"  # Redis key of a lease: the prefix and the record's _id
# Take the lease, or answer its holder's value and the milliseconds it has left (one round
# trip: a pipeline of SET NX, GET and PTTL cost the API process ~0.5 ms of CPU per key).
CLAIM_SCRIPT = (
    "if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end "
    "local holder = redis.call('get', KEYS[1]) "
    "if not holder then return 0 end "
    "return {holder, redis.call('pttl', KEYS[1])}"
)
# Compare and delete: only the lease's holder lets go of it.
RELEASE_SCRIPT = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end "
    "return 0"
)


class RecordState(StrEnum):
    DONE = "done"  # every document is final (in progress is a Redis lease)


class StoredResponse(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: int = Field(ge=100, le=599)
    media_type: str
    body: str = Field(max_length=RESPONSE_BODY_MAX)


class KeyedRequest(BaseModel):
    """One request under an Idempotency-Key: whose key, and what it asks."""

    model_config = ConfigDict(frozen=True)

    owner: str
    key: str
    operation: str
    fingerprint: str  # hex digest of the operation and its canonical body
    transaction_id: str

    @property
    def record_id(self) -> str:
        return record_id(self.owner, self.key)


class Claim(BaseModel):
    """The outcome of `claim`. `token` is set when the caller holds the lease (acquired);
    `response` for a replay; `locked_until` for in_progress."""

    model_config = ConfigDict(frozen=True)

    outcome: Literal["acquired", "replay", "mismatch", "in_progress"]
    transaction_id: str
    token: str | None = None
    response: StoredResponse | None = None
    locked_until: datetime | None = None


def record_id(owner: str, key: str) -> str:
    """Fixed-size _id whatever the key's length; the NUL keeps ("a", "bc") apart from ("ab",
    "c")."""
    return hashlib.sha256(f"{owner}\x00{key}".encode()).hexdigest()


class IdempotencyStore:
    def __init__(
        self, db: AsyncDatabase[Any], redis: redis_asyncio.Redis, *, ttl_s: int = TTL_S_MIN,
        lease_s: float = 60.0,
    ) -> None:  # fmt: skip
        assert TTL_S_MIN <= ttl_s <= TTL_S_MAX, "keys are kept at least 24 h"
        assert LEASE_S_MIN <= lease_s <= LEASE_S_MAX
        self._collection: AsyncCollection[Any] = db[IDEMPOTENCY_KEYS]
        self._redis = redis
        self._claim = redis.register_script(CLAIM_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)
        self._ttl = timedelta(seconds=ttl_s)
        self._lease_ms = int(lease_s * 1000)

    async def ensure_indexes(self) -> None:
        await self._collection.create_indexes(
            [IndexModel([("expires_at", 1)], expireAfterSeconds=0)]
        )

    async def claim(self, request: KeyedRequest) -> Claim:
        """See the module docstring. Bounded: after CLAIM_ATTEMPTS_MAX lost races the request
        is told the key is in progress (a retry sorts it out)."""
        lease_key = LEASE_PREFIX + request.record_id
        for _ in range(CLAIM_ATTEMPTS_MAX):
            token = secrets.token_hex(TOKEN_BYTES)
            mine = _lease_value(token, request)
            taken = await self._take_lease(lease_key, mine)
            if taken == 0:
                continue  # the lease ended just now: try again
            if taken != 1:
                holder, left_ms = taken
                text = holder if isinstance(holder, str) else bytes(holder).decode()
                held = _held(request, text, int(left_ms))
                final = None if held.outcome == "mismatch" else await self._final(request.record_id)
                return held if final is None else _answered(request, final)
            final = await self._final(request.record_id)
            if final is None:
                return Claim(
                    outcome="acquired", transaction_id=request.transaction_id, token=token
                )
            await self._release(keys=[lease_key], args=[mine])
            return _answered(request, final)
        locked = now_ms() + timedelta(milliseconds=self._lease_ms)
        return Claim(
            outcome="in_progress", transaction_id=request.transaction_id, locked_until=locked
        )

    async def _final(self, _id: str) -> dict[str, Any] | None:
        """The key's final document, None when there is none (or only an expired one)."""
        doc = await self._find_final(_id)
        if doc is None:
            return None
        if as_utc(doc["expires_at"]) <= now_ms():  # the TTL monitor has not run yet
            await self._collection.delete_one({"_id": _id, "expires_at": doc["expires_at"]})
            return None
        return doc

    async def _take_lease(self, lease_key: str, value: str) -> Any:
        """CLAIM_SCRIPT on `lease_key` (a subclass may send many claims' at once)."""
        return await self._claim(keys=[lease_key], args=[value, self._lease_ms])

    async def _find_final(self, _id: str) -> dict[str, Any] | None:
        """The key's document as stored (a subclass may read many keys' at once)."""
        doc: dict[str, Any] | None = await self._collection.find_one({"_id": _id})
        return doc

    async def _insert_final(self, doc: dict[str, Any]) -> bool:
        """Insert a final document; False when the key has one already (the first stands)."""
        try:
            await self._collection.insert_one(doc)
        except DuplicateKeyError:
            return False
        return True

    async def complete(
        self, request: KeyedRequest, *, token: str, response: StoredResponse
    ) -> bool:
        """Record the final response (one insert); False when another attempt's answer was
        recorded first (it stands). The lease is left to end: claims read this first."""
        assert token, "only a claim's holder completes"
        now = now_ms()
        return await self._insert_final({
            "_id": request.record_id, "owner": request.owner, "key": request.key,
            "operation": request.operation, "fingerprint": request.fingerprint,
            "transaction_id": request.transaction_id, "state": RecordState.DONE.value,
            "response": response.model_dump(), "completed_at": now,
            "expires_at": now + self._ttl,
        })  # fmt: skip

    async def release(self, request: KeyedRequest, *, token: str) -> None:
        """Let go of the lease (the request has no final answer: a dependency was down): the
        next retry claims the key at once. A lease another attempt holds now is left alone."""
        lease_key = LEASE_PREFIX + request.record_id
        await self._release(keys=[lease_key], args=[_lease_value(token, request)])


def _lease_value(token: str, request: KeyedRequest) -> str:
    # Newline-separated: fingerprints are hex and transaction ids admit no control characters.
    return f"{token}\n{request.fingerprint}\n{request.transaction_id}"


def _held(request: KeyedRequest, holder: str, left_ms: int) -> Claim:
    """The claim a lease held by another request gives."""
    _, fingerprint, transaction_id = holder.split("\n", 2)
    if fingerprint != request.fingerprint:
        return Claim(outcome="mismatch", transaction_id=transaction_id)
    locked_until = now_ms() + timedelta(milliseconds=max(0, left_ms))
    return Claim(outcome="in_progress", transaction_id=transaction_id, locked_until=locked_until)


def _answered(request: KeyedRequest, doc: dict[str, Any]) -> Claim:
    """The claim a final document gives."""
    transaction_id = str(doc["transaction_id"])
    if doc["fingerprint"] != request.fingerprint:
        return Claim(outcome="mismatch", transaction_id=transaction_id)
    response = StoredResponse.model_validate(doc["response"])
    return Claim(outcome="replay", transaction_id=transaction_id, response=response)
