"""The write path across phases, through the real wallet workflow (Temporal, MongoDB-compatible
server, Redis, TigerBeetle emulator): the switch dual_write -> tb_primary -> rollback under
concurrent traffic on the same wallets, voids of transactions older than TigerBeetle, and the
backfill racing live dual-writes.

Order check used throughout: MongoDB's transaction log ordered by wallet version, after the
version the wallet's TigerBeetle import holds, must be exactly TigerBeetle's transfer history
of the wallet (same transactions, same order, each once).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from wallet_support import (
    DUAL_PAIR,
    WalletHarness,
    assert_same_sequence,
    balances_equal,
    eventually,
    imported_version,
    isolated_settings,
    key,
    set_phase,
    wait_drained,
    wallet_harness,
)

from activities.backfill import BackfillActivities
from activities.wallet import REVERSE_OUTBOX_DEFAULT, WALLET_CLAIMER
from messages.backfill import BackfillInput, BackfillProgress
from messages.wallet import WalletStatus
from mongobase.mongo import now_ms
from stores.backfill_imports import BACKFILL_IMPORTS, ImportRecord, ImportStatus
from stores.bundle import Stores
from stores.tigerbeetle_store import TYPE_CREDIT_IN_OPENING
from walletconfig.settings import Settings
from walletcore.balances import MinorBalance
from walletcore.errors import AlreadyVoidedError, InsufficientFundsError, WalletError
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, SubtractCredit, Void
from walletcore.phases import Phase
from workers.wiring import make_importer
from workflows.backfill import BackfillWorkflow

PAIR = f"{DUAL_PAIR[0]}:{DUAL_PAIR[1]}"
MIGRATION_CACHE_S = 1.1


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def harness(
    temporal_client: Client, settings: Settings, tb_addresses: str
) -> AsyncIterator[WalletHarness]:
    def backfill_activities(stores: Stores) -> list[Any]:
        return BackfillActivities(make_importer(stores)).all()

    async with wallet_harness(
        temporal_client,
        isolated_settings(settings, "write_path"),
        idle_timeout_s=10.0,
        max_ops_per_run=20,
        extra_workflows=[BackfillWorkflow],
        extra_activities=backfill_activities,
    ) as h:
        yield h


def _txn(wallet: WalletKey, name: str) -> str:
    return f"{wallet.client_id}.{name}"


def credit(wallet: WalletKey, name: str, amount: str, **kw: Any) -> AddCredit:
    return AddCredit(wallet=wallet, transaction_id=_txn(wallet, name), amount=Decimal(amount),
                     **kw)  # fmt: skip


def debit(wallet: WalletKey, name: str, amount: str, **kw: Any) -> SubtractCredit:
    return SubtractCredit(wallet=wallet, transaction_id=_txn(wallet, name),
                          amount=Decimal(amount), **kw)  # fmt: skip


def void(wallet: WalletKey, name: str, original: str) -> Void:
    return Void(wallet=wallet, transaction_id=_txn(wallet, name),
                original_transaction_id=_txn(wallet, original))  # fmt: skip


async def switch(h: WalletHarness, phase: Phase) -> None:
    """Publish `phase` and outlive the workers' migration state cache (1 s)."""
    await set_phase(h.stores, DUAL_PAIR, phase)
    await asyncio.sleep(MIGRATION_CACHE_S)


async def drained(h: WalletHarness, wallets: list[WalletKey]) -> None:
    for w in wallets:
        status = await wait_drained(h.client, w, timeout_s=120)
        assert status is None or status.divergence_count == 0, status


# ---- the write-path switch under traffic ------------------------------------------------------


