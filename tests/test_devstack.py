"""The embedded stack (walletmig dev up|down|status), the CLI frame and docker-compose.yml."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase
from temporalio import workflow
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from walletconfig.settings import ENVIRONMENT, Settings
from walletmig import devstack
from walletmig.processes import ProcessRecord, is_alive, process_start_ticks, spawn, stop

SERVERS = ["temporal", "redis", "mongo", "tigerbeetle"]
# The worker and the API join the lifecycle test once their commands exist.
COMPONENTS = [
    *SERVERS,
    devstack.CODEC_SERVER,
    *(["worker"] if devstack.module_available(devstack.WORKER_MODULE) else []),
    *(["api"] if devstack.module_available(devstack.API_MODULE) else []),
]


def _cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALLETMIG_")}
    for name in ("TEMPORAL_ADDRESS", "MONGODB_URI", "REDIS_URL", "TB_ADDRESSES"):
        env.pop(name, None)  # the CLI must find the stack through STATE/env alone
    return subprocess.run(
        [sys.executable, "-m", "walletmig", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_up_status_idempotent_down(tmp_path: Path) -> None:
    config = devstack.StackConfig.with_free_ports(tmp_path / "state", ready_timeout_s=90)
    try:
        first = devstack.up(config, COMPONENTS)
        assert [s.state for s in first] == ["up"] * len(COMPONENTS), first
        pids = {s.name: s.pid for s in first}

        shown = _cli(config.state_dir, "dev", "status")
        for name in COMPONENTS:
            assert f"{name:<12} up " in shown.stdout, shown.stdout
        assert config.temporal_ui_url in shown.stdout
        if "api" in COMPONENTS:  # its URL, and /readyz's verdict: every server is up
            assert f"{config.api_url()} pid={pids['api']}  (ready)" in shown.stdout, shown
            assert devstack.http_get(f"{config.api_url()}/healthz") == (200, b'{"status":"ok"}')

        second = devstack.up(config, COMPONENTS)
        assert {s.name: s.pid for s in second} == pids
        assert all(s.detail == "already running" for s in second)

        exports = devstack.parse_env_file(config.state_dir / devstack.ENV_FILE)
        assert exports["TEMPORAL_ADDRESS"] == config.temporal_address
        assert exports["MONGODB_URI"] == config.mongodb_uri
        assert exports["REDIS_URL"] == config.redis_url
        assert exports["TB_ADDRESSES"] == config.tb_addresses
        assert exports["TB_REQUEST_LIMIT_BYTES"] == "1048576"
        assert exports["WALLETMIG_API_URL"] == config.api_url()
        check_metrics_urls(config, shown.stdout, exports)
        check_secrets_and_codec_server(config, exports)

        if "worker" in COMPONENTS:
            pids["temporal"] = _running_worker_is_up_only_when_it_answers(config, pids["worker"])
        records = devstack.read_records(config.state_dir)
    finally:
        stopped = devstack.down(config)
    assert {s.name: s.pid for s in stopped if s.pid is not None} == pids
    assert not any(is_alive(record) for record in records.values())
    assert devstack.read_records(config.state_dir) == {}
    assert not (config.state_dir / devstack.ENV_FILE).exists()
    after = _cli(config.state_dir, "dev", "status")
    assert after.returncode == 3, after
    for name in COMPONENTS:
        assert f"{name:<12} down " in after.stdout, after.stdout


def check_metrics_urls(config: devstack.StackConfig, status: str,
                       exports: dict[str, str]) -> None:
    """Every scrape URL of the stack (worker, Temporal SDK, API) in `dev status` and in
    `dev env`'s WALLETMIG_METRICS_URLS (issue 11)."""
    urls = exports["WALLETMIG_METRICS_URLS"].split(",")
    assert urls == config.metrics_urls(exports["WALLETMIG_API_URL"])
    assert len(urls) == len(config.worker_metrics_ports) + 1
    (line,) = [x for x in status.splitlines() if x.startswith("Metrics")]
    assert all(url in line for url in urls), line


