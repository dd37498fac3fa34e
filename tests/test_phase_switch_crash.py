"""kill -9 of the worker in the middle of a phase switch, under traffic on the same wallets.

One real worker process (`python -m walletmig worker`) serves both the migration workflow and
the wallet workflows of an isolated database. Callers keep writing while the migration goes
dual_write -> shadow_read -> read_cutover 100 % -> tb_primary; the worker is SIGKILLed while the
switch into tb_primary (the write-path switch: MongoDB-answered backlogs drain to TigerBeetle,
then TigerBeetle answers and MongoDB follows) is in flight, and a new worker takes over. The
engineer's Update carries an id, so sending it again after the crash cannot switch twice.
Then a rollback to read_cutover runs under the same traffic.

Operations are in flight at the kill. Afterwards: every answered operation is in both stores
exactly once and in the same order (TigerBeetle's own transfers on each account are exactly the
derived ids of its answered operations), the balances agree field by field, the migration moved
exactly as asked (one audit entry per action, epochs in sequence) and no wallet recorded a
divergence.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle
from wallet_support import (
    DUAL_PAIR,
    assert_same_sequence,
    history_wanted,
    isolated_settings,
    key,
    save_history,
    session_id_key,
    start_worker,
    stop_workers,
    wait_drained,
    worker_env,
)

from messages.migration import (
    ForceAdvanceRequest,
    MigrationConfig,
    MigrationInput,
    MigrationStatus,
    RollbackRequest,
)
from stores.audit_log import AuditLog
from stores.bundle import Stores, open_stores
from stores.migration_state import MigrationStateStore
from walletclient.wallet_client import WalletClient
from walletconfig.settings import Settings
from walletcore.errors import WalletError
from walletcore.gates import GateThresholds
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, SubtractCredit, WalletOperation
from walletcore.phases import Phase
from walletmig.demo_check import tigerbeetle_ids
from workflows.migration import MigrationWorkflow

SCOPE = f"{DUAL_PAIR[0]}:{DUAL_PAIR[1]}"
WALLETS = 8
CALLER_PAUSE_S = 0.02
# Kill attempts: each once the switch has published tb_primary (the switch then waits out the
# readers' state cache and the drain: under way at the kill); one that ended first anyway is
# rolled back and sent again.
KILL_ATTEMPTS = 3
SWITCH_PUBLISHED_WAIT_S = 60.0  # for the switch Update to publish tb_primary
TRAFFIC_WAIT_S = 120.0  # for the callers' next answers (they ride out the killed worker's lock)
KILL_IN_FLIGHT_WAIT_S = 5.0  # for a caller's operation to be in flight at the kill
RESTART_DELAY_S = 1.0
OPS_PER_PHASE = 40  # answered operations between two steps
UPDATE_TIMEOUT_S = 180.0
CALLER_ATTEMPTS_MAX = 5


def op_for(wallet: WalletKey, n: int, run_id: str) -> WalletOperation:
    """Never refused by either store: the first credit covers every later debit."""
    txn = f"{run_id}.{wallet.client_id}.{n}"
    if n == 0:
        return AddCredit(wallet=wallet, transaction_id=txn, amount=Decimal("1000.00"))
    if n % 3 == 2:
        return SubtractCredit(wallet=wallet, transaction_id=txn, amount=Decimal("0.75"))
    return AddCredit(wallet=wallet, transaction_id=txn, amount=Decimal("1.10"))


class Traffic:
    """Callers on every wallet until `stop`; what was answered, and what is in flight."""

    def __init__(self, client: WalletClient, wallets: list[WalletKey], run_id: str) -> None:
        self.client, self.wallets, self.run_id = client, wallets, run_id
        self.answered: dict[WalletKey, list[str]] = defaultdict(list)
        self.in_flight: set[str] = set()  # sent, not answered yet
        self.count = 0
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._caller(w)) for w in self.wallets]

    async def _caller(self, wallet: WalletKey) -> None:
        n = 0
        while not self.stop.is_set():
            op = op_for(wallet, n, self.run_id)
            self.in_flight.add(op.transaction_id)
            for attempt in range(CALLER_ATTEMPTS_MAX):
                try:
                    await self.client.apply(op)
                    break
                except WalletError as err:  # e.g. MongoDB still locked by the killed worker
                    if not err.retryable or attempt + 1 == CALLER_ATTEMPTS_MAX:
                        raise
            self.in_flight.discard(op.transaction_id)
            self.answered[wallet].append(op.transaction_id)
            self.count += 1
            n += 1
            await asyncio.sleep(CALLER_PAUSE_S)

    async def wait_for(self, ops: int) -> None:
        target = self.count + ops
        deadline = time.monotonic() + TRAFFIC_WAIT_S
        while self.count < target:
            failed = [t.exception() for t in self.tasks if t.done()]
            assert not failed, failed
            assert time.monotonic() < deadline, f"{target - self.count} of {ops} answers missing"
            await asyncio.sleep(0.05)

    async def finish(self) -> None:
        self.stop.set()
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        assert not [r for r in results if isinstance(r, BaseException)], results


@pytest.mark.slow
async def test_kill_9_worker_during_the_switch_to_tb_primary(
    temporal_client: Client, short_txn_settings: Settings, tmp_path: Path
) -> None:
    # On the short-transaction MongoDB (conftest.short_txn_mongodb_uri): the killed worker's
    # open transaction ends after 5 s, as mongod's transactionLifetimeLimitSeconds would after
    # 60 s, so the callers wait out seconds, not a minute.
    queue = f"switch-crash-{uuid.uuid4().hex[:8]}"
    isolated = isolated_settings(short_txn_settings, "switch_crash").model_copy(
        update={"wallet_task_queue": queue, "migration_task_queue": queue})
    env = worker_env(isolated, queue)
    run_id = uuid.uuid4().hex[:8]
    wallets = [key(f"sw-{run_id}-{n}", DUAL_PAIR) for n in range(WALLETS)]
    # Callers ride out the killed worker's MongoDB transaction lock in one call.
    client = WalletClient(temporal_client, queue, id_key=session_id_key(), idle_timeout_s=60,
                          max_ops_per_run=50,
                          retry_window_s=120)
    procs: list[subprocess.Popen[bytes]] = [start_worker(env, tmp_path / "worker-1.log")]
    traffic = Traffic(client, wallets, run_id)
    cfg = MigrationConfig(
        migration_id=f"switch-{run_id}", scopes=[SCOPE],
        thresholds=GateThresholds(window_s=60, tb_primary_stable_s=1),
        evidence_interval_s=0.5, archive_dir=str(tmp_path / "archive"))
    handle: WorkflowHandle[Any, MigrationStatus] = await temporal_client.start_workflow(
        MigrationWorkflow.run, MigrationInput(config=cfg), id=f"migration/{cfg.migration_id}",
        task_queue=queue)
    async with open_stores(isolated) as stores:
        try:
            try:
                in_flight_at_kill, early = await _drive(handle, cfg.migration_id, traffic,
                                                        procs, env, tmp_path, stores)
            finally:
                await traffic.finish()  # every caller's last operation answered
            answered = {t for ids in traffic.answered.values() for t in ids}
            assert in_flight_at_kill <= answered, in_flight_at_kill - answered
            for wallet in wallets:
                await _check_wallet(stores, client, wallet, traffic.answered[wallet])
            await _check_audit(stores, cfg.migration_id, early)
            if history_wanted("migration_switch_crash"):
                await save_history(handle, "migration_switch_crash")
        finally:
            await handle.terminate("test over")
            stop_workers(procs)


async def _drive(handle: WorkflowHandle[Any, MigrationStatus], migration_id: str,
                 traffic: Traffic, procs: list[subprocess.Popen[bytes]], env: dict[str, str],
                 tmp_path: Path, stores: Stores) -> tuple[set[str], int]:
    """dual_write -> ... -> tb_primary under traffic, kill -9 during the switch, rollback.
    Returns the operations in flight at the kill and how many switches ended before it."""

    async def force(step: str) -> MigrationStatus:
        # The Update id makes a resend after a crash the same action, never a second one.
        return await asyncio.wait_for(handle.execute_update(
            MigrationWorkflow.force_advance, ForceAdvanceRequest(reason=step, actor="test"),
            id=f"{migration_id}-{step}"), UPDATE_TIMEOUT_S)

    assert (await force("to-dual-write")).phase == Phase.DUAL_WRITE
    traffic.start()
    await traffic.wait_for(OPS_PER_PHASE)
    assert (await force("to-shadow-read")).phase == Phase.SHADOW_READ
    await traffic.wait_for(OPS_PER_PHASE // 2)
    assert (await force("to-read-cutover")).phase == Phase.READ_CUTOVER
    for percent in (50, 90, 100):  # force_advance walks the rollout steps
        assert (await force(f"rollout-{percent}")).rollout_percent == percent
    await traffic.wait_for(OPS_PER_PHASE // 2)

    async def rollback(name: str) -> None:
        status = await asyncio.wait_for(handle.execute_update(
            MigrationWorkflow.rollback, RollbackRequest(to=Phase.READ_CUTOVER, actor="test",
                                                        reason=name),
            id=f"{migration_id}-{name}"), UPDATE_TIMEOUT_S)
        assert status.phase == Phase.READ_CUTOVER

    published = MigrationStateStore(stores.db, cache_ttl_s=0)

    async def switch_published(switch: asyncio.Task[MigrationStatus]) -> None:
        """Until the switch has written tb_primary (or ended): a fixed delay could kill a slow
        host's worker before the Update even reached the workflow."""
        deadline = time.monotonic() + SWITCH_PUBLISHED_WAIT_S
        while not switch.done() and (await published.get(SCOPE)).phase != Phase.TB_PRIMARY:
            assert time.monotonic() < deadline, "the switch never published tb_primary"
            await asyncio.sleep(0.005)

    for early in range(KILL_ATTEMPTS):
        step = f"to-tb-primary-{early}"
        switch = asyncio.create_task(force(step))
        await switch_published(switch)
        in_flight_at_kill = await _kill_with_work_in_flight(traffic, switch, procs[0])
        if in_flight_at_kill:
            break
        assert (await switch).phase == Phase.TB_PRIMARY  # finished before the kill
        await rollback(f"early-{early}")
        await traffic.wait_for(OPS_PER_PHASE // 4)
    else:
        pytest.fail(f"the switch finished before the kill {KILL_ATTEMPTS} times")
    await asyncio.sleep(RESTART_DELAY_S)
    procs.append(start_worker(env, tmp_path / "worker-2.log"))
    assert (await switch).phase == Phase.TB_PRIMARY
    assert (await force(step)).phase == Phase.TB_PRIMARY  # resent: a no-op
    await traffic.wait_for(OPS_PER_PHASE)

    await rollback("drill")
    await traffic.wait_for(OPS_PER_PHASE // 2)
    return in_flight_at_kill, early


async def _kill_with_work_in_flight(traffic: Traffic, switch: asyncio.Task[MigrationStatus],
                                    worker: subprocess.Popen[bytes]) -> set[str]:
    """SIGKILL the worker while the switch and some caller's operation are both in flight
    (checked and killed with no await between: the set is exact); empty, and no kill, when the
    switch ended first."""
    for _ in range(int(KILL_IN_FLIGHT_WAIT_S / 0.001)):
        if switch.done():
            return set()
        if traffic.in_flight:
            in_flight_at_kill = set(traffic.in_flight)
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
            return in_flight_at_kill
        await asyncio.sleep(0.001)
    raise AssertionError("no operation was in flight before the switch ended")


async def _check_wallet(stores: Stores, client: WalletClient, wallet: WalletKey,
                        answered: list[str]) -> None:
    """Both stores hold every answered operation once, in the same order, and nothing else;
    TigerBeetle's own transfers on the account are exactly their derived ids."""
    status = await wait_drained(client, wallet, timeout_s=120, outbox=stores.legacy.outbox)
    assert status is not None and status.divergence_count == 0, status
    log = await assert_same_sequence(stores, wallet)  # same order, each once
    assert sorted(log) == sorted(answered), wallet  # nothing lost or extra
    held, expected = await tigerbeetle_ids(stores, wallet, dict.fromkeys(answered))
    assert held == expected, (wallet, len(held), len(expected))


async def _check_audit(stores: Stores, migration_id: str, early: int) -> None:
    """The migration moved exactly as asked: one audit entry per action, epochs in order
    (`early` switches ended before the kill and were rolled back)."""
    entries = await AuditLog(stores.db).list(migration_id)
    moves = [(e.from_phase, e.to_phase) for e in entries]
    assert moves == [
        (Phase.LEGACY, Phase.DUAL_WRITE), (Phase.DUAL_WRITE, Phase.SHADOW_READ),
        (Phase.SHADOW_READ, Phase.READ_CUTOVER), *[(Phase.READ_CUTOVER,) * 2] * 3,
        *[(Phase.READ_CUTOVER, Phase.TB_PRIMARY), (Phase.TB_PRIMARY, Phase.READ_CUTOVER)]
        * (early + 1),
    ], moves
    epochs = [e.epoch for e in entries]
    assert epochs == sorted(set(epochs)), epochs
