"""Helpers shared by the tests: wallet keys, an isolated store set, workers, a TB emulator process.

Fixtures built on them live in conftest.py (`wallet`, `env`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import tigerbeetle as tb
from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Worker

from activities.wallet import WalletActivities
from messages.wallet import WalletStatus
from stores.backfill_imports import ImportStatus
from stores.bundle import Stores, make_stores
from stores.legacy_store import WALLET_TRANSACTIONS
from stores.outbox import Outbox
from tb_emulator import server as tb_server
from walletclient.wallet_client import WalletClient
from walletconfig.settings import ENVIRONMENT, Settings
from walletcore.errors import NotFoundError
from walletcore.ids import hash_u128, transfer_id
from walletcore.keys import WalletKey
from walletcore.phases import MigrationState, Phase
from walletcore.reconcile import REGISTRATION_GRACE_S
from walletcore.wallet_ids import wallet_workflow_id
from walletmig import devstack
from walletmig.processes import free_port, is_alive, port_accepts
from workers.wallet_worker import build_worker, workflow_runner
from workers.wiring import make_importer

REPO_ROOT = Path(__file__).resolve().parent.parent
TB_HISTORY_MAX = 8189  # one get_account_transfers page
# Recorded workflow histories (tests/test_replay.py replays them all).
HISTORIES = Path(__file__).parent / "data" / "histories"
RECORD_MODE = os.environ.get("WALLETMIG_RECORD_HISTORIES", "")  # "1": missing ones, "all"
LEGACY_PAIR = ("USD", "USA")  # no migration_state document: legacy
DUAL_PAIR = ("MXN", "MEX")  # set to dual_write by the fixtures


def isolated_settings(settings: Settings, prefix: str) -> Settings:
    """The session's servers with a database of our own: phases we set stay ours."""
    return settings.model_copy(update={"mongodb_database": f"{prefix}_{uuid.uuid4().hex[:8]}"})


@contextlib.asynccontextmanager
async def isolated_stores(settings: Settings, prefix: str, tb_addresses: str
                          ) -> AsyncIterator[Stores]:
    """Stores on a database of our own (isolated_settings; imports indexed), closed after."""
    opened = await make_stores(isolated_settings(settings, prefix), tb_addresses=tb_addresses)
    await opened.imports.ensure_indexes()
    try:
        yield opened
    finally:
        await opened.close()


async def set_phase(stores: Stores, pair: tuple[str, str], phase: Phase) -> None:
    scope = f"{pair[0]}:{pair[1]}"
    current = await stores.migration.get(scope)
    await stores.migration.set(MigrationState(scope=scope, phase=phase, epoch=current.epoch + 1))


def key(client_id: str, pair: tuple[str, str] = LEGACY_PAIR) -> WalletKey:
    return WalletKey(client_id=client_id, country=pair[1], currency=pair[0])


def wallet_maker(unique_id: Callable[..., str]) -> Callable[..., WalletKey]:
    """make(currency="USD", country="USA", client_id=None): a wallet key, of a fresh client
    unless `client_id` is given (the `wallet` fixture)."""

    def make(
        currency: str = "USD", country: str = "USA", client_id: str | None = None
    ) -> WalletKey:
        return key(client_id or unique_id("client"), (currency, country))

    return make


@contextlib.asynccontextmanager
async def sandboxed_worker(
    temporal: Client,
    prefix: str,
    workflows: Sequence[type],
    activities: Sequence[Callable[..., Any]],
) -> AsyncIterator[tuple[Client, str]]:
    """A worker on a fresh task queue `<prefix>-<hex>` running `workflows` in the sandbox, as
    the migration worker does; yields (client, task queue)."""
    queue = f"{prefix}-{uuid.uuid4().hex[:8]}"
    async with Worker(temporal, task_queue=queue, workflows=list(workflows),
                      activities=list(activities), workflow_runner=workflow_runner()):
        yield temporal, queue


@dataclass
class WalletHarness:
    stores: Stores
    client: WalletClient
    task_queue: str


def session_id_key() -> bytes:
    """The session's wallet id key (tests/conftest.py sets WALLETMIG_ID_HASH_KEY)."""
    return Settings.from_env().id_key()


def workflow_id_of(wallet: WalletKey) -> str:
    """A wallet's workflow id under the session's key (what WalletClient.workflow_id says)."""
    return wallet_workflow_id(session_id_key(), wallet)


