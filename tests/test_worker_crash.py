"""kill -9 the wallet worker in the middle of a dual-write stream and of a tb_primary one
(TigerBeetle answers, MongoDB follows through the reverse outbox, intent recorded first); a new
worker finishes both.

The worker is a real subprocess (`python -m walletmig worker`). 1,000 operations across 50
wallets from 50 concurrent callers, half of them in each phase: the two phases on two currency
pairs of one stream, so one worker serves both and one kill lands in the middle of both (50
callers at once, as when each phase had a stream of its own: 100 at once timed workflow tasks
out on a host loaded far beyond its 2 cores). It is SIGKILLed after a tenth of all operations
were answered and a new one is started a moment later. Afterwards, for each phase (one test
each, asserting on the shared run), every accepted operation exists exactly once in MongoDB and
in TigerBeetle (the set of transfers on each account equals the derived ids of its answered
operations), operations were in flight when the worker died, and the two stores agree field by
field.

The killed worker's open MongoDB transactions keep their wallets locked until the server's
transaction lifetime aborts them: those wallets stall that long. The stream runs on the
short-transaction MongoDB (conftest.short_txn_mongodb_uri: 5 s, where the session's server
holds them 60 s, as mongod does by default). Killing early lets the rest of the stream run
during the stall instead of after it, and running both phases in one stream pays that stall
once, not once per phase.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
import pytest_asyncio
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

# Each phase on a pair of its own: the phase is a pair's, and one worker serves both.
PHASE_PAIRS: dict[Phase, tuple[str, str]] = {Phase.DUAL_WRITE: DUAL_PAIR,
                                             Phase.TB_PRIMARY: ("EUR", "ESP")}
WALLETS = 25  # per phase: 50 callers in all
CALLERS_PER_WALLET = 1
OPS_PER_CALLER = 20  # 25 * 1 * 20 = 500 operations per phase, 1,000 in all
TOTAL_OPS = len(PHASE_PAIRS) * WALLETS * CALLERS_PER_WALLET * OPS_PER_CALLER
KILL_AFTER_ANSWERS = TOTAL_OPS // 10  # every wallet busy, nine tenths still to come
RESTART_DELAY_S = 1.0
STREAM_TIMEOUT_S = 600


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


@dataclass
class CrashRun:
    """What the shared stream left: the stores and client to check it with (the restarted
    worker still runs, to drain), who was answered, and what the worker held when it died."""

    stores: Stores
    client: WalletClient
    wallets: dict[Phase, list[WalletKey]]
    answered: dict[WalletKey, list[str]] = field(default_factory=lambda: defaultdict(list))
    in_flight: dict[str, WalletKey] = field(default_factory=dict)  # sent, not answered yet
    in_flight_at_kill: dict[str, WalletKey] = field(default_factory=dict)
    answered_at_kill: list[int] = field(default_factory=list)

    def answered_count(self) -> int:
        return sum(map(len, self.answered.values()))


async def _stream(run: CrashRun, worker: subprocess.Popen[bytes],
                  restart: asyncio.Future[subprocess.Popen[bytes]],
                  env: dict[str, str], log_dir: pytest.TempPathFactory) -> None:
    """Every caller of both phases at once; the worker killed after KILL_AFTER_ANSWERS answers
    and a new one started (set into `restart`, for the fixture to stop)."""
    killed = asyncio.Event()
    held_answered_s = 0.0  # when the last operation in flight at the kill was answered

    async def caller(wallet: WalletKey, n: int) -> None:
        nonlocal held_answered_s
        for op in operations(wallet, n):
            run.in_flight[op.transaction_id] = wallet
            result = await run.client.apply(op)
            del run.in_flight[op.transaction_id]
            assert result.transaction_id == op.transaction_id
            run.answered[wallet].append(op.transaction_id)
            if op.transaction_id in run.in_flight_at_kill:
                held_answered_s = time.monotonic() - started
            if run.answered_count() >= KILL_AFTER_ANSWERS:
                killed.set()

    killed_s = 0.0

    async def crash_and_restart() -> None:
        nonlocal killed_s
        await killed.wait()
        killed_s = time.monotonic() - started
        run.answered_at_kill.append(run.answered_count())
        run.in_flight_at_kill.update(run.in_flight)  # the worker holds these when it dies
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        await asyncio.sleep(RESTART_DELAY_S)
        restart.set_result(start_worker(env, log_dir.mktemp("worker-2") / "worker.log"))

    started = time.monotonic()
    restarter = asyncio.create_task(crash_and_restart())
    try:
        callers = [caller(w, n) for ws in run.wallets.values() for w in ws
                   for n in range(CALLERS_PER_WALLET)]
        await asyncio.wait_for(asyncio.gather(*callers), timeout=STREAM_TIMEOUT_S)
        await restarter
    finally:
        restarter.cancel()
    print(f"\nworker killed after {sum(run.answered_at_kill)} answers ({killed_s:.1f} s), "
          f"{len(run.in_flight_at_kill)} in flight, the last of them answered at "
          f"{held_answered_s:.1f} s; {run.answered_count()} answered in "
          f"{time.monotonic() - started:.1f} s")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def crash_run(temporal_client: Client, short_txn_settings: Settings, tb_addresses: str,
                    tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[CrashRun]:
    """The one stream both phases' tests assert on (the kill and the restart included)."""
    isolated = isolated_settings(short_txn_settings, "wallet_crash")
    task_queue = f"wallet-crash-{uuid.uuid4().hex[:8]}"
    env = worker_env(isolated, task_queue)
    run_id = uuid.uuid4().hex[:8]
    # Bounds, not waits: a call rides out the killed worker's MongoDB transaction lock (5 s
    # here; these bounds also cover a server holding it the default 60 s).
    client = WalletClient(temporal_client, task_queue, id_key=session_id_key(), idle_timeout_s=60,
                          max_ops_per_run=20, retry_window_s=120)
    wallets = {phase: [key(f"crash-{run_id}-{phase.value}-{n}", pair) for n in range(WALLETS)]
               for phase, pair in PHASE_PAIRS.items()}
    async with open_stores(isolated) as stores:
        for phase, pair in PHASE_PAIRS.items():
            await set_phase(stores, pair, phase)
        worker = start_worker(env, tmp_path_factory.mktemp("worker-1") / "worker.log")
        restart: asyncio.Future[subprocess.Popen[bytes]] = asyncio.Future()
        try:
            run = CrashRun(stores=stores, client=client, wallets=wallets)
            await _stream(run, worker, restart, env, tmp_path_factory)
            yield run
        finally:  # everything started here is stopped, even on failure
            stop_workers([worker, *([restart.result()] if restart.done() else [])])


@pytest.mark.slow
@pytest.mark.timeout(900)  # the first test also pays for the shared stream
@pytest.mark.parametrize("phase", list(PHASE_PAIRS), ids=lambda p: p.value)
async def test_kill_9_worker_mid_stream(crash_run: CrashRun, phase: Phase) -> None:
    run = crash_run
    assert run.answered_count() == TOTAL_OPS
    (at_kill,) = run.answered_at_kill
    assert at_kill < TOTAL_OPS // 2, f"killed after {at_kill} answers: not mid-stream"
    wallets = run.wallets[phase]
    mine = set(wallets)
    held = {t for t, wallet in run.in_flight_at_kill.items() if wallet in mine}
    assert held, f"no {phase.value} operation was in flight at the kill"
    every = {t for w in wallets for t in run.answered[w]}
    assert held <= every  # each was answered after the restart ...
    for wallet in wallets:  # ... and, like every other, is in both stores once
        await _check_wallet(run.stores, run.client, wallet, run.answered[wallet])


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
