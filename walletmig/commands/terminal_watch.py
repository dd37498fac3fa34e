"""`walletmig terminal watch`: a live view of the credit terminal, refreshed every second.

From the processes' metrics (WALLETMIG_METRICS_URLS, see `walletmig dev env`): end-to-end TPS
(transactions reaching their final state per second), outcomes by kind with their mean
receipt-to-answer latency, the ledger's sync lag, pending holds, the last trial balance
check, and trend lines of the last samples. Bounded like `migration watch` (`--once`,
`--iterations N`).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from walletmig import metrics_view as mv
from walletmig.commands.watch import add_bounds, bounds, run_view

if TYPE_CHECKING:
    from rich.console import RenderableType

TRANSACTIONS = "walletmig_terminal_transactions_total"
SECONDS = "walletmig_terminal_transaction_seconds"
OUTCOMES = ("settled", "rejected", "expired", "error")


class TerminalView:
    def __init__(self, urls: list[str], trend_size: int) -> None:
        self._urls = urls
        self._trend = mv.Trend(trend_size)
        self._before: mv.Scrape | None = None

    async def frame(self) -> RenderableType:
        import asyncio

        from rich.console import Group
        from rich.text import Text

        now = await asyncio.to_thread(mv.scrape, self._urls)
        before, self._before = self._before, now
        head = Text("credit terminal", style="bold")
        if not self._urls:
            head.append("\nno metrics URLs: set WALLETMIG_METRICS_URLS (walletmig dev env)",
                        style="yellow")
        for url, error in now.errors.items():
            head.append(f"\n{url}: {error}", style="red")
        return Group(head, self._overview(now, before), self._kinds(now, before))

    def _overview(self, now: mv.Scrape, before: mv.Scrape | None) -> Any:
        from rich.table import Table

        tps = mv.rate(now, before, TRANSACTIONS)
        errors = mv.ratio_of_increase(now, before, (TRANSACTIONS, {"outcome": "error"}),
                                      (TRANSACTIONS, {}))
        lag = now.total("walletmig_ledger_sync_lag_seconds")
        holds = now.total("walletmig_terminal_pending_holds")
        trial = now.total("walletmig_trial_balance_ok")
        rows: list[tuple[str, float | None, str]] = [
            ("TPS (final states / s)", tps, mv.fmt(tps, ".1f")),
            ("transactions (total)", now.total(TRANSACTIONS), mv.fmt(now.total(TRANSACTIONS),
                                                                     ".0f")),
            ("error rate", errors, mv.pct(errors)),
            ("ledger sync lag", lag, mv.fmt(lag, ".1f", " s")),
            ("pending holds", holds, mv.fmt(holds, ".0f")),
            ("trial balance", trial,
             "-" if trial is None else ("balanced" if trial >= 1 else "[red]NOT balanced[/]")),
        ]
        table = Table(title="overview (trend: last samples)", title_justify="left")
        for column in ("measure", "now", "trend"):
            table.add_column(column)
        for name, value, text in rows:
            table.add_row(name, text, self._trend.push(name, value))
        return table

    def _kinds(self, now: mv.Scrape, before: mv.Scrape | None) -> Any:
        from rich.table import Table

        table = Table(title="by kind (totals; mean latency since the last refresh)",
                      title_justify="left")
        for column in ("kind", *OUTCOMES, "per s", "mean latency", "trend (per s)"):
            table.add_column(column)
        kinds = sorted(now.by(TRANSACTIONS, "kind"))
        for kind in kinds:
            counts = now.by(TRANSACTIONS, "outcome", kind=kind)
            per_s = mv.rate(now, before, TRANSACTIONS, kind=kind)
            mean_s = mv.mean_latency_s(now, before, SECONDS, kind=kind)
            table.add_row(kind, *(mv.fmt(counts.get(o), ".0f") for o in OUTCOMES),
                          mv.fmt(per_s, ".1f"), mv.fmt(mean_s and mean_s * 1000, ".3g", " ms"),
                          self._trend.push(f"kind:{kind}", per_s))
        return table


async def cmd_watch(args: argparse.Namespace) -> int:
    iterations, interval_s, urls = bounds(args)
    await run_view(iterations, interval_s, TerminalView(urls, args.trend).frame)
    return 0


def add_watch(commands: Any) -> None:
    """`watch` under the `terminal` group (walletmig.commands.terminal calls this)."""
    p = commands.add_parser("watch", help="live view: TPS, outcomes by kind, sync lag, holds",
                            description=__doc__)
    add_bounds(p)
    p.set_defaults(handler=cmd_watch)