async def test_switch_to_tb_primary_and_back_under_traffic(
    harness: WalletHarness, unique_id: Callable[..., str]
) -> None:
    """dual_write -> tb_primary -> rollback to read_cutover while 2 callers per wallet keep
    writing: no reordering, no double apply, nothing lost."""
    h = harness
    await switch(h, Phase.LEGACY)
    base = unique_id("sw")
    wallets = [key(f"{base}-{i}", DUAL_PAIR) for i in range(4)]
    for i, w in enumerate(wallets):  # pre-migration history, MongoDB only
        overdraft = i % 2 == 0
        await h.client.add_credit(credit(w, "pre-c", "50.00", allow_overdraft=overdraft))
        await h.client.subtract_credit(debit(w, "pre-d", "5.00"))
    await switch(h, Phase.DUAL_WRITE)

    succeeded: dict[str, list[str]] = {w.canonical: [] for w in wallets}
    stop = asyncio.Event()
    rng = random.Random(11)

    async def caller(w: WalletKey, n: int) -> None:
        mine: list[str] = []  # this caller's credits and debits not voided yet
        i = 0
        while not stop.is_set():
            i += 1
            name = f"t{n}-{i}"
            roll = rng.random()
            try:
                if roll < 0.15 and mine:
                    original = mine.pop(rng.randrange(len(mine)))
                    result = await h.client.void(void(w, name, original))
                elif roll < 0.55:
                    amount = f"{rng.randint(1, 9)}.00"
                    result = await h.client.subtract_credit(debit(w, name, amount))
                    mine.append(name)
                else:
                    result = await h.client.add_credit(credit(w, name, f"{rng.randint(1, 9)}.25"))
                    mine.append(name)
            except InsufficientFundsError:
                continue
            succeeded[w.canonical].append(result.transaction_id)

    async def statuses_show(what: str, check: Callable[[list[WalletStatus]], bool]) -> None:
        async def shown() -> bool:
            found = [await h.client.status(w) for w in wallets]
            return check([f for f in found if f is not None]) and None not in found

        await eventually(shown, what, timeout_s=120)

    async def phases() -> None:
        """Each phase lasts its time and until the traffic reached the state the checks below
        assert (a fixed duration alone left a slow host's tb_primary with no answer from
        TigerBeetle: its switch drains first)."""
        await asyncio.sleep(2.0)
        await statuses_show("each wallet's dual-writes reaching TigerBeetle", lambda found: all(
            f.tb_applied + f.outbox_ops > 0 for f in found))
        await set_phase(h.stores, DUAL_PAIR, Phase.TB_PRIMARY)
        await asyncio.sleep(3.0)
        await statuses_show("an operation answered by TigerBeetle", lambda found: sum(
            f.mongo_applied + f.reverse_outbox_ops for f in found) > 0)
        await set_phase(h.stores, DUAL_PAIR, Phase.READ_CUTOVER)  # rollback
        await asyncio.sleep(2.0)
        stop.set()

    callers = [caller(w, n) for w in wallets for n in range(2)]
    await asyncio.gather(phases(), *callers)
    await drained(h, wallets)
    mongo_applied = reverse_outbox_ops = 0
    for w in wallets:
        log = await assert_same_sequence(h.stores, w)
        expected = [_txn(w, "pre-c"), _txn(w, "pre-d")]
        assert log[:2] == expected
        assert sorted(log[2:]) == sorted(succeeded[w.canonical]), w  # each once, none lost
        assert len(log) == len(set(log))
        status = await h.client.status(w)
        assert status is not None and status.divergence_count == 0, status
        mongo_applied += status.mongo_applied + status.reverse_outbox_ops  # backlog or outbox
        reverse_outbox_ops += status.reverse_outbox_ops
        assert status.tb_applied + status.outbox_ops > 0  # the backlog or the outbox
    assert mongo_applied > 0, "no operation was answered by TigerBeetle"
    # With the reverse outbox on (activities.wallet REVERSE_OUTBOX_DEFAULT), tb_primary's
    # MongoDB side went through it.
    assert reverse_outbox_ops > 0 or not REVERSE_OUTBOX_DEFAULT


