"""Account and Transfer Registries against real MongoDB-compatible and Redis servers."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from mongobase.mongo import u128_to_hex
from mongobase.queries import scope_wallet_regex
from registries.account_registry import ACCOUNT_REGISTRY, AccountRecord, AccountRegistry
from registries.cache import CACHE_KEY_PREFIX
from registries.transfer_registry import (
    CREATED_WALLET_INDEX,
    TRANSFER_REGISTRY,
    TransferRecord,
    TransferRegistry,
)
from walletcore.errors import (
    AlreadyVoidedError,
    ConflictError,
    DuplicateTransactionError,
    InvalidInputError,
    NotFoundError,
    UnknownLedgerError,
)
from walletcore.gates import GLOBAL_SCOPE
from walletcore.ids import account_id, transfer_id, void_transfer_id
from walletcore.keys import WalletKey
from walletmig.processes import free_port

Db = AsyncDatabase[dict[str, Any]]
TTL_S = 600


@pytest.fixture(scope="module")
def db(mongo_client: AsyncMongoClient[dict[str, Any]]) -> Db:
    return mongo_client[f"walletmig_registries_{uuid.uuid4().hex[:10]}"]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def accounts(db: Db, redis_client: redis.asyncio.Redis) -> AsyncIterator[AccountRegistry]:
    registry = AccountRegistry(db, redis_client, ttl_s=TTL_S)
    await registry.ensure_indexes()
    yield registry


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def transfers(db: Db) -> AsyncIterator[TransferRegistry]:
    registry = TransferRegistry(db)
    await registry.ensure_indexes()
    yield registry


# ---------------------------------------------------------------------------- account registry


async def test_get_or_create_then_cached_read(
    accounts: AccountRegistry,
    redis_client: redis.asyncio.Redis,
    wallet: Callable[..., WalletKey],
) -> None:
    w = wallet("MXN", "MEX")
    assert await accounts.get(w) is None
    created = await accounts.get_or_create(w, allow_overdraft=True)
    assert created.account_id == account_id(w, 0) and created.nonce == 0
    assert created.ledger == 3 and created.allow_overdraft is True
    key = f"{CACHE_KEY_PREFIX}{w.canonical}"
    assert await redis_client.exists(key) == 0  # invalidated on write, filled on read
    assert await accounts.get(w) == created
    assert await redis_client.exists(key) == 1
    assert 0 < await redis_client.ttl(key) <= TTL_S
    assert await accounts.get(w) == created  # from the cache now
    # The policy applies at creation only.
    assert await accounts.get_or_create(w, allow_overdraft=False) == created
    assert await accounts.by_account_id(created.account_id) == created
    await accounts.invalidate(w)
    assert await redis_client.exists(key) == 0


async def test_concurrent_get_or_create_makes_one_record(
    accounts: AccountRegistry, db: Db, wallet: Callable[..., WalletKey]
) -> None:
    w = wallet()
    records = await asyncio.gather(
        *(accounts.get_or_create(w, allow_overdraft=i % 2 == 0) for i in range(20))
    )
    assert len({r.model_dump_json() for r in records}) == 1
    assert await db[ACCOUNT_REGISTRY].count_documents({"_id": w.canonical}) == 1


async def test_account_id_collision_takes_the_next_nonce(
    accounts: AccountRegistry,
    db: Db,
    redis_client: redis.asyncio.Redis,
    wallet: Callable[..., WalletKey],
) -> None:
    w, squatter = wallet(), wallet()
    # Forge a record of another wallet that holds the id `w` would get at nonce 0.
    await db[ACCOUNT_REGISTRY].insert_one(
        {
            "_id": squatter.canonical,
            "client_id": squatter.client_id,
            "country": squatter.country,
            "currency": squatter.currency,
            "issuer_type": None,
            "account_id": u128_to_hex(account_id(w, 0)),
            "ledger": 1,
            "nonce": 0,
            "allow_overdraft": False,
            "created_at": datetime.now(UTC),
        }
    )
    try:
        created = await accounts.get_or_create(w, allow_overdraft=False)
        assert created.nonce == 1 and created.account_id == account_id(w, 1)
        cached = await accounts.get(w)  # fills the cache
        assert cached is not None and cached.nonce == 1
        raw = await redis_client.get(f"{CACHE_KEY_PREFIX}{w.canonical}")
        assert raw is not None and AccountRecord.model_validate_json(raw).nonce == 1
        assert await accounts.get(w) == created  # cached answer
        assert await accounts.get_or_create(w, allow_overdraft=True) == created
        assert await accounts.by_account_id(account_id(w, 1)) == created
        stored = await db[ACCOUNT_REGISTRY].find_one({"_id": w.canonical})
        assert stored is not None and stored["nonce"] == 1
        # The forged holder is not a consistent record: reading it is refused, not trusted.
        with pytest.raises(ConflictError):
            await accounts.by_account_id(account_id(w, 0))
    finally:  # the forged record would break other readers of this database
        await db[ACCOUNT_REGISTRY].delete_one({"_id": squatter.canonical})
        await accounts.invalidate(squatter)


async def test_cache_outage_degrades_to_mongodb(
    db: Db, wallet: Callable[..., WalletKey], caplog: pytest.LogCaptureFixture
) -> None:
    dead = redis.asyncio.Redis(
        host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2
    )
    registry = AccountRegistry(db, dead, ttl_s=TTL_S)
    w = wallet()
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="registries.cache"):
            assert await registry.get(w) is None
            created = await registry.get_or_create(w, allow_overdraft=False)
            assert await registry.get(w) == created
            for _ in range(20):  # later calls skip the broken cache instead of waiting on it
                assert await registry.get(w) == created
        assert registry.cache.failures >= 1
        assert any("reading MongoDB instead" in r.getMessage() for r in caplog.records)
        assert time.monotonic() - started < 5
    finally:
        await dead.aclose()


async def test_unreadable_cache_entry_is_discarded(
    accounts: AccountRegistry,
    redis_client: redis.asyncio.Redis,
    wallet: Callable[..., WalletKey],
) -> None:
    w, other = wallet(), wallet()
    created = await accounts.get_or_create(w, allow_overdraft=False)
    key = f"{CACHE_KEY_PREFIX}{w.canonical}"
    await redis_client.set(key, "{not json", ex=60)
    assert await accounts.get(w) == created
    # An entry that names another wallet is never served either.
    other_record = await accounts.get_or_create(other, allow_overdraft=False)
    await redis_client.set(key, other_record.model_dump_json(), ex=60)
    assert await accounts.get(w) == created


async def test_account_registry_rejects_bad_input_and_writes_nothing(
    accounts: AccountRegistry, db: Db, wallet: Callable[..., WalletKey]
) -> None:
    w = wallet("USD", "ZZZ")
    with pytest.raises(UnknownLedgerError):
        await accounts.get_or_create(w, allow_overdraft=False)
    assert await db[ACCOUNT_REGISTRY].find_one({"_id": w.canonical}) is None
    for bad_id in (0, 2**128 - 1, -5):
        with pytest.raises(InvalidInputError) as info:
            await accounts.by_account_id(bad_id)
        assert info.value.field == "account_id"
    with pytest.raises(InvalidInputError):
        await accounts.list_by_client("x", limit=0)
    with pytest.raises(InvalidInputError):
        await accounts.page(after=None, limit=8190)


async def test_list_by_client_and_page(
    accounts: AccountRegistry, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    client_id = unique_id("client")
    mine = [
        wallet("USD", "USA", client_id),
        wallet("MXN", "MEX", client_id),
        wallet("USD", "SLV", client_id),
    ]
    for w in mine:
        await accounts.get_or_create(w, allow_overdraft=False)
    await accounts.get_or_create(wallet(), allow_overdraft=False)
    listed = await accounts.list_by_client(client_id)
    assert [r.wallet for r in listed] == sorted(mine, key=lambda w: w.canonical)
    assert len(await accounts.list_by_client(client_id, limit=2)) == 2
    page = await accounts.page(after=f"{client_id}|", limit=2)
    assert [r.wallet.canonical for r in page] == sorted(w.canonical for w in mine)[:2]
    usd_slv = await accounts.page(after=f"{client_id}|", limit=5, ledger=10)
    assert usd_slv[0].wallet == mine[2] and all(r.ledger == 10 for r in usd_slv)


async def test_account_indexes_are_idempotent(accounts: AccountRegistry, db: Db) -> None:
    await accounts.ensure_indexes()
    await accounts.ensure_indexes()
    indexes = {i["name"]: i async for i in await db[ACCOUNT_REGISTRY].list_indexes()}
    assert indexes["account_id"].get("unique") is True
    assert "client_id" in indexes


# ---------------------------------------------------------------------------- transfer registry


def transfer(w: WalletKey, txn: str, amount_minor: int = 150, **kw: Any) -> TransferRecord:
    values: dict[str, Any] = {
        "transaction_id": txn,
        "transfer_id": transfer_id(txn),
        "wallet": w,
        "account_id": account_id(w),
        "type": "credit",
        "amount_minor": amount_minor,
        "reference_id": None,
        "created_at": datetime.now(UTC),
    }
    values.update(kw)
    return TransferRecord(**values)


async def test_record_is_idempotent_and_refuses_duplicates(
    transfers: TransferRegistry, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    w = wallet()
    txn = unique_id("t")
    rec = transfer(w, txn, reference_id="order-1")
    stored = await transfers.record(rec)
    assert stored == rec and await transfers.get(txn) == rec
    assert await transfers.record(rec) == rec  # replay
    assert await transfers.record(rec.model_copy(update={"created_at": datetime.now(UTC)})) == rec
    for change in ({"amount_minor": 151}, {"type": "debit"}, {"wallet": wallet()}):
        with pytest.raises(DuplicateTransactionError) as dup:
            await transfers.record(rec.model_copy(update=change))
        assert dup.value.field == "transaction_id"
    # Another transaction claiming the same transfer id.
    other = unique_id("t")
    with pytest.raises(ConflictError) as clash:
        await transfers.record(transfer(w, other, transfer_id=rec.transfer_id))
    assert clash.value.field == "transfer_id"
    assert await transfers.get(other) is None


async def test_record_many_stores_new_and_refuses_changed_replays(
    transfers: TransferRegistry, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    w = wallet()
    old, changed, new = (transfer(w, unique_id("t")) for _ in range(3))
    await transfers.record(old)
    await transfers.record(changed)
    batch = [old, changed.model_copy(update={"amount_minor": 999}), new]
    refused = await transfers.record_many(batch)
    assert list(refused) == [1] and "amount_minor" in refused[1], refused
    assert await transfers.get(new.transaction_id) == new
    assert await transfers.get(changed.transaction_id) == changed  # unchanged
    assert await transfers.record_many([]) == {}


async def test_concurrent_records_of_one_transaction(
    transfers: TransferRegistry, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    rec = transfer(wallet(), unique_id("t"))
    results = await asyncio.gather(*(transfers.record(rec) for _ in range(10)))
    assert all(r == rec for r in results)


async def test_mark_voided(
    transfers: TransferRegistry, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    w = wallet()
    txn, void_txn = unique_id("t"), unique_id("v")
    await transfers.record(transfer(w, txn))
    await transfers.mark_voided(
        txn, void_transaction_id=void_txn, void_transfer_id=void_transfer_id(txn)
    )
    await transfers.mark_voided(
        txn, void_transaction_id=void_txn, void_transfer_id=void_transfer_id(txn)
    )
    got = await transfers.get(txn)
    assert got is not None and got.voided and got.void_transaction_id == void_txn
    assert got.void_transfer_id == void_transfer_id(txn)
    with pytest.raises(AlreadyVoidedError):
        await transfers.mark_voided(
            txn, void_transaction_id=unique_id("v"), void_transfer_id=void_transfer_id(txn)
        )
    with pytest.raises(NotFoundError) as missing:
        await transfers.mark_voided(
            unique_id("nope"), void_transaction_id=void_txn, void_transfer_id=1
        )
    assert missing.value.field == "original_transaction_id"
    with pytest.raises(InvalidInputError):
        await transfers.mark_voided(txn, void_transaction_id=void_txn, void_transfer_id=0)


async def test_big_amounts_references_and_pages(
    transfers: TransferRegistry,
    db: Db,
    wallet: Callable[..., WalletKey],
    unique_id: Callable[..., str],
) -> None:
    w = wallet()
    big_txn = unique_id("big")
    big = 2**64 - 1  # above Int64: stored as a decimal string, read back exactly
    await transfers.record(transfer(w, big_txn, amount_minor=big))
    raw = await db[TRANSFER_REGISTRY].find_one({"_id": big_txn})
    assert raw is not None and raw["amount_minor"] == str(big)
    got = await transfers.get(big_txn)
    assert got is not None and got.amount_minor == big

    reference = unique_id("ref")
    prefix = unique_id("p")
    txns = [f"{prefix}-{i}" for i in range(4)]
    for txn in txns:
        await transfers.record(transfer(w, txn, reference_id=reference))
    assert [r.transaction_id for r in await transfers.by_reference(reference)] == txns
    by_txn = await transfers.get_many([*txns, "missing-1"])
    assert sorted(by_txn) == txns
    by_tid = await transfers.by_transfer_ids([transfer_id(t) for t in txns] + [12345])
    assert {r.transaction_id for r in by_tid.values()} == set(txns)
    assert by_tid[transfer_id(txns[0])] == by_txn[txns[0]]
    assert await transfers.by_transfer_ids([]) == {}
    assert len(await transfers.by_reference(reference, limit=2)) == 2
    first = await transfers.page(after=prefix, limit=2)
    assert [r.transaction_id for r in first.records] == txns[:2]
    rest = await transfers.page(after=first.last_key, limit=2)
    assert [r.transaction_id for r in rest.records] == txns[2:]
    with pytest.raises(InvalidInputError):
        await transfers.page(after=None, limit=0)
    with pytest.raises(InvalidInputError):
        await transfers.by_reference(reference, limit=9000)


async def test_transfer_indexes_are_idempotent(transfers: TransferRegistry, db: Db) -> None:
    await transfers.ensure_indexes()
    await transfers.ensure_indexes()
    indexes = {i["name"]: i async for i in await db[TRANSFER_REGISTRY].list_indexes()}
    assert indexes["transfer_id"].get("unique") is True
    assert {"reference_id", CREATED_WALLET_INDEX} <= set(indexes)


def _or_per_pair(scopes: list[str]) -> dict[str, object]:
    """The scope filter's earlier shape, an `$or` of one regex per pair: the reference."""
    if GLOBAL_SCOPE in scopes:
        return {}
    return {"$or": [{"wallet": {"$regex": scope_wallet_regex(s)}} for s in scopes]}


