"""The production topology (docker-compose.yml, deploy/host-*.yml, Dockerfile) against the
operating rules of TigerBeetle, Temporal and MongoDB that issue 19 lists.

Static checks parse the files with PyYAML (merge keys resolved, as compose does); `compose
config -q` runs when docker-compose (v1) or the `docker compose` plugin is installed (Debian:
`apt-get install docker-compose`) and is skipped, saying so, otherwise: docker-compose.yml with
no variable at all (every secret is a file, compose `secrets:`), the per-host files with their
per-host values only. The deploy scripts run for real: tigerbeetle.sh's refusals, make-secrets.sh
and secret-env.sh, Redis reading its password from the file, temporal_setup.py against the
session's Temporal dev server, worker_health.py against the session's servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from datetime import timedelta
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from google.protobuf.duration_pb2 import Duration
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.api.workflowservice.v1 import RegisterNamespaceRequest
from temporalio.client import Client
from temporalio.service import RPCError

from walletclient.payload_codec import load_codec
from walletconfig.settings import FILE_SUFFIX, FILE_VARIANTS, SettingFileError, Settings
from walletmig.devstack import SEARCH_ATTRIBUTES, find_binary

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "docker-compose.yml"
HOST_FILES = [ROOT / "deploy" / name
              for name in ("host-tigerbeetle.yml", "host-mongod.yml", "host-app.yml")]
ALL_FILES = [MAIN, *HOST_FILES]
TB_SCRIPT = ROOT / "deploy" / "tigerbeetle.sh"
SCRIPT_TIMEOUT_S = 120
NAMESPACE_WAIT_S = 30
COMPOSE_TIMEOUT_S = 120
WORKER_STOP_GRACE_S_MIN = 30
TB_MEMORY_BYTES_MIN = 6 * 2**30  # TigerBeetle's hardware docs: >= 6 GiB per replica
LONG_RUNNING = {"unless-stopped", "always"}
REQUIRED_REF = re.compile(r"^\$\{[A-Z0-9_]+:\?[^}]*\}$")
SECRET_KEY = re.compile(r"PASSWORD|PASSWD|PWD|SECRET|TOKEN|_AUTH$|_URI$|_URL$|CLUSTER_ID")
URI_USERINFO = re.compile(r"://([^/@\s]*)@")
DEFAULT_REF = re.compile(r"^\$\{[A-Z0-9_]+:-([^}]*)\}$")
MAKE_SECRETS = ROOT / "deploy" / "make-secrets.sh"
SECRET_ENV = ROOT / "deploy" / "secret-env.sh"
SECRETS_DIR = ROOT / "deploy" / "secrets"
RUN_SECRETS = "/run/secrets/"
# Where each file's secrets live: deploy/secrets, relative to the project directory (the
# directory of the first compose file), or WALLETMIG_SECRETS_DIR. A path, never a value.
OVERLAY = ROOT / "deploy" / "observability.yml"  # an overlay: paths relative to the main file's
SECRET_SOURCES = {
    **{path: "${WALLETMIG_SECRETS_DIR:-./deploy/secrets}/" for path in (MAIN, OVERLAY)},
    **{path: "${WALLETMIG_SECRETS_DIR:-./secrets}/" for path in HOST_FILES},
}
# The per-host files' own required values (none is a secret; docker-compose.yml has none):
# `config` only interpolates, it connects to nothing.
DUMMY_ENV = {
    "TB_REPLICA": "0", "TB_ADDRESSES": "127.0.0.1:3000,127.0.0.1:3001,127.0.0.1:3002",
    "TB_DATA_DIR": "/srv/tigerbeetle", "MONGO_DATA_DIR": "/srv/mongodb",
    "MONGO_KEYFILE": "/etc/walletmig/mongo.key", "MONGO_MEMBERS": "localhost:27017",
}


# ----------------------------------------------------------------------------- helpers

def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def services(path: Path) -> dict[str, dict[str, Any]]:
    found = load(path)["services"]
    assert isinstance(found, dict) and found, path
    return found


def is_long_running(service: dict[str, Any]) -> bool:
    return service.get("restart") in LONG_RUNNING


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def default_of(value: str) -> str:
    """`${VAR:-8g}` -> `8g`; a plain value as is."""
    match = DEFAULT_REF.match(value)
    return match.group(1) if match else value


def seconds(duration: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)


def memory_bytes(size: str) -> int:
    match = re.fullmatch(r"(\d+)([kmg]?)b?", size.lower())
    assert match, size
    return int(match.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match.group(2)]


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def tigerbeetle_services(path: Path) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services(path).items()
            if str(s.get("image", "")).startswith("ghcr.io/tigerbeetle/tigerbeetle:")}


def walletmig_services(path: Path) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services(path).items()
            if str(s.get("image", "")).startswith("walletmig:")}


def published_ports(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host binding, container port) of each `ports` entry, short or long syntax."""
    out = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            out.append((str(entry.get("host_ip", "")), str(entry["target"])))
            continue
        pieces = str(entry).rsplit(":", 1)
        out.append((pieces[0] if len(pieces) == 2 else "", pieces[-1].split("/")[0]))
    return out


