"""kill -9 the wallet worker in the middle of a dual-write stream (and of a tb_primary one:
TigerBeetle answers, MongoDB follows through the reverse outbox, intent recorded first); a new
worker finishes it.

The worker is a real subprocess (`python -m walletmig worker`). 1,000 operations across 50
wallets from 50 concurrent callers; the worker is SIGKILLed after a tenth of them were
answered and a new one is started a moment later. Afterwards every accepted operation exists
exactly once in MongoDB and in TigerBeetle (the set of transfers on each account equals the
derived ids of its answered operations), operations were in flight when the worker died, and
the two stores agree field by field.

The killed worker's open MongoDB transactions keep their wallets locked until the server's
transaction lifetime (60 s, not configurable on SecantusDB 0.7) aborts them: those wallets
stall that long. Killing early lets the rest of the stream run during the stall instead of
after it, so the test costs about the lifetime plus a few seconds, not the two added up.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest
from temporalio.client import Client
from wallet_support import (
    DUAL_PAIR,
    balances_equal,
    isolated_settings,
    key,
    session_id_key,
    set_phase,
    start_worker,
    stop_workers,
    wait_drained,
    worker_env,
)

from stores.bundle import Stores, open_stores
from walletclient.wallet_client import WalletClient
from walletconfig.settings import Settings
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, SubtractCredit, Void, WalletOperation
from walletcore.phases import Phase
from walletmig.demo_check import tigerbeetle_ids

WALLETS = 50
CALLERS_PER_WALLET = 1
OPS_PER_CALLER = 20  # 50 * 1 * 20 = 1,000 operations
KILL_AFTER_ANSWERS = 100  # a tenth: every wallet busy, 900 operations still to come
RESTART_DELAY_S = 1.0


def operations(wallet: WalletKey, caller: int) -> list[WalletOperation]:
    """Never refused: the seed credit covers every debit and void."""
    prefix = f"{wallet.client_id}.{caller}"
    ops: list[WalletOperation] = [
        AddCredit(wallet=wallet, transaction_id=f"{prefix}.seed", amount=Decimal("500.00"))
    ]
    for i in range(1, OPS_PER_CALLER):
        txn = f"{prefix}.{i}"
        if i % 4 == 3:  # void the credit or debit just before
            ops.append(
                Void(wallet=wallet, transaction_id=txn, original_transaction_id=f"{prefix}.{i - 1}")
            )
        elif i % 2:
            ops.append(SubtractCredit(wallet=wallet, transaction_id=txn, amount=Decimal("1.25")))
        else:
            ops.append(AddCredit(wallet=wallet, transaction_id=txn, amount=Decimal("2.50")))
    return ops


@pytest.mark.slow
@pytest.mark.parametrize("phase", [Phase.DUAL_WRITE, Phase.TB_PRIMARY], ids=lambda p: p.value)
async def test_kill_9_worker_mid_stream(
    temporal_client: Client, settings: Settings, tb_addresses: str, tmp_path: Path,
    phase: Phase,
) -> None:
    isolated = isolated_settings(settings, "wallet_crash")
    task_queue = f"wallet-crash-{uuid.uuid4().hex[:8]}"
    env = worker_env(isolated, task_queue)
    run_id = uuid.uuid4().hex[:8]
    wallets = [key(f"crash-{run_id}-{n}", DUAL_PAIR) for n in range(WALLETS)]
    # Callers ride out the killed worker's 60 s MongoDB transaction lock in one call.
    client = WalletClient(temporal_client, task_queue, id_key=session_id_key(), idle_timeout_s=60,
                          max_ops_per_run=20,
                          retry_window_s=120)

    async with open_stores(isolated) as stores:
        await set_phase(stores, DUAL_PAIR, phase)
        worker = start_worker(env, tmp_path / "worker-1.log")
        procs = [worker]  # everything started here is stopped in `finally`, even on failure
        answered: dict[WalletKey, list[str]] = defaultdict(list)
        in_flight: set[str] = set()  # sent, not answered yet
        in_flight_at_kill: set[str] = set()
        answered_at_kill: list[int] = []
        killed = asyncio.Event()

        async def caller(wallet: WalletKey, n: int) -> None:
            for op in operations(wallet, n):
                in_flight.add(op.transaction_id)
                result = await client.apply(op)
                in_flight.discard(op.transaction_id)
                assert result.transaction_id == op.transaction_id
                answered[wallet].append(op.transaction_id)
                if sum(map(len, answered.values())) >= KILL_AFTER_ANSWERS:
                    killed.set()

        async def crash_and_restart() -> subprocess.Popen[bytes]:
            await killed.wait()
            answered_at_kill.append(sum(map(len, answered.values())))
            in_flight_at_kill.update(in_flight)  # the worker holds these when it dies
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
            await asyncio.sleep(RESTART_DELAY_S)
            restarted = start_worker(env, tmp_path / "worker-2.log")
            procs.append(restarted)
            return restarted

        restarter = asyncio.create_task(crash_and_restart())
        try:
            callers = [caller(w, n) for w in wallets for n in range(CALLERS_PER_WALLET)]
            await asyncio.wait_for(asyncio.gather(*callers), timeout=600)
            await restarter
            total = WALLETS * CALLERS_PER_WALLET * OPS_PER_CALLER
            assert sum(map(len, answered.values())) == total
            (at_kill,) = answered_at_kill
            assert at_kill < total // 2, f"killed after {at_kill} answers: not mid-stream"
            assert in_flight_at_kill, "no operation was in flight at the kill"
            every = {t for ids in answered.values() for t in ids}
            assert in_flight_at_kill <= every  # each was answered after the restart ...
            for wallet in wallets:  # ... and, like every other, is in both stores once
                await _check_wallet(stores, client, wallet, answered[wallet])
        finally:
            restarter.cancel()
            stop_workers(procs)


async def _check_wallet(
    stores: Stores, client: WalletClient, wallet: WalletKey, answered: list[str]
) -> None:
    """MongoDB holds exactly the answered operations; TigerBeetle holds exactly their derived
    transfers (set equality, read from TigerBeetle itself); the balances agree and equal the
    operations' net."""
    status = await wait_drained(client, wallet, timeout_s=120, outbox=stores.legacy.outbox)
    assert status is not None and status.divergence_count == 0, status
    docs = (
        await stores.db["wallet_transactions"]
        .find({"wallet": wallet.canonical}, {"_id": 1})
        .to_list(None)
    )
    assert sorted(d["_id"] for d in docs) == sorted(answered), wallet
    sent = {op.transaction_id: op for n in range(CALLERS_PER_WALLET)
            for op in operations(wallet, n)}  # fmt: skip
    originals = {txn: _original(sent[txn]) for txn in answered}
    held, expected = await tigerbeetle_ids(stores, wallet, originals)
    assert held == expected, (wallet, len(held), len(expected))
    credit, debit, _ = await balances_equal(stores, wallet)
    assert credit - debit == sum(_net(sent[txn]) for txn in answered)


def _original(op: WalletOperation) -> str | None:
    return op.original_transaction_id if isinstance(op, Void) else None


def _net(op: WalletOperation) -> Decimal:
    """Net effect of one op of `operations()`: voids cancel the op before them."""
    if isinstance(op, Void):
        index = int(op.original_transaction_id.rsplit(".", 1)[1])
        return Decimal("1.25") if index % 2 else Decimal("-2.50")
    return -op.amount if isinstance(op, SubtractCredit) else op.amount
