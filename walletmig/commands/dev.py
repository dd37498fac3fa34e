"""`walletmig dev up|down|status|env`: the embedded stack for local development.

Besides the processes, `dev up` ensures the stack's Temporal Schedules (`dev_schedules()`: the
terminal's catch-up ledger sync, which also resumes batches a dead submitter left `received`,
and the wallet reconciliation) as `walletmig ledger sync` and `walletmig reconcile schedule`
write them: created with their defaults, or updated in place keeping their paused state and
their interval (an operator's `--every-s`); `dev status` lists them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any

from walletmig import devstack
from walletmig.commands import UsageError

if TYPE_CHECKING:
    from temporalio.client import Client

    from walletconfig.settings import Settings
    from walletmig.commands.schedules import ScheduleRow

EXIT_NOT_ALL_UP = 3  # `dev status` when a component is down (as LSB `status` does)
SCHEDULES_TIMEOUT_S = 30.0  # bound on writing or reading them (Temporal answered its probe)


def _tb_limit_request(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return devstack.parse_tb_limit_request(text)
    except ValueError as bad:
        raise UsageError(f"--tb-limit-request: {bad}") from None


def _stack_config(args: argparse.Namespace) -> devstack.StackConfig:
    return devstack.StackConfig.from_env(
        temporal_port=getattr(args, "temporal_port", None),
        temporal_ui_port=getattr(args, "temporal_ui_port", None),
        redis_port=getattr(args, "redis_port", None),
        mongo_port=getattr(args, "mongo_port", None),
        tb_port=getattr(args, "tb_port", None),
        api_port=getattr(args, "api_port", None),
        metrics_port=getattr(args, "metrics_port", None),
        temporal_metrics_port=getattr(args, "temporal_metrics_port", None),
        codec_port=getattr(args, "codec_port", None),
        tb_request_limit_bytes=_tb_limit_request(getattr(args, "tb_limit_request", None)),
        ready_timeout_s=getattr(args, "timeout_s", None),
    )


def _components(args: argparse.Namespace) -> list[str] | None:
    only: str | None = getattr(args, "only", None)
    selected = (
        list(devstack.COMPONENTS)
        if only is None
        else [name.strip() for name in only.split(",") if name.strip()]
    )
    unknown = sorted(set(selected) - set(devstack.COMPONENTS))
    if unknown:
        raise UsageError(
            f"unknown component(s) {', '.join(unknown)}; "
            f"choose from {', '.join(devstack.COMPONENTS)}"
        )
    if getattr(args, "no_worker", False):
        selected = [name for name in selected if name != "worker"]
    if getattr(args, "no_api", False):
        selected = [name for name in selected if name != "api"]
    return selected


def _print_statuses(statuses: list[devstack.ComponentStatus]) -> None:
    for item in statuses:
        print(item.line())


def _print_footer(config: devstack.StackConfig, statuses: list[devstack.ComponentStatus]) -> None:
    temporal = next((s for s in statuses if s.name == "temporal"), None)
    if temporal is not None and temporal.state == "up":
        print(f"Temporal UI  {config.temporal_ui_url}  (payloads decrypted by {config.codec_url}"
              f" once signed in at {config.codec_url}/login)")
    api = next((s for s in statuses if s.name == "api"), None)
    if api is not None and api.state == "up":
        print(f"HTTP API     {api.address}  (OpenAPI at /openapi.json; keys: walletmig api-key)")
    scraped = [s for s in statuses if s.name in ("worker", "api") and s.state == "up"]
    if scraped:  # what WALLETMIG_METRICS_URLS (`dev env`) lists: a Prometheus scrapes them
        api_url = api.address if api is not None and api.state == "up" else None
        print(f"Metrics      {', '.join(config.metrics_urls(api_url))}")
    print(f"state        {config.state_dir.resolve()}  (logs in logs/, exports in env)")


def dev_schedules() -> list[str]:
    """The schedule ids `dev up` ensures once Temporal is up (imported late: the CLI's start
    does not load the message modules)."""
    from messages.clearing import SYNC_SCHEDULE_ID
    from messages.reconciliation import SCHEDULE_ID

    return [SYNC_SCHEDULE_ID, SCHEDULE_ID]


def _stack_settings(config: devstack.StackConfig) -> Settings:
    """The settings the stack's worker runs with (the shell's environment without inline
    secrets, then STATE/env): a schedule's input is encoded with the stack's codec key and
    lands on the worker's migration task queue."""
    from walletconfig.settings import Settings

    environ = {**devstack.without_inline_secrets(os.environ),
               **devstack.parse_env_file(config.state_dir / devstack.ENV_FILE)}
    return Settings.from_env(environ)


