"""`walletmig migration start|status|advance|rollback|set-rollout|pause|resume|force-advance|
approve`: the same Updates and Queries an engineer sends from the Temporal Web UI. The migration
workflow runs in `walletmig worker` (its migration task queue).

Temporal and the workflow models are imported inside the handlers: `walletmig --help` and the
other commands must not pay for them.
"""

from __future__ import annotations

import argparse
import getpass
import json
from typing import TYPE_CHECKING, Any

from walletconfig.settings import Settings
from walletcore.phases import Phase
from walletmig.commands import CommandError, UsageError

if TYPE_CHECKING:
    from temporalio.client import Client, WorkflowHandle

    from messages.migration import MigrationConfig, MigrationStatus

DEFAULT_NAME = "main"


async def connect(settings: Settings) -> Client:
    from workers.wallet_worker import connect_temporal

    return await connect_temporal(settings)


def _handle(client: Client, name: str) -> WorkflowHandle[Any, MigrationStatus]:
    from messages.migration import MigrationStatus, migration_workflow_id

    return client.get_workflow_handle(migration_workflow_id(name), result_type=MigrationStatus)


def render_status(status: MigrationStatus) -> str:
    from walletcore.gates import pct
    from walletcore.transitions import describe

    ev = status.evidence
    lines = [status.summary] if status.summary else []
    lines.append(
        f"migration {status.migration_id}: {describe_status(status)} (epoch {status.epoch}, "
        f"scopes {', '.join(status.scopes)})")
    if ev is not None:
        lines.append(
            f"  shadow match {pct(ev.shadow_match_rate)} ({ev.shadow_compared} compared), "
            f"fallback {pct(ev.fallback_rate)}, TB errors {pct(ev.error_rate)}, "
            f"latency ratio {'-' if ev.latency_ratio is None else f'{ev.latency_ratio:.3f}'}, "
            f"unapplied {ev.unapplied_writes}, reconciliation "
            f"{pct(ev.reconciliation_match_rate)}"
            f"{'' if ev.reconciliation is None else f' (report {ev.reconciliation.run_id})'}"
            ", backfill "
            f"{'complete' if ev.backfill_complete else 'incomplete'}")
    if status.next_step is not None:
        lines.append(f"  next: {status.next_step}")
        lines += [f"    {'ok  ' if g.passed else 'FAIL'} {g.reason}" for g in status.next_gates]
    for action in status.recent_actions[-5:]:
        lines.append(f"  #{action.seq} {action.at:%H:%M:%S} {action.actor} {action.action}: "
                     f"{describe(action.from_position)} -> {describe(action.to_position)} "
                     f"({action.reason})")
    if status.pending_approval is not None:
        p = status.pending_approval
        lines.append(f"  awaiting approve: {p.update} to {describe(p.to_position)} asked by "
                     f"{p.actor} (audit #{p.seq}): {p.reason}")
    if status.archive is not None:
        lines.append(f"  archive {status.archive.path} sha256 {status.archive.sha256}")
    return "\n".join(lines)


def describe_status(status: MigrationStatus) -> str:
    from walletcore.transitions import Position, describe

    text = describe(Position(phase=status.phase, rollout_percent=status.rollout_percent))
    return text + (" [paused]" if status.paused else "")


async def _update(args: argparse.Namespace, name: str, request: Any) -> int:
    from temporalio.client import WorkflowUpdateFailedError
    from temporalio.service import RPCError

    from messages.migration import MigrationStatus

    settings = Settings.from_env()
    client = await connect(settings)
    try:
        status = await _handle(client, args.name).execute_update(
            name, request, result_type=MigrationStatus)
    except WorkflowUpdateFailedError as exc:
        # The workflow's answer is one line that already names the Update and the next step.
        raise CommandError(str(exc.cause)) from None
    except RPCError as exc:
        raise CommandError(f"{name} failed: {exc}") from None
    _print(args, status)
    return 0


def _print(args: argparse.Namespace, status: MigrationStatus) -> None:
    if getattr(args, "json", False):
        print(json.dumps(status.model_dump(mode="json"), indent=2))
    else:
        print(render_status(status))


async def start_migration_workflow(
    client: Client, config: MigrationConfig, *, task_queue: str, workflow_id: str | None = None
) -> WorkflowHandle[Any, MigrationStatus]:
    """Start the migration workflow the way every client path does: with the summary and the
    details the Web UI shows on its page (what it is, how to act on it)."""
    from messages.migration import (
        MIGRATION_WORKFLOW,
        MigrationInput,
        MigrationStatus,
        migration_workflow_id,
        static_details,
        static_summary,
    )

    return await client.start_workflow(
        MIGRATION_WORKFLOW, MigrationInput(config=config),
        id=workflow_id or migration_workflow_id(config.migration_id), task_queue=task_queue,
        result_type=MigrationStatus, static_summary=static_summary(config),
        static_details=static_details(config),
    )


async def cmd_start(args: argparse.Namespace) -> int:
    from messages.migration import MigrationConfig
    from walletcore.gates import GateThresholds

    settings = Settings.from_env()
    thresholds = GateThresholds(window_s=args.window_s,
                                tb_primary_stable_s=args.stable_s)
    config = MigrationConfig(
        migration_id=args.name, scopes=args.scope or ["*"], thresholds=thresholds,
        evidence_interval_s=args.interval_s,
        archive_dir=str(settings.state_dir / "archive"),
        approvals_required=args.approvals_required,
    )
    client = await connect(settings)
    handle = await start_migration_workflow(client, config,
                                            task_queue=settings.migration_task_queue)
    print(f"started {handle.id} on task queue {settings.migration_task_queue!r}")
    link = ui_link(settings, handle.id)
    if link is not None:
        print(f"Web UI: {link} (status: User Metadata tab)")
    return 0