async def test_rotation_commits_store_writes_before_continue_as_new(
    harness: WalletHarness, unique_id: Callable[..., str]
) -> None:
    """Regression: the workflow task ending in continue-as-new holds no local activity (store
    write). The server refuses that task when an update arrives meanwhile (UnhandledCommand):
    its writes would stay in the store while their answers and backlog items vanish, and the
    resent updates were applied in another order, or to the other store after a switch."""
    h = harness
    await switch(h, Phase.DUAL_WRITE)
    w = key(unique_id("rot"), DUAL_PAIR)

    async def caller(n: int) -> None:
        for i in range(25):
            await h.client.add_credit(credit(w, f"r{n}-{i}", "1.00"))

    await asyncio.gather(caller(0), caller(1))  # 50 operations: at least 2 rotations (20/run)
    await drained(h, [w])
    await assert_same_sequence(h.stores, w)
    run_id: str | None = None  # latest run first, then back along the continue-as-new chain
    rotations = 0
    for _ in range(10):
        handle = h.client.temporal.get_workflow_handle(h.client.workflow_id(w), run_id=run_id)
        events = (await handle.fetch_history()).events
        last_task_commands: list[str] = []
        for event in events:
            name = EventType.Name(event.event_type)
            if name == "EVENT_TYPE_WORKFLOW_TASK_COMPLETED":
                last_task_commands = []
            elif name == "EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW":
                rotations += 1
                assert "EVENT_TYPE_MARKER_RECORDED" not in last_task_commands, last_task_commands
            else:
                last_task_commands.append(name)
        started = events[0].workflow_execution_started_event_attributes
        run_id = started.continued_execution_run_id or None
        if run_id is None:
            break
    assert rotations >= 2


# ---- voids of transactions older than TigerBeetle -----------------------------------------------


async def test_void_of_pre_migration_transactions(
    harness: WalletHarness, unique_id: Callable[..., str]
) -> None:
    h = harness
    await switch(h, Phase.LEGACY)
    w = key(unique_id("prevoid"), DUAL_PAIR)
    await h.client.add_credit(credit(w, "c0", "100.00", allow_overdraft=True))
    await h.client.subtract_credit(debit(w, "d0", "10.00"))
    await h.client.add_credit(credit(w, "c1", "5.00"))
    await switch(h, Phase.DUAL_WRITE)
    importer = make_importer(h.stores)
    assert await importer.ensure_imported(w, "backfill-test") == 3  # the backfill's import
    await balances_equal(h.stores, w)

    # dual_write: MongoDB answers, TigerBeetle reverses from MongoDB's record of c0.
    await h.client.void(void(w, "v0", "c0"))
    with pytest.raises(AlreadyVoidedError):
        await h.client.void(void(w, "v0b", "c0"))
    await drained(h, [w])
    await balances_equal(h.stores, w)
    record = await h.stores.transfers.get(_txn(w, "c0"))
    assert record is not None and record.type == TYPE_CREDIT_IN_OPENING and record.voided

    # tb_primary: TigerBeetle answers the void of a pre-migration debit.
    await switch(h, Phase.TB_PRIMARY)
    result = await h.client.void(void(w, "v1", "d0"))
    assert (result.credit, result.historical_credit) == (Decimal("5.00"), Decimal("115.00"))
    for original, name in (("c0", "v2"), ("d0", "v3")):
        with pytest.raises(AlreadyVoidedError):
            await h.client.void(void(w, name, original))
    # A replay of a pre-migration transaction is answered from MongoDB, not applied again.
    replay = await h.client.add_credit(credit(w, "c1", "5.00"))
    assert replay.replayed
    await drained(h, [w])
    await assert_same_sequence(h.stores, w)
    balance = await h.stores.tigerbeetle.get_balance(w)
    assert (balance.credit, balance.debit, balance.historical_credit) == (
        Decimal("5.00"), Decimal("0.00"), Decimal("115.00"))  # fmt: skip


async def test_void_in_dual_write_before_any_backfill(
    harness: WalletHarness, unique_id: Callable[..., str]
) -> None:
    """No backfill yet: the backlog imports the wallet itself, at the version before its
    first dual-write operation, then reverses the legacy credit from MongoDB's record."""
    h = harness
    await switch(h, Phase.LEGACY)
    w = key(unique_id("prevoid2"), DUAL_PAIR)
    await h.client.add_credit(credit(w, "c0", "20.00"))
    await h.client.add_credit(credit(w, "c1", "3.00"))
    await switch(h, Phase.DUAL_WRITE)
    await h.client.void(void(w, "v0", "c0"))
    await h.client.add_credit(credit(w, "c2", "1.00"))
    await drained(h, [w])
    assert await imported_version(h.stores, w) == 2
    log = await assert_same_sequence(h.stores, w)
    assert log[2:] == [_txn(w, "v0"), _txn(w, "c2")]


# ---- backfill racing live dual-writes ------------------------------------------------------------