def check_secrets_and_codec_server(config: devstack.StackConfig,
                                   exports: dict[str, str]) -> None:
    """Issue 12: `up` made the key files (0600 in a 0700 directory), exports their paths (never
    a key), starts the codec server with its token (401 without it, 200 with it or with the
    browser session cookie) and the Web UI pointed at it."""
    import base64

    import httpx

    from walletmig.codec_server import SESSION_COOKIE

    keys = config.keys_dir
    assert keys.stat().st_mode & 0o777 == 0o700
    for name in (devstack.CODEC_KEYS_FILE, devstack.ID_HASH_KEY_FILE, devstack.CODEC_TOKEN_FILE):
        assert (keys / name).stat().st_mode & 0o777 == 0o600, name
    assert exports["WALLETMIG_CODEC_KEYS_FILE"] == str(keys / devstack.CODEC_KEYS_FILE)
    assert exports["WALLETMIG_ID_HASH_KEY_FILE"] == str(keys / devstack.ID_HASH_KEY_FILE)
    assert len(bytes.fromhex((keys / devstack.ID_HASH_KEY_FILE).read_text().strip())) == 32
    env_text = (config.state_dir / devstack.ENV_FILE).read_text()
    token = devstack.codec_token(config)
    for secret in (token, (keys / devstack.CODEC_KEYS_FILE).read_text().split(":")[1].strip(),
                   (keys / devstack.ID_HASH_KEY_FILE).read_text().strip()):
        assert secret not in env_text
    records = devstack.read_records(config.state_dir)
    assert token not in " ".join(records[devstack.CODEC_SERVER].argv)
    temporal_argv = list(records["temporal"].argv)
    assert temporal_argv[temporal_argv.index("--ui-codec-endpoint") + 1] == config.codec_url

    plain = {"payloads": [{"metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
                           "data": base64.b64encode(b'"hello"').decode()}]}
    with httpx.Client(base_url=config.codec_url, timeout=10) as http:
        assert http.post("/encode", json=plain).status_code == 401
        sealed = http.post("/encode", json=plain, headers={"Authorization": f"Bearer {token}"})
        assert sealed.status_code == 200, sealed.text
        assert http.post("/login", data={"token": "wrong"}).status_code == 401
        signed_in = http.post("/login", data={"token": token})
        assert signed_in.status_code == 200 and token not in signed_in.headers["set-cookie"]
        assert "HttpOnly" in signed_in.headers["set-cookie"]
        cookie = http.cookies[SESSION_COOKIE]
    with httpx.Client(base_url=config.codec_url, timeout=10,
                      cookies={SESSION_COOKIE: cookie}) as browser:
        opened = browser.post("/decode", json=sealed.json())
        assert opened.status_code == 200 and opened.json() == plain
    ui = devstack.http_get(f"{config.temporal_ui_url}/api/v1/settings")
    assert ui is not None and config.codec_url in ui[1].decode(), ui


def _running_worker_is_up_only_when_it_answers(config: devstack.StackConfig, pid: int) -> int:
    """Issue 16: after a Temporal restart a running worker is not "up" until it polls again.
    A stopped (SIGSTOP) worker cannot reconnect, so `up` must wait and then fail with exit 3;
    once it runs again, `up` waits for it and reports it up. Returns Temporal's new PID."""
    os.kill(pid, signal.SIGSTOP)
    try:
        devstack.down(config, ["temporal"])
        devstack.up(config, ["temporal"])
        refused = _cli(config.state_dir, "dev", "up", "--timeout-s", "3")
        assert refused.returncode == 3, refused
        (line,) = refused.stderr.strip().splitlines()
        assert f"worker (pid {pid}) is running but not ready after 3 s" in line, line
    finally:
        os.kill(pid, signal.SIGCONT)
    waited = {s.name: s for s in devstack.up(config, COMPONENTS)}
    assert waited["worker"].state == "up" and waited["worker"].pid == pid
    assert waited["worker"].detail.startswith("already running"), waited["worker"]
    assert devstack.status(config)[COMPONENTS.index("worker")].state == "up"
    temporal_pid = waited["temporal"].pid
    assert temporal_pid is not None
    return temporal_pid