async def stack_client(config: devstack.StackConfig) -> tuple[Client, Settings]:
    """A Temporal client of the stack as its worker sees it (codec keys), and its settings."""
    from workers.wallet_worker import connect_temporal

    settings = _stack_settings(config)
    return await connect_temporal(settings), settings


async def _ensure_schedules(config: devstack.StackConfig) -> list[tuple[ScheduleRow, str]]:
    """Ensure dev_schedules(): missing ones created with their commands' defaults, existing
    ones updated in place keeping their interval and paused state (an operator's `--every-s`
    survives `dev up`; the action and its input are the current code's). Each with
    "created"/"updated"."""
    from messages.clearing import SYNC_EVERY_S_DEFAULT, SYNC_PAGE_LIMIT_DEFAULT, SYNC_SCHEDULE_ID
    from messages.reconciliation import SCHEDULE_EVERY_S_DEFAULT, SCHEDULE_ID
    from walletmig.commands.ledger_ops import ensure_sync_schedule
    from walletmig.commands.reconcile import ensure_reconcile_schedule, scheduled_input
    from walletmig.commands.schedules import describe_schedules

    client, settings = await stack_client(config)
    queue = settings.migration_task_queue
    verbs = {
        SYNC_SCHEDULE_ID: await ensure_sync_schedule(
            client, queue, SYNC_EVERY_S_DEFAULT, SYNC_PAGE_LIMIT_DEFAULT, keep_spec=True),
        SCHEDULE_ID: await ensure_reconcile_schedule(
            client, queue, scheduled_input(), every_s=SCHEDULE_EVERY_S_DEFAULT, keep_spec=True),
    }
    rows = await describe_schedules(client, list(verbs))
    return [(row, verbs[row.schedule_id]) for row in rows if row.schedule_id in verbs]


def _temporal_up(statuses: list[devstack.ComponentStatus]) -> bool:
    return any(s.name == "temporal" and s.state == "up" for s in statuses)


def _up(args: argparse.Namespace) -> int:
    config = _stack_config(args)
    started_s = time.monotonic()
    try:
        statuses = devstack.up(config, _components(args))
    except devstack.NotReadyError as not_ready:
        # Exit 3 like `dev status`: the component runs, it does not answer (yet).
        print(f"walletmig: error: {not_ready}", file=sys.stderr)
        return EXIT_NOT_ALL_UP
    _print_statuses(statuses)
    _print_footer(config, statuses)
    if _temporal_up(statuses):
        try:
            ensured = asyncio.run(asyncio.wait_for(_ensure_schedules(config),
                                                   SCHEDULES_TIMEOUT_S))
        except Exception as failed:  # the processes run; the stack is not fully operating
            print(f"walletmig: error: schedules not ensured: {type(failed).__name__} {failed}",
                  file=sys.stderr)
            return EXIT_NOT_ALL_UP
        for row, verb in ensured:
            print(f"{row.line()}  ({verb})")
    print(f"ready in {time.monotonic() - started_s:.1f} s")
    return 0


def _down(args: argparse.Namespace) -> int:
    config = _stack_config(args)
    _print_statuses(devstack.down(config, _components(args)))
    return 0


def _status(args: argparse.Namespace) -> int:
    config = _stack_config(args)
    statuses = devstack.status(config)
    _print_statuses(statuses)
    _print_footer(config, statuses)
    if _temporal_up(statuses):
        _print_schedules(config)
    all_up = all(item.state in ("up", "skipped") for item in statuses)
    return 0 if all_up else EXIT_NOT_ALL_UP


