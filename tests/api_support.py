"""Helpers for the HTTP API tests: the API as a real `walletmig api` process (started, killed
and stopped by PID), a worker process for its writes, API keys, a self-signed certificate."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase
from wallet_support import (
    REPO_ROOT,
    isolated_settings,
    start_worker,
    stop_workers,
    worker_env,
)

from stores.api_keys import ApiKeyStore
from walletconfig.settings import Settings
from walletmig.processes import free_port, log_tail

# A deadline, not a duration: `--workers 2` spawns two processes that import everything again;
# on the shared 2-core host at load ~25 they were still starting after 60 s (session 8).
API_START_TIMEOUT_S = 180.0
API_STOP_TIMEOUT_S = 15.0
LOG_WAIT_TIMEOUT_S = 60.0  # a log line is written after the answer is sent: wait for it
POLL_INTERVAL_S = 0.1
ALL_SCOPES = ["wallets:read", "wallets:write", "terminal:submit", "terminal:read",
              "migration:read", "ledger:read"]  # fmt: skip
# Defaults for a test server: generous limits, no key cache (a revocation shows at once),
# short write timeout and lease (a killed server's keys are taken over quickly).
TEST_API_VARS = {
    "WALLETMIG_API_RATE_LIMIT_MONEY": "10000/second",
    "WALLETMIG_API_RATE_LIMIT_READ": "10000/second",
    "WALLETMIG_API_KEY_CACHE_TTL_S": "0",
    "WALLETMIG_API_WRITE_TIMEOUT_S": "20",
    "WALLETMIG_API_IDEMPOTENCY_LEASE_S": "25",
}


@dataclass
class ApiProcess:
    """One `walletmig api` process; start/kill/start again keeps its port."""

    env: dict[str, str]
    log_path: Path
    ca_file: Path | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_file else 'http'}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True

    def start(self, timeout_s: float = API_START_TIMEOUT_S) -> None:
        assert self.proc is None, "already running"
        env = {**self.env, "WALLETMIG_API_HOST": "127.0.0.1", "WALLETMIG_API_PORT": str(self.port)}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "walletmig", "api"], cwd=REPO_ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not self._healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"the API exited during start-up:\n{log_tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the API did not start:\n{log_tail(self.log_path)}")
            time.sleep(POLL_INTERVAL_S)

    def _healthy(self) -> bool:
        try:
            response = httpx.get(f"{self.url}/healthz", verify=self.verify, timeout=1)
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """kill -9, by PID."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=API_STOP_TIMEOUT_S)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL if it is still running after the timeout."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=API_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=API_STOP_TIMEOUT_S)
        self.proc = None


def api_env(
    settings: Settings, task_queue: str, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The settings as environment variables, one task queue for both roles, test API vars."""
    env = worker_env(settings, task_queue)
    env["MIGRATION_TASK_QUEUE"] = task_queue
    env.update(TEST_API_VARS)
    env.update(extra or {})
    return env


@contextlib.contextmanager
def running_api(
    settings: Settings, work_dir: Path, *, name: str = "api", extra: dict[str, str] | None = None,
    ca_file: Path | None = None, with_worker: bool = True,
) -> Iterator[ApiProcess]:  # fmt: skip
    """An API process (and a worker serving its task queue), stopped by PID at the end."""
    task_queue = f"api-test-{uuid.uuid4().hex[:10]}"
    env = api_env(settings, task_queue, extra)
    workers = [start_worker(env, work_dir / f"{name}-worker.log")] if with_worker else []
    api = ApiProcess(env=env, log_path=work_dir / f"{name}.log", ca_file=ca_file)
    try:
        api.start()
        yield api
    finally:
        api.stop()
        stop_workers(workers)


async def make_key(
    db: AsyncDatabase[Any], name: str, scopes: list[str], *, owner: str | None = None,
    expires_at: datetime | None = None,
) -> str:  # fmt: skip
    issued = await ApiKeyStore(db).create(
        name=name, owner=owner or name, scopes=scopes, expires_at=expires_at
    )
    return issued.key


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the openssl CLI."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def wait_log(log_path: Path, check: Callable[[str], bool], what: str) -> str:
    """The process's log once `check` holds on it. A line is written after the answer it logs
    is sent, and a second `--workers` process may still be starting after the first answers,
    so a test waits for the state, bounded by LOG_WAIT_TIMEOUT_S, never for a fixed time."""
    deadline = time.monotonic() + LOG_WAIT_TIMEOUT_S
    while True:
        log = log_path.read_text()
        if check(log):
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"the log never showed {what}:\n{log_tail(log_path)}")
        await asyncio.sleep(POLL_INTERVAL_S)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def api_module_fixtures(name: str) -> tuple[Any, Any, Any]:
    """The `api_settings`, `api` and `db` module fixtures of a test file that runs its own API
    process on isolated settings (database and task queues named after `name`). Assign them
    to those three names at module level."""

    @pytest.fixture(scope="module")
    def api_settings(settings: Settings) -> Settings:
        return isolated_settings(settings, name)

    @pytest.fixture(scope="module")
    def api(api_settings: Settings,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
        with running_api(api_settings, tmp_path_factory.mktemp(name)) as process:
            yield process

    @pytest.fixture(scope="module")
    def db(mongo_client: Any, api_settings: Settings) -> AsyncDatabase[Any]:
        return mongo_client[api_settings.mongodb_database]  # type: ignore[no-any-return]

    return api_settings, api, db
