"""Idempotency-Key records of the HTTP gateway (`idempotency_keys` collection).

One document per (owner, key): the request's fingerprint, the transaction id the operation
runs under, and, once it finished, the response to replay (status and body, byte for byte).
A request first *claims* its key:

- no record: it is inserted `in_progress` with a lease and a random token: the caller runs;
- a record with another fingerprint: `mismatch` (the key was used for another request);
- `done`: `replay` the stored response;
- `in_progress` with a live lease: `in_progress` (the first is still running);
- `in_progress` whose lease ran out (its process died): the caller takes it over (new token)
  and runs again. That is safe because the operation's transaction id is fixed by the record
  (derived from owner and key, or the body's own): the stores answer the repeat as a replay.

Only the token holder completes or releases a record, so a request that lost its lease to a
takeover cannot overwrite the newer attempt's answer. Records expire by a TTL index on
`expires_at` (expireAfterSeconds=0: each document carries its own expiry, so the retention is
a setting and changing it needs no index rebuild); a record found past its expiry before the
TTL monitor removed it counts as absent.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

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
CLAIM_ATTEMPTS_MAX = 4  # each lost race means another request changed the record meanwhile
TOKEN_BYTES = 16


class RecordState(StrEnum):
    IN_PROGRESS = "in_progress"
    DONE = "done"


class StoredResponse(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: int = Field(ge=100, le=599)
    media_type: str
    body: str = Field(max_length=RESPONSE_BODY_MAX)


class Claim(BaseModel):
    """The outcome of `claim`. `token` is set when the caller owns the record (acquired);
    `response` for a replay; `locked_until` for in_progress."""

    model_config = ConfigDict(frozen=True)

    outcome: Literal["acquired", "replay", "mismatch", "in_progress"]
    transaction_id: str
    token: str | None = None
    taken_over: bool = False
    response: StoredResponse | None = None
    locked_until: datetime | None = None


def record_id(owner: str, key: str) -> str:
    """Fixed-size _id whatever the key's length; the NUL keeps ("a", "bc") apart from ("ab",
    "c")."""
    return hashlib.sha256(f"{owner}\x00{key}".encode()).hexdigest()


class IdempotencyStore:
    def __init__(
        self, db: AsyncDatabase[Any], *, ttl_s: int = TTL_S_MIN, lease_s: float = 60.0
    ) -> None:
        assert TTL_S_MIN <= ttl_s <= TTL_S_MAX, "keys are kept at least 24 h"
        assert LEASE_S_MIN <= lease_s <= LEASE_S_MAX
        self._collection: AsyncCollection[Any] = db[IDEMPOTENCY_KEYS]
        self._ttl = timedelta(seconds=ttl_s)
        self._lease = timedelta(seconds=lease_s)

    async def ensure_indexes(self) -> None:
        await self._collection.create_indexes(
            [IndexModel([("expires_at", 1)], expireAfterSeconds=0)]
        )

    async def claim(
        self, *, owner: str, key: str, operation: str, fingerprint: str, transaction_id: str
    ) -> Claim:
        """See the module docstring. Bounded: after CLAIM_ATTEMPTS_MAX lost races the request
        is told the key is in progress (a retry sorts it out)."""
        _id = record_id(owner, key)
        doc: dict[str, Any] | None = None
        for _ in range(CLAIM_ATTEMPTS_MAX):
            now = now_ms()
            token = secrets.token_hex(TOKEN_BYTES)
            fresh = {
                "_id": _id, "owner": owner, "key": key, "operation": operation,
                "fingerprint": fingerprint, "transaction_id": transaction_id,
                "state": RecordState.IN_PROGRESS.value, "token": token,
                "locked_until": now + self._lease, "created_at": now,
                "expires_at": now + self._ttl, "response": None,
            }  # fmt: skip
            try:
                await self._collection.insert_one(fresh)
                return Claim(outcome="acquired", transaction_id=transaction_id, token=token)
            except DuplicateKeyError:
                pass
            doc = await self._collection.find_one({"_id": _id})
            if doc is None:
                continue  # released or expired between our insert and read
            if as_utc(doc["expires_at"]) <= now:  # the TTL monitor has not run yet
                await self._collection.delete_one({"_id": _id, "token": doc["token"]})
                continue
            claim = await self._existing(doc, fingerprint, now, token)
            if claim is not None:
                return claim
        locked = None if doc is None else as_utc(doc["locked_until"])
        return Claim(outcome="in_progress", transaction_id=transaction_id, locked_until=locked)

    async def _existing(
        self, doc: dict[str, Any], fingerprint: str, now: datetime, token: str
    ) -> Claim | None:
        """The claim an existing record gives, or None when a takeover lost a race."""
        txn = str(doc["transaction_id"])
        if doc["fingerprint"] != fingerprint:
            return Claim(outcome="mismatch", transaction_id=txn)
        if doc["state"] == RecordState.DONE.value:
            response = StoredResponse.model_validate(doc["response"])
            return Claim(outcome="replay", transaction_id=txn, response=response)
        locked_until = as_utc(doc["locked_until"])
        if locked_until > now:
            return Claim(outcome="in_progress", transaction_id=txn, locked_until=locked_until)
        # The holder's lease ran out (its process died or hung): take the record over.
        taken = await self._collection.update_one(
            {"_id": doc["_id"], "token": doc["token"], "state": RecordState.IN_PROGRESS.value},
            {"$set": {"token": token, "locked_until": now + self._lease}},
        )
        if taken.modified_count != 1:
            return None
        return Claim(outcome="acquired", transaction_id=txn, token=token, taken_over=True)

    async def complete(
        self, *, owner: str, key: str, token: str, response: StoredResponse
    ) -> bool:
        """Record the final response; False when the token no longer holds the record."""
        done = await self._collection.update_one(
            {"_id": record_id(owner, key), "token": token,
             "state": RecordState.IN_PROGRESS.value},
            {"$set": {"state": RecordState.DONE.value, "response": response.model_dump(),
                      "completed_at": now_ms()}},
        )  # fmt: skip
        return done.modified_count == 1

    async def release(self, *, owner: str, key: str, token: str) -> None:
        """Forget an attempt that produced no final answer (a dependency was down): the next
        retry runs the operation again under the same transaction id."""
        await self._collection.delete_one(
            {"_id": record_id(owner, key), "token": token, "state": RecordState.IN_PROGRESS.value}
        )