def _print_schedules(config: devstack.StackConfig) -> None:
    """Every schedule of the namespace (dev_schedules() first); one that `dev up` ensures and
    is missing is named, since the stack then is not fully operating."""
    from walletmig.commands.schedules import describe_schedules

    async def rows() -> list[ScheduleRow]:
        client, _settings = await stack_client(config)
        return await describe_schedules(client, dev_schedules())

    try:
        found = asyncio.run(asyncio.wait_for(rows(), SCHEDULES_TIMEOUT_S))
    except Exception as failed:  # status reports; it does not fail on a Temporal hiccup
        print(f"schedules    not readable: {type(failed).__name__} {failed}")
        return
    for row in found:
        print(row.line())
    for missing in sorted(set(dev_schedules()) - {row.schedule_id for row in found}):
        print(f"schedule     {missing:<24} MISSING (`walletmig dev up` creates it)")


def _env(args: argparse.Namespace) -> int:
    path = _stack_config(args).state_dir / devstack.ENV_FILE
    if not path.is_file():
        raise devstack.StackError(f"{path} does not exist; run `walletmig dev up` first")
    for key, value in sorted(devstack.parse_env_file(path).items()):
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _add_port_flags(parser: argparse.ArgumentParser) -> None:
    flags: list[tuple[str, str]] = [
        ("--temporal-port", "WALLETMIG_TEMPORAL_PORT"),
        ("--temporal-ui-port", "WALLETMIG_TEMPORAL_UI_PORT"),
        ("--redis-port", "WALLETMIG_REDIS_PORT"),
        ("--mongo-port", "WALLETMIG_MONGO_PORT"),
        ("--tb-port", "WALLETMIG_TB_PORT"),
        ("--api-port", "WALLETMIG_API_PORT"),
        ("--metrics-port", "WALLETMIG_DEV_METRICS_PORT"),
        ("--temporal-metrics-port", "WALLETMIG_DEV_TEMPORAL_METRICS_PORT"),
        ("--codec-port", "WALLETMIG_DEV_CODEC_PORT"),
    ]
    for flag, env_name in flags:
        default = devstack.DEV_ENVIRONMENT[env_name][1]
        parser.add_argument(
            flag, type=int, default=None, help=f"(env {env_name}, default {default})"
        )


def register(subparsers: Any) -> None:
    dev = subparsers.add_parser(
        "dev",
        help="run the embedded stack (Temporal, Redis, ...)",
        description="Run the embedded stack as local processes.",
    )
    commands = dev.add_subparsers(dest="dev_command", metavar="ACTION", required=True)
    components_help = f"comma-separated subset of {','.join(devstack.COMPONENTS)}"

    up = commands.add_parser(
        "up", help="start every component and wait until ready (exit 3: a running one is not)"
    )
    _add_port_flags(up)
    up.add_argument("--only", help=components_help)
    up.add_argument("--no-worker", action="store_true", help="do not start the worker")
    up.add_argument("--no-api", action="store_true", help="do not start the HTTP API")
    up.add_argument(
        "--tb-limit-request", metavar="SIZE", default=None,
        help="the TigerBeetle emulator's request limit, 4KiB..1MiB, or `development` (32KiB); "
        "`dev env` exports it as TB_REQUEST_LIMIT_BYTES; remembered like the ports "
        "(default 1MiB)",
    )  # fmt: skip
    up.add_argument(
        "--timeout-s",
        type=float,
        default=None,
        help="readiness timeout per start (env WALLETMIG_READY_TIMEOUT_S, default 90)",
    )
    up.set_defaults(handler=_up)

    down = commands.add_parser("down", help="stop the processes `dev up` started")
    down.add_argument("--only", help=components_help)
    down.set_defaults(handler=_down)

    status = commands.add_parser("status", help="show each component (exit 3 if one is down)")
    _add_port_flags(status)
    status.set_defaults(handler=_status)

    env = commands.add_parser("env", help='print shell exports: eval "$(walletmig dev env)"')
    env.set_defaults(handler=_env)