# ----------------------------------------------------------------------------- exposure

@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_temporal_frontend_is_not_published_and_every_port_is_loopback(path: Path) -> None:
    for name, service in services(path).items():
        for binding, target in published_ports(service):
            assert target != "7233", f"{name} publishes Temporal's frontend (no auth on it)"
            assert binding.startswith("127.0.0.1:"), f"{name} publishes {target} on {binding!r}"
        if name == "temporal":
            assert service.get("network_mode") != "host", "host networking exposes 7233"


# ----------------------------------------------------------------------------- TigerBeetle

@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_cluster_id_is_a_file_everywhere(path: Path) -> None:
    """Chosen once per deployment and never defaulted (0 is for tests): the tb-cluster-id file,
    which the replicas (tigerbeetle.sh) and the workers (TB_CLUSTER_ID_FILE) read at start."""
    assert "${TB_CLUSTER_ID" not in path.read_text(), "never a variable, never a default"
    users = 0
    for name, service in services(path).items():
        env = environment(service)
        assert "TB_CLUSTER_ID" not in env, name
        if "TB_CLUSTER_ID_FILE" in env:
            assert env["TB_CLUSTER_ID_FILE"] == RUN_SECRETS + "tb-cluster-id", name
            assert "tb-cluster-id" in service["secrets"], name
            users += 1
    assert users > 0 or path.name == "host-mongod.yml"


def test_address_list_is_defined_once_and_matches_the_fixed_ips() -> None:
    data = load(MAIN)
    addresses = data["x-tb-addresses"]
    for name, service in services(MAIN).items():
        if "TB_ADDRESSES" in environment(service):
            assert environment(service)["TB_ADDRESSES"] == addresses, name
    assert MAIN.read_text().count(addresses) == 1, "write the list once (x-tb-addresses)"
    subnet = data["networks"]["ledger"]["ipam"]["config"][0]
    network_prefix = subnet["subnet"].rsplit(".", 1)[0]
    dynamic_from = int(subnet["ip_range"].split("/")[0].rsplit(".", 1)[1])
    replicas = {name: s for name, s in tigerbeetle_services(MAIN).items() if "ledger" in
                (s.get("networks") or {})}
    assert len(replicas) == len(addresses.split(",")) == 3
    for name, service in replicas.items():
        index = int(environment(service)["TB_REPLICA"])
        ip = service["networks"]["ledger"]["ipv4_address"]
        assert addresses.split(",")[index] == f"{ip}:3000", name
        assert ip.startswith(network_prefix + "."), name
        assert int(ip.rsplit(".", 1)[1]) < dynamic_from, f"{name}: {ip} inside ip_range"


@pytest.mark.parametrize("path", [MAIN, HOST_FILES[0]], ids=lambda p: p.name)
def test_tigerbeetle_runs_under_an_init_with_memlock_and_never_formats_on_start(
        path: Path) -> None:
    found = tigerbeetle_services(path)
    assert found
    for name, service in found.items():
        assert service.get("init") is True, f"{name}: TigerBeetle has no signal handlers"
        assert "IPC_LOCK" in service.get("cap_add", []), name
        assert service["ulimits"]["memlock"] == {"soft": -1, "hard": -1}, name
        assert "seccomp=unconfined" in service.get("security_opt", []), name
        limit = memory_bytes(default_of(str(service["mem_limit"])))
        assert limit >= TB_MEMORY_BYTES_MIN, f"{name}: mem_limit below 6 GiB"
        assert environment(service).get("TB_CACHE_GRID"), f"{name}: set --cache-grid"
        assert service["entrypoint"] == ["/bin/sh", "/deploy/tigerbeetle.sh"], name
        command = service["command"]
        assert "format" not in " ".join(command), name
        if command[0] == "bootstrap":  # the one-shot, only ever run by hand
            assert service.get("profiles") == ["bootstrap"], name
            assert service.get("restart") == "no", name
        else:
            assert command == ["start"], name


# ----------------------------------------------------------------------------- walletmig

@pytest.mark.parametrize("path", [MAIN, HOST_FILES[2]], ids=lambda p: p.name)
def test_walletmig_is_one_image_under_an_init_and_workers_get_time_to_stop(path: Path) -> None:
    found = walletmig_services(path)
    assert {"walletmig-worker", "walletmig-cli", "temporal-setup"} <= set(found)
    assert len({service["image"] for service in found.values()}) == 1, "one image"
    built = [name for name, service in found.items() if "build" in service]
    assert built == ["walletmig-worker"], "built once, by the worker"
    for name, service in found.items():
        assert service.get("init") is True, f"{name}: Python as PID 1 needs an init"
        if name != "walletmig-worker":
            assert service.get("pull_policy") == "never", name
        if is_long_running(service):
            grace = seconds(str(service.get("stop_grace_period", "10s")))
            assert grace >= WORKER_STOP_GRACE_S_MIN, f"{name}: stop_grace_period {grace} s"
    cli = found["walletmig-cli"]
    assert cli["command"] == ["--help"] and cli["profiles"] == ["cli"]


