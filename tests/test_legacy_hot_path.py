"""The legacy store's hot path (a remembered wallet snapshot written as a compare-and-swap):
every case where the snapshot is wrong or cannot decide must end exactly as a fresh read would.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from bson.decimal128 import Decimal128
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from stores.legacy_store import WALLET_TRANSACTIONS, WALLETS, LegacyStore
from walletcore.errors import DuplicateTransactionError, InsufficientFundsError
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, SubtractCredit

Db = AsyncDatabase[dict[str, Any]]


@pytest.fixture(scope="module")
def db(mongo_client: AsyncMongoClient[dict[str, Any]]) -> Db:
    return mongo_client[f"walletmig_hot_{uuid.uuid4().hex[:10]}"]


async def _store(db: Db) -> LegacyStore:
    store = LegacyStore(db)
    await store.ensure_indexes()
    return store


def _wallet(unique_id: Callable[..., str]) -> WalletKey:
    return WalletKey(client_id=unique_id("hot"), country="USA", currency="USD")


def _credit(w: WalletKey, txn: str, amount: str) -> AddCredit:
    return AddCredit(wallet=w, transaction_id=txn, amount=Decimal(amount))


def _debit(w: WalletKey, txn: str, amount: str) -> SubtractCredit:
    return SubtractCredit(wallet=w, transaction_id=txn, amount=Decimal(amount))


async def test_an_edit_that_keeps_the_version_is_not_overwritten(
    db: Db, unique_id: Callable[..., str]
) -> None:
    store = await _store(db)
    w = _wallet(unique_id)
    await store.add_credit(_credit(w, unique_id("c"), "10.00"))
    # Behind the store's back, without a version bump (e.g. a hand repair).
    await db[WALLETS].update_one(
        {"_id": w.canonical},
        {"$set": {"credit": Decimal128("15.00"), "historical_credit": Decimal128("15.00")}},
    )
    result = await store.add_credit(_credit(w, unique_id("c"), "1.00"))
    assert (result.credit, result.historical_credit) == (Decimal("16.00"), Decimal("16.00"))
    assert store.snapshot_misses == 1


async def test_replays_and_duplicates_on_a_remembered_wallet(
    db: Db, unique_id: Callable[..., str]
) -> None:
    store = await _store(db)
    w = _wallet(unique_id)
    first = await store.add_credit(_credit(w, unique_id("c"), "5.00"))
    applied = await store.add_credit(_credit(w, txn := unique_id("c"), "2.00"))
    replay = await store.add_credit(_credit(w, txn, "2.00"))
    assert replay.replayed and replay.credit == applied.credit == Decimal("7.00")
    with pytest.raises(DuplicateTransactionError):
        await store.add_credit(_credit(w, txn, "3.00"))
    # Nothing of the refused attempts stayed: the wallet is at version 2, two transactions.
    found = await store.get_wallet_version(w)
    assert found is not None and found[1] == 2
    assert await db[WALLET_TRANSACTIONS].count_documents({"wallet": w.canonical}) == 2
    assert not first.replayed


async def test_a_debit_the_snapshot_refuses_is_decided_by_a_fresh_read(
    db: Db, unique_id: Callable[..., str]
) -> None:
    store = await _store(db)
    w = _wallet(unique_id)
    await store.add_credit(_credit(w, unique_id("c"), "5.00"))
    debit = _debit(w, unique_id("d"), "4.00")
    await store.subtract_credit(debit)
    # The same debit again would overdraw the wallet: it is a replay, not a refusal.
    replay = await store.subtract_credit(debit)
    assert replay.replayed and replay.credit == Decimal("1.00")
    with pytest.raises(InsufficientFundsError):
        await store.subtract_credit(_debit(w, unique_id("d"), "4.00"))


async def test_two_processes_with_stale_snapshots_lose_nothing(
    mongodb_uri: str, db: Db, unique_id: Callable[..., str]
) -> None:
    clients: list[AsyncMongoClient[dict[str, Any]]] = [
        AsyncMongoClient(mongodb_uri) for _ in range(2)
    ]
    try:
        stores = [await _store(c[db.name]) for c in clients]
        w = _wallet(unique_id)
        for i in range(12):  # alternate: each store's snapshot is one write behind
            await stores[i % 2].add_credit(_credit(w, unique_id("c"), "1.00"))
        found = await stores[0].get_wallet_version(w)
        assert found is not None and found[1] == 12
        assert found[0].credit_minor == 1200
        assert sum(s.snapshot_misses for s in stores) >= 10
    finally:
        for c in clients:
            await c.close()
