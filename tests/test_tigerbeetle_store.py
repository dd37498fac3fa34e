"""TigerBeetleStore against the real emulator process, MongoDB and Redis (no mocks).

Every test isolates through a unique client_id / transaction ids; nothing is wiped.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio
import tigerbeetle as tb

from registries.account_registry import AccountRegistry
from registries.transfer_registry import TransferRegistry
from stores.legacy_store import LegacyStore
from stores.tb_errors import (
    ACCOUNT_STATUS_RULES,
    TRANSFER_STATUS_RULES,
    Outcome,
    status_error,
)
from stores.tigerbeetle_store import TigerBeetleStore, system_accounts
from walletcore.codes import SystemAccount, TransferCode
from walletcore.errors import (
    AlreadyVoidedError,
    ConflictError,
    DuplicateTransactionError,
    InsufficientFundsError,
    InvalidAmountError,
    InvalidInputError,
    NotFoundError,
    NotVoidableError,
    UnknownCurrencyError,
    UnknownLedgerError,
    WalletError,
)
from walletcore.ids import reference_hash, system_account_id, transfer_id
from walletcore.keys import WalletKey
from walletcore.money import U64_MAX
from walletcore.operations import AddCredit, OperationResult, SubtractCredit, Void

UniqueId = Callable[..., str]
D = Decimal


# ----------------------------------------------------------------------------- fixtures


class CountingClient:
    """The real client, counting calls per method (to check batching, not to fake answers)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def call(*args: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return await method(*args)

        return call


@pytest_asyncio.fixture(loop_scope="session")
async def registries(mongo_db: Any, redis_client: Any) -> tuple[AccountRegistry, TransferRegistry]:
    accounts = AccountRegistry(mongo_db, redis_client)
    transfers = TransferRegistry(mongo_db)
    await accounts.ensure_indexes()
    await transfers.ensure_indexes()
    return accounts, transfers


@pytest_asyncio.fixture(loop_scope="session")
async def store(
    tb_client: Any, registries: tuple[AccountRegistry, TransferRegistry]
) -> TigerBeetleStore:
    return TigerBeetleStore(tb_client, *registries)


@pytest_asyncio.fixture(loop_scope="session")
async def legacy(mongo_db: Any) -> AsyncIterator[LegacyStore]:
    store = LegacyStore(mongo_db)
    await store.ensure_indexes()
    yield store


def wallet_of(client_id: str, currency: str = "USD", country: str = "USA") -> WalletKey:
    return WalletKey(client_id=client_id, country=country, currency=currency)


def credit(wallet: WalletKey, txn: str, amount: str, **kw: Any) -> AddCredit:
    return AddCredit(wallet=wallet, transaction_id=txn, amount=D(amount), **kw)


def debit(wallet: WalletKey, txn: str, amount: str, **kw: Any) -> SubtractCredit:
    return SubtractCredit(wallet=wallet, transaction_id=txn, amount=D(amount), **kw)


def void(wallet: WalletKey, txn: str, original: str, **kw: Any) -> Void:
    return Void(wallet=wallet, transaction_id=txn, original_transaction_id=original, **kw)


def triple(result: OperationResult) -> tuple[Decimal, Decimal, Decimal]:
    return result.credit, result.debit, result.historical_credit


# ----------------------------------------------------------------------------- mapping table


def test_status_tables_are_total() -> None:
    assert set(TRANSFER_STATUS_RULES) == set(tb.CreateTransferStatus)
    assert set(ACCOUNT_STATUS_RULES) == set(tb.CreateAccountStatus)


@pytest.mark.parametrize(
    "status",
    [s for s in tb.CreateTransferStatus if TRANSFER_STATUS_RULES[s].outcome is Outcome.FAILED],
)
def test_every_failed_transfer_status_is_a_domain_error(status: tb.CreateTransferStatus) -> None:
    error = status_error(TRANSFER_STATUS_RULES[status], status, "credit t1")
    assert isinstance(error, WalletError)
    assert status.name in error.message and "credit t1" in error.message
    assert not error.retryable  # a retry sends the same id: it cannot succeed


def test_key_statuses_map_as_contracted() -> None:
    s, rules = tb.CreateTransferStatus, TRANSFER_STATUS_RULES
    assert rules[s.CREATED].outcome is Outcome.APPLIED
    assert rules[s.EXISTS].outcome is Outcome.EXISTS
    assert rules[s.EXCEEDS_CREDITS].error is InsufficientFundsError
    for status in s:
        if status.name.startswith("EXISTS_WITH_DIFFERENT_"):
            assert rules[status].error is DuplicateTransactionError
            assert rules[status].field == "transaction_id"
    a = tb.CreateAccountStatus
    assert ACCOUNT_STATUS_RULES[a.EXISTS].outcome is Outcome.EXISTS
    for account_status in a:
        if account_status.name.startswith("EXISTS_WITH_DIFFERENT_"):
            assert ACCOUNT_STATUS_RULES[account_status].error is ConflictError


# ----------------------------------------------------------------------------- accounts


async def test_system_accounts_idempotent(store: TigerBeetleStore, tb_client: Any) -> None:
    await store.ensure_system_accounts(5)
    await store.ensure_system_accounts(5)  # cached
    fresh = TigerBeetleStore(tb_client, store._accounts, store._transfers)
    await fresh.ensure_system_accounts(5)  # EXISTS from TigerBeetle is success
    ids = [system_account_id(5, a) for a in SystemAccount]
    found = await tb_client.lookup_accounts(ids)
    assert [a.id for a in found] == ids
    assert [a.code for a in found] == [int(a) for a in SystemAccount]
    assert all(a.flags == tb.AccountFlags.NONE and a.ledger == 5 for a in found)
    assert [a.id for a in system_accounts(5)] == ids


async def test_ensure_account_flags_and_conflict(
    store: TigerBeetleStore, tb_client: Any, unique_id: UniqueId
) -> None:
    strict = await store.ensure_account(wallet_of(unique_id("c")), allow_overdraft=False)
    loose = await store.ensure_account(wallet_of(unique_id("c")), allow_overdraft=True)
    again = await store.ensure_account(strict.wallet, allow_overdraft=True)  # first policy wins
    assert again.account_id == strict.account_id and not again.allow_overdraft
    a, b = await tb_client.lookup_accounts([strict.account_id, loose.account_id])
    assert a.flags == tb.AccountFlags.HISTORY | tb.AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
    assert b.flags == tb.AccountFlags.HISTORY
    assert a.user_data_128 == reference_hash(strict.wallet.client_id)
    assert a.ledger == 1 and a.code == 100
    # A TigerBeetle account that disagrees with the registry is a conflict, not a success.
    wallet = wallet_of(unique_id("c"))
    record = await store._accounts.get_or_create(wallet, allow_overdraft=True)
    (res,) = await tb_client.create_accounts(
        [tb.Account(id=record.account_id, ledger=1, code=100, flags=tb.AccountFlags.NONE)]
    )
    assert res.status == tb.CreateAccountStatus.CREATED
    fresh = TigerBeetleStore(tb_client, store._accounts, store._transfers)
    with pytest.raises(ConflictError) as info:
        await fresh.ensure_account(wallet, allow_overdraft=True)
    assert info.value.field == "wallet"


# ----------------------------------------------------------------------------- writes


async def test_credit_debit_and_balance(store: TigerBeetleStore, unique_id: UniqueId) -> None:
    w = wallet_of(unique_id("c"))
    r1 = await store.add_credit(credit(w, unique_id("t"), "10.50", reference_id="ref-1"))
    assert (r1.type, r1.amount, triple(r1), r1.replayed) == (
        "credit", D("10.50"), (D("10.50"), D("0.00"), D("10.50")), False,
    )
    assert r1.created_at is not None
    r2 = await store.subtract_credit(debit(w, unique_id("t"), "0.50"))
    assert triple(r2) == (D("10.00"), D("0.00"), D("10.50"))
    balance = await store.get_balance(w)
    assert (balance.credit, balance.debit, balance.historical_credit) == triple(r2)
    assert balance.source == "tigerbeetle" and balance.wallet == w
    with pytest.raises(NotFoundError):
        await store.get_balance(wallet_of(unique_id("nobody")))


async def test_overdraft_policy(store: TigerBeetleStore, unique_id: UniqueId) -> None:
    strict = wallet_of(unique_id("c"))
    txn = unique_id("t")
    # A first debit on a strict wallet fails without creating the wallet.
    with pytest.raises(InsufficientFundsError) as info:
        await store.subtract_credit(debit(strict, txn, "1.00"))
    assert info.value.field == "amount"
    with pytest.raises(NotFoundError):
        await store.get_balance(strict)
    assert await store._accounts.get(strict) is None
    await store.add_credit(credit(strict, unique_id("t"), "5.00"))
    with pytest.raises(InsufficientFundsError):
        await store.subtract_credit(debit(strict, unique_id("t"), "5.01"))
    # The failed transaction id was not burned: it succeeds once the funds are there.
    ok = await store.subtract_credit(debit(strict, txn, "1.00"))
    assert triple(ok) == (D("4.00"), D("0.00"), D("5.00")) and not ok.replayed
    # An overdraft wallet goes negative; a credit pays the debt first.
    loose = wallet_of(unique_id("c"), "MXN", "MEX")
    r = await store.subtract_credit(debit(loose, unique_id("t"), "3.00", allow_overdraft=True))
    assert triple(r) == (D("0.00"), D("3.00"), D("0.00"))
    r = await store.add_credit(credit(loose, unique_id("t"), "5.00"))
    assert triple(r) == (D("2.00"), D("0.00"), D("5.00"))
    # Later ops don't change the policy.
    with pytest.raises(InsufficientFundsError):
        await store.subtract_credit(debit(strict, unique_id("t"), "100", allow_overdraft=True))


async def test_idempotent_replays(store: TigerBeetleStore, unique_id: UniqueId) -> None:
    w = wallet_of(unique_id("c"))
    t1, t2 = unique_id("t"), unique_id("t")
    first = await store.add_credit(credit(w, t1, "7.00", reference_id="a"))
    d = await store.subtract_credit(debit(w, t2, "2.00"))
    await store.add_credit(credit(w, unique_id("t"), "100.00"))  # balance moves on
    again = await store.add_credit(credit(w, t1, "7.00", reference_id="a"))
    assert again.replayed and triple(again) == triple(first)  # balance right after the original
    assert again.created_at == first.created_at
    # reference_id is not part of a transaction's identity (as in the legacy store)
    other_ref = await store.add_credit(credit(w, t1, "7.00", reference_id="b"))
    assert other_ref.replayed and triple(other_ref) == triple(first)
    d_again = await store.subtract_credit(debit(w, t2, "2.00"))
    assert d_again.replayed and triple(d_again) == triple(d)
    before = await store.get_balance(w)
    for op_call, field in (
        (store.add_credit(credit(w, t1, "7.01")), "transaction_id"),  # other amount
        (store.subtract_credit(debit(w, t1, "7.00")), "transaction_id"),  # other type
        (store.add_credit(credit(wallet_of(unique_id("c")), t1, "7.00")), "transaction_id"),
        (store.void(void(w, t1, t2)), "transaction_id"),  # a credit's id reused by a void
    ):
        with pytest.raises(DuplicateTransactionError) as info:
            await op_call
        assert info.value.field == field
    assert await store.get_balance(w) == before


async def test_voids(store: TigerBeetleStore, unique_id: UniqueId) -> None:
    w = wallet_of(unique_id("c"))
    tc, td, v1, v2 = (unique_id(p) for p in ("c", "d", "v", "v"))
    await store.add_credit(credit(w, tc, "10.00"))
    await store.subtract_credit(debit(w, td, "4.00"))
    r = await store.void(void(w, v1, td))  # void of a debit = a credit
    assert (r.type, r.amount, triple(r), r.replayed) == (
        "void", D("4.00"), (D("10.00"), D("0.00"), D("14.00")), False,
    )
    r2 = await store.void(void(w, v2, tc))  # void of a credit = a debit
    assert triple(r2) == (D("0.00"), D("0.00"), D("14.00"))
    replay = await store.void(void(w, v1, td))
    assert replay.replayed and triple(replay) == triple(r)
    with pytest.raises(AlreadyVoidedError) as info:
        await store.void(void(w, unique_id("v"), td))
    assert info.value.field == "original_transaction_id"
    with pytest.raises(NotVoidableError):
        await store.void(void(w, unique_id("v"), v1))
    with pytest.raises(NotFoundError) as nf:
        await store.void(void(w, unique_id("v"), unique_id("missing")))
    assert nf.value.field == "original_transaction_id"
    with pytest.raises(NotFoundError):  # original of another wallet
        await store.void(void(wallet_of(unique_id("c")), unique_id("v"), tc))
    with pytest.raises(DuplicateTransactionError):  # same void id, different original
        await store.void(void(w, v1, tc))
    voided, void_record = await store._transfers.get(td), await store._transfers.get(v1)
    assert voided is not None and voided.voided and voided.void_transaction_id == v1
    assert void_record is not None and void_record.type == "void"


async def test_concurrent_writes(store: TigerBeetleStore, unique_id: UniqueId) -> None:
    w = wallet_of(unique_id("c"))
    tc, td = unique_id("c"), unique_id("d")
    await store.add_credit(credit(w, tc, "10.00"))
    same = await asyncio.gather(*(store.subtract_credit(debit(w, td, "1.00")) for _ in range(3)))
    assert sorted(r.replayed for r in same) == [False, True, True]
    assert {triple(r) for r in same} == {(D("9.00"), D("0.00"), D("10.00"))}
    outcomes = await asyncio.gather(
        *(store.void(void(w, unique_id("v"), td)) for _ in range(3)), return_exceptions=True
    )
    applied = [o for o in outcomes if isinstance(o, OperationResult)]
    assert len(applied) == 1, outcomes
    assert all(isinstance(o, AlreadyVoidedError) for o in outcomes if o not in applied)
    record = await store._transfers.get(td)
    assert record is not None and record.void_transaction_id == applied[0].transaction_id
    assert (await store.get_balance(w)).credit == D("10.00")


async def test_void_of_credit_respects_overdraft(
    store: TigerBeetleStore, unique_id: UniqueId
) -> None:
    w = wallet_of(unique_id("c"))
    tc, v = unique_id("c"), unique_id("v")
    await store.add_credit(credit(w, tc, "10.00"))
    await store.subtract_credit(debit(w, unique_id("d"), "6.00"))
    with pytest.raises(InsufficientFundsError):
        await store.void(void(w, v, tc))
    await store.add_credit(credit(w, unique_id("c"), "6.00"))
    r = await store.void(void(w, v, tc))  # same void id works once funds are there
    assert triple(r) == (D("0.00"), D("0.00"), D("16.00"))
    # First op of a wallet being a void: NotFound.
    with pytest.raises(NotFoundError):
        await store.void(void(wallet_of(unique_id("c")), unique_id("v"), tc))


async def test_bad_inputs_rejected_nothing_written(
    store: TigerBeetleStore, tb_client: Any, unique_id: UniqueId
) -> None:
    w = wallet_of(unique_id("c"))
    cases: list[tuple[Any, type[WalletError], str]] = [
        (credit(w, unique_id("t"), "0"), InvalidAmountError, "amount"),
        (credit(w, unique_id("t"), "-1"), InvalidAmountError, "amount"),
        (credit(w, unique_id("t"), "1.001"), InvalidAmountError, "amount"),
        (credit(w, unique_id("t"), str(U64_MAX + 1)), InvalidAmountError, "amount"),
        (debit(w, unique_id("t"), "0.000"), InvalidAmountError, "amount"),
        (credit(wallet_of(unique_id("c"), "JPY", "JPN"), unique_id("t"), "1"),
         UnknownLedgerError, "currency"),
        (credit(wallet_of(unique_id("c"), "XXX", "USA"), unique_id("t"), "1"),
         UnknownCurrencyError, "currency"),
        (void(w, "same-id", "same-id"), InvalidInputError, "original_transaction_id"),
    ]
    for op, error, field in cases:
        with pytest.raises(error) as info:
            if isinstance(op, Void):
                await store.void(op)
            elif isinstance(op, SubtractCredit):
                await store.subtract_credit(op)
            else:
                await store.add_credit(op)
        assert info.value.field == field, (op, info.value)
        assert await store._accounts.get(op.wallet) is None
        assert await store._transfers.get(op.transaction_id) is None
        if not isinstance(op, Void):
            assert await tb_client.lookup_transfers([transfer_id(op.transaction_id)]) == []
    with pytest.raises(InvalidInputError) as info:
        await store.history(w, 0)
    assert info.value.field == "limit"
    # The largest u64 amount is fine (never rounded).
    big = wallet_of(unique_id("c"))
    top = f"{U64_MAX // 100}.{U64_MAX % 100:02d}"  # 184467440737095516.15
    r = await store.add_credit(credit(big, unique_id("t"), top))
    assert r.amount == D(top) and r.credit == D(top)


async def test_crash_between_tigerbeetle_and_registry_heals(
    store: TigerBeetleStore, tb_client: Any, unique_id: UniqueId
) -> None:
    """The transfer reached TigerBeetle but the registry write was lost: the retry replays."""
    w = wallet_of(unique_id("c"))
    await store.add_credit(credit(w, unique_id("t"), "5.00"))  # a strict (no overdraft) wallet
    account = await store._accounts.get(w)
    assert account is not None
    txn = unique_id("t")
    spend = system_account_id(1, SystemAccount.SPEND)
    (res,) = await tb_client.create_transfers(
        [tb.Transfer(id=transfer_id(txn), debit_account_id=account.account_id,
                     credit_account_id=spend, amount=300, ledger=1,
                     code=int(TransferCode.DEBIT))]
    )
    assert res.status == tb.CreateTransferStatus.CREATED
    assert await store._transfers.get(txn) is None
    # The balance (2.00) no longer covers the debit, yet the retry must replay, not refuse.
    r = await store.subtract_credit(debit(w, txn, "3.00"))
    assert r.replayed and triple(r) == (D("2.00"), D("0.00"), D("5.00"))
    record = await store._transfers.get(txn)
    assert record is not None and record.amount_minor == 300 and record.type == "debit"


async def test_history(store: TigerBeetleStore, unique_id: UniqueId) -> None:
    w = wallet_of(unique_id("c"), "EUR", "ESP")
    tc, td, v = unique_id("c"), unique_id("d"), unique_id("v")
    await store.add_credit(credit(w, tc, "5.00", reference_id="r1", allow_overdraft=True))
    await store.subtract_credit(debit(w, td, "1.25", reference_id="r2"))
    await store.void(void(w, v, tc, reference_id="r3"))
    entries = await store.history(w, 10)
    assert [(e.transaction_id, e.type, e.amount, e.reference_id, e.voided) for e in entries] == [
        (v, "void", D("5.00"), "r3", False),
        (td, "debit", D("1.25"), "r2", False),
        (tc, "credit", D("5.00"), "r1", True),
    ]
    times = [e.created_at for e in entries if e.created_at is not None]
    assert len(times) == 3 and times == sorted(times, reverse=True)
    assert [e.transaction_id for e in await store.history(w, 2)] == [v, td]
    assert await store.history(wallet_of(unique_id("nobody")), 5) == []


async def test_multi_balance_one_batch(
    store: TigerBeetleStore, tb_client: Any, unique_id: UniqueId
) -> None:
    client_id = unique_id("c")
    wallets = [
        WalletKey(client_id=client_id, country="USA", currency="USD"),
        WalletKey(client_id=client_id, country="USA", currency="USD", issuer_type="bank"),
        WalletKey(client_id=client_id, country="MEX", currency="MXN"),
    ]
    for i, w in enumerate(wallets):
        await store.add_credit(credit(w, unique_id("t"), f"{i + 1}.00"))
    counting = CountingClient(tb_client)
    reader = TigerBeetleStore(counting, store._accounts, store._transfers)
    balances = await reader.get_multi_balance(client_id)
    assert counting.calls == {"lookup_accounts": 1}
    assert [b.wallet for b in balances] == sorted(wallets, key=lambda k: k.canonical)
    by_wallet = {b.wallet: b.credit for b in balances}
    assert by_wallet == {wallets[0]: D("1.00"), wallets[1]: D("2.00"), wallets[2]: D("3.00")}
    assert await reader.get_multi_balance(unique_id("nobody")) == []


# ----------------------------------------------------------------------------- parity


async def _outcome(store: Any, op: AddCredit | SubtractCredit | Void) -> Any:
    try:
        if isinstance(op, Void):
            result = await store.void(op)
        elif isinstance(op, SubtractCredit):
            result = await store.subtract_credit(op)
        else:
            result = await store.add_credit(op)
    except WalletError as exc:
        return ("error", type(exc).__name__, exc.field)
    return ("ok", result.model_dump(exclude={"created_at"}))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_parity_with_legacy_store(
    store: TigerBeetleStore, legacy: LegacyStore, unique_id: UniqueId, seed: int
) -> None:
    """The same random operations (failures included) give identical results field by field."""
    rng = random.Random(seed)
    client_id = unique_id("parity")
    wallets = [
        WalletKey(client_id=client_id, country="USA", currency="USD"),
        WalletKey(client_id=client_id, country="USA", currency="USD", issuer_type="promo"),
        WalletKey(client_id=client_id, country="MEX", currency="MXN"),
        WalletKey(client_id=client_id, country="ESP", currency="EUR"),
        WalletKey(client_id=client_id, country="PER", currency="PEN", issuer_type="bank"),
    ]
    used: list[tuple[WalletKey, str]] = []  # (wallet, txn) of every op sent
    ops: list[AddCredit | SubtractCredit | Void] = []
    for i in range(100):
        w = rng.choice(wallets)
        txn = f"{client_id}-{i}"
        roll = rng.random()
        amount = f"{rng.randint(1, 5000) / 100:.2f}"
        overdraft = rng.random() < 0.3
        if roll < 0.35:
            op: AddCredit | SubtractCredit | Void = credit(
                w, txn, amount, allow_overdraft=overdraft
            )
        elif roll < 0.65:
            op = debit(w, txn, amount, allow_overdraft=overdraft)
        elif roll < 0.8 and used:  # mostly voids of this wallet's transactions (or voids)
            same_wallet = [u for u in used if u[0] == w]
            _, otxn = rng.choice(same_wallet if same_wallet and rng.random() < 0.85 else used)
            op = void(w, txn, otxn, reference_id=f"void-{i}")
        elif used:  # replays and reuse of ids with other content
            ow, otxn = rng.choice(used)
            prior = next(o for o in ops if o.transaction_id == otxn)
            if rng.random() < 0.5:  # same content; the reference id is not part of it
                op = prior.model_copy(update={"reference_id": rng.choice([None, "x"])})
            elif isinstance(prior, Void):
                op = void(ow, otxn, rng.choice(used)[1])
            else:
                op = type(prior)(wallet=ow, transaction_id=otxn, amount=D(amount))
        else:
            op = credit(w, txn, amount)
        ops.append(op)
        used.append((op.wallet, op.transaction_id))

    kinds: dict[str, int] = {}
    for i, op in enumerate(ops):
        expected = await _outcome(legacy, op)
        actual = await _outcome(store, op)
        assert actual == expected, f"op {i}: {op!r}"
        kind = expected[1] if expected[0] == "error" else (
            "replayed" if expected[1]["replayed"] else f"ok-{expected[1]['type']}"
        )
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"parity seed {seed}: {sorted(kinds.items())}")
    # The sequence must exercise failures and replays, not only happy paths.
    assert {"InsufficientFundsError", "DuplicateTransactionError", "replayed", "ok-void"} <= set(
        kinds
    )
    for w in wallets:
        try:
            lb = await legacy.get_balance(w)
        except NotFoundError:
            with pytest.raises(NotFoundError):
                await store.get_balance(w)
            continue
        tbb = await store.get_balance(w)
        assert (tbb.credit, tbb.debit, tbb.historical_credit) == (
            lb.credit, lb.debit, lb.historical_credit,
        ), w
        lh = [(e.transaction_id, e.type, e.amount, e.reference_id, e.voided)
              for e in await legacy.history(w, 200)]
        th = [(e.transaction_id, e.type, e.amount, e.reference_id, e.voided)
              for e in await store.history(w, 200)]
        assert th == lh, w
    lm = [(b.wallet, b.credit, b.debit, b.historical_credit)
          for b in await legacy.get_multi_balance(client_id)]
    tm = [(b.wallet, b.credit, b.debit, b.historical_credit)
          for b in await store.get_multi_balance(client_id)]
    assert tm == lm
