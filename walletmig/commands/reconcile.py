"""`walletmig reconcile schedule|run|report`: the reconciliation workflow and its reports.

`schedule` creates (or updates) a Temporal Schedule that starts ReconciliationWorkflow every
N seconds (default 300) and can pause/unpause/delete it; `run` runs one now and waits;
`report` prints the latest report, `--html FILE` writes a page with the match-rate history.
Exit status of `run`: 0 healthy, 3 when the run raised an alert.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from walletconfig.settings import Settings
from walletmig.commands import CommandError, UsageError
from walletmig.commands.backfill import connect, resolve_pairs

# Temporal, pymongo and the workflow models load inside the handlers (fast `walletmig --help`).
if TYPE_CHECKING:
    from messages.reconciliation import ReconcileInput, ReconcileSummary

EXIT_ALERT = 3
HISTORY_DEFAULT = 100


def _input(args: argparse.Namespace, run_id: str) -> ReconcileInput:
    from messages.reconciliation import PAGE_MAX, ReconcileInput

    if args.repair and not args.reason:
        raise UsageError("--repair needs --reason (it is written to the audit log)")
    return ReconcileInput(
        run_id=run_id, pairs=resolve_pairs(args.pair), page_size=args.page_size or PAGE_MAX,
        repair=args.repair, actor=args.actor, reason=args.reason,
        check_transfers=not args.skip_transfers,
    )


def _rate(rate: float | None) -> str:
    return "no data (nothing compared)" if rate is None else f"{rate:.4%}"


def summary_lines(s: ReconcileSummary) -> list[str]:
    lines = [
        f"reconciliation {s.run_id} over {', '.join(s.pairs)} ({s.kind}, "
        f"{'full' if s.full else 'partial: no gate accepts it'})",
        f"  wallets {s.wallets} · matched {s.matched} · in flight {s.in_flight} "
        f"(resolved on re-check {s.resolved_on_recheck}) · real {s.real}",
        f"  match rate {_rate(s.match_rate)} · conservation "
        f"{'ok' if s.conservation_ok else 'FAILED'} · repaired {s.repaired} "
        f"(failed {s.repair_failed})",
    ]
    if s.findings:
        lines.append("  findings: " + ", ".join(f"{k} {v}" for k, v in sorted(s.findings.items())))
    lines.extend(f"  ALERT: {reason}" for reason in s.alerts)
    return lines


async def _run(args: argparse.Namespace) -> int:
    from workflows.reconciliation import ReconciliationWorkflow

    settings = Settings.from_env()
    client = await connect(settings)
    run_id = f"reconcile-{uuid.uuid4().hex[:12]}"
    summary: ReconcileSummary = await client.execute_workflow(
        ReconciliationWorkflow.run, _input(args, run_id), id=f"reconcile/{run_id}",
        task_queue=settings.migration_task_queue, execution_timeout=timedelta(hours=6),
    )
    print(summary.model_dump_json(indent=2) if args.json else "\n".join(summary_lines(summary)))
    return EXIT_ALERT if summary.alerts else 0


async def ensure_reconcile_schedule(
    client: Any, task_queue: str, inp: ReconcileInput, *, every_s: int,
    schedule_id: str | None = None, note: str | None = None, keep_spec: bool = False,
) -> str:
    """Create (or update in place, keeping its paused state) the schedule that starts
    ReconciliationWorkflow with `inp` every `every_s` seconds (`reconcile schedule` and
    `walletmig dev up`, which passes the defaults: every pair, SCHEDULE_EVERY_S_DEFAULT).
    `keep_spec` (`dev up`): an existing schedule keeps its interval, only its action changes."""
    from temporalio.client import (
        Schedule,
        ScheduleActionStartWorkflow,
        ScheduleIntervalSpec,
        ScheduleSpec,
        ScheduleState,
    )

    from messages.reconciliation import SCHEDULE_ID
    from walletmig.commands.schedules import upsert_schedule
    from workflows.reconciliation import ReconciliationWorkflow

    assert every_s > 0, every_s
    schedule_id = schedule_id or SCHEDULE_ID
    action = ScheduleActionStartWorkflow(
        ReconciliationWorkflow.run, inp, id=f"reconcile/{schedule_id}", task_queue=task_queue,
        execution_timeout=timedelta(hours=6),
    )
    schedule = Schedule(
        action=action,
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(seconds=every_s))]),
        state=ScheduleState(note=note or "walletmig reconcile schedule"),
    )
    return await upsert_schedule(client, schedule_id, schedule, keep_spec=keep_spec)


def scheduled_input(pairs: list[str] | None = None) -> ReconcileInput:
    """What a scheduled run compares: `pairs` (default every configured pair), no repair."""
    from messages.reconciliation import PAGE_MAX, ReconcileInput

    return ReconcileInput(run_id="scheduled", pairs=resolve_pairs(pairs), page_size=PAGE_MAX)


async def _schedule(args: argparse.Namespace) -> int:
    from messages.reconciliation import SCHEDULE_EVERY_S_DEFAULT, SCHEDULE_ID

    args.schedule_id = args.schedule_id or SCHEDULE_ID
    args.every_s = SCHEDULE_EVERY_S_DEFAULT if args.every_s is None else args.every_s
    settings = Settings.from_env()
    client = await connect(settings)
    handle = client.get_schedule_handle(args.schedule_id)
    if args.delete:
        await handle.delete()
        print(f"schedule {args.schedule_id} deleted")
        return 0
    if args.pause or args.unpause:
        await (handle.pause(note=args.note) if args.pause else handle.unpause(note=args.note))
        print(f"schedule {args.schedule_id} {'paused' if args.pause else 'unpaused'}")
        return 0
    if args.every_s <= 0:
        raise UsageError("--every-s must be positive")
    verb = await ensure_reconcile_schedule(
        client, settings.migration_task_queue, _input(args, "scheduled"), every_s=args.every_s,
        schedule_id=args.schedule_id, note=args.note)
    print(f"schedule {args.schedule_id} {verb}: reconciliation every {args.every_s}s "
          f"over {', '.join(resolve_pairs(args.pair))}")
    return 0


async def _report(args: argparse.Namespace) -> int:
    from messages.reconciliation import ReconcileSummary
    from mongobase.mongo import database_of, make_mongo_client
    from stores.reports import ReportStore

    settings = Settings.from_env()
    mongo = make_mongo_client(settings.mongodb_uri)
    try:
        reports = ReportStore(database_of(mongo, settings.mongodb_database))
        latest = await reports.latest()
        if latest is None:
            raise CommandError("no finished reconciliation report yet (`walletmig reconcile run`)")
        if args.html:
            history = await reports.history(args.history)
            Path(args.html).write_text(render_html(latest, history))
            print(f"wrote {args.html} ({len(history)} runs)", file=sys.stderr)
        if args.json:
            print(json.dumps(latest, default=str, indent=2))
        else:
            summary = ReconcileSummary.model_validate(latest)
            print("\n".join(summary_lines(summary)))
            for m in latest.get("mismatches", [])[: args.limit]:
                print(f"  - {m['kind']} {m['subject']}: {m['detail']}")
        return EXIT_ALERT if latest.get("alerts") else 0
    finally:
        await mongo.close()


# ---------------------------------------------------------------------------- html


CHART_W, CHART_H, PAD = 720, 240, 40


def _chart(history: list[dict[str, Any]], threshold: float) -> str:
    """Inline SVG line chart of match rate per run (no scripts, opens anywhere)."""
    # Runs that compared nothing have no rate ("no data"): they are left out of the line.
    history = [d for d in history if isinstance(d.get("match_rate"), int | float)]
    rates = [float(d["match_rate"]) for d in history] or [1.0]
    low = min(min(rates), threshold) - 0.0001
    span = max(1.0 - low, 1e-6)

    def x(i: int) -> float:
        return PAD + (CHART_W - 2 * PAD) * (i / max(len(rates) - 1, 1))

    def y(rate: float) -> float:
        return PAD + (CHART_H - 2 * PAD) * (1.0 - (rate - low) / span)

    points = " ".join(f"{x(i):.1f},{y(r):.1f}" for i, r in enumerate(rates))
    dots = "".join(
        f'<circle cx="{x(i):.1f}" cy="{y(r):.1f}" r="3" '
        f'fill="{"#c00" if r < threshold else "#070"}">'
        f"<title>{html.escape(str(history[i].get('started_at', '')))}: {r:.4%}</title></circle>"
        for i, r in enumerate(rates) if i < len(history)
    )
    return (
        f'<svg width="{CHART_W}" height="{CHART_H}" xmlns="http://www.w3.org/2000/svg">'
        f'<rect width="100%" height="100%" fill="#fafafa" stroke="#ccc"/>'
        f'<line x1="{PAD}" x2="{CHART_W - PAD}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}"'
        f' stroke="#c00" stroke-dasharray="4"/>'
        f'<text x="{PAD}" y="{y(threshold) - 4:.1f}" font-size="11" fill="#c00">'
        f"threshold {threshold:.2%}</text>"
        f'<text x="4" y="{PAD}" font-size="11">100%</text>'
        f'<text x="4" y="{CHART_H - PAD}" font-size="11">{low:.3%}</text>'
        f'<polyline fill="none" stroke="#06c" stroke-width="2" points="{points}"/>{dots}</svg>'
    )


def render_html(latest: dict[str, Any], history: list[dict[str, Any]]) -> str:
    esc = html.escape
    threshold = float(latest.get("threshold", 0.9999))
    rows = "".join(
        f"<tr><td>{esc(str(m.get('kind')))}</td><td>{esc(str(m.get('subject')))}</td>"
        f"<td>{esc(str(m.get('detail')))}</td><td>{esc(json.dumps(m.get('legacy'), default=str))}"
        f"</td><td>{esc(json.dumps(m.get('tigerbeetle'), default=str))}</td></tr>"
        for m in latest.get("mismatches", [])
    )
    alerts = "".join(f"<li>{esc(a)}</li>" for a in latest.get("alerts", [])) or "<li>none</li>"
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>walletmig reconciliation</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px}}
table{{border-collapse:collapse}}</style></head><body>
<h1>Reconciliation</h1>
<p>Latest run <b>{esc(str(latest.get('run_id', latest.get('_id'))))}</b> at
{esc(str(latest.get('finished_at')))}: match rate <b>{esc(_rate(latest.get('match_rate')))}</b>
over {latest.get('wallets', 0)} wallets (real {latest.get('real', 0)}, in flight
{latest.get('in_flight', 0)}, repaired {latest.get('repaired', 0)}).</p>
<h2>Match rate history ({len(history)} runs)</h2>{_chart(history, threshold)}
<h2>Alerts</h2><ul>{alerts}</ul>
<h2>Real mismatches (first {len(latest.get('mismatches', []))})</h2>
<table><tr><th>kind</th><th>subject</th><th>detail</th><th>legacy</th><th>TigerBeetle</th></tr>
{rows}</table></body></html>
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("reconcile", help="compare MongoDB and TigerBeetle")
    sub = parser.add_subparsers(dest="reconcile_command", metavar="SUBCOMMAND")

    def scope(p: argparse.ArgumentParser) -> None:
        p.add_argument("--pair", action="append", metavar="CUR:CTRY",
                       help="ledger pair (repeat; default: every configured pair)")
        p.add_argument("--page-size", type=int, default=None,
                       help="wallets per page (default: the largest the workflow allows)")
        p.add_argument("--skip-transfers", action="store_true",
                       help="skip the Transfer Registry check (a partial report: no "
                       "migration gate accepts it)")
        p.add_argument("--repair", action="store_true",
                       help="in dual_write: fix real mismatches with Correction transfers")
        p.add_argument("--actor", default=None, help="who asks for the repair (audit)")
        p.add_argument("--reason", default=None, help="why (audit); required with --repair")

    run = sub.add_parser("run", help="run one reconciliation now and wait")
    scope(run)
    run.add_argument("--json", action="store_true")
    run.set_defaults(handler=_run)

    sched = sub.add_parser("schedule", help="create/update/pause the reconciliation schedule")
    scope(sched)
    sched.add_argument("--every-s", type=int, default=None,
                       help="interval in seconds (default: SCHEDULE_EVERY_S_DEFAULT, 5 min)")
    sched.add_argument("--schedule-id", default=None,
                       help="default: SCHEDULE_ID of messages/reconciliation.py")
    sched.add_argument("--note", default=None)
    action = sched.add_mutually_exclusive_group()
    action.add_argument("--pause", action="store_true")
    action.add_argument("--unpause", action="store_true")
    action.add_argument("--delete", action="store_true")
    sched.set_defaults(handler=_schedule)

    report = sub.add_parser("report", help="print the latest reconciliation report")
    report.add_argument("--html", metavar="FILE", help="write an HTML page with the history")
    report.add_argument("--history", type=int, default=HISTORY_DEFAULT, help="runs in the chart")
    report.add_argument("--limit", type=int, default=20, help="mismatches to print")
    report.add_argument("--json", action="store_true")
    report.set_defaults(handler=_report)


__all__ = ["register", "render_html", "summary_lines"]
