"""WalletWorkflow end to end: real Temporal, MongoDB-compatible server, Redis, TB emulator.

A worker runs in-process on a task queue of this module; the stores use a database of their
own, so the phases set here (MXN:MEX = dual_write) never leak into other modules.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from wallet_support import (
    DUAL_PAIR,
    LEGACY_PAIR,
    EmulatorProcess,
    WalletHarness,
    balances_equal,
    isolated_settings,
    key,
    set_phase,
    tb_missing,
    wait_completed,
    wait_drained,
    wallet_harness,
)

from activities.wallet import OUTBOX_DEFAULT
from messages.wallet import CreditRequest, WalletCommand, WalletWorkflowInput
from walletclient.wallet_client import WalletClient
from walletconfig.settings import Settings
from walletcore.errors import (
    AlreadyVoidedError,
    DuplicateTransactionError,
    InsufficientFundsError,
    InvalidAmountError,
    InvalidInputError,
    NotFoundError,
    NotVoidableError,
)
from walletcore.operations import AddCredit, SubtractCredit, Void
from walletcore.phases import Phase
from workflows.wallet import WalletWorkflow


@pytest.fixture(scope="module")
def wallet_settings(settings: Settings) -> Settings:
    return isolated_settings(settings, "wallet_wf")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def harness(
    temporal_client: Client, wallet_settings: Settings, tb_addresses: str
) -> AsyncIterator[WalletHarness]:
    async with wallet_harness(temporal_client, wallet_settings) as h:
        await set_phase(h.stores, DUAL_PAIR, Phase.DUAL_WRITE)
        yield h


def txn_id(wallet: Any, txn: str) -> str:
    """Transaction ids are global: scope the test's short names by its unique client id."""
    return f"{wallet.client_id}.{txn}"


def credit(wallet: Any, txn: str, amount: str, **kw: Any) -> AddCredit:
    return AddCredit(
        wallet=wallet, transaction_id=txn_id(wallet, txn), amount=Decimal(amount), **kw
    )


def debit(wallet: Any, txn: str, amount: str, **kw: Any) -> SubtractCredit:
    return SubtractCredit(
        wallet=wallet, transaction_id=txn_id(wallet, txn), amount=Decimal(amount), **kw
    )


def void(wallet: Any, txn: str, original: str, *, original_wallet: Any = None) -> Void:
    return Void(
        wallet=wallet,
        transaction_id=txn_id(wallet, txn),
        original_transaction_id=txn_id(original_wallet or wallet, original),
    )


async def count_transactions(harness: WalletHarness, wallet: Any) -> int:
    return await harness.stores.db["wallet_transactions"].count_documents(
        {"wallet": wallet.canonical}
    )


def fields(result: Any) -> tuple[Decimal, Decimal, Decimal]:
    return (result.credit, result.debit, result.historical_credit)


async def run_every_operation(client: WalletClient, wallet: Any) -> None:
    """Credit, debit, both void kinds, a replay, a debt paid by a credit."""
    d = Decimal
    r = await client.add_credit(credit(wallet, "c1", "100.00", reference_id="ref-1"))
    assert fields(r) == (d("100.00"), d("0.00"), d("100.00")) and not r.replayed
    r = await client.subtract_credit(debit(wallet, "d1", "30.25"))
    assert fields(r) == (d("69.75"), d("0.00"), d("100.00"))
    r = await client.void(void(wallet, "v1", "d1"))  # void of a debit: a credit
    assert fields(r) == (d("100.00"), d("0.00"), d("130.25"))
    r = await client.void(void(wallet, "v2", "c1"))  # void of a credit: a debit
    assert fields(r) == (d("0.00"), d("0.00"), d("130.25"))
    replay = await client.subtract_credit(debit(wallet, "d1", "30.25"))
    assert replay.replayed and fields(replay) == (d("69.75"), d("0.00"), d("100.00"))


async def test_every_operation_legacy(
    harness: WalletHarness, unique_id: Callable[..., str]
) -> None:
    wallet = key(unique_id("legacy"), LEGACY_PAIR)
    await run_every_operation(harness.client, wallet)
    balance = await harness.client.get_balance(wallet)
    assert (balance.credit, balance.debit, balance.source) == (Decimal("0.00"), 0, "mongodb")
    status = await harness.client.status(wallet)
    assert status is not None and status.phase_seen is Phase.LEGACY
    assert status.backlog_length == 0 and status.tb_applied == 0
    assert await tb_missing(harness.stores, wallet), "legacy phase must not write TigerBeetle"


