"""`walletmig backfill start|status`: import legacy wallets into TigerBeetle (BackfillWorkflow).

The workflow runs on the migration task queue; its id is derived from the scope, so starting
the same scope twice attaches to the running backfill instead of starting a second one.
While it runs (`start`, `status --watch`): a rich progress bar on a terminal (transient), a
plain line at most every PLAIN_EVERY_S otherwise; then one plain summary line (`progress_line`)
or, with --json, the final progress as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from walletconfig.settings import Settings
from walletmig.commands import CommandError

# Temporal, the workflow and its models load inside the handlers (fast `walletmig --help`).
if TYPE_CHECKING:
    from rich.console import Console
    from temporalio.client import Client, WorkflowHandle

    from messages.backfill import BackfillProgress

POLL_INTERVAL_S = 1.0
# Not a terminal (a log, a pipe, a test): a plain progress line at most this often (a backfill
# of millions of wallets runs for hours), then the final summary line.
PLAIN_EVERY_S = 60.0


def resolve_pairs(pairs: list[str] | None) -> list[str]:
    """Explicit pairs (validated) or every configured ledger pair, in a stable order."""
    from walletcore.ledgers import DEFAULT_LEDGER_TABLE

    return list(DEFAULT_LEDGER_TABLE.parse_scope(pairs or None))


async def connect(settings: Settings) -> Client:
    from workers.wallet_worker import connect_temporal

    return await connect_temporal(settings)


def progress_line(p: BackfillProgress) -> str:
    """One plain line (no bar: on a terminal rich draws it): `backfill status`, a log's
    periodic line and the final summary."""
    if p.stage == "history":
        return f"history {_share(*_history_counts(p))} · {history_detail(p)}"
    eta = "done" if p.finished else ("-" if p.eta_s is None else f"ETA {p.eta_s:.0f}s")
    where = p.pair or "all pairs"
    return f"wallets {_share(p.done, p.total)} · {where} · {wallets_detail(p)} · {eta}"


def _share(done: int, total: int) -> str:
    return f"{done / total if total else 1.0:6.1%} {done}/{total}"


def _history_counts(p: BackfillProgress) -> tuple[int, int]:
    return (p.history.scanned, p.history.total) if p.history else (0, 0)


def wallets_detail(p: BackfillProgress) -> str:
    return (f"imported {p.imported} already {p.already} busy {p.busy} failed {p.failed}"
            + ("" if p.history is None else
               f" · history {p.history.imported + p.history.already}/{p.history.total} "
               f"failed {p.history.failed}")
            + f" · {p.rate_per_s:.0f} wallets/s"
            + ("" if p.wallets_per_s_max is None else
               f" (paced <= {p.wallets_per_s_max:g}, paused {p.paused_s:.0f}s)"))


def history_detail(p: BackfillProgress) -> str:
    """--with-history, first stage: the transaction log as imported transfers."""
    h = p.history
    reached = h.reached.isoformat(timespec="seconds") if h and h.reached else "-"
    return (f"reached {reached} · imported {h.imported if h else 0} already "
            f"{h.already if h else 0} skipped {h.skipped if h else 0} failed "
            f"{h.failed if h else 0}"
            + ("" if p.history_txns_per_s_max is None else
               f" (paced <= {p.history_txns_per_s_max:g} transactions/s, paused "
               f"{p.paused_s:.0f}s)"))


async def _poll(handle: WorkflowHandle[Any, Any], show: Callable[[BackfillProgress], None]
                ) -> None:
    """Query the progress every POLL_INTERVAL_S and `show` it, until the workflow finished."""
    from workflows.backfill import BackfillWorkflow

    while True:
        progress: BackfillProgress = await handle.query(BackfillWorkflow.progress)
        show(progress)
        if progress.finished:
            return
        await asyncio.sleep(POLL_INTERVAL_S)


async def _follow(handle: WorkflowHandle[Any, Any], console: Console) -> None:
    """A terminal: a rich progress bar per stage (history, wallets), gone when it finishes."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
    )
    from rich.table import Column

    # The counts are cut at the terminal's edge (one line that rewrites itself, not a wrap).
    detail = TextColumn("{task.fields[detail]}",
                        table_column=Column(no_wrap=True, overflow="ellipsis"))
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
               MofNCompleteColumn(), detail)
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("backfill", total=None, detail="")

        def show(p: BackfillProgress) -> None:
            if p.stage == "history":
                done, total = _history_counts(p)
                bar.update(task, description="history", completed=done, total=total,
                           detail=history_detail(p))
            else:
                eta = "" if p.eta_s is None else f" · ETA {p.eta_s:.0f}s"
                bar.update(task, description=p.pair or "wallets", completed=p.done,
                           total=p.total, detail=wallets_detail(p) + eta)

        await _poll(handle, show)