async def test_backfill_concurrent_with_workflow_traffic(
    harness: WalletHarness, unique_id: Callable[..., str]
) -> None:
    h = harness
    await switch(h, Phase.LEGACY)
    base = unique_id("bf")
    wallets = [key(f"{base}-{i:02d}", DUAL_PAIR) for i in range(10)]
    for i, w in enumerate(wallets):
        await h.client.add_credit(credit(w, "pre-c", f"{20 + i}.00", allow_overdraft=i % 3 == 0))
        await h.client.subtract_credit(debit(w, "pre-d", "1.50"))
    await switch(h, Phase.DUAL_WRITE)

    async def traffic(w: WalletKey) -> int:
        applied = 0
        for r in range(6):
            op = debit(w, f"live-{r}", "1.00") if r % 2 else credit(w, f"live-{r}", "2.00")
            try:
                if isinstance(op, SubtractCredit):
                    await h.client.subtract_credit(op)
                else:
                    await h.client.add_credit(op)
            except WalletError as err:  # only a refused debit is acceptable
                assert isinstance(err, InsufficientFundsError), err
                continue
            applied += 1
            await asyncio.sleep(0.05)
        return applied

    run_id = f"bf-{uuid.uuid4().hex[:8]}"
    backfill = h.client.temporal.execute_workflow(
        BackfillWorkflow.run,
        BackfillInput(run_id=run_id, pairs=[PAIR], page_size=3, pages_per_run=2),
        id=f"write-path-backfill/{run_id}", task_queue=h.task_queue,
        execution_timeout=timedelta(minutes=5),
    )  # fmt: skip
    progress, applied = await asyncio.gather(
        backfill, asyncio.gather(*(traffic(w) for w in wallets))
    )
    assert isinstance(progress, BackfillProgress)
    assert progress.failed == 0, progress.failed_sample
    await drained(h, wallets)
    for w, n in zip(wallets, applied, strict=True):
        log = await assert_same_sequence(h.stores, w)
        assert len(log) == 2 + n


# ---- a tb_primary write retried after its attempt timed out --------------------------------


async def test_new_wallet_in_tb_primary_retried_after_a_timed_out_attempt(
    harness: WalletHarness, unique_id: Callable[..., str]
) -> None:
    """A new wallet's first tb_primary write claims an empty import (version 0) before writing
    TigerBeetle. An attempt cancelled by its timeout between that claim and its completion
    leaves the claim CLAIMED; the write may still land in TigerBeetle (a retry, or the
    cancelled attempt itself) and the reverse outbox then gives legacy the wallet at version 1.
    The retry must not import legacy's projection over it ("TigerBeetle already holds more
    than legacy version 0"): the claim is the wallet's, empty, and stays version 0."""
    h = harness
    await switch(h, Phase.TB_PRIMARY)
    w = key(unique_id("tbnew"), DUAL_PAIR)
    empty = MinorBalance(credit_minor=0, debit_minor=0, historical_credit_minor=0)
    claim = ImportRecord(wallet=w.canonical, version=0, balance=empty,
                         status=ImportStatus.CLAIMED, claimed_by=WALLET_CLAIMER,
                         claimed_at=now_ms())  # fmt: skip
    # What the timed-out attempt left: its claim, never marked done.
    assert await h.stores.imports.claim_many([claim]) == {w.canonical}
    await h.client.add_credit(credit(w, "c0", "500.00"))
    assert await imported_version(h.stores, w) == 0  # completed before the TigerBeetle write
    # The other order: TigerBeetle holds the credit while the claim is still CLAIMED (the
    # cancelled attempt's write landed), and legacy holds its projection (version 1).
    await h.stores.db[BACKFILL_IMPORTS].update_one(
        {"_id": w.canonical}, {"$set": {"status": ImportStatus.CLAIMED.value, "done_at": None}})
    await drained(h, [w])
    assert (await h.stores.legacy.get_wallet_version(w) or (None, 0))[1] == 1
    await h.client.add_credit(credit(w, "c0", "500.00"))  # the caller's retry: a replay
    await h.client.add_credit(credit(w, "c1", "1.00"))
    await h.client.subtract_credit(debit(w, "d0", "2.00"))
    await drained(h, [w])
    assert await imported_version(h.stores, w) == 0
    log = await assert_same_sequence(h.stores, w)
    assert log == [_txn(w, "c0"), _txn(w, "c1"), _txn(w, "d0")]