async def test_every_operation_dual_write(
    harness: WalletHarness, unique_id: Callable[..., str]
) -> None:
    wallet = key(unique_id("dual"), DUAL_PAIR)
    await run_every_operation(harness.client, wallet)
    # overdraft wallet: debt, then a credit paying it first
    od = key(unique_id("dual-od"), DUAL_PAIR)
    await harness.client.subtract_credit(debit(od, "o1", "5.00", allow_overdraft=True))
    r = await harness.client.add_credit(credit(od, "o2", "7.50"))
    assert fields(r) == (Decimal("2.50"), Decimal("0.00"), Decimal("7.50"))
    for w in (wallet, od):
        status = await wait_drained(harness.client, w)
        assert status is not None and status.divergence_count == 0, status
        assert status.phase_seen is Phase.DUAL_WRITE
        await balances_equal(harness.stores, w)
    legacy_history = await harness.stores.legacy.history(wallet, 50)
    tb_history = await harness.stores.tigerbeetle.history(wallet, 50)
    assert len(legacy_history) == len(tb_history) == 4
    multi = await harness.client.get_multi_balance(wallet.client_id)
    assert [b.wallet for b in multi] == [wallet]


HISTORY_SHAPE_OPS = 4


@pytest.mark.parametrize("pair", [LEGACY_PAIR, DUAL_PAIR], ids=["legacy", "dual_write"])
async def test_one_marker_per_operation_and_no_other_command(
    harness: WalletHarness, unique_id: Callable[..., str], pair: tuple[str, str]
) -> None:
    """What one operation costs Temporal (issue 18): after a run's first update, each further
    one adds its update's accepted and completed events and ONE local-activity marker: no
    timer (the idle timer is started again only after one fired), no search-attribute upsert
    (the patches' markers are the first update's), no regular activity (the outbox carries
    dual_write's TigerBeetle side). Judged on the commands, not on workflow-task counts (a slow
    host may time a task out and retry it)."""
    if pair == DUAL_PAIR and not OUTBOX_DEFAULT:
        pytest.skip("WALLETMIG_OUTBOX=off: the backlog path schedules a TigerBeetle activity")
    wallet = key(unique_id("shape"), pair)
    for i in range(HISTORY_SHAPE_OPS):
        await harness.client.add_credit(credit(wallet, f"c{i}", "1.00"))
    handle = harness.client.temporal.get_workflow_handle(harness.client.workflow_id(wallet))
    events = (await handle.fetch_history()).events
    names = [EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in events]
    first_done = names.index("WORKFLOW_EXECUTION_UPDATE_COMPLETED")
    after = names[first_done + 1:]
    assert after.count("WORKFLOW_EXECUTION_UPDATE_ACCEPTED") == HISTORY_SHAPE_OPS - 1, names
    assert after.count("WORKFLOW_EXECUTION_UPDATE_COMPLETED") == HISTORY_SHAPE_OPS - 1, names
    assert after.count("MARKER_RECORDED") == HISTORY_SHAPE_OPS - 1, names
    assert after.count("TIMER_STARTED") <= after.count("TIMER_FIRED"), names
    unexpected = {"UPSERT_WORKFLOW_SEARCH_ATTRIBUTES", "ACTIVITY_TASK_SCHEDULED",
                  "WORKFLOW_PROPERTIES_MODIFIED", "SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED"}
    assert not unexpected & set(after), names


async def test_idempotent_replays(harness: WalletHarness, unique_id: Callable[..., str]) -> None:
    wallet = key(unique_id("idem"), DUAL_PAIR)
    first = await harness.client.add_credit(credit(wallet, "t1", "10.00"))
    await harness.client.add_credit(credit(wallet, "t2", "1.00"))
    again = await asyncio.gather(
        *(harness.client.add_credit(credit(wallet, "t1", "10.00")) for _ in range(5))
    )
    assert all(r.replayed and fields(r) == fields(first) for r in again)
    with pytest.raises(DuplicateTransactionError) as exc:
        await harness.client.add_credit(credit(wallet, "t1", "11.00"))
    assert exc.value.field == "transaction_id"
    with pytest.raises(DuplicateTransactionError):
        await harness.client.subtract_credit(debit(wallet, "t1", "10.00"))
    await wait_drained(harness.client, wallet)
    assert await harness.stores.legacy.get_balance(wallet) is not None
    assert (await balances_equal(harness.stores, wallet))[0] == Decimal("11.00")
    assert (
        await harness.stores.db["wallet_transactions"].count_documents({"wallet": wallet.canonical})
        == 2
    )