@pytest.mark.parametrize("path", [MAIN, HOST_FILES[2]], ids=lambda p: p.name)
def test_api_gateway_serves_on_loopback_with_a_readiness_check(path: Path) -> None:
    found = services(path)
    api, worker = found["walletmig-api"], found["walletmig-worker"]
    assert api["image"] == worker["image"] and "build" not in api, "the worker's image"
    assert api["command"] == ["api", "--host", "0.0.0.0", "--port", "8080"]
    assert published_ports(api) == [("127.0.0.1:${WALLETMIG_API_PUBLISHED_PORT:-8090}", "8080")]
    assert is_long_running(api) and seconds(api["stop_grace_period"]) >= WORKER_STOP_GRACE_S_MIN
    env, shared = environment(api), environment(worker)
    assert {key: env[key] for key in shared} == shared, "the shared environment anchor"
    assert set(env) - set(shared) == {"WALLETMIG_API_TLS_CERT", "WALLETMIG_API_TLS_KEY"}
    assert env["WALLETMIG_API_TLS_CERT"] == "${WALLETMIG_API_TLS_CERT:-}"  # unset = HTTP
    check = api["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"] and "/readyz" in check[3]
    compile(check[3], "healthcheck", "exec")  # the image has Python, no curl
    assert set(api["depends_on"]) <= set(worker["depends_on"])


@pytest.mark.parametrize("path", [MAIN, HOST_FILES[2]], ids=lambda p: p.name)
def test_web_ui_decrypts_through_the_codec_server_and_keys_are_files(path: Path) -> None:
    """Issue 12: the UI's codec endpoint is the codec server's published port (the browser
    calls it, with its session cookie); the codec server holds only the payload keys and its
    token; every other walletmig service reads both keys from compose secrets (files)."""
    found, top = services(path), load(path)
    ui, codec = environment(found["temporal-ui"]), found["walletmig-codec-server"]
    port = "${WALLETMIG_CODEC_PUBLISHED_PORT:-8234}"
    assert ui["TEMPORAL_CODEC_ENDPOINT"] == f"http://localhost:{port}"
    assert ui["TEMPORAL_CODEC_INCLUDE_CREDENTIALS"] == "true"
    assert published_ports(codec) == [(f"127.0.0.1:{port}", "8234")]
    assert codec["command"][:5] == ["codec-server", "--host", "0.0.0.0", "--port", "8234"]
    env = environment(codec)
    assert env["WALLETMIG_CODEC_SERVER_TOKEN_FILE"] == RUN_SECRETS + "walletmig-codec-server-token"
    assert env["WALLETMIG_CODEC_KEYS_FILE"] == RUN_SECRETS + "walletmig-codec-keys"
    assert "${TEMPORAL_UI_PORT:-8080}" in env["WALLETMIG_CODEC_SERVER_CORS_ORIGINS"]
    assert not {"MONGODB_URI_FILE", "REDIS_URL_FILE", "WALLETMIG_ID_HASH_KEY_FILE"} & set(env)
    assert codec["secrets"] == ["walletmig-codec-keys", "walletmig-codec-server-token"]
    assert codec["networks"] == ["codec"]
    for name in ("walletmig-codec-keys", "walletmig-id-hash-key"):
        assert top["secrets"][name]["file"] == SECRET_SOURCES[path] + name
    for name, service in walletmig_services(path).items():
        if name == "walletmig-codec-server":
            continue
        env = environment(service)
        assert env["WALLETMIG_CODEC_KEYS_FILE"] == RUN_SECRETS + "walletmig-codec-keys", name
        assert env["WALLETMIG_ID_HASH_KEY_FILE"] == RUN_SECRETS + "walletmig-id-hash-key", name
        assert env["MONGODB_URI_FILE"] == RUN_SECRETS + "mongodb-uri", name
        assert env["REDIS_URL_FILE"] == RUN_SECRETS + "redis-url", name
        assert service["secrets"] == ["walletmig-codec-keys", "walletmig-id-hash-key",
                                      "mongodb-uri", "redis-url", "tb-cluster-id"], name
        assert not {"WALLETMIG_CODEC_KEYS", "WALLETMIG_ID_HASH_KEY"} & set(env), name


# ----------------------------------------------------------------------------- health