def test_emulator_request_limit_is_passed_exported_and_guarded(tmp_path: Path) -> None:
    config = devstack.StackConfig.with_free_ports(
        tmp_path / "state", tb_request_limit_bytes=devstack.parse_tb_limit_request("32KiB"))
    try:
        (started,) = devstack.up(config, ["tigerbeetle"])
        assert started.state == "up", started
        record = devstack.read_records(config.state_dir)["tigerbeetle"]
        assert record.argv[-2:] == ("--limit-request", "32768")
        assert devstack.emulator_request_limit(record) == 32768  # from its ready line
        exports = devstack.parse_env_file(config.state_dir / devstack.ENV_FILE)
        assert exports["TB_REQUEST_LIMIT_BYTES"] == "32768"
        assert json.loads((config.state_dir / devstack.CONFIG_FILE).read_text())[
            "tb_request_limit_bytes"] == 32768  # later commands need no flag

        other = _cli(config.state_dir, "dev", "up", "--only", "tigerbeetle",
                     "--tb-limit-request", "1MiB")
        assert other.returncode == 1, other
        (line,) = other.stderr.strip().splitlines()
        assert f"pid {record.pid}) runs with request limit 32768 bytes, not 1048576" in line
        same = _cli(config.state_dir, "dev", "up", "--only", "tigerbeetle",
                    "--tb-limit-request", "development")
        assert same.returncode == 0 and "already running" in same.stdout, same
        shown = _cli(config.state_dir, "dev", "status")
        assert "(request limit 32768 bytes)" in shown.stdout, shown.stdout
    finally:
        devstack.down(config)


def test_tb_limit_request_values() -> None:
    assert devstack.parse_tb_limit_request("development") == 32 * 1024
    assert devstack.parse_tb_limit_request("4KiB") == 4096
    assert devstack.parse_tb_limit_request("1048576") == 1024 * 1024
    for bad in ("3KiB", "2MiB", "dev", ""):
        with pytest.raises(ValueError):
            devstack.parse_tb_limit_request(bad)


def test_stop_never_signals_a_reused_pid(tmp_path: Path) -> None:
    record = spawn(
        ["sleep", "30"], log_path=tmp_path / "sleep.log", env=os.environ, cwd=tmp_path, address="-"
    )
    try:
        assert record.start_ticks == process_start_ticks(record.pid)
        impostor = ProcessRecord(
            pid=record.pid,
            start_ticks=(record.start_ticks or 0) + 1,
            argv=record.argv,
            address="-",
            log_path=record.log_path,
        )
        assert not is_alive(impostor)
        assert stop(impostor, timeout_s=1) == "not running"
        assert is_alive(record)
    finally:
        assert stop(record, timeout_s=5) == "stopped"
    assert not is_alive(record)


def test_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = devstack.StackConfig.with_free_ports(
            tmp_path / "state", redis_port=busy.getsockname()[1]
        )
        with pytest.raises(devstack.StackError, match=r"^redis: port \d+ .* already in use"):
            devstack.up(config, ["temporal", "redis"])
    assert devstack.read_records(config.state_dir) == {}  # checked before starting anything


def test_load_stack_env_fills_only_unset_variables(tmp_path: Path) -> None:
    (tmp_path / devstack.ENV_FILE).write_text(
        "# comment\nexport REDIS_URL=redis://127.0.0.1:1/0\n"
        "export MONGODB_URI='mongodb://h:2/?a=b&c=d'\n"
    )
    environ = {"REDIS_URL": "redis://production:6379/0"}
    applied = devstack.load_stack_env(tmp_path, environ)
    assert applied == {"MONGODB_URI": "mongodb://h:2/?a=b&c=d"}
    assert environ["REDIS_URL"] == "redis://production:6379/0"


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        ["dev", "up", "--only", "temporal,bogus"],
        ["dev", "up", "--redis-port", "x"],
        ["dev", "up", "--tb-limit-request", "3KiB"],
    ],
)
def test_cli_user_mistakes_exit_2_without_traceback(tmp_path: Path, args: list[str]) -> None:
    done = _cli(tmp_path, *args)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    assert "error:" in done.stderr