async def test_created_between_returns_the_scope_s_records_as_the_or_shape_did(
    transfers: TransferRegistry, db: Db, wallet: Callable[..., WalletKey],
    unique_id: Callable[..., str],
) -> None:
    """created_between asks one `$regex` for the scope (the index-friendly shape): the same
    records as the `$or` of one regex per pair, for one pair, several pairs and `*`, oldest
    first, and a wallet outside the scope is never returned."""
    # A window of its own, far in the past: the other tests' records (created now) are not in it.
    start = datetime(2001, 1, 1, tzinfo=UTC) + timedelta(days=uuid.uuid4().int % 10_000)
    pairs = [("USD", "USA"), ("MXN", "MEX"), ("USD", "SLV")]
    recs = [transfer(wallet(*pairs[n % 3]), unique_id("cb"),
                     created_at=start + timedelta(seconds=n)) for n in range(9)]
    outside = transfer(wallet("MXN", "USA"), unique_id("cb"), created_at=start)  # not a scope's
    assert await transfers.record_many([*recs, outside]) == {}
    until = start + timedelta(seconds=7)
    window = {"created_at": {"$gte": start, "$lte": until}}
    for scopes in (["USD:USA"], ["USD:USA", "MXN:MEX"], ["MXN:MEX", "USD:SLV", "USD:USA"],
                   ["*"]):
        got = await transfers.created_between(scopes, start=start, until=until, limit=100)
        old = db[TRANSFER_REGISTRY].find({**window, **_or_per_pair(scopes)})
        assert sorted(c.id for c in got) == sorted([d["_id"] async for d in old])
        assert [c.created_at for c in got] == sorted(c.created_at for c in got)
        wanted = {r.transaction_id for r in recs[:8]
                  if scopes == ["*"] or r.wallet.ledger_pair in scopes}
        if scopes == ["*"]:
            wanted.add(outside.transaction_id)
        else:
            assert outside.transaction_id not in {c.id for c in got}
        assert {c.id for c in got} == wanted and wanted
