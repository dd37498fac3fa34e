"""Account Registry: wallet key <-> TigerBeetle account id, ledger and nonce.

The registry is the authority for account ids. The id is account_id(key, nonce) starting at
nonce 0; a unique index on `account_id` detects a collision with another wallet, and the
registry then tries the next nonce and records the one that won. Records never change after
creation, which is what makes the Redis read-through cache safe.

Reads of an account by wallet (`read_account`, the TigerBeetle balance read) skip the registry
trip: the id of a wallet seen before is remembered in process (immutable, so never stale), and a
wallet not seen yet is looked up at its derived id (nonce 0) WHILE the registry is asked; the
derived answer is used only when the registry's record says nonce 0. So the answer always comes
from the id the registry recorded (correct under collisions) and costs one TigerBeetle round
trip, the registry's running beside it only on a wallet's first read in the process.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Generic, NamedTuple, TypeVar

import redis.asyncio as redis_asyncio
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from mongobase.mongo import (
    IN_CHUNK_MAX,
    PAGE_LIMIT_MAX,
    as_utc,
    hex_to_u128,
    insert_new,
    now_ms,
    u128_to_hex,
)
from mongobase.queries import find_in, find_keys
from registries.cache import CACHE_KEY_PREFIX, JsonCache
from walletcore.errors import ConflictError, InvalidInputError
from walletcore.ids import NONCE_MAX, U128_MAX, account_id, wallet_log_name
from walletcore.keys import WalletKey
from walletcore.ledgers import DEFAULT_LEDGER_TABLE, LEDGER_MAX, LedgerTable

log = logging.getLogger(__name__)

ACCOUNT_REGISTRY = "account_registry"
DEFAULT_TTL_S = 1800
CREATE_ATTEMPTS_MAX = 4 * (NONCE_MAX + 1)  # each nonce may also lose a race or two
MANY_MAX = PAGE_LIMIT_MAX  # wallets per get_many / create_many call (one backfill page)
CREATE_CONCURRENCY = 64  # get_or_create calls in flight for the leftovers of create_many
# Wallet -> account id remembered for reads (~250 bytes each: ~16 MB); beyond it, least recent out.
READ_IDS_MAX = 65_536
# Registry entries one `remember_pair` page reads (one bounded (ledger, _id) index range read).
REMEMBER_PAGE = 2048

Document = dict[str, Any]
T = TypeVar("T")


class AccountRead(NamedTuple, Generic[T]):
    """What `read_account` found: registered False = the registry has no such wallet; found None
    = registered, but the lookup found nothing (its account not created yet)."""

    registered: bool
    found: T | None


class AccountRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    wallet: WalletKey
    account_id: int = Field(gt=0, lt=U128_MAX)
    ledger: int = Field(gt=0, le=LEDGER_MAX)
    nonce: int = Field(ge=0, le=NONCE_MAX)
    allow_overdraft: bool
    created_at: datetime


class AccountRegistry:
    def __init__(
        self,
        db: AsyncDatabase[Any],
        cache: redis_asyncio.Redis | None,
        *,
        ttl_s: int = DEFAULT_TTL_S,
        ledgers: LedgerTable = DEFAULT_LEDGER_TABLE,
    ) -> None:
        self._accounts: AsyncCollection[Any] = db[ACCOUNT_REGISTRY]
        self._cache = JsonCache(cache, prefix=CACHE_KEY_PREFIX, ttl_s=ttl_s)
        self._ledgers = ledgers
        self._read_ids: OrderedDict[str, int] = OrderedDict()  # canonical -> id (read_account)

    @property
    def cache(self) -> JsonCache:
        return self._cache

    async def ensure_indexes(self) -> None:
        await self._accounts.create_indexes(
            [
                IndexModel([("account_id", ASCENDING)], name="account_id", unique=True),
                IndexModel([("client_id", ASCENDING)], name="client_id"),
                IndexModel([("ledger", ASCENDING), ("_id", ASCENDING)], name="ledger_id"),
            ]
        )

    async def get(self, wallet: WalletKey) -> AccountRecord | None:
        """Read-through: Redis first, MongoDB on a miss or any cache trouble."""
        canonical = wallet.canonical
        cached = await self._cache.get(canonical)
        if cached is not None:
            try:
                record = AccountRecord.model_validate_json(cached)
            except ValidationError as exc:  # never trust a mangled entry: drop it, read Mongo
                log.warning("discarding unreadable cache entry for %s: %s", wallet_log_name(wallet),
                            type(exc).__name__)
                await self._cache.delete(canonical)
            else:
                if record.wallet.canonical == canonical:
                    return record
                await self._cache.delete(canonical)
        doc = await self._accounts.find_one({"_id": canonical})
        if doc is None:
            return None  # not cached: the wallet may be created a moment later
        record = _record_of(doc)
        await self._cache.set(canonical, record.model_dump_json())
        return record

    async def read_account(self, wallet: WalletKey,
                           lookup: Callable[[int], Awaitable[T | None]]) -> AccountRead[T]:
        """`lookup(account id)` of the wallet's account in ONE round trip of `lookup` (see the
        module docstring): the remembered id, else the derived id beside the registry read."""
        canonical = wallet.canonical
        known = self._read_ids.get(canonical)
        if known is not None:
            self._read_ids.move_to_end(canonical)
            return AccountRead(True, await lookup(known))
        derived = account_id(wallet, 0)
        record, speculative = await asyncio.gather(
            self.get(wallet), lookup(derived), return_exceptions=True)
        if isinstance(record, BaseException):
            raise record  # the registry is the authority: without it there is no answer
        if record is None:
            return AccountRead(False, None)  # the derived lookup's outcome does not matter
        self._remember_id(record)
        if record.account_id != derived:  # a collision: the derived id is another wallet's
            return AccountRead(True, await lookup(record.account_id))
        if isinstance(speculative, BaseException):
            raise speculative
        return AccountRead(True, speculative)

    async def remember_pair(self, pair: str, *, limit: int = READ_IDS_MAX) -> int:
        """Load up to `limit` of a ledger pair's ("USD:USA") registry ids into the read map, in
        pages of one (ledger, _id) index range read: `read_account` then answers those wallets
        with one TigerBeetle round trip from their first read on. Without it a process's first
        read of each wallet waits for the registry (Redis, and MongoDB on a cache miss) beside
        the lookup: in the demo's first shadow_read that was the slowest 3 % of TigerBeetle
        reads. Only ids that are the wallet's derived nonce-0 id are taken (a collided wallet
        keeps the per-read registry path); never evicts: stops when the map is full. Returns
        how many ids it added."""
        assert 1 <= limit <= READ_IDS_MAX
        currency, _, country = pair.partition(":")
        ledger = self._ledgers.ledger_of(currency, country)
        added, after = 0, None
        for _page in range(-(-READ_IDS_MAX // REMEMBER_PAGE)):
            room = min(REMEMBER_PAGE, limit - added, READ_IDS_MAX - len(self._read_ids))
            if room <= 0:
                break
            entries = await self.entries_in_range(ledger, after=after, last_key=None, limit=room)
            for canonical, entry in entries.items():
                if canonical not in self._read_ids and entry.account_id == account_id(
                        WalletKey.from_canonical(canonical), 0):
                    self._read_ids[canonical] = entry.account_id
                    self._read_ids.move_to_end(canonical, last=False)  # first out, not hot
                    added += 1
            if len(entries) < room:
                break
            after = max(entries)
        assert len(self._read_ids) <= READ_IDS_MAX
        return added

    def remembers(self, wallet: WalletKey) -> bool:
        """Whether `read_account` answers this wallet without a registry read (diagnostics)."""
        return wallet.canonical in self._read_ids

    def _remember_id(self, record: AccountRecord) -> None:
        self._read_ids[record.wallet.canonical] = record.account_id
        self._read_ids.move_to_end(record.wallet.canonical)
        while len(self._read_ids) > READ_IDS_MAX:
            self._read_ids.popitem(last=False)

    async def get_or_create(self, wallet: WalletKey, *, allow_overdraft: bool) -> AccountRecord:
        """The wallet's record, creating it on first use. `allow_overdraft` applies only at
        creation. A concurrent creator of the same wallet wins or loses cleanly: one record."""
        ledger = self._ledgers.ledger_of(wallet.currency, wallet.country)
        existing = await self.get(wallet)
        if existing is not None:
            return existing
        canonical = wallet.canonical
        nonce = 0
        for _attempt in range(CREATE_ATTEMPTS_MAX):
            if nonce > NONCE_MAX:
                break
            candidate = account_id(wallet, nonce)
            doc = _doc_of(wallet, ledger, nonce, allow_overdraft, now_ms())
            try:
                await self._accounts.insert_one(doc)
            except DuplicateKeyError:
                mine = await self._accounts.find_one({"_id": canonical})
                if mine is not None:  # a concurrent creator of this wallet won
                    return _record_of(mine)
                holder = await self._accounts.find_one({"account_id": u128_to_hex(candidate)})
                if holder is not None and holder["_id"] != canonical:
                    log.warning(
                        "account id collision: %s nonce %d is held by %s; trying nonce %d",
                        wallet_log_name(wallet),
                        nonce,
                        wallet_log_name(WalletKey.from_canonical(holder["_id"])),
                        nonce + 1,
                    )
                    nonce += 1
                continue  # holder vanished or was us: try the same nonce again
            await self._cache.delete(canonical)  # invalidate on write
            return _record_of(doc)
        raise ConflictError(
            f"no free account id for {canonical} within nonces 0..{NONCE_MAX}", field="wallet"
        )

    async def get_many(self, wallets: Sequence[WalletKey]) -> dict[str, AccountRecord]:
        """Records of `wallets` by canonical key (absent: not registered), read past the cache.
        Per ledger: one `(ledger, _id)` index range read for a page, one `$in` for a few. A
        bare `_id` range scans the whole collection on SecantusDB."""
        assert len(wallets) <= MANY_MAX
        by_ledger: dict[int, list[str]] = {}
        for w in wallets:
            ledger = self._ledgers.ledger_of(w.currency, w.country)
            by_ledger.setdefault(ledger, []).append(w.canonical)
        found: dict[str, AccountRecord] = {}
        for ledger, keys in by_ledger.items():
            wanted = set(keys)
            if len(keys) <= IN_CHUNK_MAX:
                query: Document = {"_id": {"$in": keys}}
            else:  # an entry of another ledger is missed: create_many then reads it back
                query = {"ledger": ledger, "_id": {"$gte": min(keys), "$lte": max(keys)}}
            # One more than asked: a first batch of exactly len(keys) documents leaves the
            # cursor open, and its close costs another round trip (a getMore) every call.
            cursor = self._accounts.find(query).batch_size(len(keys) + 1)
            found.update({d["_id"]: _record_of(d) async for d in cursor if d["_id"] in wanted})
        return found

    async def create_many(
        self, wallets: Sequence[tuple[WalletKey, bool]]
    ) -> dict[str, AccountRecord]:
        """Records of new (wallet, allow_overdraft) pairs: one unordered bulk insert at nonce
        0 (nothing to invalidate: a missing record is never cached). A wallet whose insert
        lost (registered meanwhile, or its nonce-0 id is taken) goes through get_or_create,
        which owns the nonce logic."""
        assert len(wallets) <= MANY_MAX
        now = now_ms()
        docs = [_doc_of(w, self._ledgers.ledger_of(w.currency, w.country), 0, allow, now)
                for w, allow in wallets]
        lost = await insert_new(self._accounts, docs)
        found = {doc["_id"]: _record_of(doc) for i, doc in enumerate(docs) if i not in lost}
        gate = asyncio.Semaphore(CREATE_CONCURRENCY)

        async def one(wallet: WalletKey, allow_overdraft: bool) -> AccountRecord:
            async with gate:
                return await self.get_or_create(wallet, allow_overdraft=allow_overdraft)

        slow = await asyncio.gather(*(one(*wallets[i]) for i in sorted(lost)))
        found.update({r.wallet.canonical: r for r in slow})
        return found

    async def get_or_create_many(
        self, wallets: Sequence[tuple[WalletKey, bool]]
    ) -> dict[str, AccountRecord]:
        """get_or_create for a page of (wallet, allow_overdraft) pairs: one read, one insert."""
        found = await self.get_many([w for w, _ in wallets])
        found.update(await self.create_many(
            [(w, allow) for w, allow in wallets if w.canonical not in found]))
        return found

    async def by_account_id(self, account_id: int) -> AccountRecord | None:
        if not 0 < account_id < U128_MAX:
            raise InvalidInputError(f"{account_id} is not a valid account id", field="account_id")
        doc = await self._accounts.find_one({"account_id": u128_to_hex(account_id)})
        return None if doc is None else _record_of(doc)

    async def list_by_client(self, client_id: str, limit: int = 1000) -> list[AccountRecord]:
        _check_limit(limit, PAGE_LIMIT_MAX)
        cursor = self._accounts.find({"client_id": client_id}).sort("_id", ASCENDING).limit(limit)
        return [_record_of(doc) async for doc in cursor]

    async def page(
        self, *, after: str | None, limit: int, ledger: int | None = None
    ) -> list[AccountRecord]:
        """Records ordered by canonical wallet key, strictly after `after`."""
        _check_limit(limit, PAGE_LIMIT_MAX)
        query: Document = {}
        if after is not None:
            query["_id"] = {"$gt": after}
        if ledger is not None:
            query["ledger"] = ledger
        cursor = self._accounts.find(query).sort("_id", ASCENDING).limit(limit)
        return [_record_of(doc) async for doc in cursor]

    async def invalidate(self, wallet: WalletKey) -> None:
        self._read_ids.pop(wallet.canonical, None)
        await self._cache.delete(wallet.canonical)

    # ---- reconciliation reads (raw ids, no cache: the cache may hide a missing document) -------

    async def entries_in_range(
        self, ledger: int, *, after: str | None, last_key: str | None, limit: int
    ) -> dict[str, RegistryEntry]:
        """A ledger's entries with keys in (after, last_key], or (after, end) when last_key is
        None: ONE bounded `(ledger, _id)` index range read. A closed range matters on servers
        that materialise a query's whole result before applying `limit` (SecantusDB)."""
        assert 1 <= limit <= 2 * PAGE_LIMIT_MAX
        key_range: Document = {"$gt": after or ""}
        if last_key is not None:
            key_range["$lte"] = last_key
        cursor = self._accounts.find(  # no projection: it costs SecantusDB more than it saves
            {"ledger": ledger, "_id": key_range}).limit(limit).batch_size(limit)
        return {d["_id"]: _entry_of(d) async for d in cursor}

    async def entries_of(self, keys: list[str]) -> dict[str, RegistryEntry]:
        """Entries of canonical wallet keys (absent: not registered)."""
        assert len(keys) <= PAGE_LIMIT_MAX
        return {key: _entry_of(doc) for key, doc in (await find_keys(self._accounts, keys)).items()}

    async def registered_ids(self, account_ids: list[int]) -> set[int]:
        """The account ids among `account_ids` that some entry holds."""
        hexes = [u128_to_hex(a) for a in account_ids]
        docs = await find_in(self._accounts, "account_id", hexes, {"account_id": 1})
        return {hex_to_u128(d["account_id"]) for d in docs}


