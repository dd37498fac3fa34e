"""`walletmig dev up` ensures the stack's Temporal Schedules (the terminal's catch-up ledger
sync, which also resumes batches a dead submitter left `received`, and the wallet
reconciliation) and `walletmig dev status` shows them: on a private stack of real servers."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from pathlib import Path

from temporalio.client import (
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
    ScheduleHandle,
    ScheduleIntervalSpec,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from test_devstack import _cli

from messages.clearing import SYNC_CATCH_UP_WORKFLOW_ID, SYNC_SCHEDULE_ID, LedgerSyncOutcome
from messages.reconciliation import SCHEDULE_ID
from walletmig import devstack
from walletmig.commands.dev import EXIT_NOT_ALL_UP, stack_client

EVERY = re.compile(r"every (\d+)s\s+(active|PAUSED)\s+next run (\S+)")
# What a scheduled run needs (no API, no codec server: the test stays short).
ONLY = "temporal,redis,mongo,tigerbeetle,worker"


def _row(stdout: str, schedule_id: str) -> str:
    (line,) = [x for x in stdout.splitlines() if x.startswith("schedule ") and schedule_id in x]
    return line


async def _run_now(handle: ScheduleHandle) -> str:
    """Trigger one run of the schedule and return the workflow id it started."""
    await handle.trigger()
    for _ in range(100):  # bounded: 20 s
        recent = (await handle.describe()).info.recent_actions
        if recent:
            action = recent[-1].action
            assert isinstance(action, ScheduleActionExecutionStartWorkflow)
            return action.workflow_id
        await asyncio.sleep(0.2)
    raise AssertionError("the triggered run did not start")


async def test_dev_up_ensures_the_schedules_in_place_and_status_shows_them(
    tmp_path: Path,
) -> None:
    config = devstack.StackConfig.with_free_ports(tmp_path / "state", ready_timeout_s=90)
    config.state_dir.mkdir(parents=True)
    config.save()  # the CLI below finds the free ports in STATE/stack.json
    try:
        first = _cli(config.state_dir, "dev", "up", "--only", ONLY)
        assert first.returncode == 0, first
        for schedule_id in (SYNC_SCHEDULE_ID, SCHEDULE_ID):
            line = _row(first.stdout, schedule_id)
            created = EVERY.search(line)
            assert line.endswith("(created)") and created and created[1] == "300", line

        # The stack runs what the schedule starts: the worker decodes its (encrypted) input on
        # the migration task queue; the catch-up resumes (none left here), then syncs.
        client, settings = await stack_client(config)
        handle = client.get_schedule_handle(SYNC_SCHEDULE_ID)
        action = (await handle.describe()).schedule.action
        assert isinstance(action, ScheduleActionStartWorkflow)
        assert (action.workflow, action.id, action.task_queue) == (
            "LedgerSyncWorkflow", SYNC_CATCH_UP_WORKFLOW_ID, settings.migration_task_queue)
        started = client.get_workflow_handle(await _run_now(handle),
                                             result_type=LedgerSyncOutcome)
        outcome = await asyncio.wait_for(started.result(), 60)
        assert outcome.caught_up and outcome.resumed == [], outcome

        # An operator changed its interval and paused it (one update: a pause and an update
        # pending together are applied pause first, and the update's state wins), and its
        # action is another code version's (here: another task queue); `dev up` keeps the
        # interval and the pause and writes the current action.
        def operator(inp: ScheduleUpdateInput) -> ScheduleUpdate:
            schedule = inp.description.schedule
            schedule.spec = ScheduleSpec(
                intervals=[ScheduleIntervalSpec(every=timedelta(seconds=60))])
            schedule.state = ScheduleState(note="operator: hold the catch-up", paused=True)
            assert isinstance(schedule.action, ScheduleActionStartWorkflow)
            schedule.action.task_queue = "an-older-version-queue"
            return ScheduleUpdate(schedule=schedule)

        await handle.update(operator)
        for _ in range(100):  # bounded: 20 s (the schedule applies an update asynchronously)
            if (await handle.describe()).schedule.state.paused:
                break
            await asyncio.sleep(0.2)
        else:  # `dev up` below must meet the operator's pause, not race it
            raise AssertionError("the operator's pause was not applied in 20 s")
        again = _cli(config.state_dir, "dev", "up", "--only", ONLY)
        assert again.returncode == 0, again
        assert _row(again.stdout, SYNC_SCHEDULE_ID).endswith("(updated)"), again.stdout
        after = await handle.describe()
        assert after.schedule.state.paused
        assert after.schedule.state.note == "operator: hold the catch-up"
        assert [i.every for i in after.schedule.spec.intervals] == [timedelta(seconds=60)]
        assert isinstance(after.schedule.action, ScheduleActionStartWorkflow)
        assert after.schedule.action.task_queue == settings.migration_task_queue

        shown = _cli(config.state_dir, "dev", "status")
        assert shown.returncode == EXIT_NOT_ALL_UP, shown  # the API is not started here
        paused = EVERY.search(_row(shown.stdout, SYNC_SCHEDULE_ID))
        active = EVERY.search(_row(shown.stdout, SCHEDULE_ID))
        assert paused is not None and paused.group(1, 2) == ("60", "PAUSED"), shown.stdout
        assert active is not None and active.group(1, 2) == ("300", "active"), shown.stdout
        assert re.fullmatch(r"\d\d:\d\d:\d\d", active[3]), shown.stdout  # its next run, UTC

        # `reconcile schedule` writes the same schedule through the same rule.
        custom = _cli(config.state_dir, "reconcile", "schedule", "--every-s", "120")
        assert "schedule reconciliation-schedule updated" in custom.stdout, custom
        recon = await client.get_schedule_handle(SCHEDULE_ID).describe()
        assert [i.every for i in recon.schedule.spec.intervals] == [timedelta(seconds=120)]
        # ... and the next `dev up` leaves that interval alone.
        third = _cli(config.state_dir, "dev", "up", "--only", ONLY)
        assert third.returncode == 0, third
        kept = EVERY.search(_row(third.stdout, SCHEDULE_ID))
        assert kept is not None and kept[1] == "120", third.stdout
        recon = await client.get_schedule_handle(SCHEDULE_ID).describe()
        assert [i.every for i in recon.schedule.spec.intervals] == [timedelta(seconds=120)]
    finally:
        devstack.down(config)
