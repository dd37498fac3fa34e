"""No secret in any log file after a full small demo on a dev stack (issue 12).

The run is the session's shared one (conftest `demo_run`, tests/demo_support.py): a whole
`walletmig dev up` stack of its own, API keys created by the CLI and used on the API (and a
wrong one presented), a browser sign-in and a decode at the codec server, and `walletmig demo`
(every phase to complete under live traffic, its own worker). After `dev down` (the processes'
last lines are written), every file under the state directory's `logs/` and the demo's own
output (its JSON report, its progress lines, and the report as the CLI renders it) are scanned
for:

- the API keys' secret parts (a key's id is not secret: logs name the caller by it);
- the payload codec key (as written in its file, base64, and its bytes as hex);
- the wallet id hash key (hex, and its bytes as base64);
- the codec server's token and the browser session cookie derived from it;
- a password in a URI (`scheme://user:password@`).

A hit fails naming the file and the line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from demo_support import DemoRun

from walletmig import devstack
from walletmig.demo import render

SCANNED_BYTES_MAX = 512 * 1024 * 1024  # logs of one small demo are a few MB
# A password in a URI: user:password@ with a non-empty password.
URI_PASSWORD = re.compile(r"[a-z][a-z0-9+.\-]*://[^/\s:@]*:[^/\s@]+@", re.I)
# The components whose logs must exist (what was scanned is what ran).
EXPECTED_LOGS = ("temporal.log", "worker.log", "api.log", f"{devstack.CODEC_SERVER}.log")


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
@pytest.mark.timeout(900)  # the first test of the two pays for the shared demo run
def test_no_secret_in_any_log_after_a_demo(demo_run: DemoRun, tmp_path: Path) -> None:
    logs = sorted(p for p in (demo_run.config.state_dir / "logs").rglob("*") if p.is_file())
    names = {p.name for p in logs}
    assert set(EXPECTED_LOGS) <= names, names
    assert any(n.endswith("-worker.log") and n != "worker.log" for n in names), names
    # The demo went through every phase (whether its own verdict is ok is test_demo's
    # business: on a loaded machine a live write may go unanswered).
    report = demo_run.report()
    assert report.final_phase == "complete", demo_run.log_out.read_text()[-4000:]
    rendered = tmp_path / "demo.txt"  # what `walletmig demo` without --json prints
    rendered.write_text(render(report))
    leaks = scan([*logs, demo_run.report_out, demo_run.log_out, rendered], demo_run.secrets)
    assert not leaks, "secrets in logs:\n" + "\n".join(leaks[:50])