@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_long_running_services_have_healthchecks_and_dependencies_wait_for_them(
        path: Path) -> None:
    found = services(path)
    for name, service in found.items():
        restart = service.get("restart")
        assert restart is not None or service.get("profiles"), f"{name}: say its restart"
        if str(restart).startswith("on-failure"):
            assert re.fullmatch(r"on-failure:\d+", str(restart)), f"{name}: bound the restarts"
        if is_long_running(service):
            check = service.get("healthcheck") or {}
            assert check.get("test") and check["test"] != ["NONE"], f"{name}: no healthcheck"
            assert not check.get("disable"), name
        for dependency, rule in (service.get("depends_on") or {}).items():
            wanted = ("service_healthy" if is_long_running(found[dependency])
                      else "service_completed_successfully")
            assert rule == {"condition": wanted}, f"{name} -> {dependency}: {rule}"


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_every_service_rotates_its_logs(path: Path) -> None:
    for name, service in services(path).items():
        logging = service.get("logging") or {}
        assert logging.get("driver") == "json-file", name
        assert {"max-size", "max-file"} <= set(logging.get("options", {})), name


# ----------------------------------------------------------------------------- credentials

@pytest.mark.parametrize("path", list(SECRET_SOURCES), ids=lambda p: p.name)
def test_secrets_are_files_never_values(path: Path) -> None:
    """No credential is a literal, a default or an interpolated variable: every one is a
    compose secret (a file under deploy/secrets or WALLETMIG_SECRETS_DIR) that the service
    mounts and reads from /run/secrets, by name (`*_FILE`) or by a script."""
    top = load(path).get("secrets") or {}
    for secret, spec in top.items():
        assert set(spec) == {"file"}, f"{secret}: a file, never `environment:`"
        assert spec["file"] == SECRET_SOURCES[path] + secret, secret
    for name, service in services(path).items():
        mounted = set(service.get("secrets") or [])
        assert mounted <= set(top), f"{name} mounts undefined secrets"
        for key, value in environment(service).items():
            if SECRET_KEY.search(key):
                assert key.endswith("_FILE") and value.startswith(RUN_SECRETS), \
                    f"{name}: {key}={value!r} must be a *_FILE naming /run/secrets/..."
        for text in strings(service):
            assert not URI_USERINFO.search(text), f"{name}: credentials in a URI: {text!r}"
            assert "--requirepass" not in text, f"{name}: a password on a command line"
            for used in re.findall(re.escape(RUN_SECRETS) + r"([a-z0-9-]+)", text):
                assert used in mounted, f"{name} reads {used} without mounting it"
    text = path.read_text()
    for word in ("PASSWORD:?", "TOKEN:?", "PASSWORD:-", "TOKEN:-", "_PATH:?"):
        assert word not in text, f"{path.name}: {word} (secrets are files, not variables)"


def test_stores_require_authentication() -> None:
    found = services(MAIN)
    mongods = {name: s for name, s in found.items() if s.get("command", [None])[0] == "mongod"}
    assert len(mongods) == 3
    for name, service in mongods.items():
        assert "--keyFile" in service["command"], name
        assert "--wiredTigerCacheSizeGB" in service["command"], name
        assert "mem_limit" in service, name
    with_root = [name for name, s in mongods.items() if "MONGO_INITDB_ROOT_PASSWORD_FILE" in
                 environment(s)]
    assert with_root == ["mongo-0"], "root user on the initiating member only"
    assert "authSource=admin" in MAKE_SECRETS.read_text(), "the app user lives in admin"
    redis_script = found["redis"]["command"][-1]
    assert "requirepass" in redis_script and "--maxmemory " in redis_script
    assert found["redis"]["secrets"] == ["redis-password"]
    init = environment(found["mongo-init"])
    assert init["MONGO_APP_PASSWORD_FILE"] == RUN_SECRETS + "mongo-app-password"
    assert init["MONGO_ROOT_PASSWORD_FILE"] == RUN_SECRETS + "mongo-root-password"


def test_temporal_keeps_retention_and_no_test_attributes_and_setup_is_bounded() -> None:
    found = services(MAIN)
    temporal = environment(found["temporal"])
    assert temporal["SKIP_ADD_CUSTOM_SEARCH_ATTRIBUTES"] == "true"
    assert seconds(default_of(temporal["DEFAULT_NAMESPACE_RETENTION"])) >= 24 * 3600
    assert temporal["DEFAULT_NAMESPACE"] == environment(found["walletmig-worker"])[
        "TEMPORAL_NAMESPACE"]
    setup = found["temporal-setup"]
    assert setup["depends_on"] == {"temporal": {"condition": "service_healthy"}}
    assert setup["entrypoint"] == ["python", "/app/deploy/temporal_setup.py"]


# ----------------------------------------------------------------------------- images