def test_docker_compose_refers_to_defined_things(repo_root: Path) -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((repo_root / "docker-compose.yml").read_text())
    services: dict[str, dict[str, object]] = compose["services"]
    volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict | list)
        for dependency in depends:
            assert dependency in services, f"{name} depends on undefined {dependency}"
        for mount in service.get("volumes") or []:  # type: ignore[attr-defined]
            source = str(mount).split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name} mounts undefined volume {source}"
            elif source.startswith("."):
                assert (repo_root / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build["context"]  # type: ignore[index]
            assert (repo_root / str(context) / "Dockerfile").exists()
    images = {str(s.get("image")) for s in services.values()}
    assert "ghcr.io/tigerbeetle/tigerbeetle:0.17.9" in images
    # Three always-on replicas; one-shot jobs (a `profiles:` service, e.g. the bootstrap that
    # formats them) may use the image too.
    assert (
        sum(
            str(s.get("image")) == "ghcr.io/tigerbeetle/tigerbeetle:0.17.9"
            and not s.get("profiles")
            for s in services.values()
        )
        == 3
    )


@workflow.defn(sandboxed=False)
class _SleepsThreeDays:
    @workflow.run
    async def run(self) -> str:
        await workflow.sleep(timedelta(days=3))
        return "woke"


async def test_shared_fixtures_reach_real_servers(
    settings: Settings,
    temporal_client: Client,
    mongo_db: AsyncDatabase[dict[str, Any]],
    redis_client: redis.asyncio.Redis,
    tb_client: Any,
    unique_id: Callable[..., str],
) -> None:
    key = unique_id("fixture")
    assert key != unique_id("fixture")
    assert settings.mongodb_database == mongo_db.name

    await mongo_db["smoke"].insert_one({"_id": key})
    assert await mongo_db["smoke"].count_documents({"_id": key}) == 1
    await redis_client.set(key, "1", ex=60)
    assert await redis_client.get(key) == b"1"
    assert await tb_client.lookup_accounts([1]) == []
    described = await temporal_client.workflow_service.get_system_info(GetSystemInfoRequest())
    assert described.server_version


async def test_time_skipping_env_skips_timers(time_skipping_env: WorkflowEnvironment) -> None:
    client = time_skipping_env.client
    started_s = time.monotonic()
    async with Worker(client, task_queue="ts", workflows=[_SleepsThreeDays]):
        result = await client.execute_workflow(
            _SleepsThreeDays.run, id=f"sleep-{uuid.uuid4().hex}", task_queue="ts"
        )
    assert result == "woke"
    assert time.monotonic() - started_s < 30


def test_readme_documents_every_setting(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    head = readme.split("\n## ", 1)[0]
    assert "make demo" in head and "make test" in head
    assert "make test" in (repo_root / ".ci" / "run").read_text()
    for name, (_, default) in {**ENVIRONMENT, **devstack.DEV_ENVIRONMENT}.items():
        assert f"| `{name}` | `{default}` |" in readme, f"README lacks {name} (default {default})"


def test_cli_renders_a_rejected_update_as_one_line() -> None:
    from temporalio.client import WorkflowUpdateFailedError
    from temporalio.exceptions import ApplicationError

    from walletmig.cli import _temporal_failure

    try:
        raise WorkflowUpdateFailedError(ApplicationError("phase change rejected: gate not met"))
    except WorkflowUpdateFailedError as rejected:
        line = _temporal_failure(rejected)
    assert line == "WorkflowUpdateFailedError: phase change rejected: gate not met"
    assert _temporal_failure(ValueError("bug")) is None
