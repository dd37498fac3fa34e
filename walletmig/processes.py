"""Start, identify and stop server processes that this project launched.

A PID alone is not an identity: after a crash the kernel may hand the same number to an
unrelated process. We record the PID together with its kernel start time (field 22 of
/proc/PID/stat) and only ever signal a PID whose start time still matches.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

PROC_ROOT = Path("/proc")
POLL_INTERVAL_S = 0.05
PORT_PROBE_TIMEOUT_S = 0.5


class ProcessRecord(BaseModel):
    """What we remember about a process we started, enough to find it again safely."""

    model_config = ConfigDict(frozen=True)

    pid: int
    start_ticks: int | None  # None only where /proc does not exist (not Linux)
    argv: tuple[str, ...]
    address: str
    log_path: str


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name, or None if the process is gone."""
    try:
        text = (PROC_ROOT / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) `pid` has used so far; None if gone or not Linux."""
    fields = _read_stat(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def process_start_ticks(pid: int) -> int | None:
    """Kernel start time of `pid` in clock ticks since boot (None if absent or not Linux)."""
    fields = _read_stat(pid)
    if fields is None:
        return None
    return int(fields[19])  # field 22 overall; fields[0] is field 3 (state)


def _reap_if_child(pid: int) -> None:
    """Collect the exit status if `pid` is our own child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def is_alive(record: ProcessRecord) -> bool:
    """True if the recorded process still runs and is the very process we started."""
    assert record.pid > 0
    _reap_if_child(record.pid)
    if not PROC_ROOT.is_dir():  # portability fallback: weaker identity check
        try:
            os.kill(record.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = _read_stat(record.pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return record.start_ticks is None or int(fields[19]) == record.start_ticks


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path,
    address: str,
) -> ProcessRecord:
    """Start `argv` detached in its own session, stdout and stderr appended to `log_path`."""
    assert argv, "empty command line"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        # A new session detaches the server from the terminal and from `walletmig dev up`,
        # and makes its PID the process group id, so stop() can signal helpers it forks.
        child = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,
        )
    return ProcessRecord(
        pid=child.pid,
        start_ticks=process_start_ticks(child.pid),
        argv=tuple(argv),
        address=address,
        log_path=str(log_path),
    )


def _signal(record: ProcessRecord, signum: int) -> None:
    # The group id equals the PID because spawn() used a new session; fall back to the
    # single process if the group is already gone.
    try:
        os.killpg(record.pid, signum)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signum)


def stop(record: ProcessRecord, *, timeout_s: float) -> str:
    """Stop the recorded process: SIGTERM, then SIGKILL after `timeout_s`. Returns what happened."""
    assert timeout_s > 0
    if not is_alive(record):
        return "not running"
    _signal(record, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_alive(record):
            return "stopped"
        time.sleep(POLL_INTERVAL_S)
    _signal(record, signal.SIGKILL)
    kill_deadline = time.monotonic() + 5.0
    while time.monotonic() < kill_deadline:
        if not is_alive(record):
            return "killed"
        time.sleep(POLL_INTERVAL_S)
    return "still running after SIGKILL"


def port_accepts(host: str, port: int, timeout_s: float = PORT_PROBE_TIMEOUT_S) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (small race until the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, line_count: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    assert line_count > 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log file)"
    return "\n".join(lines[-line_count:])
