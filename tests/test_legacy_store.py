"""Legacy MongoDB wallet store against a real MongoDB-compatible server (SecantusDB)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio
from bson.decimal128 import Decimal128
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from mongobase.mongo import decimal128_to_minor, minor_to_decimal128
from stores.legacy_store import WALLET_TRANSACTIONS, WALLETS, LegacyStore
from walletcore.errors import (
    AlreadyVoidedError,
    DuplicateTransactionError,
    InsufficientFundsError,
    InvalidAmountError,
    InvalidInputError,
    NotFoundError,
    NotVoidableError,
    UnknownCurrencyError,
    UnknownLedgerError,
)
from walletcore.keys import WalletKey
from walletcore.ledgers import LedgerTable
from walletcore.money import U64_MAX
from walletcore.operations import (
    AddCredit,
    OperationResult,
    OperationType,
    SubtractCredit,
    Void,
    parse_input,
)

Db = AsyncDatabase[dict[str, Any]]
# Default ledgers plus pairs for the odd precisions (JPY 0, BHD 3, USDC 6, BTC 8).
LEDGERS = LedgerTable(
    {"USD:USA": 1, "MXN:MEX": 3, "JPY:JPN": 20, "BHD:BHR": 21, "USDC:USA": 22, "BTC:USA": 23}
)


@pytest.fixture(scope="module")
def db(mongo_client: AsyncMongoClient[dict[str, Any]]) -> Db:
    return mongo_client[f"walletmig_legacy_{uuid.uuid4().hex[:10]}"]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def store(db: Db) -> AsyncIterator[LegacyStore]:
    legacy = LegacyStore(db, ledgers=LEDGERS)
    await legacy.ensure_indexes()
    yield legacy


def credit(w: WalletKey, txn: str, amount: str, **kw: Any) -> AddCredit:
    return AddCredit(wallet=w, transaction_id=txn, amount=Decimal(amount), **kw)


def debit(w: WalletKey, txn: str, amount: str, **kw: Any) -> SubtractCredit:
    return SubtractCredit(wallet=w, transaction_id=txn, amount=Decimal(amount), **kw)


async def apply(store: LegacyStore, op: AddCredit) -> OperationResult:
    """Send a credit or debit to the matching store method."""
    if isinstance(op, SubtractCredit):
        return await store.subtract_credit(op)
    return await store.add_credit(op)


def balance_of(result: OperationResult) -> tuple[str, str, str]:
    return (str(result.credit), str(result.debit), str(result.historical_credit))


async def nothing_written(db: Db, w: WalletKey, txn: str) -> None:
    assert await db[WALLETS].find_one({"_id": w.canonical}) is None
    assert await db[WALLET_TRANSACTIONS].find_one({"_id": txn}) is None


# ---------------------------------------------------------------------------- semantics


async def test_credit_and_debit_follow_the_balance_mapping(
    store: LegacyStore, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    w = wallet()
    first = await store.add_credit(credit(w, unique_id("t"), "10.00", reference_id="r1"))
    assert balance_of(first) == ("10.00", "0.00", "10.00")
    assert first.type == OperationType.CREDIT and not first.replayed
    spent = await store.subtract_credit(debit(w, unique_id("t"), "3.5"))
    assert balance_of(spent) == ("6.50", "0.00", "10.00")
    assert spent.amount == Decimal("3.50") and str(spent.amount) == "3.50"
    balance = await store.get_balance(w)
    assert (balance.credit, balance.debit, balance.historical_credit) == (
        Decimal("6.50"),
        Decimal("0.00"),
        Decimal("10.00"),
    )
    assert balance.source == "mongodb"
    assert await store.get_wallet_version(w) is not None


async def test_overdraft_wallet_goes_into_debt_and_credit_pays_it_first(
    store: LegacyStore, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    w = wallet()
    # A debit may create the wallet; the first op's policy sticks.
    r = await store.subtract_credit(debit(w, unique_id("t"), "5.00", allow_overdraft=True))
    assert balance_of(r) == ("0.00", "5.00", "0.00")
    r = await store.add_credit(credit(w, unique_id("t"), "3.00", allow_overdraft=False))
    assert balance_of(r) == ("0.00", "2.00", "3.00")
    r = await store.add_credit(credit(w, unique_id("t"), "4.00"))
    assert balance_of(r) == ("2.00", "0.00", "7.00")
    r = await store.subtract_credit(debit(w, unique_id("t"), "10.00"))  # still allowed
    assert balance_of(r) == ("0.00", "8.00", "7.00")


async def test_insufficient_funds_writes_nothing(
    store: LegacyStore, db: Db, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    w = wallet()
    txn = unique_id("t")
    with pytest.raises(InsufficientFundsError):  # a first debit without overdraft
        await store.subtract_credit(debit(w, txn, "1.00"))
    await nothing_written(db, w, txn)

    await store.add_credit(credit(w, unique_id("t"), "2.00"))
    before = await store.get_wallet_version(w)
    with pytest.raises(InsufficientFundsError) as info:
        await store.subtract_credit(debit(w, txn, "2.01"))
    assert info.value.field == "amount"
    assert await store.get_wallet_version(w) == before
    assert await db[WALLET_TRANSACTIONS].find_one({"_id": txn}) is None
    # The failed id is not consumed: it can succeed once funds arrive.
    r = await store.subtract_credit(debit(w, txn, "2.00"))
    assert balance_of(r) == ("0.00", "0.00", "2.00") and not r.replayed


async def test_voids(
    store: LegacyStore, db: Db, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    w = wallet()
    c1, d1, v1, v2 = (unique_id(p) for p in ("c", "d", "v", "v"))
    await store.add_credit(credit(w, c1, "10.00"))
    await store.subtract_credit(debit(w, d1, "4.00"))
    # Void of a debit is a credit and counts toward historical credit.
    r = await store.void(Void(wallet=w, transaction_id=v1, original_transaction_id=d1))
    assert r.type == OperationType.VOID and r.amount == Decimal("4.00")
    assert balance_of(r) == ("10.00", "0.00", "14.00")
    # Replay of the void.
    again = await store.void(Void(wallet=w, transaction_id=v1, original_transaction_id=d1))
    assert again.replayed and balance_of(again) == balance_of(r)
    # Another void of the same original.
    with pytest.raises(AlreadyVoidedError) as already:
        await store.void(Void(wallet=w, transaction_id=v2, original_transaction_id=d1))
    assert already.value.field == "original_transaction_id"
    # A void cannot be voided.
    with pytest.raises(NotVoidableError):
        await store.void(Void(wallet=w, transaction_id=v2, original_transaction_id=v1))
    # Void of a credit is a debit; historical credit unchanged.
    r = await store.void(Void(wallet=w, transaction_id=v2, original_transaction_id=c1))
    assert balance_of(r) == ("0.00", "0.00", "14.00")
    history = await store.history(w, 10)
    assert [h.transaction_id for h in history] == [v2, v1, d1, c1]
    assert [h.voided for h in history] == [False, False, True, True]
    stored = await db[WALLET_TRANSACTIONS].find_one({"_id": c1})
    assert stored is not None and stored["voided_by"] == v2


async def test_void_errors_write_nothing(
    store: LegacyStore, db: Db, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    w, other = wallet(), wallet()
    vid = unique_id("v")
    # First op a void: no wallet, no original.
    with pytest.raises(NotFoundError) as missing:
        await store.void(Void(wallet=w, transaction_id=vid, original_transaction_id="nope-1"))
    assert missing.value.field == "original_transaction_id"
    await nothing_written(db, w, vid)

    c1 = unique_id("c")
    await store.add_credit(credit(other, c1, "5.00"))
    await store.subtract_credit(debit(other, unique_id("d"), "5.00"))
    # The original belongs to another wallet.
    await store.add_credit(credit(w, unique_id("c"), "1.00"))
    with pytest.raises(NotFoundError):
        await store.void(Void(wallet=w, transaction_id=vid, original_transaction_id=c1))
    # Void of a credit that would overdraw a no-overdraft wallet.
    before = await store.get_wallet_version(other)
    with pytest.raises(InsufficientFundsError):
        await store.void(Void(wallet=other, transaction_id=vid, original_transaction_id=c1))
    assert await store.get_wallet_version(other) == before
    assert await db[WALLET_TRANSACTIONS].find_one({"_id": vid}) is None
    original = await db[WALLET_TRANSACTIONS].find_one({"_id": c1})
    assert original is not None and original["voided_by"] is None
    # Same id for void and original.
    with pytest.raises(InvalidInputError) as same:
        await store.void(Void(wallet=w, transaction_id=c1, original_transaction_id=c1))
    assert same.value.field == "original_transaction_id"


async def test_replay_returns_first_result_and_duplicates_are_refused(
    store: LegacyStore, db: Db, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    w, other = wallet(), wallet()
    txn = unique_id("t")
    first = await store.add_credit(credit(w, txn, "7.25", reference_id="ref-a"))
    await store.add_credit(credit(w, unique_id("t"), "1.00"))  # balance moves on
    replay = await store.add_credit(credit(w, txn, "7.250"))  # same amount, other spelling
    assert replay.replayed
    assert replay.model_copy(update={"replayed": False}) == first
    for bad in (
        credit(w, txn, "7.26"),
        debit(w, txn, "7.25"),
        credit(other, txn, "7.25"),
    ):
        with pytest.raises(DuplicateTransactionError) as dup:
            await apply(store, bad)
        assert dup.value.field == "transaction_id"
    with pytest.raises(DuplicateTransactionError):
        await store.void(Void(wallet=w, transaction_id=txn, original_transaction_id="x-1"))
    assert await db[WALLETS].find_one({"_id": other.canonical}) is None
    assert await db[WALLET_TRANSACTIONS].count_documents({"wallet": w.canonical}) == 2


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"wallet": {"country": "US"}}, "wallet.country"),
        ({"wallet": {"country": "usa"}}, "wallet.country"),
        ({"wallet": {"client_id": ""}}, "wallet.client_id"),
        ({"amount": "NaN"}, "amount"),
        ({"amount": "Infinity"}, "amount"),
        ({"amount": "ten"}, "amount"),
        ({"transaction_id": ""}, "transaction_id"),
        ({"extra": 1}, "extra"),
    ],
)
async def test_malformed_input_is_rejected_naming_the_field(
    payload: dict[str, Any], field: str, unique_id: Callable[..., str]
) -> None:
    data: dict[str, Any] = {
        "wallet": {"client_id": unique_id("c"), "country": "USA", "currency": "USD"},
        "transaction_id": unique_id("t"),
        "amount": "1.00",
    }
    for name, value in payload.items():
        if isinstance(value, dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    with pytest.raises(InvalidInputError) as info:
        parse_input(AddCredit, data)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("currency", "country", "amount", "error", "field"),
    [
        ("USD", "USA", "1.001", InvalidAmountError, "amount"),
        ("USD", "USA", "0", InvalidAmountError, "amount"),
        ("USD", "USA", "0.00", InvalidAmountError, "amount"),
        ("USD", "USA", "-1.00", InvalidAmountError, "amount"),
        ("USD", "USA", "NaN", InvalidAmountError, "amount"),
        ("USD", "USA", "sNaN", InvalidAmountError, "amount"),
        ("USD", "USA", "Infinity", InvalidAmountError, "amount"),
        ("USD", "USA", str(U64_MAX + 1) + "E-2", InvalidAmountError, "amount"),
        ("JPY", "JPN", "1.5", InvalidAmountError, "amount"),
        ("BTC", "USA", "0.000000001", InvalidAmountError, "amount"),
        ("USD", "ZZZ", "1.00", UnknownLedgerError, "country"),
        ("XYZ", "USA", "1.00", UnknownCurrencyError, "currency"),
    ],
)
async def test_bad_amounts_and_pairs_write_nothing(
    store: LegacyStore,
    db: Db,
    unique_id: Callable[..., str],
    currency: str,
    country: str,
    amount: str,
    error: type[Exception],
    field: str,
) -> None:
    w = WalletKey(client_id=unique_id("c"), country=country, currency=currency)
    txn = unique_id("t")
    # model_construct skips pydantic, as a caller that bypassed validation would.
    for cls in (AddCredit, SubtractCredit):
        op = cls.model_construct(
            wallet=w, transaction_id=txn, amount=Decimal(amount), allow_overdraft=True
        )
        with pytest.raises(error) as info:
            await apply(store, op)
        assert getattr(info.value, "field", None) == field
    await nothing_written(db, w, txn)


async def test_read_limits_are_checked(
    store: LegacyStore, wallet: Callable[..., WalletKey]
) -> None:
    with pytest.raises(InvalidInputError) as info:
        await store.history(wallet(), 0)
    assert info.value.field == "limit"
    with pytest.raises(InvalidInputError):
        await store.history(wallet(), 8190)
    with pytest.raises(InvalidInputError):
        await store.page_wallets(after=None, limit=8190)
    with pytest.raises(NotFoundError) as missing:
        await store.get_balance(wallet())
    assert missing.value.field == "wallet"


# ---------------------------------------------------------------------------- money exactness


@pytest.mark.parametrize(
    ("currency", "country", "amount", "stored"),
    [
        ("USD", "USA", "0.01", "0.01"),
        ("USD", "USA", "12.5", "12.50"),
        ("USD", "USA", "184467440737095516.15", "184467440737095516.15"),  # u64 max minor
        ("JPY", "JPN", "1000", "1000"),
        ("BHD", "BHR", "1.234", "1.234"),
        ("USDC", "USA", "0.000001", "0.000001"),
        ("BTC", "USA", "0.00000001", "0.00000001"),
        ("BTC", "USA", "21000000.12345678", "21000000.12345678"),
    ],
)
async def test_amounts_are_stored_as_exact_decimal128(
    store: LegacyStore,
    db: Db,
    unique_id: Callable[..., str],
    currency: str,
    country: str,
    amount: str,
    stored: str,
) -> None:
    w = WalletKey(client_id=unique_id("c"), country=country, currency=currency)
    txn = unique_id("t")
    r = await store.add_credit(credit(w, txn, amount))
    assert text(r.amount) == stored and text(r.credit) == stored
    decimals = len(stored.partition(".")[2])
    doc = await db[WALLETS].find_one({"_id": w.canonical})
    assert doc is not None
    assert isinstance(doc["credit"], Decimal128) and text(doc["credit"]) == stored
    assert doc["credit"].to_decimal().as_tuple().exponent == -decimals  # currency precision
    assert text(doc["debit"]) == text(Decimal(0).scaleb(-decimals))
    txn_doc = await db[WALLET_TRANSACTIONS].find_one({"_id": txn})
    assert txn_doc is not None and text(txn_doc["amount"]) == stored
    balance = await store.get_balance(w)
    assert text(balance.credit) == stored and text(balance.historical_credit) == stored


def text(value: Decimal | Decimal128) -> str:
    """Fixed-point text (str() of a Decimal may use exponents: 1E-8)."""
    return format(value.to_decimal() if isinstance(value, Decimal128) else value, "f")


def test_decimal128_round_trip_is_exact() -> None:
    for minor in (0, 1, 99, 10**18, U64_MAX, 2 * U64_MAX):
        for currency in ("JPY", "USD", "BHD", "USDC", "BTC"):
            assert decimal128_to_minor(
                minor_to_decimal128(minor, currency), currency, field="x"
            ) == (minor)
    from walletcore.errors import ConflictError

    with pytest.raises(ConflictError):  # inexact stored value: refuse, never round
        decimal128_to_minor(Decimal128("1.005"), "USD", field="credit")


# ---------------------------------------------------------------------------- concurrency


async def _hammer_one_wallet(
    stores: list[LegacyStore], w: WalletKey, unique_id: Callable[..., str], writers: int
) -> None:
    """`writers` concurrent mixed credits/debits on one wallet; checks no update was lost."""
    seed = await stores[0].add_credit(credit(w, unique_id("seed"), "1000.00"))
    assert not seed.replayed
    ops: list[AddCredit] = []
    expected_net = Decimal("1000.00")
    for i in range(writers):
        amount = Decimal(f"{i + 1}.{i % 100:02d}")
        if i % 3 == 0:
            ops.append(debit(w, unique_id(f"d{i}"), str(amount)))
            expected_net -= amount
        else:
            ops.append(credit(w, unique_id(f"c{i}"), str(amount)))
            expected_net += amount

    results = await asyncio.gather(
        *(apply(stores[i % len(stores)], op) for i, op in enumerate(ops))
    )
    assert not any(r.replayed for r in results)
    balance = await stores[0].get_balance(w)
    assert balance.credit - balance.debit == expected_net
    found = await stores[0].get_wallet_version(w)
    assert found is not None and found[1] == writers + 1
    txns = stores[0]._txns  # the test inspects the store's own collection
    versions = sorted([doc["wallet_version"] async for doc in txns.find({"wallet": w.canonical})])
    assert versions == list(range(1, writers + 2))  # each op stored once, one per version
    # Every result's balance is the one recorded at its version (no torn reads).
    for op, result in zip(ops, results, strict=True):
        doc = await txns.find_one({"_id": op.transaction_id})
        assert doc is not None and str(doc["balance_after"]["credit"]) == str(result.credit)


async def test_fifty_concurrent_writers_on_one_wallet(
    store: LegacyStore, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    await _hammer_one_wallet([store], wallet(), unique_id, 50)


async def test_fifty_concurrent_writers_without_local_queue(
    db: Db, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    """No in-process serialization: only MongoDB's transaction + version check protect."""
    raw = LegacyStore(db, ledgers=LEDGERS, serialize_local=False)
    await _hammer_one_wallet([raw], wallet(), unique_id, 50)
    assert raw.conflict_retries > 0  # the conflicts really happened and were retried
    print(f"\n50 writers, no local queue: {raw.conflict_retries} retries, peak {raw.attempts_peak}")


