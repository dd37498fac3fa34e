"""No secret in any log file after a full small demo on a dev stack (issue 12).

A whole `walletmig dev up` stack of its own (Temporal + Web UI, Redis, MongoDB, the TigerBeetle
emulator, the codec server, the worker, the HTTP API), then what engineers and services do with
its secrets: API keys created by the CLI and used on the API (and a wrong one presented), a
browser sign-in and a decode at the codec server, and `walletmig demo` (every phase to complete
under live traffic, its own worker). After `dev down` (the processes' last lines are written),
every file under the state directory's `logs/` and the demo's own output are scanned for:

- the API keys' secret parts (a key's id is not secret: logs name the caller by it);
- the payload codec key (as written in its file, base64, and its bytes as hex);
- the wallet id hash key (hex, and its bytes as base64);
- the codec server's token and the browser session cookie derived from it;
- a password in a URI (`scheme://user:password@`).

A hit fails naming the file and the line.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from walletmig import devstack
from walletmig.codec_server import SESSION_COOKIE, session_value

DEMO_TIMEOUT_S = 420
CLI_TIMEOUT_S = 120
SCANNED_BYTES_MAX = 512 * 1024 * 1024  # logs of one small demo are a few MB
# A password in a URI: user:password@ with a non-empty password.
URI_PASSWORD = re.compile(r"[a-z][a-z0-9+.\-]*://[^/\s:@]*:[^/\s@]+@", re.I)
# The components whose logs must exist (what was scanned is what ran).
EXPECTED_LOGS = ("temporal.log", "worker.log", "api.log", f"{devstack.CODEC_SERVER}.log")


def cli_command(state_dir: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment of `walletmig --state-dir STATE ...` finding the stack (and its
    key files) through STATE/env alone, as an engineer's shell after `dev up` does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALLETMIG_")}
    for name in ("TEMPORAL_ADDRESS", "MONGODB_URI", "REDIS_URL", "TB_ADDRESSES"):
        env.pop(name, None)
    return [sys.executable, "-m", "walletmig", "--state-dir", str(state_dir), *args], env


def cli(state_dir: Path, *args: str, timeout_s: float = CLI_TIMEOUT_S
        ) -> subprocess.CompletedProcess[str]:
    argv, env = cli_command(state_dir, *args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env,
                          check=False)  # fmt: skip


@contextlib.contextmanager
def demo_running(state_dir: Path, out: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`walletmig demo` in the background, its stdout and stderr into `out`; killed if the
    block fails before it ended (never left running into `dev down`)."""
    # 100 wallets: the sticky 10 % rollout routes someone to TigerBeetle (test_demo.py).
    argv, env = cli_command(state_dir, "demo", "--wallets", "100", "--writers", "2",
                            "--readers", "2", "--dwell-s", "1", "--tb-p95-ratio", "100")
    with out.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=CLI_TIMEOUT_S)


def key_forms(config: devstack.StackConfig) -> dict[str, str]:
    """name -> text that must never appear, for the stack's key files."""
    keys = config.keys_dir
    forms: dict[str, str] = {}
    for line in (keys / devstack.CODEC_KEYS_FILE).read_text().splitlines():
        key_id, _, key_b64 = line.strip().partition(":")
        forms[f"codec key {key_id} (base64)"] = key_b64
        forms[f"codec key {key_id} (hex)"] = base64.b64decode(key_b64).hex()
    id_hex = (keys / devstack.ID_HASH_KEY_FILE).read_text().strip()
    forms["id hash key (hex)"] = id_hex
    forms["id hash key (base64)"] = base64.b64encode(bytes.fromhex(id_hex)).decode()
    token = devstack.codec_token(config)
    forms["codec server token"] = token
    forms["codec session cookie"] = session_value(token)
    return forms


