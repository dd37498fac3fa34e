"""The layer order (docs/ARCHITECTURE.md, "Layers") is a contract: CI fails on an upward import.

`lint-imports` reads the contracts from pyproject.toml ([tool.importlinter]); this test runs it
so the README's test command enforces them, not only `make lint`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_TIMEOUT_S = 120


def test_imports_flow_down_only() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
        timeout=LINT_TIMEOUT_S, check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
