"""TigerBeetle 0.17.9 conformance: replay every golden trace in tests/data/tigerbeetle-0.17.9/
through the client adapter against a fresh emulator process (one per trace file).

Against a real cluster instead: `TB_ADDRESSES=127.0.0.1:3000 pytest tests/test_tb_conformance.py`.
Each trace needs an EMPTY cluster, so only the first trace file runs unless `TB_RESET_CMD` is a
shell command that leaves a fresh cluster listening at TB_ADDRESSES (run before every file),
e.g. `TB_RESET_CMD='./reset-tigerbeetle.sh'`.

The emulator variant also kills (-9) and restarts the emulator after each trace and checks that
the recovered state (every account and transfer, with balances and timestamps) is identical,
and replays every trace again against an emulator started with `--development` (32 KiB
request limit).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tigerbeetle as tb

from tb_emulator.client import SCHEME, EmulatorClientSync
from tb_emulator.conformance import make_client
from tb_emulator.server import EmulatorProcess

DATA_DIR = Path(__file__).parent / "data" / "tigerbeetle-0.17.9"
TRACES = sorted(DATA_DIR.glob("*.jsonl"))
REAL_ADDRESSES = os.environ.get("TB_ADDRESSES", "")
REAL_CLUSTER = bool(REAL_ADDRESSES) and not REAL_ADDRESSES.startswith(SCHEME)
RESET_CMD = os.environ.get("TB_RESET_CMD") or None
QUERY_ALL = {
    "user_data_128": 0, "user_data_64": 0, "user_data_32": 0, "ledger": 0, "code": 0,
    "timestamp_min": 0, "timestamp_max": 0, "limit": 8189,
}


def _load_replay() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tb_replay", DATA_DIR / "replay.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


replay = _load_replay()


def _options() -> argparse.Namespace:
    return argparse.Namespace(
        reset_cmd=RESET_CMD if REAL_CLUSTER else None, max_mismatches=10, stop_after=0,
        no_failed_timestamps=False, addresses=REAL_ADDRESSES if REAL_CLUSTER else None,
        timeout=60.0,
    )


class _KeepOpen(EmulatorClientSync):
    """replay.py closes the engine at the end; keep the process for the restart check."""

    def sleep(self, seconds: float) -> None:
        import time

        time.sleep(seconds)


def _snapshot(client: EmulatorClientSync) -> tuple[list[tb.Account], list[tb.Transfer]]:
    accounts = client.query_accounts(tb.QueryFilter(**QUERY_ALL, flags=tb.QueryFilterFlags.NONE))
    transfers = client.query_transfers(
        tb.QueryFilter(**QUERY_ALL, flags=tb.QueryFilterFlags.NONE))
    return accounts, transfers


@pytest.mark.parametrize("trace", TRACES, ids=[t.stem for t in TRACES])
def test_trace(trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert len(TRACES) == 11
    if REAL_CLUSTER:
        if RESET_CMD is None and trace != TRACES[0]:
            pytest.skip("a real cluster must be fresh per trace: set TB_RESET_CMD")
        assert replay.replay_file(str(trace), _real_factory, _options()), capsys.readouterr().out
        return
    process = EmulatorProcess(str(tmp_path / "data.tbemu")).start()
    try:
        client = _KeepOpen(0, process.address, timeout_s=30)
        client.close = lambda: None  # type: ignore[method-assign]
        ok = replay.replay_file(str(trace), lambda: client, _options())
        assert ok, capsys.readouterr().out
        before = _snapshot(client)
        EmulatorClientSync.close(client)
        process.kill()
        process.start()
        with EmulatorClientSync(0, process.address, timeout_s=30) as restarted:
            after = _snapshot(restarted)
        assert after == before
    finally:
        process.kill()
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.skipif(REAL_CLUSTER, reason="the emulator's --development request limit")
@pytest.mark.parametrize("trace", TRACES, ids=[t.stem for t in TRACES])
def test_trace_at_the_development_request_limit(
    trace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The traces were recorded so every request fits a `--development` (32 KiB) cluster:
    their largest batch, 250 transfers, is under its maximum of 253."""
    client = make_client(development=True)
    try:
        assert client.request_limit_bytes() == 32 * 1024
        ok = replay.replay_file(str(trace), lambda: client, _options())  # Closes the client.
        assert ok, capsys.readouterr().out
    finally:
        client.close()


def _real_factory() -> Any:
    return tb.ClientSync(cluster_id=0, replica_addresses=REAL_ADDRESSES)
