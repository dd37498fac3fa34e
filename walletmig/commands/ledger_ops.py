"""`walletmig ledger sync|sync-status|reconcile|rebuild-from-tigerbeetle|rebuild-tigerbeetle`:
the terminal ledger's sync with TigerBeetle, its reconciliation and the two recoveries.

Joined to the `ledger` group by walletmig/commands/ledger.py (`register_ledger`).

    sync                       start the continuous LedgerSyncWorkflow (id ledger-sync/continuous)
                               and create/update its catch-up Temporal Schedule (every 5 min);
                               --once: one catch-up here, now, until caught up; --stop: end both
    sync-status                the cursor, the lag measured now, the last page, unmatched posts
    reconcile                  the ledger against TigerBeetle as of the sync cursor (after a
                               catch-up); the report goes to terminal_reports
    rebuild-from-tigerbeetle   replay the ledger from TigerBeetle and verify (--drop-existing:
                               after a digest of the entries, drop the ledger first and compare)
    rebuild-tigerbeetle        import the mirrors and posted balances into a fresh cluster
                               (--target-addresses) with the entries' timestamps and verify

Exit status: 0 ok, 3 when a reconciliation or a verification found something, 1/2 as usual.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from walletconfig.settings import Settings
from walletmig.commands import CommandError, UsageError

if TYPE_CHECKING:
    from activities.terminal_recovery import TerminalOps
    from messages.clearing import TerminalReconcileReport

EXIT_FINDINGS = 3


@contextlib.asynccontextmanager
async def open_terminal(
    settings: Settings, *, tb_addresses: str | None = None
) -> AsyncIterator[TerminalOps]:
    """The terminal's sync/reconcile/rebuild operations over the settings' MongoDB database
    and TigerBeetle (cut to its request limit), indexes ensured. For the CLI and the demo."""
    from activities.terminal_recovery import terminal_ops
    from mongobase.mongo import database_of, make_mongo_client
    from stores.bundle import connect_batched

    client = await connect_batched(settings, tb_addresses=tb_addresses)
    mongo = make_mongo_client(settings.mongodb_uri)
    try:
        ops = terminal_ops(database_of(mongo, settings.mongodb_database), client,
                           limits=client.limits)
        await ops.ensure_indexes()
        yield ops
    finally:
        with contextlib.suppress(Exception):
            await client.close()
        await mongo.close()


def _ts(timestamp: int) -> str:
    if timestamp <= 0:
        return "-"
    return datetime.fromtimestamp(timestamp / 1e9, UTC).isoformat(timespec="milliseconds")


# ---- sync ------------------------------------------------------------------------------------


async def _sync(args: argparse.Namespace) -> int:
    if args.once:
        async with open_terminal(Settings.from_env()) as ops:
            outcome = await ops.sync.run_until_caught_up(limit=args.limit)
        if args.json:
            print(outcome.model_dump_json(indent=2))
        else:
            t = outcome.totals
            print(f"sync {'caught up' if outcome.caught_up else 'NOT caught up'}: cursor "
                  f"{_ts(outcome.cursor.timestamp)}, {t.pages} pages, {t.scanned} transfers, "
                  f"{t.new_entries} new entries, {t.unmatched} unmatched, lag at start "
                  f"{outcome.lag_s:.1f}s{'' if outcome.lag_exact else ' (at most)'}")
        return 0 if outcome.caught_up and outcome.totals.unmatched == 0 else EXIT_FINDINGS
    return await _sync_on_temporal(args)


async def _sync_on_temporal(args: argparse.Namespace) -> int:
    from temporalio.client import WorkflowHandle
    from temporalio.common import WorkflowIDConflictPolicy
    from temporalio.service import RPCError

    from messages.clearing import (
        SYNC_EVERY_S_DEFAULT,
        SYNC_SCHEDULE_ID,
        SYNC_WORKFLOW_ID,
        LedgerSyncInput,
    )
    from walletmig.commands.backfill import connect
    from workflows.terminal_sync import LedgerSyncWorkflow

    settings = Settings.from_env()
    client = await connect(settings)
    schedule = client.get_schedule_handle(SYNC_SCHEDULE_ID)
    if args.stop:
        handle: WorkflowHandle[Any, Any] = client.get_workflow_handle(SYNC_WORKFLOW_ID)
        for stop in (handle.terminate("walletmig ledger sync --stop"), schedule.delete()):
            with contextlib.suppress(RPCError):
                await stop
        print(f"continuous sync {SYNC_WORKFLOW_ID} and schedule {SYNC_SCHEDULE_ID} stopped")
        return 0
    every_s = SYNC_EVERY_S_DEFAULT if args.every_s is None else args.every_s
    if every_s <= 0:
        raise UsageError("--every-s must be positive")
    await client.start_workflow(
        LedgerSyncWorkflow.run, LedgerSyncInput(limit=args.limit, idle_s=args.idle_s),
        id=SYNC_WORKFLOW_ID, task_queue=settings.migration_task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING)
    verb = await ensure_sync_schedule(client, settings.migration_task_queue, every_s, args.limit)
    print(f"continuous sync {SYNC_WORKFLOW_ID} running on {settings.migration_task_queue}; "
          f"catch-up schedule {SYNC_SCHEDULE_ID} {verb} (every {every_s}s)")
    return 0


async def ensure_sync_schedule(
    client: Any, task_queue: str, every_s: int, limit: int, *, keep_spec: bool = False
) -> str:
    """Create (or update in place, keeping its paused state) the catch-up schedule: a
    LedgerSyncWorkflow with `once` every `every_s` seconds; overlapping runs are skipped.
    `keep_spec` (`dev up`): an existing schedule keeps its interval, only its action changes.

    Each run first resumes the terminal's batches left `received` by a submitter that died
    before starting their workflow (activity `terminal_resume_received`, batches older than
    OWNER_GRACE_S, the oldest 100), then writes the entries of posts the pipeline left
    without one. `walletmig ledger sync` and `walletmig dev up` call it."""
    from temporalio.client import (
        Schedule,
        ScheduleActionStartWorkflow,
        ScheduleIntervalSpec,
        ScheduleSpec,
        ScheduleState,
    )

    from messages.clearing import SYNC_CATCH_UP_WORKFLOW_ID, SYNC_SCHEDULE_ID, LedgerSyncInput
    from walletmig.commands.schedules import upsert_schedule
    from workflows.terminal_sync import LedgerSyncWorkflow

    assert every_s > 0, every_s
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            LedgerSyncWorkflow.run, LedgerSyncInput(once=True, limit=limit),
            id=SYNC_CATCH_UP_WORKFLOW_ID, task_queue=task_queue,
            execution_timeout=timedelta(hours=1)),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(seconds=every_s))]),
        state=ScheduleState(note="walletmig ledger sync: catch-up"),
    )
    return await upsert_schedule(client, SYNC_SCHEDULE_ID, schedule, keep_spec=keep_spec)


async def _sync_status(args: argparse.Namespace) -> int:
    async with open_terminal(Settings.from_env()) as ops:
        cursor = await ops.ledger.read_cursor()
        lag_s, exact = await ops.sync.measure_lag()
        status = await ops.reports.sync_status()
    unmatched_lag_s = 0.0
    if status is not None and status.oldest_unmatched_ts:
        unmatched_lag_s = max(time.time_ns() - status.oldest_unmatched_ts, 0) / 1e9
    body = {
        "cursor_timestamp": cursor.timestamp, "cursor_at": _ts(cursor.timestamp),
        "sync_lag_seconds": max(lag_s, unmatched_lag_s), "lag_exact": exact,
        "unmatched_total": status.unmatched_total if status else 0,
        "last_page": status.model_dump(mode="json") if status else None,
    }
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print(f"cursor {body['cursor_at']} ({cursor.timestamp}); sync_lag_seconds "
              f"{body['sync_lag_seconds']:.1f}{'' if exact else ' (at most)'}; unmatched posts "
              f"{body['unmatched_total']}")
        if status is not None:
            print(f"  last page at {status.measured_at}: {status.scanned} transfers, "
                  f"{status.new_entries} new entries, "
                  f"{'caught up' if status.exhausted else 'more to read'}")
    return 0 if body["unmatched_total"] == 0 else EXIT_FINDINGS


# ---- reconcile -------------------------------------------------------------------------------


def report_lines(r: TerminalReconcileReport) -> list[str]:
    lines = [
        f"terminal reconciliation {r.run_id}: {'OK' if r.ok else 'FINDINGS'} as of "
        f"{_ts(r.snapshot_timestamp)}",
        f"  accounts {r.accounts_checked} (mismatched {len(r.mismatched_accounts)}, "
        f"missing mirrors {len(r.missing_mirrors)}) · entries {r.entries_checked} · posted "
        f"transfers {r.transfers_checked}",
        f"  posted without entry {r.posted_without_entry_count} · entries without transfer "
        f"{r.entries_without_transfer_count} · entries differing from their transfer "
        f"{r.transfer_mismatch_count} · duplicated {r.duplicated_entries}",
        f"  trial balance {'zero' if r.trial_balance_zero else 'NOT ZERO'} · chain "
        f"{'intact' if r.chain_ok else f'BROKEN ({r.chain_reason})'} · balance drift "
        f"{len(r.balance_drift)} · expired holds {r.expired_hold_count} of {r.holds_checked}"
        f" · sync lag {r.sync_lag_s:.1f}s",
    ]
    lines += [f"  - {m.account}:{m.currency} GL Dr {m.gl_debits_minor} Cr {m.gl_credits_minor}"
              f" / TigerBeetle Dr {m.tb_debits_posted} Cr {m.tb_credits_posted}"
              for m in r.mismatched_accounts[:20]]
    return lines


async def _reconcile(args: argparse.Namespace) -> int:
    from messages.clearing import TerminalReconcileInput

    run_id = args.run_id or f"terminal-{uuid.uuid4().hex[:12]}"
    inp = TerminalReconcileInput(run_id=run_id, catch_up=not args.no_catch_up)
    if args.via_temporal:
        from messages.clearing import TERMINAL_RECONCILE_WORKFLOW, TerminalReconcileReport
        from walletmig.commands.backfill import connect

        settings = Settings.from_env()
        client = await connect(settings)
        report = await client.execute_workflow(
            TERMINAL_RECONCILE_WORKFLOW, inp, id=f"terminal-reconcile/{run_id}",
            task_queue=settings.migration_task_queue, result_type=TerminalReconcileReport,
            execution_timeout=timedelta(hours=6))
    else:
        async with open_terminal(Settings.from_env()) as ops:
            report = await ops.reconciler.run(inp)
    print(report.model_dump_json(indent=2) if args.json else "\n".join(report_lines(report)))
    return 0 if report.ok else EXIT_FINDINGS


# ---- rebuilds --------------------------------------------------------------------------------


async def _rebuild_ledger(args: argparse.Namespace) -> int:
    run_id = f"ledger-rebuild-{uuid.uuid4().hex[:12]}"
    async with open_terminal(Settings.from_env()) as ops:
        result = await ops.rebuild_ledger(drop_existing=args.drop_existing, run_id=run_id)
    if args.json:
        print(json.dumps({**result.model_dump(mode="json"), "ok": result.ok}, indent=2))
    else:
        same = {None: "no earlier ledger compared", True: "EQUAL to the ledger before",
                False: "DIFFERENT from the ledger before"}[result.equal]
        print(f"ledger rebuilt from TigerBeetle in {result.seconds:.1f}s: "
              f"{result.entries_after} entries ({result.sync.totals.new_entries} written), "
              f"{same}; trial balance {'zero' if result.trial_balance_zero else 'NOT ZERO'}, "
              f"chain {'intact' if result.chain_ok else 'BROKEN'}, reconciliation "
              f"{'clean' if result.reconcile_ok else 'FINDINGS'} ({result.reconcile_run_id})")
    return 0 if result.ok and result.equal is not False else EXIT_FINDINGS


async def _rebuild_tigerbeetle(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.target_addresses.strip() == settings.tb_addresses.strip() and not args.force:
        raise UsageError("--target-addresses is the configured cluster; rebuild into a fresh "
                         "one (or --force to verify the configured one against the ledger)")
    run_id = f"tigerbeetle-rebuild-{uuid.uuid4().hex[:12]}"
    target_settings = settings.model_copy(update={"tb_cluster_id": args.target_cluster_id})
    try:
        # The configured cluster may be the lost one: everything here talks to the target.
        async with open_terminal(target_settings, tb_addresses=args.target_addresses) as ops:
            result = await ops.rebuild_tigerbeetle(ops.client, target_limits=ops.limits,
                                                   run_id=run_id)
    except Exception as exc:
        if type(exc).__name__ in {"InvalidInputError", "ConflictError"}:
            raise CommandError(str(exc)) from None
        raise
    if args.json:
        print(json.dumps({**result.model_dump(mode="json"), "ok": result.ok}, indent=2))
    else:
        print(f"TigerBeetle rebuilt from the ledger in {result.seconds:.1f}s: mirrors "
              f"{result.accounts_created} created / {result.accounts_existing} there, transfers "
              f"{result.transfers_imported} imported / {result.transfers_existing} there, "
              f"failed {result.failed_count}; {result.mirrors_checked} mirrors compared, "
              f"{len(result.mismatched_accounts)} differ")
        for failure in result.failed[:20]:
            print(f"  - {failure}")
    return 0 if result.ok else EXIT_FINDINGS


# ---- registration ----------------------------------------------------------------------------


def register_ledger(commands: Any) -> None:
    """Adds the commands to the `ledger` group's sub-parsers (walletmig/commands/ledger.py)."""
    from messages.clearing import SYNC_IDLE_S_DEFAULT, SYNC_PAGE_LIMIT_DEFAULT

    sync = commands.add_parser("sync", help="TigerBeetle -> ledger: continuous, or --once")
    sync.add_argument("--once", action="store_true", help="catch up here and now, then exit")
    sync.add_argument("--stop", action="store_true",
                      help="terminate the continuous sync and delete its schedule")
    sync.add_argument("--every-s", type=int, default=None,
                      help="catch-up schedule interval (default 300)")
    sync.add_argument("--idle-s", type=float, default=SYNC_IDLE_S_DEFAULT,
                      help="the continuous sync's pause while caught up")
    sync.add_argument("--limit", type=int, default=SYNC_PAGE_LIMIT_DEFAULT,
                      help="transfers scanned per page (<= 8189)")
    sync.add_argument("--json", action="store_true")
    sync.set_defaults(handler=_sync)

    status = commands.add_parser("sync-status", help="cursor, sync_lag_seconds, unmatched")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_sync_status)

    reconcile = commands.add_parser("reconcile", help="the ledger against TigerBeetle")
    reconcile.add_argument("--json", action="store_true")
    reconcile.add_argument("--run-id", default=None)
    reconcile.add_argument("--no-catch-up", action="store_true",
                           help="compare at the cursor as it is (no sync first)")
    reconcile.add_argument("--via-temporal", action="store_true",
                           help="run TerminalReconcileWorkflow on the migration task queue")
    reconcile.set_defaults(handler=_reconcile)

    ledger = commands.add_parser("rebuild-from-tigerbeetle",
                                 help="replay the ledger from TigerBeetle and verify")
    ledger.add_argument("--drop-existing", action="store_true",
                        help="digest the entries, drop the ledger, rebuild, compare")
    ledger.add_argument("--json", action="store_true")
    ledger.set_defaults(handler=_rebuild_ledger)

    rebuild = commands.add_parser("rebuild-tigerbeetle",
                                  help="import mirrors and balances into a fresh cluster")
    rebuild.add_argument("--target-addresses", required=True,
                         help="the fresh cluster (e.g. tbemu://127.0.0.1:3001 or 3001)")
    rebuild.add_argument("--target-cluster-id", type=int, default=0)
    rebuild.add_argument("--force", action="store_true",
                         help="allow the configured cluster as target (verification only)")
    rebuild.add_argument("--json", action="store_true")
    rebuild.set_defaults(handler=_rebuild_tigerbeetle)
