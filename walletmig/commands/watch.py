"""`walletmig migration watch`: a live terminal view of a migration, refreshed every second.

What it shows: the migration workflow's status (phase, rollout, the next step's gates with
their measured values and thresholds: the `migration status` query, read through
walletmig.commands.migration's own functions), and what the processes' metrics say right now
(every endpoint of WALLETMIG_METRICS_URLS, see `walletmig dev env`): each scope's phase, the
shadow-read match ratio, the reconciliation match ratio, TigerBeetle / MongoDB latency ratio,
backlog items and age, error and fallback rates, with a short trend line of the last samples.

Bounded: `--iterations N` stops after N refreshes, `--once` is one (tests, scripts); a
terminal gets a live view, anything else one printed frame per refresh.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Any

from walletconfig.settings import Settings
from walletmig import metrics_view as mv
from walletmig.commands import UsageError

if TYPE_CHECKING:
    from rich.console import RenderableType
    from temporalio.client import Client

    from messages.migration import MigrationStatus

INTERVAL_S_DEFAULT = 1.0
ITERATIONS_MAX = 1_000_000  # about 11 days at one a second: a bound, not a limit anyone meets
STATUS_TIMEOUT_S = 3.0
PHASES = ("legacy", "dual_write", "shadow_read", "read_cutover", "tb_primary", "complete")


def subcommands(parser: argparse.ArgumentParser) -> Any:
    """The sub-command action of a group's parser (to add a command to a group another module
    registered, without editing that module)."""
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(found) == 1, "the group has one sub-command action"
    return found[0]


def add_bounds(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval-s", type=float, default=INTERVAL_S_DEFAULT,
                   help=f"refresh every (default {INTERVAL_S_DEFAULT:g} s)")
    p.add_argument("--iterations", type=int, default=None, help="stop after N refreshes")
    p.add_argument("--once", action="store_true", help="one refresh, printed (= --iterations 1)")
    p.add_argument("--trend", type=int, default=mv.TREND_SAMPLES_DEFAULT,
                   help=f"samples per trend line (default {mv.TREND_SAMPLES_DEFAULT})")
    p.add_argument("--metrics-url", action="append", default=None,
                   help="scrape URL (repeat); default WALLETMIG_METRICS_URLS")


def bounds(args: argparse.Namespace) -> tuple[int, float, list[str]]:
    iterations = 1 if args.once else (args.iterations or ITERATIONS_MAX)
    if not 1 <= iterations <= ITERATIONS_MAX:
        raise UsageError(f"--iterations must be 1..{ITERATIONS_MAX}")
    if not 0.1 <= args.interval_s <= 3600:
        raise UsageError("--interval-s must be 0.1..3600")
    if not 1 <= args.trend <= 600:
        raise UsageError("--trend must be 1..600")
    urls = (args.metrics_url or mv.metrics_urls())[:mv.URLS_MAX]
    return iterations, args.interval_s, urls


async def run_view(iterations: int, interval_s: float,
                   frame: Any) -> None:
    """Call `frame()` (-> a rich renderable) `iterations` times, `interval_s` apart: live on a
    terminal, printed otherwise."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if not console.is_terminal or iterations == 1:
        for i in range(iterations):
            console.print(await frame())
            if i + 1 < iterations:
                await asyncio.sleep(interval_s)
        return
    with Live(await frame(), console=console, auto_refresh=False) as live:
        for _ in range(iterations - 1):
            await asyncio.sleep(interval_s)
            live.update(await frame(), refresh=True)


class MigrationView:
    """One frame per call: the status query and a scrape, compared with the previous scrape."""

    def __init__(self, name: str, urls: list[str], trend_size: int) -> None:
        self._name = name
        self._urls = urls
        self._trend = mv.Trend(trend_size)
        self._before: mv.Scrape | None = None
        self._client: Client | None = None

    async def _status(self) -> tuple[MigrationStatus | None, str]:
        from messages.migration import QUERY_STATUS, MigrationStatus
        from walletmig.commands.migration import _handle, connect

        try:
            if self._client is None:
                self._client = await asyncio.wait_for(connect(Settings.from_env()),
                                                      STATUS_TIMEOUT_S)
            handle = _handle(self._client, self._name)
            status = await asyncio.wait_for(
                handle.query(QUERY_STATUS, result_type=MigrationStatus), STATUS_TIMEOUT_S)
            return status, ""
        except Exception as exc:  # shown in the view: the metrics are still worth watching
            return None, f"{type(exc).__name__}: {exc}"[:160]

    async def frame(self) -> RenderableType:
        from rich.console import Group

        status, why = await self._status()
        now = await asyncio.to_thread(mv.scrape, self._urls)
        before, self._before = self._before, now
        parts: list[RenderableType] = [self._header(status, why, now)]
        if status is not None and status.next_gates:
            parts.append(self._gates(status))
        parts.append(self._scopes(now))
        parts.append(self._measures(status, now, before))
        return Group(*parts)

    def _header(self, status: MigrationStatus | None, why: str, now: mv.Scrape) -> Any:
        from rich.text import Text

        from walletmig.commands.migration import describe_status

        if status is None:
            text = Text(f"migration {self._name}: status unavailable ({why})", style="yellow")
        else:
            text = Text(f"migration {status.migration_id}: phase {status.phase.value} "
                        f"({describe_status(status)}), rollout {status.rollout_percent}%, "
                        f"epoch {status.epoch}, auto-rollbacks {status.auto_rollbacks}",
                        style="bold")
            if status.next_step:
                text.append(f"\nnext: {status.next_step}")
        if not self._urls:
            text.append("\nno metrics URLs: set WALLETMIG_METRICS_URLS (walletmig dev env)",
                        style="yellow")
        for url, error in now.errors.items():
            text.append(f"\n{url}: {error}", style="red")
        return text

    def _gates(self, status: MigrationStatus) -> Any:
        from rich.table import Table

        table = Table(title="gates of the next step", title_justify="left")
        for column in ("gate", "measured", "threshold", ""):
            table.add_column(column)
        for gate in status.next_gates:
            table.add_row(gate.name, gate.measured, gate.threshold,
                          "[green]ok[/]" if gate.passed else "[red]FAIL[/]")
        return table

    def _scopes(self, now: mv.Scrape) -> Any:
        """Each scope's phase as the processes last read it (walletmig_migration_phase)."""
        from rich.table import Table

        table = Table(title="scopes (metrics)", title_justify="left")
        for column in ("scope", "phase", "rollout"):
            table.add_column(column)
        rollout = now.by("walletmig_migration_rollout_percent", "migration")
        for labels, value in sorted(now.series("walletmig_migration_phase"),
                                    key=lambda item: item[0].get("migration", "")):
            if value >= 1:
                scope = labels.get("migration", "")
                table.add_row(scope, labels.get("phase", ""), mv.fmt(rollout.get(scope), ".0f",
                                                                    "%"))
        return table

    def _measures(self, status: MigrationStatus | None, now: mv.Scrape,
                  before: mv.Scrape | None) -> Any:
        from rich.table import Table

        table = Table(title="measures (trend: last samples)", title_justify="left")
        for column in ("measure", "now", "trend"):
            table.add_column(column)
        for name, value, text in measures(status, now, before):
            table.add_row(name, text, self._trend.push(name, value))
        return table