def test_images_are_pinned() -> None:
    for path in ALL_FILES:
        for name, service in services(path).items():
            image = str(service.get("image", ""))
            assert image, f"{path.name}: {name} has no image"
            repository, _, tag = image.rpartition(":")
            assert repository and tag and tag != "latest", f"{name}: {image}"
            if not repository.startswith("walletmig"):  # the local build carries its version
                assert re.fullmatch(r"\d+\.\d+(\.\d+)?", tag), f"{name}: exact version {image}"
    base = re.search(r"^FROM (\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert base and re.search(r":\d+\.\d+\.\d+", base.group(1)), "pin the base image"


def test_dockerfile_installs_every_package_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY \. \.$", dockerfile, re.M), "copy the whole (filtered) tree"
    assert re.search(r"^USER (?!root)\S+$", dockerfile, re.M)
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]
    needed = [*packages, "pyproject.toml", "README.md", "deploy", "deploy/worker_health.py",
              "deploy/temporal_setup.py"]
    for path in needed:
        assert (ROOT / path).exists(), path
        hits = [p for p in ignored if fnmatch(path, p) or fnmatch(path, p.removeprefix("**/"))]
        assert not hits, f".dockerignore excludes {path}: {hits}"
    for unwanted in (".git", ".venv", ".walletmig", "tests", "deploy/secrets"):
        assert unwanted in ignored, f".dockerignore must exclude {unwanted}"


# ----------------------------------------------------------------------------- multi-host

DRIFT_KEYS = ("image", "command", "entrypoint", "healthcheck", "init", "stop_grace_period",
              "ports", "restart", "mem_limit", "pull_policy", "profiles", "logging", "deploy")
PER_HOST_VALUES = {"MONGODB_URI", "TB_ADDRESSES", "TB_CLUSTER_ID"}


def _volumes(path: Path, service: dict[str, Any]) -> list[str]:
    out = []
    for volume in service.get("volumes") or []:
        source, _, rest = str(volume).partition(":")
        if source.startswith("."):
            source = str((path.parent / source).resolve())
        out.append(f"{source}:{rest}")
    return out


def test_app_host_services_do_not_drift_from_the_single_host_file() -> None:
    main, app = services(MAIN), services(HOST_FILES[2])
    for name, service in app.items():
        twin = main[name]
        for key in DRIFT_KEYS:
            assert service.get(key) == twin.get(key), f"{name}.{key} drifted"
        env, twin_env = environment(service), environment(twin)
        assert set(env) == set(twin_env), name
        for key in set(env) - PER_HOST_VALUES:
            assert env[key] == twin_env[key], f"{name}: {key}"
        assert _volumes(HOST_FILES[2], service) == _volumes(MAIN, twin), name


# ----------------------------------------------------------------------------- compose itself

