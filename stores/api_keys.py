"""API keys of the HTTP gateway (`api_keys` collection): who may call it, with which scopes.

A key is `wmk_<key_id>_<secret>`: `key_id` (16 hex digits, the document's `_id`) finds the
record in one indexed read and names the key in logs; `secret` is 32 random bytes. Only the
SHA-256 of the whole key is stored, never the key: whoever reads the collection cannot call
the API. A plain hash is enough here (unlike passwords): the secret has 256 bits of entropy,
so no dictionary or brute-force search over hashes can find it, and a slow KDF (bcrypt,
argon2) would cost milliseconds of CPU on every request of a 2-core gateway for nothing.

Scopes are stored as given; which scopes exist is the gateway's rule (gateway.operations).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from mongobase.mongo import as_utc, now_ms
from walletcore.errors import ConflictError, InvalidInputError
from walletcore.keys import ID_PATTERN

API_KEYS = "api_keys"
KEY_PREFIX = "wmk"
KEY_ID_BYTES = 8  # 16 hex digits: random, unique by the collection's _id
SECRET_BYTES = 32  # 256 bits of entropy (see the module docstring)
PRESENTED_KEY_MAX = 128  # longer than any key we issue: refused before hashing
NAME_MAX = 128  # walletmig/commands/api_key.py checks the same bound
SCOPES_MAX = 32
SCOPE_PATTERN = r"^[a-z]+:[a-z]+$"
LIST_LIMIT_MAX = 10_000
CREATE_ATTEMPTS_MAX = 4  # a random 64-bit id colliding even once is already astronomically rare
_KEY_RE = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{{KEY_ID_BYTES * 2}}})_([A-Za-z0-9_\-]+)$")


class ApiKeyRecord(BaseModel):
    """What the collection holds about one key (never the key itself)."""

    model_config = ConfigDict(frozen=True)

    key_id: str
    name: str = Field(min_length=1, max_length=NAME_MAX)
    owner: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)
    scopes: list[str] = Field(max_length=SCOPES_MAX)
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def usable(self, now: datetime) -> bool:
        """Neither revoked nor expired at `now`."""
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or as_utc(self.expires_at) > now


class IssuedKey(BaseModel):
    """A new key: `key` is shown once and never stored."""

    model_config = ConfigDict(frozen=True)

    key: str
    record: ApiKeyRecord


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key_id(key: str) -> str | None:
    """The key id of a well-formed presented key, else None (nothing else is looked at)."""
    if len(key) > PRESENTED_KEY_MAX:
        return None
    match = _KEY_RE.match(key)
    return None if match is None else match.group(1)


class ApiKeyStore:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._collection: AsyncCollection[Any] = db[API_KEYS]

    async def ensure_indexes(self) -> None:
        await self._collection.create_indexes(
            [IndexModel([("owner", ASCENDING)]), IndexModel([("name", ASCENDING)])]
        )

    async def create(
        self, *, name: str, owner: str, scopes: list[str], expires_at: datetime | None = None
    ) -> IssuedKey:
        for scope in scopes:
            if re.match(SCOPE_PATTERN, scope) is None:
                raise InvalidInputError(f"{scope!r} is not a scope", field="scopes")
        now = now_ms()
        if expires_at is not None and as_utc(expires_at) <= now:
            raise InvalidInputError("must be in the future", field="expires_at")
        for _ in range(CREATE_ATTEMPTS_MAX):
            key_id = secrets.token_hex(KEY_ID_BYTES)
            key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
            assert parse_key_id(key) == key_id, "an issued key must parse"
            record = ApiKeyRecord(
                key_id=key_id, name=name, owner=owner, scopes=sorted(set(scopes)),
                created_at=now, expires_at=expires_at,
            )  # fmt: skip
            doc = record.model_dump(mode="python", exclude={"key_id"})
            try:
                await self._collection.insert_one({"_id": key_id, "hash": key_hash(key), **doc})
            except DuplicateKeyError:
                continue
            return IssuedKey(key=key, record=record)
        raise ConflictError("could not draw an unused key id", field="key_id")

    async def verify(self, key: str) -> ApiKeyRecord | None:
        """The record of `key` when the key is one we issued (usable or not), else None."""
        key_id = parse_key_id(key)
        if key_id is None:
            return None
        doc = await self._collection.find_one({"_id": key_id})
        if doc is None:
            return None
        # Constant-time comparison: the response time says nothing about the stored hash.
        if not hmac.compare_digest(str(doc.get("hash", "")), key_hash(key)):
            return None
        return _record_of(doc)

    async def list(self, *, limit: int = 1000) -> list[ApiKeyRecord]:
        assert 1 <= limit <= LIST_LIMIT_MAX
        cursor = self._collection.find({}).sort("created_at", ASCENDING).limit(limit)
        return [_record_of(doc) async for doc in cursor]

    async def revoke(self, key_id: str) -> ApiKeyRecord | None:
        """Revoke the key (idempotent: the first revocation time stays). None: no such key."""
        await self._collection.update_one(
            {"_id": key_id, "revoked_at": None}, {"$set": {"revoked_at": now_ms()}}
        )
        doc = await self._collection.find_one({"_id": key_id})
        return None if doc is None else _record_of(doc)


def _record_of(doc: dict[str, Any]) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=str(doc["_id"]),
        name=doc["name"],
        owner=doc["owner"],
        scopes=list(doc.get("scopes", [])),
        created_at=as_utc(doc["created_at"]),
        expires_at=None if doc.get("expires_at") is None else as_utc(doc["expires_at"]),
        revoked_at=None if doc.get("revoked_at") is None else as_utc(doc["revoked_at"]),
    )
