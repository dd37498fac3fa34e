"""The migration in the Temporal Web UI, driven by a real browser (Playwright + Chromium).

An engineer's path: open the migration's page, read its summary and status, send `advance`
from "Send an Update", see the phase change on the page (the Search Attributes tab refreshes by
itself; Current Details on R), and see a mistyped input answered in one line with no stack
trace. The Temporal server is the embedded stack's `temporal server start-dev` with its Web UI
(walletmig.devstack, the session's free ports). Chromium must already be installed (Debian's
`chromium`; Playwright never downloads a browser here): without it, or without the `playwright`
package, the test is skipped and says which is missing.

WALLETMIG_UI_SCREENSHOT=/path.png keeps a screenshot of the page after the advance.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import string
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from wallet_support import eventually, sandboxed_worker

from activities.migration import MigrationActivities
from messages.migration import MigrationConfig, MigrationStatus
from walletcore.gates import GateThresholds
from walletmig import devstack
from walletmig.commands.migration import start_migration_workflow
from workflows.migration import MigrationWorkflow

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
UI_WAIT_MS = 30_000  # the UI re-reads the workflow a few seconds after an Update
SCREENSHOT_ENV = "WALLETMIG_UI_SCREENSHOT"


def chromium_path() -> str | None:
    found = [p for p in CHROMIUM_CANDIDATES if Path(p).is_file()]
    return found[0] if found else shutil.which("chromium")


@pytest.fixture(scope="module")
def browser_path() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium installed (apt-get install chromium); the browser check of "
                    "the Web UI needs one, Playwright must not download it")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")
    return path


@pytest.fixture(scope="module")
def ui_stack(stack_config: devstack.StackConfig, browser_path: str) -> devstack.StackConfig:
    """The embedded stack's Temporal server, Web UI included (the session's ports)."""
    (result,) = devstack.up(stack_config, ["temporal"])
    if result.state == "skipped":
        pytest.skip(f"temporal unavailable: {result.detail}")
    assert result.state == "up", result
    return stack_config


@pytest_asyncio.fixture(loop_scope="session")
async def ui_client(ui_stack: devstack.StackConfig) -> Client:
    return await Client.connect(ui_stack.temporal_address,
                                data_converter=pydantic_data_converter)


@pytest_asyncio.fixture(loop_scope="session")
async def ui_migration(
    ui_client: Client, mongo_db: AsyncDatabase[dict[str, Any]], tmp_path: Path
) -> AsyncIterator[str]:
    """A migration started as `walletmig migration start` does, its worker running."""
    acts = MigrationActivities(mongo_db)
    await acts.ensure_indexes()
    async with sandboxed_worker(ui_client, "migration-ui", [MigrationWorkflow],
                                acts.all()) as (_, queue):
        config = MigrationConfig(
            migration_id=f"ui-{uuid.uuid4().hex[:8]}", scopes=[_scope()],
            thresholds=GateThresholds(window_s=60), evidence_interval_s=2.0,
            state_cache_ttl_s=0, archive_dir=str(tmp_path / "archive"))
        handle = await start_migration_workflow(ui_client, config, task_queue=queue)

        async def has_evidence() -> bool:
            status: MigrationStatus = await handle.query(MigrationWorkflow.status)
            return status.evidence is not None

        # The page shows the gates once evidence exists: no test starts before (a bounded wait
        # that fails here, with its reason, rather than later on the page).
        await eventually(has_evidence, "the migration's first evidence round")
        yield handle.id
        await handle.terminate("test done")


def _scope() -> str:
    letters = "".join(random.choices(string.ascii_uppercase, k=6))
    return f"{letters[:3]}:{letters[3:]}"


async def test_advance_from_the_update_dialog_changes_the_page(
    ui_stack: devstack.StackConfig, browser_path: str, ui_migration: str, ui_client: Client,
    tmp_path: Path,
) -> None:
    from playwright.async_api import Page, async_playwright, expect

    url = (f"{ui_stack.temporal_ui_url}/namespaces/default/workflows/"
           f"{quote(ui_migration, safe='')}")

    async def send_update(page: Page, name: str, data: str) -> Any:
        await page.get_by_role("button", name="More Actions").click()
        await page.get_by_role("menuitem", name="Send an Update").click()
        dialog = page.get_by_role("dialog", name="Send an Update")
        await dialog.get_by_test_id("update-select-button").click()
        # An option's accessible name is the Update's name followed by its description.
        await dialog.get_by_role("option", name=re.compile(f"^{name}\\b")).click()
        # The Data editor (CodeMirror) keeps the last text typed: replace it. Leaving it
        # reformats the JSON and redraws the dialog, which swallows a click that lands at that
        # moment: leave it first (into the Update ID field), then submit.
        await dialog.locator(".cm-content").fill(data)
        await dialog.get_by_test_id("update-id").click()
        await dialog.get_by_test_id("confirm-modal-button").click()
        return dialog

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=browser_path,
                                           args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1300})
            await page.goto(url)
            await page.get_by_role("tab", name="Search Attributes").click()
            await expect(page.locator("main")).to_contain_text('"MigrationPhase": "legacy"',
                                                               timeout=UI_WAIT_MS)

            # advance from the dialog: the phase changes on the page, no reload.
            dialog = await send_update(page, "advance",
                                       '{"actor": "ui-check", "reason": "browser check"}')
            await expect(dialog).to_be_hidden(timeout=UI_WAIT_MS)
            await expect(page.locator("main")).to_contain_text(
                '"MigrationPhase": "dual_write"', timeout=UI_WAIT_MS)

            # A mistyped field: one line, no stack trace under it; the phase stays.
            dialog = await send_update(page, "advance", '{"reson": "typo"}')
            await expect(dialog).to_contain_text(
                'advance: unknown field "reson"; allowed: reason, actor, confirm',
                timeout=UI_WAIT_MS)
            text = await dialog.inner_text()
            assert "Traceback" not in text and 'File "' not in text, text
            await dialog.get_by_test_id("cancel-modal-button").click()
            await expect(page.locator("main")).to_contain_text('"MigrationPhase": "dual_write"')

            # The status lives under User Metadata: summary, details, current details.
            await page.get_by_role("tab", name="User Metadata").click()
            await page.keyboard.press("r")  # the panel's own refresh key
            details = page.frame_locator("iframe").last
            await expect(details.locator("main")).to_contain_text("dual_write",
                                                                  timeout=UI_WAIT_MS)
            await expect(details.locator("main")).to_contain_text(
                "ui-check: advanced legacy → dual_write (epoch 1): browser check",
                timeout=UI_WAIT_MS)
            summary = page.frame_locator("iframe").first
            await expect(summary.locator("main")).to_contain_text(
                f"Wallet migration {ui_migration.split('/')[-1]}", timeout=UI_WAIT_MS)
            shot = os.environ.get(SCREENSHOT_ENV) or str(tmp_path / "ui.png")
            await page.screenshot(path=shot, full_page=True)
        finally:
            await browser.close()
    handle = ui_client.get_workflow_handle(ui_migration, result_type=MigrationStatus)
    status: MigrationStatus = await handle.query(MigrationWorkflow.status)
    assert status.phase.value == "dual_write" and status.recent_actions[-1].actor == "ui-check"
