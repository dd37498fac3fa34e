"""Shared fixtures: real servers, started once per session on free ports through
walletmig.devstack (the same code as `walletmig dev up`) and stopped by PID at the end.

Set TEMPORAL_ADDRESS, MONGODB_URI, REDIS_URL or TB_ADDRESSES to run against servers you
already have (e.g. `eval "$(walletmig dev env)"`); the matching server is then not started.
Servers start lazily: a test that only needs Redis does not pay for MongoDB.

Tests isolate through unique ids (`unique_id`) and a per-session MongoDB database, never by
wiping a server.

Nothing outlives the session: SIGTERM and SIGHUP unwind pytest like Ctrl-C (so fixtures tear
down), and an atexit hook then stops every stack this session started (by recorded PID) and
any child process still running (Temporal dev servers, workers a test spawned).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pymongo
import pytest
import pytest_asyncio
import redis.asyncio
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.testing import WorkflowEnvironment

from walletclient.temporal_connect import connect_temporal, data_converter
from walletconfig.settings import ENVIRONMENT, Settings
from walletmig import devstack
from walletmig.processes import PROC_ROOT, log_tail

if TYPE_CHECKING:
    from demo_support import DemoRun
    from recon_support import Env

    from stores.bundle import Stores
    from walletcore.keys import WalletKey

# The dev server's own default start-up timeout (5 s) is too tight on a loaded 2-core machine.
TEMPORAL_STARTUP_TIMEOUT_S = 60

# The wallet id key (walletcore.wallet_ids): one per session, set before any Settings is read, so
# every client, worker and `walletmig` subprocess of the session computes the same workflow ids.
# A key from `walletmig dev env` (WALLETMIG_ID_HASH_KEY_FILE) wins: the stack it names uses it.
os.environ.setdefault("WALLETMIG_ID_HASH_KEY", secrets.token_hex(32))


def _search_attribute_keys() -> list[SearchAttributeKey[Any]]:
    factories: dict[str, Callable[[str], SearchAttributeKey[Any]]] = {
        "Keyword": SearchAttributeKey.for_keyword,
        "Int": SearchAttributeKey.for_int,
        "Text": SearchAttributeKey.for_text,
        "Bool": SearchAttributeKey.for_bool,
        "Double": SearchAttributeKey.for_float,
        "Datetime": SearchAttributeKey.for_datetime,
    }
    return [factories[kind](name) for name, kind in devstack.SEARCH_ATTRIBUTES.items()]


def temporal_binary() -> str:
    """The venv's `temporal` CLI; the SDK must never download a dev server."""
    return str(devstack.find_binary("temporal"))


# ----------------------------------------------------------------------------- cleanup

# Stacks this session started and has not stopped yet: the atexit hook stops them.
_LIVE_STACKS: list[devstack.StackConfig] = []
CHILD_STOP_TIMEOUT_S = 10.0
CHILD_POLL_INTERVAL_S = 0.05
SESSION_CHECK_TIMEOUT_MS = 900_000  # the shared MongoDB client's checks: see mongo_client
INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _live_children() -> list[int]:
    """PIDs of this process's children that still run (zombies excluded)."""
    me = os.getpid()
    found: list[int] = []
    for entry in PROC_ROOT.glob("[0-9]*"):
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == me and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def _signal_child(pid: int, signum: int) -> None:
    # devstack servers lead their own process group (new session): signal the group, which
    # also reaches helpers they forked; other children get the signal alone.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)


def _reap(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def stop_children(timeout_s: float = CHILD_STOP_TIMEOUT_S) -> list[int]:
    """SIGTERM every live child, SIGKILL those still running after `timeout_s`.

    Returns the PIDs found running. Only children of this very process: never anything a
    test did not start.
    """
    assert timeout_s > 0
    pids = _live_children()
    for pid in pids:
        _signal_child(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pids)
        if not set(pids) & set(_live_children()):
            return pids
        time.sleep(CHILD_POLL_INTERVAL_S)
    for pid in set(pids) & set(_live_children()):
        _signal_child(pid, signal.SIGKILL)
    _reap(pids)
    return pids


def _stop_everything() -> None:
    """atexit: the stacks not stopped by their fixture, then any child still running."""
    while _LIVE_STACKS:
        config = _LIVE_STACKS.pop()
        try:
            devstack.down(config)
        except Exception as exc:  # keep going: the child sweep below is the backstop
            print(f"conftest: stopping the stack in {config.state_dir} failed: {exc}",
                  file=sys.stderr)  # fmt: skip
    leaked = stop_children()
    if leaked:
        print(f"conftest: stopped stray child processes {leaked}", file=sys.stderr)


def _interrupt(signum: int, _frame: object) -> None:
    # Unwind like Ctrl-C: pytest then tears the fixtures down and atexit runs. Later
    # signals are ignored so they cannot cut that (bounded) cleanup short.
    for other in INTERRUPT_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _install_interrupt_handlers() -> None:
    for signum in INTERRUPT_SIGNALS:
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _interrupt)