async def test_replay_after_idle_close_answers_from_store(
    harness: WalletHarness, unique_id: Callable[..., str]
) -> None:
    wallet = key(unique_id("idle-replay"), DUAL_PAIR)
    first = await harness.client.add_credit(credit(wallet, "t1", "3.00"))
    await wait_completed(harness.client.temporal, harness.client.workflow_id(wallet))
    replay = await harness.client.add_credit(credit(wallet, "t1", "3.00"))  # a new run
    assert replay.replayed and fields(replay) == fields(first)
    await wait_drained(harness.client, wallet)
    await balances_equal(harness.stores, wallet)


async def test_bad_input_rejected_by_client(
    harness: WalletHarness, unique_id: Callable[..., str]
) -> None:
    wallet = key(unique_id("bad"), DUAL_PAIR)
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"amount": "1.001"}, InvalidAmountError, "amount"),
        ({"amount": "0"}, InvalidAmountError, "amount"),
        ({"amount": "-5"}, InvalidAmountError, "amount"),
        ({"amount": "NaN"}, InvalidInputError, "amount"),
        ({"amount": "1", "transaction_id": ""}, InvalidInputError, "transaction_id"),
        ({"amount": "1", "wallet": {"client_id": "x", "country": "usa", "currency": "USD"}},
         InvalidInputError, "wallet.country"),
    ]  # fmt: skip
    for override, error, field in cases:
        data: dict[str, Any] = {"wallet": wallet, "transaction_id": "b1", **override}
        with pytest.raises(error) as exc:
            await harness.client.add_credit(data)
        assert exc.value.field == field, (override, exc.value)
    with pytest.raises(InvalidInputError) as void_exc:
        await harness.client.void(
            {"wallet": wallet, "transaction_id": "same", "original_transaction_id": "same"}
        )
    assert void_exc.value.field == "original_transaction_id"
    assert await harness.client.status(wallet) is None, "a rejected input must not start a run"
    assert await harness.stores.db["wallets"].count_documents({"_id": wallet.canonical}) == 0