def ui_link(settings: Settings, workflow_id: str) -> str | None:
    """The workflow's page in the embedded stack's Web UI, when the settings point at it."""
    from urllib.parse import quote

    from walletmig import devstack

    stack = devstack.StackConfig.from_env(state_dir=settings.state_dir)
    if stack.temporal_address != settings.temporal_address:
        return None  # another Temporal: its UI's address is not known here
    return (f"{stack.temporal_ui_url}/namespaces/{quote(settings.temporal_namespace, safe='')}"
            f"/workflows/{quote(workflow_id, safe='')}")


async def cmd_status(args: argparse.Namespace) -> int:
    from temporalio.service import RPCError

    from messages.migration import QUERY_STATUS, MigrationStatus

    client = await connect(Settings.from_env())
    try:
        status = await _handle(client, args.name).query(QUERY_STATUS, result_type=MigrationStatus)
    except RPCError as exc:
        raise CommandError(f"no migration {args.name!r}: {exc}") from None
    _print(args, status)
    return 0


def _actor(args: argparse.Namespace) -> str:
    return str(args.actor or getpass.getuser() or "cli")


def register(subparsers: Any) -> None:
    group = subparsers.add_parser("migration", help="operate the migration workflow")
    sub = group.add_subparsers(dest="migration_command", metavar="ACTION", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        p.add_argument("--name", default=DEFAULT_NAME, help="migration name (workflow id "
                                                            "migration/NAME)")
        p.add_argument("--json", action="store_true", help="print the status as JSON")
        return p

    p = add("start", "start a migration workflow")
    p.add_argument("--scope", action="append", help="ledger pair CUR:CTY (repeat); default all")
    p.add_argument("--window-s", type=int, default=300, help="gate evidence window")
    p.add_argument("--interval-s", type=float, default=15.0, help="evidence refresh interval")
    p.add_argument("--stable-s", type=int, default=600, help="tb_primary stable window")
    # Four eyes by default for migrations engineers start: force-advance and complete are the
    # steps that skip the gates or cannot be undone (the workflow model's default stays 0 so
    # recorded histories, fixtures and the demo keep their behaviour).
    p.add_argument("--approvals-required", type=int, default=1, choices=[0, 1],
                   help="approvals by another engineer before force-advance or complete runs")
    p.set_defaults(handler=cmd_start)

    add("status", "phase, evidence and next gates").set_defaults(handler=cmd_status)

    def with_actor(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--actor", default=None, help="who (default: $USER)")
        p.add_argument("--reason", default="", help="why (kept in the audit log)")
        return p

    p = with_actor(add("advance", "next phase / rollout step, if the gates pass"))
    p.add_argument("--confirm", action="store_true", help="required to enter complete")
    p.set_defaults(handler=_advance)

    p = with_actor(add("force-advance", "next step past failed gates (reason required)"))
    p.add_argument("--confirm", action="store_true")
    p.set_defaults(handler=_force)

    p = with_actor(add("rollback", "back to an earlier phase"))
    p.add_argument("--to", required=True, choices=[ph.value for ph in Phase])
    p.add_argument("--percent", type=int, default=None, help="rollout, for read_cutover")
    p.set_defaults(handler=_rollback)

    p = with_actor(add("set-rollout", "read-cutover percentage"))
    p.add_argument("percent", type=int)
    p.set_defaults(handler=_set_rollout)

    with_actor(add("pause", "stop advancing and automatic rollback")).set_defaults(
        handler=_pause)
    with_actor(add("resume", "resume")).set_defaults(handler=_resume)
    with_actor(add("approve", "run the pending force-advance or complete (another engineer)")
               ).set_defaults(handler=_approve)


async def _advance(args: argparse.Namespace) -> int:
    from messages.migration import UPDATE_ADVANCE, AdvanceRequest

    return await _update(args, UPDATE_ADVANCE, AdvanceRequest(
        actor=_actor(args), reason=args.reason, confirm=args.confirm))


async def _rollback(args: argparse.Namespace) -> int:
    from messages.migration import UPDATE_ROLLBACK, RollbackRequest

    return await _update(args, UPDATE_ROLLBACK, RollbackRequest(
        actor=_actor(args), reason=args.reason, to=Phase(args.to),
        rollout_percent=args.percent))


async def _set_rollout(args: argparse.Namespace) -> int:
    from messages.migration import UPDATE_SET_ROLLOUT, SetRolloutRequest

    return await _update(args, UPDATE_SET_ROLLOUT, SetRolloutRequest(
        actor=_actor(args), reason=args.reason, percent=args.percent))


async def _pause(args: argparse.Namespace) -> int:
    from messages.migration import UPDATE_PAUSE, PauseRequest

    return await _update(args, UPDATE_PAUSE, PauseRequest(actor=_actor(args),
                                                          reason=args.reason))


async def _resume(args: argparse.Namespace) -> int:
    from messages.migration import UPDATE_RESUME, PauseRequest

    return await _update(args, UPDATE_RESUME, PauseRequest(actor=_actor(args),
                                                           reason=args.reason))


async def _force(args: argparse.Namespace) -> int:
    if not args.reason.strip():
        raise UsageError("force-advance needs --reason")
    from messages.migration import UPDATE_FORCE_ADVANCE, ForceAdvanceRequest

    return await _update(args, UPDATE_FORCE_ADVANCE, ForceAdvanceRequest(
        actor=_actor(args), reason=args.reason, confirm=args.confirm))


async def _approve(args: argparse.Namespace) -> int:
    from messages.migration import UPDATE_APPROVE, ApproveRequest

    return await _update(args, UPDATE_APPROVE, ApproveRequest(actor=_actor(args),
                                                              reason=args.reason))