async def _log(handle: WorkflowHandle[Any, Any], console: Console) -> None:
    """Not a terminal: a plain line at most every PLAIN_EVERY_S (the first at once)."""
    printed_at: float | None = None

    def show(p: BackfillProgress) -> None:
        nonlocal printed_at
        now = time.monotonic()
        if not p.finished and (printed_at is None or now - printed_at >= PLAIN_EVERY_S):
            console.print(progress_line(p), soft_wrap=True, highlight=False, markup=False)
            printed_at = now

    await _poll(handle, show)


async def _watch(handle: WorkflowHandle[Any, Any], as_json: bool) -> int:
    from rich.console import Console

    console = Console()
    if as_json:
        await _poll(handle, lambda _progress: None)
    elif console.is_terminal:
        await _follow(handle, console)
    else:
        await _log(handle, console)
    result: BackfillProgress = await handle.result()
    if as_json:
        print(result.model_dump_json(indent=2))
    else:  # the one line that stays: the bar was transient
        console.print(progress_line(result), soft_wrap=True, highlight=False, markup=False)
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
    workflow_id = backfill_workflow_id(args.pair or [])
    # Unset sizes take the workflow input's defaults (one source of truth).
    sizes = {name: value for name, value in (("page_size", args.page_size),
                                              ("pages_per_run", args.pages_per_run),
                                              ("history_page_size", args.history_page_size),
                                              ("wallets_per_s_max", args.wallets_per_s),
                                              ("history_txns_per_s_max",
                                               args.history_txns_per_s))
             if value is not None}
    run_id = args.run_id or f"backfill-{uuid.uuid4().hex[:12]}"
    # Validated before connecting: a bad budget is one line naming the field, not a timeout.
    inp = BackfillInput(run_id=run_id, pairs=pairs, with_history=args.with_history, **sizes)
    client = await connect(settings)
    handle = await client.start_workflow(
        BackfillWorkflow.run, inp,
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
    start.add_argument("--wallets-per-s", type=float, default=None, metavar="RATE",
                       help="pace the wallet import to at most RATE wallets/s (1..1e6): pages "
                       "of at most RATE wallets and a pause after each, so the import leaves "
                       "MongoDB room for live traffic (default: unpaced)")
    start.add_argument("--history-txns-per-s", type=float, default=None, metavar="RATE",
                       help="pace --with-history's transaction-log import to at most RATE "
                       "transactions/s (1..1e6): pages of at most RATE transactions and a "
                       "pause after each, so live legacy writes keep MongoDB (default: "
                       "unpaced)")
    start.add_argument("--run-id", help="name of this backfill (claims, audit)")
    start.add_argument("--no-wait", action="store_true", help="start and return")
    start.add_argument("--json", action="store_true", help="print the final progress as JSON")
    start.set_defaults(handler=_start)

    status = sub.add_parser("status", help="progress of the backfill of a scope")
    status.add_argument("--pair", action="append", metavar="CUR:CTRY")
    status.add_argument("--watch", action="store_true", help="follow until it finishes")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_status)
