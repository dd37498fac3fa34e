"""The migration audit log (`migration_audit` collection): every accepted migration action.

One document per action: who (the actor the Update named, or a marker that it named nobody),
when, from, to, evidence, reason, the Update's input as the caller sent it (`request`), and
the workflow's clocks after the action. `_id` is `<migration_id>:<seq>` so a retried activity
writes the same entry once. The workflow's own entries (automatic rollback, a refused
cancellation, adopting the published phase after a reset) name `migration-workflow` or
`temporal cancel request` as the actor.

The entries are chained in place (stores.audit_chain, chain `migration:<migration_id>`): each
carries `chain`, `chain_seq`, `prev_hash` and `hash`, written in one transaction with the
chain's head, so `walletmig audit verify` finds an edited or deleted entry.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from messages.migration import AuditEntry
from mongobase.mongo import as_utc
from stores.audit_chain import (
    MIGRATION_AUDIT,
    AuditChain,
    RecordExistsError,
    migration_chain,
    storable,
)
from walletcore.errors import ConflictError, StoreUnavailableError

AUDIT_LIST_LIMIT_MAX = 1000
RECORD_ATTEMPTS_MAX = 3  # a concurrent attempt of the same activity wrote it: compare, done
CHAIN_FIELDS = ("chain", "chain_seq", "prev_hash", "hash")


def audit_id(migration_id: str, seq: int) -> str:
    return f"{migration_id}:{seq:08d}"


class AuditLog:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._collection: AsyncCollection[Any] = db[MIGRATION_AUDIT]
        self._chain = AuditChain(db)

    async def ensure_indexes(self) -> None:
        await self._collection.create_indexes(
            [IndexModel([("migration_id", ASCENDING), ("seq", ASCENDING)])])
        await self._chain.ensure_indexes()

    async def record(self, entry: AuditEntry) -> None:
        """Idempotent: the same entry again is a no-op; a different one under the same seq is a
        conflict (two writers think they own the migration). Chained with its head in one
        transaction."""
        doc = storable({"_id": audit_id(entry.migration_id, entry.seq),
                        **entry.model_dump(mode="python")})  # fmt: skip
        for _ in range(RECORD_ATTEMPTS_MAX):
            existing = await self._collection.find_one({"_id": doc["_id"]})
            if existing is not None:
                _check_same(existing, entry, doc["_id"])
                return
            try:
                await self._chain.append(MIGRATION_AUDIT, migration_chain(entry.migration_id),
                                         [doc])  # fmt: skip
                return
            except RecordExistsError:
                continue  # written meanwhile (a retried activity's earlier attempt): compare
        raise StoreUnavailableError(f"MongoDB (audit log): entry {doc['_id']} neither written "
                                    "nor readable", field=None)  # fmt: skip

    async def list(self, migration_id: str, limit: int = 100) -> list[AuditEntry]:
        """The migration's entries, oldest first (the last `limit`)."""
        assert 1 <= limit <= AUDIT_LIST_LIMIT_MAX
        cursor = self._collection.find({"migration_id": migration_id}).sort(
            "seq", DESCENDING).limit(limit)
        docs = [doc async for doc in cursor]
        docs.reverse()
        return [AuditEntry.model_validate({k: _aware(v) for k, v in d.items()
                                           if k != "_id" and k not in CHAIN_FIELDS})
                for d in docs]  # fmt: skip


def _check_same(existing: dict[str, Any], entry: AuditEntry, doc_id: str) -> None:
    if (existing.get("action"), existing.get("epoch"), existing.get("actor")) != (
            entry.action, entry.epoch, entry.actor):
        raise ConflictError(f"audit entry {doc_id} already holds a different action",
                            field="seq")  # fmt: skip


def _aware(value: Any) -> Any:
    """A client opened without tz_aware reads naive datetimes (UTC): the workflow subtracts
    them from its own aware clock."""
    return as_utc(value) if isinstance(value, datetime) else value