def _check_limit(limit: int, limit_max: int) -> None:
    if not 1 <= limit <= limit_max:
        raise InvalidInputError(f"must be 1..{limit_max}, got {limit}", field="limit")


def _doc_of(
    wallet: WalletKey, ledger: int, nonce: int, allow_overdraft: bool, created_at: datetime
) -> Document:
    """The registry's document format (read back by _record_of)."""
    return {
        "_id": wallet.canonical,
        "client_id": wallet.client_id,
        "country": wallet.country,
        "currency": wallet.currency,
        "issuer_type": wallet.issuer_type,
        "account_id": u128_to_hex(account_id(wallet, nonce)),
        "ledger": ledger,
        "nonce": nonce,
        "allow_overdraft": allow_overdraft,
        "created_at": created_at,
    }


def _record_of(doc: Document) -> AccountRecord:
    wallet = WalletKey.from_canonical(doc["_id"])
    record = AccountRecord(
        wallet=wallet,
        account_id=hex_to_u128(doc["account_id"]),
        ledger=int(doc["ledger"]),
        nonce=int(doc["nonce"]),
        allow_overdraft=bool(doc["allow_overdraft"]),
        created_at=as_utc(doc["created_at"]),
    )
    if record.account_id != account_id(wallet, record.nonce):
        raise ConflictError(
            f"registry record {doc['_id']} holds {doc['account_id']}, which is not the id of"
            f" nonce {record.nonce}",
            field="account_id",
        )
    return record


class RegistryEntry(NamedTuple):
    """An entry as reconciliation compares it (plain values: thousands per page)."""

    account_id: int
    ledger: int
    allow_overdraft: bool


def _entry_of(doc: Document) -> RegistryEntry:
    return RegistryEntry(account_id=hex_to_u128(doc["account_id"]), ledger=int(doc["ledger"]),
                         allow_overdraft=bool(doc["allow_overdraft"]))
