"""`walletmig dev up` ensures the stack's Temporal Schedules (the terminal's catch-up ledger
sync, which also resumes batches a dead submitter left `received`, and the wallet
reconciliation) and `walletmig dev status` shows them: on a private Temporal server."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

from temporalio.client import (
    Client,
    ScheduleActionStartWorkflow,
    ScheduleIntervalSpec,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from test_devstack import _cli

from messages.clearing import SYNC_CATCH_UP_WORKFLOW_ID, SYNC_SCHEDULE_ID
from messages.reconciliation import SCHEDULE_ID
from walletconfig.settings import ENVIRONMENT
from walletmig import devstack
from walletmig.commands.dev import EXIT_NOT_ALL_UP

EVERY = re.compile(r"every 300s\s+(active|PAUSED)\s+next run (\S+)")


def _row(stdout: str, schedule_id: str) -> str:
    (line,) = [x for x in stdout.splitlines() if x.startswith("schedule ") and schedule_id in x]
    return line


async def test_dev_up_ensures_the_schedules_in_place_and_status_shows_them(
    tmp_path: Path,
) -> None:
    # Temporal alone: the schedules are Temporal's; what they start runs once a worker polls.
    config = devstack.StackConfig.with_free_ports(tmp_path / "state", ready_timeout_s=90)
    config.state_dir.mkdir(parents=True)
    config.save()  # the CLI below finds the free ports in STATE/stack.json
    try:
        first = _cli(config.state_dir, "dev", "up", "--only", "temporal")
        assert first.returncode == 0, first
        for schedule_id in (SYNC_SCHEDULE_ID, SCHEDULE_ID):
            line = _row(first.stdout, schedule_id)
            assert line.endswith("(created)") and EVERY.search(line), line

        client = await Client.connect(config.temporal_address)
        handle = client.get_schedule_handle(SYNC_SCHEDULE_ID)
        described = await handle.describe()
        action = described.schedule.action
        assert isinstance(action, ScheduleActionStartWorkflow)
        assert (action.workflow, action.id, action.task_queue) == (
            "LedgerSyncWorkflow", SYNC_CATCH_UP_WORKFLOW_ID, ENVIRONMENT["MIGRATION_TASK_QUEUE"][1])

        # An operator paused it and someone changed its interval: `dev up` puts the interval
        # back and keeps the pause.
        def shorten(inp: ScheduleUpdateInput) -> ScheduleUpdate:
            inp.description.schedule.spec = ScheduleSpec(
                intervals=[ScheduleIntervalSpec(every=timedelta(seconds=60))])
            return ScheduleUpdate(schedule=inp.description.schedule)

        await handle.update(shorten)
        await handle.pause(note="operator: hold the catch-up")
        again = _cli(config.state_dir, "dev", "up", "--only", "temporal")
        assert again.returncode == 0, again
        assert _row(again.stdout, SYNC_SCHEDULE_ID).endswith("(updated)"), again.stdout
        after = await handle.describe()
        assert after.schedule.state.paused
        assert after.schedule.state.note == "operator: hold the catch-up"
        assert [i.every for i in after.schedule.spec.intervals] == [timedelta(seconds=300)]

        shown = _cli(config.state_dir, "dev", "status")
        assert shown.returncode == EXIT_NOT_ALL_UP, shown  # the other components are down
        paused = EVERY.search(_row(shown.stdout, SYNC_SCHEDULE_ID))
        active = EVERY.search(_row(shown.stdout, SCHEDULE_ID))
        assert paused is not None and paused[1] == "PAUSED", shown.stdout
        assert active is not None and active[1] == "active", shown.stdout
        assert re.fullmatch(r"\d\d:\d\d:\d\d", active[2]), shown.stdout  # its next run, UTC

        # `reconcile schedule` writes the same schedule through the same rule.
        custom = _cli(config.state_dir, "reconcile", "schedule", "--every-s", "120")
        assert "schedule reconciliation-schedule updated" in custom.stdout, custom
        recon = await client.get_schedule_handle(SCHEDULE_ID).describe()
        assert [i.every for i in recon.schedule.spec.intervals] == [timedelta(seconds=120)]
    finally:
        devstack.down(config)
