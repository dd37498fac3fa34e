"""One `walletmig demo` on a whole dev stack of its own, shared by the tests that need a demo
run (test_demo.py asserts on its report, test_no_secrets.py scans everything it logged): the
demo is the suite's slowest set-up, paid once (conftest's `demo_run` fixture).

A `walletmig dev up` stack (Temporal + Web UI, Redis, MongoDB, the TigerBeetle emulator, the
codec server, the worker, the HTTP API), then what engineers and services do with its secrets
while `walletmig demo --json` runs (every phase to complete under live traffic, its own
worker): API keys created by the CLI and used on the API (and a wrong one presented), a browser
sign-in and a decode at the codec server. Then `dev down` (the processes' last lines written).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from walletmig import devstack
from walletmig.codec_server import SESSION_COOKIE, session_value
from walletmig.demo import DemoReport

DEMO_TIMEOUT_S = 420
CLI_TIMEOUT_S = 120
# The demo's size, as test_demo asserts on it. 150 wallets = 75 clients: the sticky 10 %
# rollout then routes someone to TigerBeetle (with 15 clients, one run in five had nobody
# there and waited out the fallback gate). The latency gate compares two Python servers
# sharing two cores with the test itself: on a loaded machine it flaps and each flap costs a
# forced step's wait. It is covered by the migration workflow's tests; here it is opened
# (--tb-p95-ratio 100) so the run checks the migration itself.
# Writes open loop at 5/s (covers the --write-rate mode, at a small rate: writes the host
# cannot carry wait for one of the bounded in-flight slots and only add latency).
DEMO_ARGS = ("--wallets", "150", "--write-rate", "5", "--readers", "2", "--dwell-s", "1.5",
             "--tb-p95-ratio", "100")


@dataclass(frozen=True)
class DemoRun:
    """What the shared run left: its stack's config (state dir and logs), the secrets used
    (name -> text that must never appear), the demo's outputs and its exit status."""

    config: devstack.StackConfig
    secrets: dict[str, str]
    report_out: Path  # the demo's stdout: its report as JSON (--json)
    log_out: Path  # the demo's stderr: its progress lines
    returncode: int

    def report(self) -> DemoReport:
        return DemoReport.model_validate_json(self.report_out.read_text())


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
def demo_running(state_dir: Path, report_out: Path, log_out: Path
                 ) -> Iterator[subprocess.Popen[bytes]]:
    """`walletmig demo --json` in the background (stdout and stderr into the two files);
    killed if the block fails before it ended (never left running into `dev down`)."""
    argv, env = cli_command(state_dir, "demo", "--json", *DEMO_ARGS)
    with report_out.open("wb") as report, log_out.open("wb") as log:
        process = subprocess.Popen(argv, stdout=report, stderr=log, env=env)
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


def run_demo_on_a_stack(config: devstack.StackConfig, root: Path) -> DemoRun:
    """Up, the API and the codec server used while the demo runs, down (even on failure)."""
    run = uuid.uuid4().hex[:8]
    report_out, log_out = root / "demo.json", root / "demo.log"
    try:
        statuses = devstack.up(config)
        assert all(s.state == "up" for s in statuses), statuses
        exports = devstack.parse_env_file(config.state_dir / devstack.ENV_FILE)
        secrets = key_forms(config)
        # The demo spends most of its time waiting for gates: the API and the codec server
        # are used meanwhile (the same stack, the same logs scanned after `dev down`).
        with demo_running(config.state_dir, report_out, log_out) as demo:
            secrets.update(use_the_api(config.state_dir, exports["WALLETMIG_API_URL"], run))
            use_the_codec_server(config)
            returncode = demo.wait(timeout=DEMO_TIMEOUT_S)
    finally:
        devstack.down(config)
    return DemoRun(config=config, secrets=secrets, report_out=report_out, log_out=log_out,
                   returncode=returncode)
