"""Temporal Schedules of the CLI: one create-or-update rule, and their one-line descriptions.

`walletmig ledger sync` (catch-up sync), `walletmig reconcile schedule` (wallet reconciliation)
and `walletmig dev up` (both) write schedules through `upsert_schedule`; `walletmig dev status`
shows them with `describe_schedules`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from temporalio.client import Client, Schedule, ScheduleDescription

SCHEDULES_SHOWN_MAX = 20  # `dev status` lists at most this many schedules (a dev stack has ~2)


async def upsert_schedule(
    client: Client, schedule_id: str, schedule: Schedule, *, keep_spec: bool = False
) -> Literal["created", "updated"]:
    """Create the schedule, or update it in place when it exists. The update keeps the
    existing one's state (paused, note): an operator's pause survives a re-run of whichever
    command ensures it. `keep_spec`: the update also keeps the existing one's spec (its
    interval), replacing only the action (its input): `walletmig dev up` ensures with the
    defaults and must not undo an operator's `--every-s`; the schedule commands themselves
    set the interval they are given. Idempotent."""
    from temporalio.client import (
        ScheduleAlreadyRunningError,
        ScheduleUpdate,
        ScheduleUpdateInput,
    )

    try:
        await client.create_schedule(schedule_id, schedule)
        return "created"
    except ScheduleAlreadyRunningError:
        pass

    def update(inp: ScheduleUpdateInput) -> ScheduleUpdate:
        # The existing schedule as described just before this update is sent (the SDK sends no
        # conflict token: a change landing in between is overwritten; the window is one RPC).
        existing = inp.description.schedule
        schedule.state = existing.state
        if keep_spec:
            schedule.spec = existing.spec
        return ScheduleUpdate(schedule=schedule)

    await client.get_schedule_handle(schedule_id).update(update)
    return "updated"


class ScheduleRow(BaseModel):
    """What `dev status` shows of one schedule."""

    model_config = ConfigDict(frozen=True)

    schedule_id: str
    every_s: list[float]  # the interval specs' periods; empty for calendar/cron specs
    paused: bool
    next_run_at: datetime | None

    def line(self) -> str:
        every = ", ".join(f"{s:g}s" for s in self.every_s) or "calendar"
        when = "-" if self.next_run_at is None else self.next_run_at.astimezone(UTC).strftime(
            "%H:%M:%S UTC")
        return (f"schedule     {self.schedule_id:<24} every {every}  "
                f"{'PAUSED' if self.paused else 'active'}  next run {when}")


def _row(description: ScheduleDescription) -> ScheduleRow:
    spec = description.schedule.spec
    times = description.info.next_action_times
    return ScheduleRow(
        schedule_id=description.id,
        every_s=[i.every.total_seconds() for i in spec.intervals],
        paused=description.schedule.state.paused,
        next_run_at=min(times) if times else None,
    )


async def describe_schedules(client: Client, schedule_ids: list[str]) -> list[ScheduleRow]:
    """`schedule_ids` first (described by id: consistent right after their creation), then
    the others the namespace lists (its visibility store may lag a little), at most
    SCHEDULES_SHOWN_MAX. An id that does not exist is left out."""
    from temporalio.service import RPCError, RPCStatusCode

    wanted = list(dict.fromkeys(schedule_ids))
    async for listed in await client.list_schedules(page_size=SCHEDULES_SHOWN_MAX):
        if len(wanted) >= SCHEDULES_SHOWN_MAX:
            break
        if listed.id not in wanted:
            wanted.append(listed.id)
    rows: list[ScheduleRow] = []
    for schedule_id in wanted[:SCHEDULES_SHOWN_MAX]:
        try:
            rows.append(_row(await client.get_schedule_handle(schedule_id).describe()))
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
    return rows