def pytest_configure(config: pytest.Config) -> None:
    atexit.register(_stop_everything)
    _install_interrupt_handlers()


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Code under test may reset a handler to SIG_DFL (asyncio's remove_signal_handler does);
    # a SIGTERM would then kill pytest without stopping the servers.
    _install_interrupt_handlers()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """After fixture teardown: a process still running here leaked; stop it and say so."""
    leaked = stop_children()
    if leaked:
        session.config.get_terminal_writer().line(
            f"conftest: stopped stray child processes {leaked} after the session", red=True
        )


# ----------------------------------------------------------------------------- servers


@pytest.fixture(scope="session")
def stack_config(request: pytest.FixtureRequest) -> Iterator[devstack.StackConfig]:
    """The session's embedded stack: fresh state dir, free ports, the same durability settings
    as `walletmig dev up` (MongoDB syncs on commit), stopped by PID at the end.

    The state dir is not under pytest's numbered basetemp: a concurrent pytest session may
    delete that once its lock is released, which on an interrupted run happens before the
    session fixtures are torn down. It is removed after a session without failures and kept
    (with the server logs) otherwise.
    """
    state_dir = Path(tempfile.mkdtemp(prefix="walletmig-test-stack-"))
    config = devstack.StackConfig.with_free_ports(state_dir, ready_timeout_s=120)
    _LIVE_STACKS.append(config)  # from here on, an interrupted session still stops it
    yield config
    devstack.down(config)
    _LIVE_STACKS.remove(config)
    if request.session.testsfailed == 0:
        shutil.rmtree(state_dir, ignore_errors=True)
    else:
        print(f"\nconftest: stack state and server logs kept in {state_dir}")


@pytest.fixture(scope="session")
def demo_run(request: pytest.FixtureRequest) -> Iterator[DemoRun]:
    """One `walletmig demo` on a dev stack of its own, API and codec server used meanwhile,
    the stack down again (tests/demo_support.py): test_demo asserts on its report and
    test_no_secrets scans its logs, so the suite's slowest set-up runs once. Its directory
    (logs, the demo's outputs) is removed after a session without failures."""
    from demo_support import run_demo_on_a_stack

    root = Path(tempfile.mkdtemp(prefix="walletmig-demo-run-"))
    config = devstack.StackConfig.with_free_ports(root / "state", ready_timeout_s=120)
    _LIVE_STACKS.append(config)  # an interrupted session still stops it
    try:
        run = run_demo_on_a_stack(config, root)
    finally:
        _LIVE_STACKS.remove(config)
    yield run
    if request.session.testsfailed == 0:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"\nconftest: the demo run's stack state and logs kept in {root}")


# ----------------------------------------------------------------- short-lived transactions

# A client killed inside a MongoDB transaction leaves it open: its documents stay locked until
# the server reaps it (SecantusDB: 60 s of idleness, mongod's transactionLifetimeLimitSeconds
# default). `secantusd-py` takes no setting for it (neither a flag, nor its file, nor
# setParameter); its server class does. The kill -9 tests run on a server of their own started
# with a short lifetime: the same expiry by the server, without a minute's wait per kill.
SHORT_TXN_LIFETIME_S = 5.0
SHORT_TXN_START_TIMEOUT_S = 120.0
SHORT_TXN_STOP_TIMEOUT_S = 15.0
# argv: storage path, lifetime in seconds. Binds a free port itself (no race with another
# process for it), prints it, then serves until SIGTERM. The flags `walletmig dev up` gives
# secantusd-py: one-node replica set `secantus`, fsync on commit.
SHORT_TXN_SERVER = """
import signal, sys
from secantus.server import SecantusDBServer

server = SecantusDBServer(host="127.0.0.1", port=0, storage_path=sys.argv[1],
                          replica_set_name="secantus", enable_test_commands=False,
                          sync_on_commit=True, transaction_lifetime_seconds=float(sys.argv[2]))

def stop(signum, frame):
    server.stop()
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
server.start()
print(server.port, flush=True)
server.wait()
"""