@contextlib.asynccontextmanager
async def wallet_harness(
    temporal: Client,
    settings: Settings,
    *,
    tb_addresses: str | None = None,
    idle_timeout_s: float = 2.0,
    max_ops_per_run: int = 20,
    extra_workflows: Sequence[type] = (),
    extra_activities: Callable[[Stores], Sequence[Callable[..., Any]]] | None = None,
) -> AsyncIterator[WalletHarness]:
    stores = await make_stores(settings, tb_addresses=tb_addresses)
    await stores.imports.ensure_indexes()
    task_queue = f"wallet-test-{uuid.uuid4().hex[:10]}"
    activities = WalletActivities(
        legacy=stores.legacy, tigerbeetle=stores.tigerbeetle, migration=stores.migration,
        importer=make_importer(stores),
    )
    worker = build_worker(
        temporal, settings, activities, task_queue=task_queue,
        extra_workflows=extra_workflows,
        extra_activities=extra_activities(stores) if extra_activities else (),
    )  # fmt: skip
    client = WalletClient(
        temporal, task_queue, id_key=settings.id_key(), idle_timeout_s=idle_timeout_s,
        max_ops_per_run=max_ops_per_run,
    )
    _OUTBOX_OF[client] = stores.legacy.outbox  # wait_drained reads it
    try:
        async with worker:
            yield WalletHarness(stores=stores, client=client, task_queue=task_queue)
    finally:
        await stores.close()


def history_wanted(name: str) -> bool:
    """Record `name` now? Missing ones with RECORD_MODE=1, every one with =all."""
    if RECORD_MODE == "all":
        return True
    return RECORD_MODE == "1" and not (HISTORIES / f"{name}.json").exists()


async def save_history(handle: WorkflowHandle[Any, Any], name: str) -> None:
    history = await handle.fetch_history()
    HISTORIES.mkdir(parents=True, exist_ok=True)
    payload = {"workflow_id": handle.id, "history": json.loads(history.to_json())}
    (HISTORIES / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")


STATE_WAIT_S = 30.0  # a state a test waits for (eventually): reached in seconds, loaded host too
STATE_POLL_S = 0.2


async def eventually(check: Callable[[], Awaitable[bool]], what: str,
                     timeout_s: float = STATE_WAIT_S) -> None:
    """Until `await check()` holds, at most `timeout_s`: a test waits for the state it asserts
    on, never for a fixed time a loaded host may need more of (or a quick one less)."""
    assert timeout_s > 0
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(STATE_POLL_S)


async def wait_completed(temporal: Client, workflow_id: str, timeout_s: float = STATE_WAIT_S
                         ) -> None:
    """Until the workflow's latest run has COMPLETED (a wallet workflow idles out)."""
    handle = temporal.get_workflow_handle(workflow_id)

    async def completed() -> bool:
        status = (await handle.describe()).status
        return status is not None and status.name == "COMPLETED"

    await eventually(completed, f"{workflow_id} to complete", timeout_s)


# The transactional outbox of each harness's stores, by its client (see wait_drained).
_OUTBOX_OF: weakref.WeakKeyDictionary[WalletClient, Outbox] = weakref.WeakKeyDictionary()


async def wait_drained(
    client: WalletClient, wallet: WalletKey, timeout_s: float = 60.0,
    *, outbox: Outbox | None = None,
) -> WalletStatus | None:
    """Poll the status query until the TigerBeetle backlog is empty (or the run closed) and
    the wallet's transactional outbox records are applied (`outbox`, default: the harness's)."""
    outbox = outbox or _OUTBOX_OF.get(client)
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = await client.status(wallet)
        if (status is None or status.backlog_length == 0) and (
                outbox is None or await outbox.pending_count(wallet) == 0):
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"backlog of {wallet} not drained in {timeout_s} s: {status}")


async def balances_equal(stores: Stores, wallet: WalletKey) -> tuple[Decimal, Decimal, Decimal]:
    """Both stores hold the same balance, field by field; returns it."""
    legacy = await stores.legacy.get_balance(wallet)
    tb = await stores.tigerbeetle.get_balance(wallet)
    fields = ("credit", "debit", "historical_credit")
    left = tuple(getattr(legacy, f) for f in fields)
    right = tuple(getattr(tb, f) for f in fields)
    assert left == right, f"{wallet}: mongodb {left} != tigerbeetle {right}"
    return left


async def tb_missing(stores: Stores, wallet: WalletKey) -> bool:
    try:
        await stores.tigerbeetle.get_balance(wallet)
    except NotFoundError:
        return True
    return False


async def imported_version(stores: Stores, wallet: WalletKey) -> int:
    record = await stores.imports.get(wallet.canonical)
    assert record is not None and record.status is ImportStatus.DONE, wallet
    return record.version


async def assert_same_sequence(stores: Stores, wallet: WalletKey) -> list[str]:
    """Equal balances, and MongoDB's log after the import == TigerBeetle's history, in order,
    each transaction once. Returns MongoDB's full log (transaction ids by version)."""
    docs = [
        d async for d in stores.db[WALLET_TRANSACTIONS]
        .find({"wallet": wallet.canonical}, {"wallet_version": 1})
        .sort("wallet_version", 1)
    ]  # fmt: skip
    versions = [int(d["wallet_version"]) for d in docs]
    assert versions == list(range(1, len(docs) + 1)), f"{wallet}: version gaps {versions}"
    since = await imported_version(stores, wallet)
    expected = [d["_id"] for d in docs if int(d["wallet_version"]) > since]
    history = await stores.tigerbeetle.history(wallet, TB_HISTORY_MAX)
    kinds = [e.type for e in history]
    assert kinds.count("opening") <= 2, kinds
    applied = [e.transaction_id for e in reversed(history) if e.type != "opening"]
    if applied != expected:  # say where the two logs part, not only that they differ
        at = next((i for i, (a, b) in enumerate(zip(applied, expected, strict=False)) if a != b),
                  min(len(applied), len(expected)))
        raise AssertionError(
            f"{wallet}: logs differ at {at} (imported version {since}): TigerBeetle "
            f"{applied[max(0, at - 2):at + 3]} != MongoDB {expected[max(0, at - 2):at + 3]} "
            f"(lengths {len(applied)} / {len(expected)})")
    await balances_equal(stores, wallet)
    return [d["_id"] for d in docs]