def measures(status: MigrationStatus | None, now: mv.Scrape,
             before: mv.Scrape | None) -> list[tuple[str, float | None, str]]:
    """(name, value for the trend, text) of each measured row."""
    ev = status.evidence if status is not None else None
    reads = "walletmig_reads_total"
    matched = mv.rate(now, before, reads, outcome="match")
    compared = (matched or 0.0) + (mv.rate(now, before, reads, outcome="mismatch") or 0.0)
    shadow = matched / compared if matched is not None and compared else None
    fallback = (mv.rate(now, before, reads, outcome="fallback_error") or 0.0) + (
        mv.rate(now, before, reads, outcome="fallback_open") or 0.0)
    reads_rate = mv.rate(now, before, reads)
    ops = "walletmig_wallet_operations_total"
    errors = mv.ratio_of_increase(now, before, (ops, {"outcome": "error"}), (ops, {}))
    seconds = "walletmig_store_operation_seconds"
    tb_s = mv.mean_latency_s(now, before, seconds, store="tigerbeetle")
    mongo_s = mv.mean_latency_s(now, before, seconds, store="mongodb")
    latency = tb_s / mongo_s if tb_s is not None and mongo_s else None
    recon = now.by("walletmig_reconciliation_match_ratio", "scope")
    recon_min = min(recon.values()) if recon else None
    backlog = now.by("walletmig_backlog_items", "direction")
    age = now.by("walletmig_backlog_oldest_age_seconds", "direction")
    rows: list[tuple[str, float | None, str]] = [
        ("shadow match (live)", shadow, mv.pct(shadow)),
        ("shadow match (gate evidence)", ev.shadow_match_rate if ev else None,
         mv.pct(ev.shadow_match_rate) if ev else "-"),
        ("reconciliation match (min)", recon_min, mv.pct(recon_min)),
        ("latency TB / MongoDB (live)", latency,
         f"{mv.fmt(latency)} ({mv.fmt(tb_s and tb_s * 1000, '.3g', ' ms')} / "
         f"{mv.fmt(mongo_s and mongo_s * 1000, '.3g', ' ms')})"),
        ("latency ratio (gate evidence)", ev.latency_ratio if ev else None,
         mv.fmt(ev.latency_ratio if ev else None)),
        ("error rate (store operations)", errors, mv.pct(errors)),
        ("fallback rate (reads)", fallback / reads_rate if reads_rate else None,
         mv.pct(fallback / reads_rate if reads_rate else None)),
        ("wallet operations / s", mv.rate(now, before, ops), mv.fmt(mv.rate(now, before, ops))),
    ]
    for direction in ("to_tigerbeetle", "to_mongodb"):
        rows.append((f"backlog {direction}", backlog.get(direction),
                     f"{mv.fmt(backlog.get(direction), '.0f')} items, oldest "
                     f"{mv.fmt(age.get(direction), '.1f', ' s')}"))
    return rows


async def cmd_watch(args: argparse.Namespace) -> int:
    iterations, interval_s, urls = bounds(args)
    view = MigrationView(args.name, urls, args.trend)
    await run_view(iterations, interval_s, view.frame)
    return 0


def register(subparsers: Any) -> None:
    """`watch` under the `migration` group (walletmig.commands.migration registers the group;
    cli.GROUPS lists this module after it)."""
    from walletmig.commands.migration import DEFAULT_NAME

    group = subparsers.choices.get("migration")
    if group is None:
        return
    p = subcommands(group).add_parser(
        "watch", help="live view: phase, gates, match ratio, latency, backlog, errors",
        description=__doc__)
    p.add_argument("--name", default=DEFAULT_NAME, help="migration name")
    add_bounds(p)
    p.set_defaults(handler=cmd_watch)