def _start_short_txn_server(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The server process (its own process group) and its URI, once it answers as primary."""
    data_dir.mkdir(parents=True)
    log_path = data_dir / "server.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", SHORT_TXN_SERVER, str(data_dir / "db"), str(SHORT_TXN_LIFETIME_S)],
        stdout=subprocess.PIPE, stderr=log, start_new_session=True)  # fmt: skip
    assert proc.stdout is not None
    # The port, or nothing: died (EOF) or still silent at the deadline.
    ready, _, _ = select.select([proc.stdout], [], [], SHORT_TXN_START_TIMEOUT_S)
    line = proc.stdout.readline() if ready else b""
    if not line.strip().isdigit():
        proc.kill()
        raise AssertionError(f"short-txn MongoDB did not start:\n{log_tail(log_path)}")
    uri = devstack.mongodb_uri("127.0.0.1", int(line))
    deadline = time.monotonic() + SHORT_TXN_START_TIMEOUT_S
    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=1000) as client:
        while not client.admin.command("hello").get("isWritablePrimary"):
            assert time.monotonic() < deadline, "short-txn MongoDB never became primary"
            time.sleep(CHILD_POLL_INTERVAL_S)
    return proc, uri


@pytest.fixture(scope="session")
def short_txn_mongodb_uri(stack_config: devstack.StackConfig) -> Iterator[str]:
    """A MongoDB of its own whose open transactions end after SHORT_TXN_LIFETIME_S idle
    (started only for the tests asking for it; stopped by PID, SIGKILL if SIGTERM is not
    enough). Started even when MONGODB_URI names a server: its lifetime is the point."""
    proc, uri = _start_short_txn_server(stack_config.state_dir / "mongo-short-txn")
    try:
        yield uri
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=SHORT_TXN_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=SHORT_TXN_STOP_TIMEOUT_S)


@pytest.fixture(scope="session")
def short_txn_settings(settings: Settings, short_txn_mongodb_uri: str) -> Settings:
    """The session's settings on the short-transaction MongoDB (same database name)."""
    return settings.model_copy(update={"mongodb_uri": short_txn_mongodb_uri})


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def short_txn_mongo_client(
    short_txn_mongodb_uri: str,
) -> AsyncIterator[AsyncMongoClient[dict[str, Any]]]:
    """A client of the short-transaction MongoDB (checks polled, as mongo_client's)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        short_txn_mongodb_uri, serverMonitoringMode="poll",
        connectTimeoutMS=SESSION_CHECK_TIMEOUT_MS)  # fmt: skip
    try:
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture(loop_scope="session")
async def short_txn_stores(short_txn_settings: Settings,
                           tb_addresses: str) -> AsyncIterator[Stores]:
    """Stores on a database of the test's own on the short-transaction MongoDB (imports
    indexed), closed after the test."""
    from wallet_support import isolated_stores

    async with isolated_stores(short_txn_settings, "short_txn", tb_addresses) as opened:
        yield opened


def _start(config: devstack.StackConfig, name: str) -> None:
    (result,) = devstack.up(config, [name])
    if result.state == "skipped":
        pytest.skip(f"{name} unavailable: {result.detail}")
    assert result.state == "up", result


@pytest.fixture(scope="session")
def mongodb_uri(stack_config: devstack.StackConfig) -> str:
    if "MONGODB_URI" in os.environ:
        return os.environ["MONGODB_URI"]
    _start(stack_config, "mongo")
    return stack_config.mongodb_uri


@pytest.fixture(scope="session")
def redis_url(stack_config: devstack.StackConfig) -> str:
    if "REDIS_URL" in os.environ:
        return os.environ["REDIS_URL"]
    _start(stack_config, "redis")
    return stack_config.redis_url


@pytest.fixture(scope="session")
def tb_addresses(stack_config: devstack.StackConfig) -> str:
    if "TB_ADDRESSES" in os.environ:
        return os.environ["TB_ADDRESSES"]
    _start(stack_config, "tigerbeetle")
    return stack_config.tb_addresses


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """A real Temporal dev server (in-memory SQLite) with the project's search attributes."""
    address = os.environ.get("TEMPORAL_ADDRESS")
    if address is not None:
        client = await connect_temporal(address)
        yield WorkflowEnvironment.from_client(client)
        return
    env = await WorkflowEnvironment.start_local(
        data_converter=data_converter(),
        dev_server_existing_path=temporal_binary(),
        ip="127.0.0.1",
        search_attributes=_search_attribute_keys(),
        dev_server_startup_timeout=timedelta(seconds=TEMPORAL_STARTUP_TIMEOUT_S),
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
def temporal_client(temporal_env: WorkflowEnvironment) -> Client:
    """Client with the pydantic data converter, connected to the session's Temporal server."""
    return temporal_env.client


@pytest_asyncio.fixture(loop_scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """A fresh dev server with per-workflow time skipping (Temporal's v2 API).

    Function-scoped, so only tests that ask for it pay its start-up (about a second). Timers
    of workflows started through `time_skipping_env.client` are skipped whenever the workflow
    has no in-flight work; use `fast_forward(handle, duration)` for finer control.
    """
    env = await WorkflowEnvironment.start_time_skipping_v2(
        data_converter=data_converter(),
        dev_server_existing_path=temporal_binary(),
        ip="127.0.0.1",
        search_attributes=_search_attribute_keys(),
        dev_server_extra_args=[
            "--dynamic-config-value",
            "frontend.WorkflowTimeSkippingEnabled=true",
        ],
        dev_server_startup_timeout=timedelta(seconds=TEMPORAL_STARTUP_TIMEOUT_S),
    )
    try:
        yield env
    finally:
        await env.shutdown()


# ----------------------------------------------------------------------------- settings


@pytest.fixture(scope="session")
def settings(
    temporal_env: WorkflowEnvironment,
    mongodb_uri: str,
    redis_url: str,
    tb_addresses: str,
    stack_config: devstack.StackConfig,
) -> Settings:
    """Settings pointing at the session's servers, with a MongoDB database of its own."""
    return Settings.from_env(
        temporal_address=temporal_env.client.service_client.config.target_host,
        mongodb_uri=mongodb_uri,
        mongodb_database=f"walletmig_test_{uuid.uuid4().hex[:10]}",
        redis_url=redis_url,
        tb_addresses=tb_addresses,
        state_dir=stack_config.state_dir,
    )


@pytest.fixture(scope="session")
def settings_env(settings: Settings) -> dict[str, str]:
    """os.environ plus the settings as environment variables: for `walletmig` subprocesses."""
    values = settings.model_dump()
    env = dict(os.environ)
    env.update({name: str(values[field]) for name, (field, _) in ENVIRONMENT.items()})
    return env


# ----------------------------------------------------------------------------- clients


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def mongo_client(mongodb_uri: str) -> AsyncIterator[AsyncMongoClient[dict[str, Any]]]:
    # The session's event loop stands still while sync tests and fixtures run (the shared
    # demo run: 90 s and more). A server check in flight then finds its deadline passed when
    # the loop resumes, marks the server unknown and cancels the next test's operations
    # (pymongo _OperationCancelled). Polled checks (none in flight between them) with a
    # deadline longer than any sync stretch keep the shared client usable across them.
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongodb_uri, serverMonitoringMode="poll", connectTimeoutMS=SESSION_CHECK_TIMEOUT_MS)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="session")
def mongo_db(
    mongo_client: AsyncMongoClient[dict[str, Any]], settings: Settings
) -> AsyncDatabase[dict[str, Any]]:
    """The session's own MongoDB database (named in settings.mongodb_database)."""
    return mongo_client[settings.mongodb_database]


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def tb_client(tb_addresses: str, settings: Settings) -> AsyncIterator[Any]:
    """A TigerBeetle client (emulator or real cluster, from TB_ADDRESSES), cluster 0, cut to
    the cluster's request limit like the processes' (stores.bundle.connect_batched): the suite
    also runs against clusters started with --development or --limit-request."""
    from stores.bundle import connect_batched

    client = await connect_batched(settings, tb_addresses=tb_addresses)
    try:
        yield client
    finally:
        await client.close()


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def unique_id() -> Callable[..., str]:
    """`unique_id("wallet")` -> "wallet-3f2a9c1b7d4e": ids that never collide across tests."""

    def make(prefix: str = "t") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:12]}"

    return make


@pytest.fixture
def wallet(unique_id: Callable[..., str]) -> Callable[..., WalletKey]:
    """`wallet("MXN", "MEX")` -> a key of a fresh client (wallet_support.wallet_maker)."""
    from wallet_support import wallet_maker  # here: only the tests using it load the platform

    return wallet_maker(unique_id)


@pytest_asyncio.fixture(loop_scope="session")
async def env(mongo_db: AsyncDatabase[dict[str, Any]], redis_client: redis.asyncio.Redis,
              tb_client: Any) -> Env:
    """Real stores on the session's servers with a ledger table of the test's own
    (recon_support.make_env): the backfill and reconciliation tests' set-up. A test module
    may override it (test_backfill_history: a TigerBeetle of its own)."""
    from recon_support import make_env

    return await make_env(mongo_db, redis_client, tb_client)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