def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True,
                               timeout=COMPOSE_TIMEOUT_S, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def compose_config(command: list[str], files: list[Path], env: dict[str, str],
                   cwd: Path) -> subprocess.CompletedProcess[str]:
    args = [part for path in files for part in ("-f", str(path))]
    return subprocess.run([*command, *args, "config", "-q"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=COMPOSE_TIMEOUT_S, check=False)


def copy_tree(tmp_path: Path, files: list[Path]) -> list[Path]:
    """The compose files in a temporary project directory: no .env file of the checkout (nor
    a deploy/secrets/ with files in it) can make `config` pass."""
    copies = []
    for path in files:
        copy = tmp_path / path.relative_to(ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
        copies.append(copy)
    return copies


def test_compose_config_validates_with_no_variable_at_all(tmp_path: Path) -> None:
    """The developers' guide's plain `docker-compose config -q`: no variable, no .env file, no
    secret file (compose checks a secret's file only when a container starts)."""
    command = compose_command()
    if command is None:
        print("SKIP: no docker compose / docker-compose: `config -q` not run")
        pytest.skip("neither `docker compose` nor docker-compose is installed: static checks "
                    "only (apt-get install docker-compose to run `config -q`)")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for files in ([MAIN], [MAIN, OVERLAY]):
        done = compose_config(command, copy_tree(tmp_path, files), env, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout == "", done.stdout[-3000:]
    assert not (tmp_path / "deploy" / "secrets").exists(), "config created no secret file"


@pytest.mark.parametrize("path", HOST_FILES, ids=lambda p: p.name)
def test_host_compose_files_validate_with_their_per_host_values(
        tmp_path: Path, path: Path) -> None:
    command = compose_command()
    if command is None:
        print("SKIP: no docker compose / docker-compose: `config -q` not run")
        pytest.skip("neither `docker compose` nor docker-compose is installed: static checks "
                    "only (apt-get install docker-compose to run `config -q`)")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **DUMMY_ENV}
    [copy] = copy_tree(tmp_path, [path])
    done = compose_config(command, [copy], env, copy.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    required = sorted(set(re.findall(r"\$\{([A-Z0-9_]+):\?", path.read_text())))
    assert required and set(required) <= set(DUMMY_ENV), required
    del env[required[0]]  # a per-host value left unset fails, naming it
    missing = compose_config(command, [copy], env, copy.parent)
    assert missing.returncode != 0 and required[0] in missing.stderr


# ----------------------------------------------------------------------------- deploy scripts

def run_tb(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    sh = shutil.which("dash") or shutil.which("sh")
    assert sh is not None
    return subprocess.run([sh, str(TB_SCRIPT), *args], env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, check=False)


def test_tigerbeetle_script_is_posix_sh() -> None:
    sh = shutil.which("dash") or shutil.which("sh")
    assert sh is not None
    done = subprocess.run([sh, "-n", str(TB_SCRIPT)], capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr


def test_replica_with_a_missing_data_file_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    done = run_tb("start", TB_CLUSTER_ID="12345", TB_ADDRESSES=DUMMY_ENV["TB_ADDRESSES"],
                  TB_REPLICA="1", TB_CACHE_GRID="1GiB", TB_DATA_ROOT=str(tmp_path),
                  TB_BINARY=str(tmp_path / "never-run"))
    assert done.returncode == 1
    assert "refusing to start" in done.stderr and "recover" in done.stderr
    assert "do NOT format" in done.stderr
    assert list((tmp_path / "1").iterdir()) == []


@pytest.mark.parametrize("cluster_id", ["0", "000", "", "12ab", "1" * 40])
def test_replica_refuses_a_reserved_or_malformed_cluster_id(tmp_path: Path,
                                                            cluster_id: str) -> None:
    done = run_tb("start", TB_CLUSTER_ID=cluster_id, TB_ADDRESSES=DUMMY_ENV["TB_ADDRESSES"],
                  TB_REPLICA="0", TB_CACHE_GRID="1GiB", TB_DATA_ROOT=str(tmp_path))
    assert done.returncode == 1 and "TB_CLUSTER_ID" in done.stderr


@pytest.mark.parametrize("leftover", ["12345_2.tigerbeetle", ".bootstrapped", "unknown.bin"])
def test_bootstrap_formats_only_a_brand_new_cluster(tmp_path: Path, leftover: str) -> None:
    for replica in ("0", "1", "2"):
        (tmp_path / replica).mkdir()
    (tmp_path / "2" / leftover).write_text("x")
    done = run_tb("bootstrap", "0", "1", "2", TB_CLUSTER_ID="12345",
                  TB_ADDRESSES=DUMMY_ENV["TB_ADDRESSES"], TB_DATA_ROOT=str(tmp_path),
                  TB_BINARY=str(tmp_path / "never-run"))
    assert done.returncode == 1, done.stderr
    assert "bootstrap" in done.stderr
    assert [list((tmp_path / r).iterdir()) for r in ("0", "1")] == [[], []], "nothing formatted"


def test_recover_refuses_to_overwrite_an_existing_data_file(tmp_path: Path) -> None:
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "12345_0.tigerbeetle").write_text("x")
    done = run_tb("recover", TB_CLUSTER_ID="12345", TB_ADDRESSES=DUMMY_ENV["TB_ADDRESSES"],
                  TB_REPLICA="0", TB_DATA_ROOT=str(tmp_path),
                  TB_BINARY=str(tmp_path / "never-run"))
    assert done.returncode == 1 and "exists" in done.stderr


def test_replica_reads_the_cluster_id_file_and_names_a_missing_one(tmp_path: Path) -> None:
    (tmp_path / "0").mkdir()
    id_file = tmp_path / "tb-cluster-id"
    id_file.write_text("12345\n")
    common = {"TB_ADDRESSES": DUMMY_ENV["TB_ADDRESSES"], "TB_REPLICA": "0",
              "TB_CACHE_GRID": "1GiB", "TB_DATA_ROOT": str(tmp_path),
              "TB_BINARY": str(tmp_path / "never-run")}
    done = run_tb("start", TB_CLUSTER_ID_FILE=str(id_file), **common)
    assert done.returncode == 1 and "12345_0.tigerbeetle is missing" in done.stderr, done.stderr
    for bad in (tmp_path / "absent", tmp_path / "empty"):
        if bad.name == "empty":
            bad.write_text("\n")
        done = run_tb("start", TB_CLUSTER_ID_FILE=str(bad), **common)
        assert done.returncode == 1 and f"TB_CLUSTER_ID_FILE {bad}" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_tigerbeetle_health_is_a_tcp_check() -> None:
    if shutil.which("nc") is None:
        pytest.skip("no nc on this machine (the tigerbeetle image has busybox nc)")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        up = run_tb("health", TB_ADDRESSES=f"127.0.0.1:{port}", TB_REPLICA="0")
    down = run_tb("health", TB_ADDRESSES=f"127.0.0.1:{port}", TB_REPLICA="0")
    assert (up.returncode, down.returncode != 0) == (0, True), up.stderr


def test_mongo_init_script_parses() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node on this machine to syntax-check deploy/mongo-init.js")
    done = subprocess.run([node, "--check", str(ROOT / "deploy" / "mongo-init.js")],
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_python(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "deploy" / script), *args], env=env,
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, check=False)


async def test_temporal_setup_waits_for_the_namespace_and_is_idempotent(
        temporal_client: Client, settings_env: dict[str, str]) -> None:
    namespace = f"setup-{uuid.uuid4().hex[:10]}"
    await temporal_client.workflow_service.register_namespace(RegisterNamespaceRequest(
        namespace=namespace,
        workflow_execution_retention_period=Duration(seconds=int(timedelta(days=1).total_seconds())),
    ))
    env = {**settings_env, "TEMPORAL_NAMESPACE": namespace}
    first = run_python("temporal_setup.py", env, "--wait-s", "60")
    assert first.returncode == 0, first.stderr
    assert "added " + ", ".join(sorted(SEARCH_ATTRIBUTES)) in first.stdout
    again = run_python("temporal_setup.py", env, "--wait-s", "60")
    assert again.returncode == 0 and "nothing to add" in again.stdout, again.stderr

    missing = run_python("temporal_setup.py", {**env, "TEMPORAL_NAMESPACE": f"{namespace}-x"},
                         "--wait-s", "3")
    assert missing.returncode == 1 and "not ready" in missing.stderr


async def test_temporal_setup_refuses_an_attribute_of_another_type(
        temporal_client: Client, settings_env: dict[str, str]) -> None:
    namespace = f"setup-{uuid.uuid4().hex[:10]}"
    await temporal_client.workflow_service.register_namespace(RegisterNamespaceRequest(
        namespace=namespace,
        workflow_execution_retention_period=Duration(seconds=int(timedelta(days=1).total_seconds())),
    ))
    name = next(iter(SEARCH_ATTRIBUTES))
    wrong = (IndexedValueType.INDEXED_VALUE_TYPE_TEXT
             if SEARCH_ATTRIBUTES[name] != "Text" else IndexedValueType.INDEXED_VALUE_TYPE_INT)
    env = {**settings_env, "TEMPORAL_NAMESPACE": namespace}
    for _ in range(NAMESPACE_WAIT_S):  # a new namespace is served once the cache refreshes
        try:
            await temporal_client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(namespace=namespace,
                                           search_attributes={name: wrong}))
            break
        except RPCError:
            await asyncio.sleep(1)
    else:
        pytest.fail(f"namespace {namespace} not served after {NAMESPACE_WAIT_S} s")
    done = run_python("temporal_setup.py", env, "--wait-s", "60")
    assert done.returncode == 1 and name in done.stderr and "expected" in done.stderr


def test_worker_health_passes_against_live_servers_and_names_what_is_down(
        settings_env: dict[str, str]) -> None:
    healthy = run_python("worker_health.py", settings_env)
    assert healthy.returncode == 0, healthy.stderr
    closed = free_port()
    env = {**settings_env,
           "TB_ADDRESSES": f"127.0.0.1:{closed},127.0.0.1:{closed},127.0.0.1:{free_port()}"}
    down = run_python("worker_health.py", env)
    assert down.returncode == 1 and "tigerbeetle: 0 of 3" in down.stderr, down.stderr


# ----------------------------------------------------------------------------- secret files

def declared_secrets() -> set[str]:
    return {name for path in SECRET_SOURCES for name in load(path).get("secrets") or {}}


def make_secrets(secrets_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    sh = shutil.which("dash") or shutil.which("sh")
    assert sh is not None
    env = {"PATH": "/usr/bin:/bin", "WALLETMIG_SECRETS_DIR": str(secrets_dir)}
    return subprocess.run([sh, str(MAKE_SECRETS), *args], env=env, capture_output=True,
                          text=True, timeout=SCRIPT_TIMEOUT_S, check=False)


def test_secret_files_are_neither_committed_nor_built() -> None:
    ignore = [line for line in (SECRETS_DIR / ".gitignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore == ["*", "!.gitignore", "!README.md"]
    tracked = subprocess.run(["git", "ls-files", str(SECRETS_DIR)], cwd=ROOT, text=True,
                             capture_output=True, timeout=SCRIPT_TIMEOUT_S, check=True).stdout
    assert {Path(line).name for line in tracked.split()} <= {".gitignore", "README.md"}
    readme = (SECRETS_DIR / "README.md").read_text()
    for name in declared_secrets():
        assert f"| {name} |" in readme, f"deploy/secrets/README.md: document {name}"


def test_make_secrets_creates_every_declared_secret_once_and_usable(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    absent = make_secrets(secrets_dir, "--check")
    assert absent.returncode == 1 and "tb-cluster-id" in absent.stderr
    first = make_secrets(secrets_dir)
    assert first.returncode == 0, first.stderr
    made = {path.name: path.read_text() for path in secrets_dir.iterdir()}
    assert set(made) == declared_secrets(), "make-secrets.sh makes what the files declare"
    assert secrets_dir.stat().st_mode & 0o777 == 0o700
    assert all((secrets_dir / name).stat().st_mode & 0o777 == 0o444 for name in made)
    again = make_secrets(secrets_dir)
    assert again.returncode == 0 and again.stdout.count("kept") == len(made), again.stderr
    kept = {path.name: path.read_text() for path in secrets_dir.iterdir()}
    assert kept == made, "an existing file is never rewritten"
    assert make_secrets(secrets_dir, "--check").returncode == 0
    # What the walletmig processes read from them (the services' *_FILE paths, here).
    env = {"MONGODB_URI_FILE": str(secrets_dir / "mongodb-uri"),
           "REDIS_URL_FILE": str(secrets_dir / "redis-url"),
           "TB_CLUSTER_ID_FILE": str(secrets_dir / "tb-cluster-id"),
           "WALLETMIG_CODEC_SERVER_TOKEN_FILE": str(secrets_dir / "walletmig-codec-server-token"),
           "WALLETMIG_ID_HASH_KEY_FILE": str(secrets_dir / "walletmig-id-hash-key")}
    settings = Settings.from_env(env)
    assert 0 < settings.tb_cluster_id < 2**128
    assert made["mongo-app-password"].strip() in settings.mongodb_uri
    assert "authSource=admin" in settings.mongodb_uri
    assert settings.redis_url == f"redis://:{made['redis-password'].strip()}@redis:6379/0"
    assert len(settings.id_key()) == 32 and len(settings.codec_server_token) == 64
    assert load_codec(secrets_dir / "walletmig-codec-keys") is not None
    # An emptied file is named by --check and never silently replaced.
    victim = secrets_dir / "redis-url"
    victim.chmod(0o600)
    victim.write_text("")
    check = make_secrets(secrets_dir, "--check")
    assert check.returncode == 1 and str(victim) in check.stderr
    refused = make_secrets(secrets_dir)
    assert refused.returncode == 1 and str(victim) in refused.stderr


@pytest.mark.parametrize("variable", FILE_VARIANTS)
def test_walletmig_stops_at_start_naming_a_missing_or_empty_secret_file(
        tmp_path: Path, variable: str) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path in (tmp_path / "absent", empty):
        name = variable + FILE_SUFFIX
        with pytest.raises(SettingFileError, match=f"^{name} {re.escape(str(path))}: "):
            Settings.from_env({name: str(path)})
    # The production process itself: one line, no traceback, before connecting anything.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "WALLETMIG_STATE_DIR": str(tmp_path),
           variable + FILE_SUFFIX: str(tmp_path / "absent")}
    done = subprocess.run([sys.executable, "-m", "walletmig", "worker"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, check=False)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (f"walletmig: error: {variable}{FILE_SUFFIX} "
                                   f"{tmp_path / 'absent'}: No such file or directory")


def test_secret_env_exports_a_file_and_names_a_missing_or_empty_one(tmp_path: Path) -> None:
    sh = shutil.which("dash") or shutil.which("sh")
    assert sh is not None
    secret = tmp_path / "pwd"
    secret.write_text("s3cret\n")
    (tmp_path / "empty").write_text("")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sh, str(SECRET_ENV), *args], env={"PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S,
                              check=False)

    ok = run(f"POSTGRES_PWD={secret}", "--", sh, "-c", 'printf "[%s]" "$POSTGRES_PWD"')
    assert (ok.returncode, ok.stdout) == (0, "[s3cret]"), ok.stderr
    for path in (tmp_path / "absent", tmp_path / "empty", tmp_path):
        done = run(f"POSTGRES_PWD={path}", "--", "true")
        assert done.returncode == 1 and "POSTGRES_PWD: secret " in done.stderr, done.stderr
        assert f"{path} is" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert run("--", "true").returncode == 1 and run(f"X={secret}").returncode == 1


def test_redis_takes_its_password_from_the_secret_file_on_stdin(tmp_path: Path) -> None:
    """docker-compose.yml's redis command, run for real with the venv's redis-server in place of
    the image's entrypoint: the password comes from the file, never from a command line."""
    script = services(MAIN)["redis"]["command"][-1].replace("$$", "$")
    script = script.replace('"${REDIS_MAXMEMORY:-1gb}"', "64mb")
    secret = tmp_path / "redis-password"
    script = script.replace(RUN_SECRETS + "redis-password", str(secret))
    assert "${" not in script and RUN_SECRETS not in script
    port = free_port()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    entrypoint = bin_dir / "docker-entrypoint.sh"  # the image's: drops to the redis user
    entrypoint.write_text(f'#!/bin/sh\nshift\nexec "{find_binary("redis-server")}" --port {port} '
                          f'--bind 127.0.0.1 --dir "{tmp_path}" --save "" "$@"\n')
    entrypoint.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    sh = shutil.which("dash") or shutil.which("sh")
    assert sh is not None
    missing = subprocess.run([sh, "-c", script], env=env, capture_output=True, text=True,
                             timeout=SCRIPT_TIMEOUT_S, check=False)
    assert missing.returncode == 1 and str(secret) in missing.stderr, missing.stderr
    password = "0123456789abcdef" * 4
    secret.write_text(password + "\n")
    server = subprocess.Popen([sh, "-c", script], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, password=password, socket_timeout=2)
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.1)
        assert client.ping() and client.config_get("maxmemory") == {"maxmemory": str(64 * 2**20)}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2).set("k", "v")
        assert password not in Path(f"/proc/{server.pid}/cmdline").read_text()
    finally:
        server.terminate()
        server.wait(timeout=SCRIPT_TIMEOUT_S)
