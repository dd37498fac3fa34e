"""Blocked counterparties of the credit terminal: the list the `blocked_counterparty` check reads.

Collection `clearing_blocked`, `_id` = the counterparty in walletcore.clearing_checks'
normalized form (case-insensitive: partners send ids in whatever case), so blocking is
idempotent and a party is listed once. The checks read only the parties of the batch they
check (chunked `$in` on `_id`), never the whole list.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from mongobase.mongo import as_utc, now_ms
from mongobase.queries import find_in
from walletcore.clearing import COUNTERPARTY_MAX
from walletcore.clearing_checks import BLOCKED_MAX, normalized_party
from walletcore.errors import InvalidInputError

CLEARING_BLOCKED = "clearing_blocked"
REASON_MAX = 256
PARTIES_PER_READ_MAX = 8189  # one batch's counterparties


class BlockedParty(BaseModel):
    model_config = ConfigDict(frozen=True)

    counterparty: str = Field(min_length=1, max_length=COUNTERPARTY_MAX)
    reason: str | None = Field(default=None, max_length=REASON_MAX)
    blocked_at: datetime


class BlockedParties:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._parties: AsyncCollection[Any] = db[CLEARING_BLOCKED]

    async def block(self, counterparty: str, reason: str | None = None) -> bool:
        """Block `counterparty`; False when it was blocked already (its first reason stays)."""
        key = _key(counterparty)
        if reason is not None and len(reason) > REASON_MAX:
            raise InvalidInputError(f"at most {REASON_MAX} characters", field="reason")
        if await self._parties.estimated_document_count() >= BLOCKED_MAX:
            raise InvalidInputError(f"the list holds {BLOCKED_MAX} parties already",
                                    field="counterparty")
        updated = await self._parties.update_one(
            {"_id": key},
            {"$setOnInsert": {"reason": reason, "blocked_at": now_ms()}},
            upsert=True,
        )
        return updated.upserted_id is not None

    async def unblock(self, counterparty: str) -> bool:
        """Lift the block; False when the party was not blocked."""
        deleted = await self._parties.delete_one({"_id": _key(counterparty)})
        return deleted.deleted_count == 1

    async def blocked_among(self, counterparties: Sequence[str]) -> frozenset[str]:
        """The normalized forms of those `counterparties` that are blocked (what
        walletcore.clearing_checks.CheckContext.blocked_counterparties holds)."""
        if len(counterparties) > PARTIES_PER_READ_MAX:
            raise InvalidInputError(f"at most {PARTIES_PER_READ_MAX} per read",
                                    field="counterparties")
        keys = sorted({normalized_party(party) for party in counterparties})
        if not keys:
            return frozenset()
        docs = await find_in(self._parties, "_id", keys, {"_id": 1})
        return frozenset(doc["_id"] for doc in docs)

    async def list(self, limit: int = 100) -> list[BlockedParty]:
        if not 1 <= limit <= BLOCKED_MAX:
            raise InvalidInputError(f"must be 1..{BLOCKED_MAX}, got {limit}", field="limit")
        cursor = self._parties.find({}).sort("_id", ASCENDING).limit(limit)
        return [
            BlockedParty(counterparty=doc["_id"], reason=doc.get("reason"),
                         blocked_at=as_utc(doc["blocked_at"]))
            async for doc in cursor
        ]


def _key(counterparty: str) -> str:
    key = normalized_party(counterparty)
    if not 0 < len(key) <= COUNTERPARTY_MAX:
        raise InvalidInputError(f"1..{COUNTERPARTY_MAX} characters", field="counterparty")
    return key
