"""Schemathesis (>= 4) over the whole OpenAPI document of a live `walletmig api` process, with a
key holding every scope: no 5xx, every response conforms to the schema (status, content type,
headers, body), invalid data is refused, required headers and auth are enforced, undeclared
methods get 405. The stateful phase follows the links from each write to the reads of the
same wallet (create, then read back).

Bounded: few examples per operation and a time budget, so the file runs in about a minute.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from api_support import ALL_SCOPES, ApiProcess, make_key, running_api
from wallet_support import isolated_settings

from walletconfig.settings import Settings

MAX_EXAMPLES = 8
MAX_TIME_S = 45
RUN_TIMEOUT_S = 110
SEED = 20260
# Every check except those that do not fit this API: `positive_data_acceptance` (data valid by
# the schema is still refused by the domain: an unknown ledger pair, insufficient funds, a
# wallet that does not exist) and the resource-lifecycle checks (nothing is ever deleted).
EXCLUDED_CHECKS = (
    "positive_data_acceptance,use_after_free,ensure_resource_availability,"
    "object_level_authorization"
)


@pytest.fixture(scope="module")
def api_settings(settings: Settings) -> Settings:
    return isolated_settings(settings, "api_st")


@pytest.fixture(scope="module")
def api(api_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    with running_api(api_settings, tmp_path_factory.mktemp("api-st")) as process:
        yield process


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def key(mongo_client: Any, api_settings: Settings) -> str:
    return await make_key(mongo_client[api_settings.mongodb_database], "schemathesis", ALL_SCOPES)


def test_schemathesis_over_the_whole_schema(api: ApiProcess, key: str, tmp_path: Path) -> None:
    report = tmp_path / "report"
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "run", f"{api.url}/openapi.json",
        "--header", f"Authorization: Bearer {key}",
        "--checks", "all", "--exclude-checks", EXCLUDED_CHECKS,
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", str(MAX_EXAMPLES), "--max-time", str(MAX_TIME_S),
        "--seed", str(SEED), "--workers", "1", "--request-timeout", "30",
        "--report", "junit", "--report-dir", str(report), "--no-color",
    ]  # fmt: skip
    # cwd: Schemathesis keeps its example database there (.schemathesis/), not in the repo.
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                         timeout=RUN_TIMEOUT_S)  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-12_000:]
    assert "No issues found" in output or " passed" in output, output[-4_000:]
