"""The migration audit log (`migration_audit` collection): every accepted migration action.

One document per action: who (the actor the Update named, or a marker that it named nobody),
when, from, to, evidence, reason, the Update's input as the caller sent it (`request`), and
the workflow's clocks after the action. `_id` is `<migration_id>:<seq>` so a retried activity
writes the same entry once. The workflow's own entries (automatic rollback, a refused
cancellation, adopting the published phase after a reset) name `migration-workflow` or
`temporal cancel request` as the actor.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from messages.migration import AuditEntry
from mongobase.mongo import as_utc
from walletcore.errors import ConflictError

MIGRATION_AUDIT = "migration_audit"
AUDIT_LIST_LIMIT_MAX = 1000


def audit_id(migration_id: str, seq: int) -> str:
    return f"{migration_id}:{seq:08d}"


class AuditLog:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._collection: AsyncCollection[Any] = db[MIGRATION_AUDIT]

    async def ensure_indexes(self) -> None:
        await self._collection.create_indexes(
            [IndexModel([("migration_id", ASCENDING), ("seq", ASCENDING)])])

    async def record(self, entry: AuditEntry) -> None:
        """Idempotent: the same entry again is a no-op; a different one under the same seq is a
        conflict (two writers think they own the migration)."""
        doc = {"_id": audit_id(entry.migration_id, entry.seq), **entry.model_dump(mode="python")}
        doc["from_phase"] = entry.from_phase.value
        doc["to_phase"] = entry.to_phase.value
        try:
            await self._collection.insert_one(doc)
        except DuplicateKeyError:
            existing = await self._collection.find_one({"_id": doc["_id"]})
            if existing is None or (existing.get("action"), existing.get("epoch"),
                                    existing.get("actor")) != (entry.action, entry.epoch,
                                                               entry.actor):
                raise ConflictError(f"audit entry {doc['_id']} already holds a different action",
                                    field="seq") from None

    async def list(self, migration_id: str, limit: int = 100) -> list[AuditEntry]:
        """The migration's entries, oldest first (the last `limit`)."""
        assert 1 <= limit <= AUDIT_LIST_LIMIT_MAX
        cursor = self._collection.find({"migration_id": migration_id}).sort(
            "seq", DESCENDING).limit(limit)
        docs = [doc async for doc in cursor]
        docs.reverse()
        return [AuditEntry.model_validate({k: _aware(v) for k, v in d.items() if k != "_id"})
                for d in docs]


def _aware(value: Any) -> Any:
    """A client opened without tz_aware reads naive datetimes (UTC): the workflow subtracts
    them from its own aware clock."""
    return as_utc(value) if isinstance(value, datetime) else value