async def test_concurrent_writers_from_two_processes_worth_of_clients(
    mongodb_uri: str, db: Db, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    """Two stores on two separate clients (as two workers would be) on one wallet."""
    clients: list[AsyncMongoClient[dict[str, Any]]] = [
        AsyncMongoClient(mongodb_uri) for _ in range(2)
    ]
    try:
        stores = [LegacyStore(c[db.name], ledgers=LEDGERS) for c in clients]
        await _hammer_one_wallet(stores, wallet(), unique_id, 40)
    finally:
        for c in clients:
            await c.close()


@pytest.mark.parametrize("serialize_local", [True, False])
async def test_concurrent_replays_apply_once(
    db: Db,
    wallet: Callable[..., WalletKey],
    unique_id: Callable[..., str],
    serialize_local: bool,
) -> None:
    s = LegacyStore(db, ledgers=LEDGERS, serialize_local=serialize_local)
    w = wallet()
    op = credit(w, unique_id("t"), "3.33")
    results = await asyncio.gather(*(s.add_credit(op) for _ in range(20)))
    assert sum(not r.replayed for r in results) == 1
    assert {balance_of(r) for r in results} == {("3.33", "0.00", "3.33")}
    found = await s.get_wallet_version(w)
    assert found is not None and found[1] == 1
    # Concurrent replays of one void, mixed with a competing void of the same original.
    v1, v2 = unique_id("v"), unique_id("v")
    await s.add_credit(credit(w, unique_id("t"), "10.00"))
    outcomes = await asyncio.gather(
        *(
            s.void(
                Void(
                    wallet=w,
                    transaction_id=v1 if i % 2 else v2,
                    original_transaction_id=op.transaction_id,
                )
            )
            for i in range(10)
        ),
        return_exceptions=True,
    )
    applied = [o for o in outcomes if isinstance(o, OperationResult) and not o.replayed]
    assert len(applied) == 1
    winner = applied[0].transaction_id
    for outcome in outcomes:
        if isinstance(outcome, OperationResult):
            assert outcome.transaction_id == winner
        else:
            assert isinstance(outcome, AlreadyVoidedError)
    found = await s.get_wallet_version(w)
    assert found is not None and found[1] == 3


# ---------------------------------------------------------------------------- reads


async def test_multi_balance_history_and_pages(
    store: LegacyStore, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    client_id = unique_id("client")
    usd = wallet("USD", "USA", client_id)
    mxn = wallet("MXN", "MEX", client_id)
    usd_card = WalletKey(client_id=client_id, country="USA", currency="USD", issuer_type="card")
    stranger = wallet("USD", "USA")
    for w, amount in ((usd, "1.00"), (mxn, "2.00"), (usd_card, "3.00"), (stranger, "4.00")):
        await store.add_credit(credit(w, unique_id("t"), amount))
    balances = await store.get_multi_balance(client_id)
    assert {b.wallet: str(b.credit) for b in balances} == {
        usd: "1.00",
        mxn: "2.00",
        usd_card: "3.00",
    }
    assert await store.get_multi_balance(unique_id("nobody")) == []

    txns = [unique_id(f"h{i}") for i in range(5)]
    for i, txn in enumerate(txns):
        await store.add_credit(credit(usd, txn, f"0.0{i + 1}", reference_id=f"ref{i}"))
    newest = await store.history(usd, 3)
    assert [h.transaction_id for h in newest] == txns[::-1][:3]
    assert newest[0].amount == Decimal("0.05") and newest[0].reference_id == "ref4"
    assert newest[0].created_at is not None and newest[0].created_at.tzinfo is not None
    assert len(await store.history(usd, 100)) == 6
    assert await store.history(wallet(), 5) == []

    page = await store.page_wallets(after=f"{client_id}|", limit=2)
    assert [p["_id"] for p in page] == sorted([usd.canonical, usd_card.canonical, mxn.canonical])[
        :2
    ]
    following = await store.page_wallets(after=page[-1]["_id"], limit=1)
    assert following and following[0]["_id"] > page[-1]["_id"]
    only_mxn = await store.page_wallets(after=f"{client_id}|", limit=10, currency="MXN")
    assert only_mxn[0]["wallet"] == mxn and only_mxn[0]["balance"].credit_minor == 200
    assert all(p["wallet"].currency == "MXN" for p in only_mxn)
    assert only_mxn[0]["version"] == 1 and only_mxn[0]["allow_overdraft"] is False


async def test_ensure_indexes_is_idempotent(store: LegacyStore, db: Db) -> None:
    await store.ensure_indexes()
    await store.ensure_indexes()
    wallet_indexes = {i["name"] async for i in await db[WALLETS].list_indexes()}
    txn_indexes = {i["name"]: i async for i in await db[WALLET_TRANSACTIONS].list_indexes()}
    assert {"client_id", "currency_country_id"} <= wallet_indexes
    assert {"wallet_version"} <= set(txn_indexes)
    # No index that no query uses: every insert pays for each one.
    assert not {"wallet_created", "reference_id"} & set(txn_indexes)
    assert txn_indexes["wallet_version"].get("unique") is True


async def test_single_wallet_throughput(
    store: LegacyStore, wallet: Callable[..., WalletKey], unique_id: Callable[..., str]
) -> None:
    """Reports ops/s for one wallet (sequential and 50-way concurrent); no hard floor."""
    w = wallet()
    count = 40
    started = time.perf_counter()
    for _ in range(count):
        await store.add_credit(credit(w, unique_id("t"), "1.00"))
    sequential = count / (time.perf_counter() - started)
    started = time.perf_counter()
    await asyncio.gather(
        *(store.add_credit(credit(w, unique_id("t"), "1.00")) for _ in range(count))
    )
    concurrent = count / (time.perf_counter() - started)
    print(
        f"\nlegacy single-wallet: sequential {sequential:.0f} ops/s,"
        f" concurrent {concurrent:.0f} ops/s"
    )
    assert (await store.get_balance(w)).credit == Decimal(2 * count)