def worker_env(settings: Settings, task_queue: str) -> dict[str, str]:
    values = settings.model_dump()
    env = dict(os.environ)
    env.update({name: str(values[field]) for name, (field, _) in ENVIRONMENT.items()})
    env["WALLET_TASK_QUEUE"] = task_queue
    return env


async def kill_when_stopped(script: str, args: list[str], env: dict[str, str], log_path: Path,
                            timeout_s: float) -> None:
    """Run `script` (python -c) until it prints `stopped` (it holds the state its test builds,
    e.g. a transaction left open), then kill -9 it: the crash lands in that state by
    construction. Its stderr goes to `log_path` (shown if it never stops)."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=log_path.open("wb"))
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout_s)
        assert line.strip() == b"stopped", (line, log_path.read_text())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


KILL_WAIT_S = 10.0


def kill_9(stack: devstack.StackConfig, name: str) -> None:
    """SIGKILL a stack server's process group (devstack servers lead their own) and wait until
    it is gone: the outage starts when the call returns, not when the kernel gets to it."""
    record = devstack.read_records(stack.state_dir)[name]
    os.killpg(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while is_alive(record):
        assert time.monotonic() < deadline, f"{name} (pid {record.pid}) survived SIGKILL"
        time.sleep(0.05)


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "walletmig", "worker", "--log-level", "WARNING"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


WORKER_STOP_TIMEOUT_S = 20


def stop_workers(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (graceful shutdown), SIGKILL if one is still running after the timeout."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=WORKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()


class EmulatorProcess:
    """A TigerBeetle emulator of our own, to kill and restart (same port, same data file)."""

    def __init__(self, data_file: Path) -> None:
        self.data_file = data_file
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"tbemu://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        assert self.proc is None
        log = (self.data_file.parent / "emulator.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "tb_emulator", "--host", "127.0.0.1",
                "--port", str(self.port), "--data-file", str(self.data_file),
            ],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not port_accepts("127.0.0.1", self.port):
            assert self.proc.poll() is None, "emulator exited during start-up"
            assert time.monotonic() < deadline, "emulator did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.kill()


@dataclass(frozen=True)
class RequestLimit:
    """A TigerBeetle request limit the emulator can run at, and the real client's maxima there
    (issue 13's measurements)."""

    name: str
    options: dict[str, Any]  # tb_emulator.server.EmulatorProcess options: its command line.
    limit_bytes: int
    creates_max: int
    lookups_max: int


REQUEST_LIMITS = [
    RequestLimit("1MiB", {}, 1 << 20, 8189, 8189),  # The default: no option.
    RequestLimit("32KiB", {"development": True}, 32 << 10, 253, 2031),
    RequestLimit("4KiB", {"limit_request": "4KiB"}, 4 << 10, 29, 239),
]


@contextlib.contextmanager
def limited_emulator(limit: RequestLimit) -> Iterator[tb_server.EmulatorProcess]:
    """A fresh emulator process at the limit, in a temp dir of its own; killed by PID and the dir
    removed on exit."""
    directory, data_file = tb_server.temp_data_file(f"tbemu-{limit.name}-")
    process = tb_server.EmulatorProcess(data_file, **limit.options).start()
    try:
        assert process.request_limit_bytes == limit.limit_bytes
        yield process
    finally:
        process.kill()
        shutil.rmtree(directory, ignore_errors=True)


async def twin_in_tigerbeetle(client: Any, txn: str, tag: str) -> int:
    """Behind the platform's back: a second transfer moving the same money as `txn`'s, under
    another id, created with the TigerBeetle client directly (no registry, no workflow). Returns
    once it is past the grace a registration may take (walletcore.reconcile): from then on it is
    judged as what it is, a transfer the platform did not make."""
    (first,) = await client.lookup_transfers([transfer_id(txn)])
    twin = tb.Transfer(id=hash_u128(f"twin:{tag}"), debit_account_id=first.debit_account_id,
                       credit_account_id=first.credit_account_id, amount=first.amount,
                       ledger=first.ledger, code=first.code)
    (result,) = await client.create_transfers([twin])
    assert result.status == tb.CreateTransferStatus.CREATED, result
    await asyncio.sleep(REGISTRATION_GRACE_S + 0.5)
    return int(twin.id)