def use_the_api(state_dir: Path, api_url: str, run: str) -> dict[str, str]:
    """Two keys created by the CLI, used for a credit and reads; a wrong key presented."""
    found: dict[str, str] = {}
    full: list[str] = []
    for name, scopes in ((f"nosecret-{run}-w", "wallets:read,wallets:write"),
                         (f"nosecret-{run}-r", "wallets:read")):
        made = cli(state_dir, "api-key", "create", "--name", name, "--scopes", scopes, "--json")
        assert made.returncode == 0, made.stderr
        full.append(json.loads(made.stdout)["key"])
        found[f"API key {name}"] = full[-1].split("_", 2)[2]  # the secret part (not the id)
    writer, reader = (f"Bearer {key}" for key in full)
    wrong = f"wmk_{uuid.uuid4().hex[:16]}_{uuid.uuid4().hex}"
    found["wrong API key presented"] = wrong.split("_", 2)[2]
    wallet = {"client_id": f"c-{run}", "country": "USA", "currency": "USD"}
    with httpx.Client(base_url=api_url, timeout=60, verify=False) as http:
        credit = http.post("/v1/wallets/credit", json={"wallet": wallet, "amount": "5"},
                           headers={"Authorization": writer, "Idempotency-Key": run})
        assert credit.status_code == 200, credit.text
        balance = http.get(f"/v1/wallets/c-{run}/USA/USD/balance",
                           headers={"Authorization": reader})
        assert balance.status_code == 200, balance.text
        refused = http.get(f"/v1/wallets/c-{run}/USA/USD/balance",
                           headers={"Authorization": f"Bearer {wrong}"})
        assert refused.status_code == 401, refused.text
    return found


def use_the_codec_server(config: devstack.StackConfig) -> None:
    """A browser sign-in (wrong token, then the right one) and a decode with the bearer."""
    token = devstack.codec_token(config)
    plain = {"payloads": [{"metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
                           "data": base64.b64encode(b'"x"').decode()}]}
    with httpx.Client(base_url=config.codec_url, timeout=30) as http:
        assert http.post("/login", data={"token": token[::-1]}).status_code == 401
        assert http.post("/login", data={"token": token}).status_code == 200
        assert SESSION_COOKIE in http.cookies
        sealed = http.post("/encode", json=plain, headers={"Authorization": f"Bearer {token}"})
        assert sealed.status_code == 200, sealed.text
        assert http.post("/decode", json=sealed.json()).status_code == 200  # the cookie


def scan(paths: list[Path], secrets: dict[str, str]) -> list[str]:
    """'file:line: what' for every secret or URI password found."""
    assert all(len(value) >= 16 for value in secrets.values()), "a short value would match noise"
    leaks: list[str] = []
    scanned = 0
    for path in paths:
        scanned += path.stat().st_size
        assert scanned <= SCANNED_BYTES_MAX, "logs larger than expected"
        with path.open(errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                for what, value in secrets.items():
                    if value in line:
                        leaks.append(f"{path}:{number}: {what}")
                for match in URI_PASSWORD.finditer(line):
                    leaks.append(f"{path}:{number}: password in a URI ({match.group(0)[:12]}...)")
    return leaks


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_no_secret_in_any_log_after_a_demo() -> None:
    # Not under pytest's basetemp: a concurrent pytest session may delete that (conftest's
    # stack_config says why); kept after a failure, for the logs.
    root = Path(tempfile.mkdtemp(prefix="walletmig-no-secrets-"))
    config = devstack.StackConfig.with_free_ports(root / "state", ready_timeout_s=120)
    run = uuid.uuid4().hex[:8]
    demo_out = root / "demo.out"
    try:
        statuses = devstack.up(config)
        assert all(s.state == "up" for s in statuses), statuses
        exports = devstack.parse_env_file(config.state_dir / devstack.ENV_FILE)
        secrets = key_forms(config)
        # The demo spends most of its time waiting for gates: the API and the codec server
        # are used meanwhile (the same stack, the same logs scanned after `dev down`).
        with demo_running(config.state_dir, demo_out) as demo:
            secrets.update(use_the_api(config.state_dir, exports["WALLETMIG_API_URL"], run))
            use_the_codec_server(config)
            demo.wait(timeout=DEMO_TIMEOUT_S)
    finally:
        devstack.down(config)
    logs = sorted(p for p in (config.state_dir / "logs").rglob("*") if p.is_file())
    names = {p.name for p in logs}
    assert set(EXPECTED_LOGS) <= names, names
    assert any(n.endswith("-worker.log") and n != "worker.log" for n in names), names
    leaks = scan([*logs, demo_out], secrets)
    assert not leaks, "secrets in logs:\n" + "\n".join(leaks[:50])
    # The demo went through every phase (whether its own verdict is ok is test_demo's
    # business: on a loaded machine a live write may go unanswered).
    shown = demo_out.read_text(errors="replace")
    assert "final phase: complete" in shown, shown[-4000:]
    shutil.rmtree(root, ignore_errors=True)
