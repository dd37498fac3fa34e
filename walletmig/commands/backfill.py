"""`walletmig backfill start|status`: import legacy wallets into TigerBeetle (BackfillWorkflow).

The workflow runs on the migration task queue; its id is derived from the scope, so starting
the same scope twice attaches to the running backfill instead of starting a second one.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from walletconfig.settings import Settings
from walletmig.commands import CommandError

# Temporal, the workflow and its models load inside the handlers (fast `walletmig --help`).
if TYPE_CHECKING:
    from temporalio.client import Client, WorkflowHandle

    from messages.backfill import BackfillProgress

POLL_INTERVAL_S = 1.0
BAR_WIDTH = 30


def resolve_pairs(pairs: list[str] | None) -> list[str]:
    """Explicit pairs (validated) or every configured ledger pair, in a stable order."""
    from walletcore.ledgers import DEFAULT_LEDGER_TABLE

    return list(DEFAULT_LEDGER_TABLE.parse_scope(pairs or None))


async def connect(settings: Settings) -> Client:
    from workers.wallet_worker import connect_temporal

    return await connect_temporal(settings)


def progress_line(p: BackfillProgress) -> str:
    if p.stage == "history":
        return history_line(p)
    share = p.done / p.total if p.total else 1.0
    filled = int(BAR_WIDTH * min(share, 1.0))
    eta = "done" if p.finished else ("-" if p.eta_s is None else f"ETA {p.eta_s:.0f}s")
    where = p.pair or "all pairs"
    return (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {share:6.1%} "
            f"{p.done}/{p.total} {p.rate_per_s:.0f} wallets/s {eta} · {where} · "
            f"imported {p.imported} already {p.already} busy {p.busy} failed {p.failed}"
            + ("" if p.history is None else
               f" · history {p.history.imported + p.history.already}/{p.history.total} "
               f"failed {p.history.failed}"))


def history_line(p: BackfillProgress) -> str:
    """--with-history, first stage: the transaction log as imported transfers."""
    h = p.history
    done, total = (h.scanned, h.total) if h else (0, 0)
    share = done / total if total else 0.0
    filled = int(BAR_WIDTH * min(share, 1.0))
    reached = h.reached.isoformat(timespec="seconds") if h and h.reached else "-"
    return (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {share:6.1%} history "
            f"{done}/{total} transactions · reached {reached} · "
            f"imported {h.imported if h else 0} already {h.already if h else 0} "
            f"skipped {h.skipped if h else 0} failed {h.failed if h else 0}")


async def _watch(handle: WorkflowHandle[Any, Any], as_json: bool) -> int:
    from workflows.backfill import BackfillWorkflow

    tty = sys.stdout.isatty()
    while True:
        progress = await handle.query(BackfillWorkflow.progress)
        if not as_json:
            end = "\r" if tty and not progress.finished else "\n"
            print(progress_line(progress), end=end, flush=True)
        if progress.finished:
            break
        await asyncio.sleep(POLL_INTERVAL_S)
    result: BackfillProgress = await handle.result()
    if as_json:
        print(result.model_dump_json(indent=2))
    for key, error in result.failed_sample.items():
        print(f"failed: {key}: {error}", file=sys.stderr)
    history_failed = 0 if result.history is None else result.history.failed
    if result.history is not None:
        for txn, error in result.history.failed_sample.items():
            print(f"history failed: {txn}: {error}", file=sys.stderr)
    return 0 if result.failed == 0 and history_failed == 0 else 3


async def _start(args: argparse.Namespace) -> int:
    from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

    from messages.backfill import BackfillInput
    from workflows.backfill import BackfillWorkflow, backfill_workflow_id

    settings = Settings.from_env()
    pairs = resolve_pairs(args.pair)
    client = await connect(settings)
    workflow_id = backfill_workflow_id(args.pair or [])
    # Unset sizes take the workflow input's defaults (one source of truth).
    sizes = {name: value for name, value in (("page_size", args.page_size),
                                              ("pages_per_run", args.pages_per_run),
                                              ("history_page_size", args.history_page_size))
             if value is not None}
    run_id = args.run_id or f"backfill-{uuid.uuid4().hex[:12]}"
    handle = await client.start_workflow(
        BackfillWorkflow.run,
        BackfillInput(run_id=run_id, pairs=pairs, with_history=args.with_history, **sizes),
        id=workflow_id, task_queue=settings.migration_task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        execution_timeout=timedelta(days=7),
    )
    print(f"backfill {workflow_id} (scope {', '.join(pairs)}) on task queue "
          f"{settings.migration_task_queue}", file=sys.stderr)
    if args.no_wait:
        return 0
    return await _watch(handle, args.json)


async def _status(args: argparse.Namespace) -> int:
    from temporalio.service import RPCError

    from workflows.backfill import BackfillWorkflow, backfill_workflow_id

    settings = Settings.from_env()
    client = await connect(settings)
    handle = client.get_workflow_handle(backfill_workflow_id(args.pair or []))
    try:
        progress = await handle.query(BackfillWorkflow.progress)
    except RPCError as exc:
        raise CommandError(f"no backfill for this scope ({exc.message})") from None
    print(progress.model_dump_json(indent=2) if args.json else progress_line(progress))
    if args.watch and not progress.finished:
        return await _watch(handle, args.json)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("backfill", help="import legacy wallets into TigerBeetle")
    sub = parser.add_subparsers(dest="backfill_command", metavar="SUBCOMMAND")

    start = sub.add_parser("start", help="start (or attach to) the backfill of a scope")
    start.add_argument("--pair", action="append", metavar="CUR:CTRY",
                       help="ledger pair to import (repeat; default: every configured pair)")
    start.add_argument("--page-size", type=int, default=None,
                       help="wallets per page (default: the largest the workflow allows; "
                       "the worker cuts a page to what one request of the cluster holds, "
                       "TB_REQUEST_LIMIT_BYTES)")
    start.add_argument("--pages-per-run", type=int, default=None,
                       help="pages before continue-as-new (default: the workflow's)")
    start.add_argument("--with-history", action="store_true",
                       help="first import the transaction log as TigerBeetle imported "
                       "transfers with their original timestamps (only while every pair is "
                       "in phase legacy and TigerBeetle holds no normal transfer)")
    start.add_argument("--history-page-size", type=int, default=None,
                       help="transactions per history page (default 4096; the worker cuts "
                       "a page to one create_transfers request of the cluster, "
                       "TB_REQUEST_LIMIT_BYTES)")
    start.add_argument("--run-id", help="name of this backfill (claims, audit)")
    start.add_argument("--no-wait", action="store_true", help="start and return")
    start.add_argument("--json", action="store_true", help="print the final progress as JSON")
    start.set_defaults(handler=_start)

    status = sub.add_parser("status", help="progress of the backfill of a scope")
    status.add_argument("--pair", action="append", metavar="CUR:CTRY")
    status.add_argument("--watch", action="store_true", help="follow until it finishes")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_status)