async def test_bad_input_rejected_by_validator(
    harness: WalletHarness, temporal_client: Client, unique_id: Callable[..., str]
) -> None:
    """Bypassing the client: the update validator rejects; nothing in history or the stores."""
    wallet = key(unique_id("validator"), DUAL_PAIR)
    await harness.client.add_credit(credit(wallet, "ok", "1.00"))  # the run exists
    bad = WalletCommand(
        request=CreditRequest(
            op=AddCredit(wallet=wallet, transaction_id="b1", amount=Decimal("1.001"))
        )
    )
    other = WalletCommand.of(credit(key(unique_id("other"), DUAL_PAIR), "b2", "1.00"))
    for command, field in ((bad, "amount"), (other, "wallet")):
        start = WithStartWorkflowOperation(
            WalletWorkflow.run,
            WalletWorkflowInput(wallet=wallet, idle_timeout_s=2, max_ops_per_run=20),
            id=harness.client.workflow_id(wallet),
            task_queue=harness.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        with pytest.raises(WorkflowUpdateFailedError) as exc:
            await temporal_client.execute_update_with_start_workflow(
                WalletWorkflow.apply, command, start_workflow_operation=start
            )
        cause = exc.value.cause
        assert isinstance(cause, ApplicationError)
        assert cause.type in ("InvalidAmountError", "InvalidInputError")
        assert cause.details and cause.details[0]["field"] == field
    handle = temporal_client.get_workflow_handle(harness.client.workflow_id(wallet))
    history = await handle.fetch_history()
    accepted = [
        e
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    ]
    assert len(accepted) == 1, "rejected updates must leave no trace in history"
    assert await count_transactions(harness, wallet) == 1  # only "ok"


async def test_insufficient_funds_writes_nothing(
    harness: WalletHarness, unique_id: Callable[..., str]
) -> None:
    wallet = key(unique_id("funds"), DUAL_PAIR)
    with pytest.raises(InsufficientFundsError):  # a first debit on a new wallet
        await harness.client.subtract_credit(debit(wallet, "d0", "1.00"))
    await harness.client.add_credit(credit(wallet, "c1", "5.00"))
    with pytest.raises(InsufficientFundsError) as exc:
        await harness.client.subtract_credit(debit(wallet, "d1", "5.01"))
    assert exc.value.field == "amount"
    ok = await harness.client.subtract_credit(debit(wallet, "d1", "5.00"))  # same id, now fits
    assert fields(ok) == (Decimal("0.00"), Decimal("0.00"), Decimal("5.00"))
    await harness.client.add_credit(credit(wallet, "c2", "1.00"))
    with pytest.raises(InsufficientFundsError):  # void of a credit the wallet cannot pay
        await harness.client.void(void(wallet, "v1", "c1"))
    await wait_drained(harness.client, wallet)
    status = await harness.client.status(wallet)
    assert status is not None and status.divergence_count == 0
    await balances_equal(harness.stores, wallet)
    assert (
        await harness.stores.db["wallet_transactions"].count_documents({"wallet": wallet.canonical})
        == 3
    )


async def test_void_paths(harness: WalletHarness, unique_id: Callable[..., str]) -> None:
    wallet = key(unique_id("void"), DUAL_PAIR)
    with pytest.raises(NotFoundError):  # a first op that is a void
        await harness.client.void(void(wallet, "v0", "nothing"))
    await harness.client.add_credit(credit(wallet, "c1", "10.00"))
    await harness.client.add_credit(credit(wallet, "c2", "10.00"))
    with pytest.raises(NotFoundError) as nf:
        await harness.client.void(void(wallet, "v1", "unknown"))
    assert nf.value.field == "original_transaction_id"
    v = await harness.client.void(void(wallet, "v1", "c1"))
    assert fields(v) == (Decimal("10.00"), Decimal("0.00"), Decimal("20.00"))
    assert (await harness.client.void(void(wallet, "v1", "c1"))).replayed
    with pytest.raises(AlreadyVoidedError):
        await harness.client.void(void(wallet, "v2", "c1"))
    with pytest.raises(NotVoidableError):
        await harness.client.void(void(wallet, "v3", "v1"))
    other = key(unique_id("void-other"), DUAL_PAIR)
    await harness.client.add_credit(credit(other, "oc1", "1.00"))
    with pytest.raises(NotFoundError):  # the original belongs to another wallet
        await harness.client.void(void(other, "ov1", "c2", original_wallet=wallet))
    await wait_drained(harness.client, wallet)
    status = await harness.client.status(wallet)
    assert status is not None and status.divergence_count == 0
    await balances_equal(harness.stores, wallet)


async def test_idle_close_and_continue_as_new_race_updates(
    harness: WalletHarness, unique_id: Callable[..., str]
) -> None:
    """Bursts timed around the idle timeout (2 s) and max_ops_per_run (20): none dropped."""
    wallet = key(unique_id("race"), DUAL_PAIR)
    await harness.client.add_credit(credit(wallet, "seed", "1000.00"))
    rng = random.Random(7)
    txns: list[str] = []

    async def caller(n: int) -> None:
        for i in range(15):
            txn = f"r{n}-{i}"
            txns.append(txn)
            if i % 2:
                await harness.client.subtract_credit(debit(wallet, txn, "1.00"))
            else:
                await harness.client.add_credit(credit(wallet, txn, "2.00"))
            await asyncio.sleep(rng.uniform(0, 0.05))

    await asyncio.gather(*(caller(n) for n in range(8)))  # 120 ops: several continue-as-new
    rotated = await wait_drained(harness.client, wallet)
    assert rotated is not None and rotated.runs >= 120 // 20, rotated
    await wait_completed(harness.client.temporal, harness.client.workflow_id(wallet))
    # Land updates right on the idle deadline, when the run is completing.
    for burst in range(4):
        await asyncio.sleep(2.0 + rng.uniform(-0.05, 0.05))
        batch = [f"idle{burst}-{i}" for i in range(6)]
        txns.extend(batch)
        await asyncio.gather(*(harness.client.add_credit(credit(wallet, t, "2.00")) for t in batch))
    await wait_drained(harness.client, wallet)
    count = await harness.stores.db["wallet_transactions"].count_documents(
        {"wallet": wallet.canonical}
    )
    assert count == len(txns) + 1
    expected = Decimal("1000.00") + sum(
        (Decimal("-1.00") if t.startswith("r") and int(t.split("-")[1]) % 2 else Decimal("2.00"))
        for t in txns
    )
    credit_, debit_, _ = await balances_equal(harness.stores, wallet)
    assert credit_ - debit_ == expected
    status = await harness.client.status(wallet)
    assert status is not None and status.divergence_count == 0


async def test_dual_write_survives_tigerbeetle_outage(
    temporal_client: Client, settings: Settings, tmp_path: Path, unique_id: Callable[..., str]
) -> None:
    emulator = EmulatorProcess(tmp_path / "outage.tbemu")
    emulator.start()
    try:
        isolated = isolated_settings(settings, "wallet_outage")
        async with wallet_harness(
            temporal_client, isolated, tb_addresses=emulator.address, idle_timeout_s=30
        ) as h:
            await set_phase(h.stores, DUAL_PAIR, Phase.DUAL_WRITE)
            wallet = key(unique_id("outage"), DUAL_PAIR)
            await h.client.add_credit(credit(wallet, "c0", "100.00"))
            await wait_drained(h.client, wallet)
            emulator.kill()
            answered = []
            for i in range(15):  # answered from MongoDB while TigerBeetle is down
                op = credit(wallet, f"o{i}", "1.00") if i % 3 else debit(wallet, f"o{i}", "2.00")
                answered.append(await h.client.apply(op))
            assert len(answered) == 15
            status = await h.client.status(wallet)
            outbox = h.stores.legacy.outbox
            pending = await outbox.pending_count(wallet)
            assert status is not None and status.backlog_length + pending >= 14, status
            # The catch-up an operator sees (`walletmig wallet backlog`): size and oldest age,
            # of the workflows' backlogs (the path of runs without the outbox) ...
            report = await h.client.backlog_report()
            if status.outbox_ops == 0:
                assert report.backlog_total >= 14 and report.wallets_with_backlog >= 1, report
                assert report.backlog_age_s > 0 and report.oldest[0].wallet == wallet, report
            else:  # ... and of the transactional outbox
                total, wallets, oldest = await outbox.pending_summary()
                assert total >= 14 and wallets >= 1 and oldest is not None, (total, wallets)
            emulator.start()
            status = await wait_drained(h.client, wallet, timeout_s=90)
            assert status is not None and status.divergence_count == 0, status
            await balances_equal(h.stores, wallet)
    finally:
        emulator.stop()


def test_models_roundtrip() -> None:
    """The command's tag survives JSON, and a SubtractCredit never turns into a credit."""
    wallet = key("roundtrip")
    for op in (credit(wallet, "a", "1"), debit(wallet, "b", "1"), void(wallet, "c", "a")):
        command = WalletCommand.of(op)
        again = WalletCommand.model_validate_json(command.model_dump_json())
        assert again == command and type(again.op) is type(op)


async def test_migration_state_store(harness: WalletHarness) -> None:
    """Pair document wins over '*'; absent means legacy; a stale epoch is refused."""
    from walletcore.errors import ConflictError
    from walletcore.phases import MigrationState

    store = harness.stores.migration
    assert (await store.resolve("EUR:ESP")).phase is Phase.LEGACY
    await store.set(MigrationState(scope="*", phase=Phase.SHADOW_READ, epoch=1))
    assert (await store.resolve("EUR:ESP")).phase is Phase.SHADOW_READ
    assert (await store.resolve("MXN:MEX")).phase is Phase.DUAL_WRITE  # its own document
    with pytest.raises(ConflictError):
        await store.set(MigrationState(scope="*", phase=Phase.LEGACY, epoch=1))
    await store.set(MigrationState(scope="*", phase=Phase.LEGACY, epoch=2))
    assert (await store.get("*")).epoch == 2
