"""`walletmig terminal demo`: a realistic mix through the credit terminal, end to end.

A database and task queue of the run's own, a clearing worker in this process (the default
routes plus `instant_hold`, a card authorization whose 1 s hold lapses before its checks can
run: the expiry path), and three waves of batches, because a hold counts only posted funds:

1. money in: capital, ACH credits, Stripe settlements, USDC deposits, expenses; with fraud-rule
   hits (amounts over the kind's limit, a velocity burst, reused references), blocked parties,
   expiring holds, an unknown kind (refused at intake);
2. money moving: ACH settlements and debits, USDC withdrawals, payroll; plus replays of wave 1
   (same content, also concurrently) and conflicting content under used ids;
3. money out: ACH settlements out (one beyond the funds: refused at the reservation), and
   expenses after their account was frozen.

The run's terminal ledgers are its own (random, >= 10000), so its mirrors start at zero.

Every transaction with a known outcome (a fraud rule, a block, an expiry, a conflict) is held
to it. The report: per kind counts and latency (submit to final outcome), then the checks:
nothing lost, no entry doubled, trial balance zero, chain intact; then the ledger sync finds
nothing to add, the terminal reconciliation nothing wrong, and a ledger rebuilt from
TigerBeetle equals the pipeline's (activities/terminal_recovery.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from temporalio.worker import Worker

from activities.clearing import ClearingActivities, build_clearing_activities
from mongobase.mongo import database_of, make_mongo_client
from stores.bundle import connect_batched
from stores.clearing_blocklist import BlockedParties
from stores.clearing_store import ClearingStore
from stores.general_ledger import GL_ENTRIES, GeneralLedger
from stores.tb_batches import BatchedClient
from walletclient.clearing_client import ClearingClient
from walletconfig.settings import Settings
from walletcore.clearing import (
    DEFAULT_CLEARING_TABLE,
    ClearingTable,
    ExternalTransaction,
    KindLimits,
    Route,
)
from walletcore.gl_chart import AccountStatus, ChartOfAccounts
from workers.wallet_worker import connect_temporal, workflow_runner
from workflows.clearing import ClearingBatchWorkflow

TRANSACTIONS_MIN = 100
TRANSACTIONS_MAX = 100_000
BATCH_SIZE = 250
POLL_S = 0.1
DRAIN_S = 120.0
FINAL = ("settled", "rejected")
BLOCKED = ("sanctioned-bank-7", "shell-co-44")
FROZEN_ACCOUNT = 6100  # Ops-Expense, frozen before wave 3
INSTANT_HOLD = "instant_hold"
DEMO_LEDGER_MIN = 10_000  # terminal ledgers start at 100, wallet ledgers stay below
DEMO_LEDGER_MAX = 2**31
RULE_HITS_MAX = 80  # duplicate-reference pairs: the rules' batch stays one batch
CHECK_CHUNK = 8189  # ids per store/ledger read


def own_ledgers(rng: random.Random, table: ClearingTable = DEFAULT_CLEARING_TABLE,
                extra: tuple[Route, ...] = ()) -> ClearingTable:
    """`table`'s routes (plus `extra`) on terminal ledgers of a run's own (random, >= 10000):
    its mirrors start from zero (funds refusals are exact) and the sync, reconciliation and
    rebuild see only the run's transfers, however many runs the shared TigerBeetle holds."""
    usd = rng.randrange(DEMO_LEDGER_MIN, DEMO_LEDGER_MAX)
    chart = ChartOfAccounts(accounts=table.chart.accounts, ledgers={"USD": usd, "USDC": usd + 1})
    return ClearingTable(chart=chart, routes=(*table.routes, *extra))


def demo_table(rng: random.Random) -> ClearingTable:
    """The default routes plus `instant_hold` (1 s hold: expires before its checks run), on
    ledgers of the run's own."""
    hold = Route(
        kind=INSTANT_HOLD, code=2099, debit_account=1060, credit_account=2180,
        pending_timeout_s=1, limits={"USD": KindLimits(
            amount_min=Decimal("0.01"), amount_max=Decimal("5000"), velocity_count_max=1000,
            velocity_amount_max=Decimal("1000000"))})
    return own_ledgers(rng, extra=(hold,))


class KindFigures(BaseModel):
    kind: str
    submitted: int = 0
    settled: int = 0
    rejected: int = 0
    refused: int = 0  # at intake: bad input or conflicting content, never recorded
    replayed: int = 0
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None
    reasons: dict[str, int] = Field(default_factory=dict)


class TerminalDemoReport(BaseModel):
    run_id: str
    database: str
    transactions: int
    seconds: float
    throughput_tx_per_s: float
    kinds: list[KindFigures]
    lost_transactions: int
    duplicated_entries: int
    settled_without_entry: int
    trial_balance_zero: bool
    chain_ok: bool
    unexpected_outcomes: int
    unexpected_sample: list[str] = Field(default_factory=list)
    unsynced_after_drain: int | None = None
    reconcile_ok: bool | None = None
    rebuilt_ledger_equal: bool | None = None
    notes: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.lost_transactions == 0 and self.duplicated_entries == 0
                and self.settled_without_entry == 0 and self.trial_balance_zero
                and self.chain_ok and self.unexpected_outcomes == 0
                and self.unsynced_after_drain in (None, 0) and self.reconcile_ok is not False
                and self.rebuilt_ledger_equal in (None, True))


@dataclass
class Planned:
    txn: ExternalTransaction
    expect: str | None = None  # "settled", a rejection reason, "refused"; None: not checked


@dataclass
class Tracker:
    """Submit times, outcomes and per kind figures of the run."""

    kind_of: dict[str, str] = field(default_factory=dict)
    expect: dict[str, str] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    final: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    replayed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    unexpected: list[str] = field(default_factory=list)

    @property
    def open_ids(self) -> list[str]:
        return [x for x in self.sent_at if x not in self.final]


class Demo:
    def __init__(self, client: ClearingClient, ledger: GeneralLedger, tb: BatchedClient,
                 rng: random.Random, run_id: str, progress: Progress) -> None:
        self.client = client
        self.ledger = ledger
        self.tb = tb
        self.rng = rng
        self.run_id = run_id
        self.track = Tracker()
        self.progress = progress
        self.task = progress.add_task("cleared", total=0)
        self._seq = 0

    def txn(self, kind: str, amount: str, currency: str = "USD", *, party: str | None = None,
            reference: str | None = None, external_id: str | None = None) -> ExternalTransaction:
        self._seq += 1
        return ExternalTransaction(
            external_id=external_id or f"{self.run_id}-{self._seq}", kind=kind,
            amount=Decimal(amount), currency=currency,
            counterparty=party or f"party-{self.rng.randrange(400)}", reference=reference)

    def amount(self, low: int, high: int) -> str:
        return f"{self.rng.randint(low, high)}.{self.rng.randrange(100):02d}"

    async def submit(self, planned: Sequence[Planned]) -> None:
        """In batches; refused ones are final at once (and held to `expect`)."""
        for start in range(0, len(planned), BATCH_SIZE):
            chunk = planned[start:start + BATCH_SIZE]
            sent = time.monotonic()
            result = await self.client.submit_many([p.txn for p in chunk])
            by_id = {p.txn.external_id: p for p in chunk}
            for p in chunk:
                self.track.kind_of.setdefault(p.txn.external_id, p.txn.kind)
            for external_id in result.accepted:
                if by_id[external_id].expect == "refused":
                    self.track.unexpected.append(f"{external_id}: accepted, expected refused")
                self.track.sent_at[external_id] = sent
                if by_id[external_id].expect is not None:
                    self.track.expect[external_id] = str(by_id[external_id].expect)
            for replay in result.replayed:
                self.track.replayed[by_id[replay.external_id].txn.kind] += 1
            for refusal in result.refused:
                refused = by_id.get(refusal.external_id)
                self.track.refused[refused.txn.kind if refused else "invalid"] += 1
                if refused is not None and refused.expect not in (None, "refused"):
                    self.track.unexpected.append(
                        f"{refusal.external_id}: refused {refusal.error}")
            self.progress.update(self.task, total=len(self.track.sent_at))

    async def drain(self, timeout_s: float = DRAIN_S) -> None:
        """Poll until every accepted transaction is final (or the timeout)."""
        deadline = time.monotonic() + timeout_s
        while self.track.open_ids and time.monotonic() < deadline:
            await self.poll()
            await asyncio.sleep(POLL_S)

    async def poll(self) -> None:
        open_ids = self.track.open_ids
        for start in range(0, len(open_ids), 2000):
            found = await self.client.statuses(open_ids[start:start + 2000])
            now = time.monotonic()
            for external_id, outcome in found.items():
                if outcome.state not in FINAL:
                    continue
                self.track.final[external_id] = (outcome.state, outcome.reason)
                kind = self.track.kind_of[external_id]
                self.track.latency_ms[kind].append((now - self.track.sent_at[external_id]) * 1e3)
                expected = self.track.expect.get(external_id)
                got = outcome.state if outcome.state == "settled" else outcome.reason
                if expected is not None and expected != got:
                    self.track.unexpected.append(f"{external_id} ({kind}): {got}, "
                                                 f"expected {expected}")
        self.progress.update(self.task, completed=len(self.track.final))


# ---- the waves ----------------------------------------------------------------------------


def wave_in(d: Demo, n: int) -> tuple[list[Planned], list[Planned]]:
    """Money in (shuffled), and the fraud rules' cases in an order of their own, in one batch:
    velocity and duplicate references are judged in arrival order, and batches clearing at
    the same time count each other's live transactions (pessimistically)."""
    plan = [Planned(d.txn("capital_contribution", "2000000.00", party=f"{d.run_id}-owner-{i}"),
                    "settled") for i in range(3)]
    shares = [("ach_credit_in", 0.45), ("stripe_settlement", 0.2), ("usdc_vault_deposit", 0.15),
              ("ops_expense", 0.1)]
    for kind, share in shares:
        for _ in range(max(1, int(n * share))):
            currency = "USDC" if kind == "usdc_vault_deposit" or (
                kind == "ops_expense" and d.rng.random() < 0.3) else "USD"
            plan.append(Planned(d.txn(kind, d.amount(50, 4000), currency), "settled"))
    hits = min(max(2, n // 100), RULE_HITS_MAX)
    plan += [Planned(d.txn("ach_credit_in", "30000.00"), "amount_above_max") for _ in range(hits)]
    plan += [Planned(d.txn("stripe_settlement", d.amount(5, 50), party=d.rng.choice(BLOCKED)),
                     "blocked_counterparty") for _ in range(hits)]
    plan += [Planned(d.txn(INSTANT_HOLD, d.amount(5, 200)), "expired") for _ in range(hits)]
    plan.append(Planned(d.txn("ach_credit_in", "1.00"), None))
    d.rng.shuffle(plan)
    burst = f"{d.run_id}-burst-bank"  # ach_credit_in allows 50 per counterparty and hour
    rules = [Planned(d.txn("ach_credit_in", "1.00", party=burst),
                     "settled" if i < 50 else "velocity_count_exceeded") for i in range(55)]
    for i in range(hits):  # the same trace number twice from one bank: the second is refused
        party, ref = f"{d.run_id}-bank-{i}", f"TRACE-{d.run_id}-{i}"
        rules.append(Planned(d.txn("ach_credit_in", "10.00", party=party, reference=ref),
                             "settled"))
        rules.append(Planned(d.txn("ach_credit_in", "11.00", party=party, reference=ref),
                             "duplicate_reference"))
    assert len(rules) <= BATCH_SIZE
    return plan, rules


def wave_move(d: Demo, n: int) -> list[Planned]:
    """Money moving on: small against wave 1's totals, so each settles on posted funds."""
    plan: list[Planned] = []
    shares = [("ach_settlement_in", 0.15), ("ach_debit_out", 0.1),
              ("usdc_vault_withdrawal", 0.08), ("payroll_run", 0.05)]
    for kind, share in shares:
        for _ in range(max(1, int(n * share))):
            currency = "USDC" if kind == "usdc_vault_withdrawal" else "USD"
            plan.append(Planned(d.txn(kind, d.amount(1, 60), currency,
                                      party=f"{d.run_id}-{kind}-{d.rng.randrange(10**6)}"),
                                "settled"))
    return plan


def wave_out(d: Demo, n: int) -> list[Planned]:
    plan = [Planned(d.txn("ach_settlement_out", d.amount(1, 20)), "settled")
            for _ in range(max(1, n // 20))]
    plan += [Planned(d.txn("ops_expense", d.amount(5, 50)), "account_frozen")
             for _ in range(max(2, n // 100))]
    # 2100 owes only what wave 2's ACH debits put there (at most 60 each): settling out far
    # more is refused by TigerBeetle at the reservation (a liability never goes below zero).
    plan.append(Planned(d.txn("ach_settlement_out", "250000.00"),
                        "pending_refused:exceeds_credits"))
    return plan


async def replays_and_conflicts(d: Demo, earlier: list[Planned]) -> None:
    """Wave 1 again: same content (sequentially and two concurrent copies), and other content
    under used ids (a conflict each), and a kind nobody routes (refused at intake)."""
    sample = d.rng.sample(earlier, max(2, len(earlier) // 100))
    same = [Planned(p.txn) for p in sample]
    await d.submit(same)
    await asyncio.gather(d.submit(same), d.submit(same))
    conflicts = [Planned(p.txn.model_copy(update={"amount": p.txn.amount + Decimal(1)}),
                         "refused") for p in sample[: max(1, len(sample) // 2)]]
    await d.submit(conflicts)
    unknown = {"external_id": f"{d.run_id}-unknown", "kind": "teleport", "amount": "1",
               "currency": "USD", "counterparty": "x"}
    result = await d.client.submit_many([unknown])
    assert [r.field for r in result.refused] == ["kind"], result
    d.track.refused["teleport"] += 1


# ---- the run ------------------------------------------------------------------------------


@dataclass
class DemoStack:
    client: ClearingClient
    activities: ClearingActivities
    tb: BatchedClient
    db: Any  # the run's database


@contextlib.asynccontextmanager
async def clearing_worker(settings: Settings, table: ClearingTable) -> AsyncIterator[DemoStack]:
    """A clearing worker in this process on the settings' database and migration queue."""
    temporal = await connect_temporal(settings)
    tb = await connect_batched(settings)
    mongo = make_mongo_client(settings.mongodb_uri)
    try:
        db = database_of(mongo, settings.mongodb_database)
        activities = await build_clearing_activities(db, tb, tb.limits, table=table)
        await activities.ensure_ready(mirrors=True)
        queue = settings.migration_task_queue
        async with Worker(temporal, task_queue=queue, workflows=[ClearingBatchWorkflow],
                          activities=activities.all(), workflow_runner=workflow_runner(),
                          max_concurrent_activities=50):
            ledger = GeneralLedger(db, chart=table.chart)
            client = ClearingClient(temporal, ClearingStore(db), queue, ledger=ledger,
                                    table=table)
            yield DemoStack(client=client, activities=activities, tb=tb, db=db)
    finally:
        await tb.close()
        await mongo.close()


async def run_terminal_demo(
    settings: Settings, transactions: int, *, console: Console, seed: int | None = None,
) -> TerminalDemoReport:
    assert TRANSACTIONS_MIN <= transactions <= TRANSACTIONS_MAX
    run_id = f"tdemo-{uuid.uuid4().hex[:8]}"
    settings = settings.model_copy(update={
        "mongodb_database": f"walletmig_{run_id}".replace("-", "_"),
        "migration_task_queue": f"{run_id}-clearing"})
    rng = random.Random(seed)
    table = demo_table(rng)
    started = time.monotonic()
    async with clearing_worker(settings, table) as stack:
        ledger = GeneralLedger(stack.db, chart=table.chart)
        for party in BLOCKED:
            await BlockedParties(stack.db).block(party, "demo: sanctions list")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            demo = Demo(stack.client, ledger, stack.tb, rng, run_id, progress)
            await _waves(demo, ledger, transactions)
        seconds = time.monotonic() - started
        report = await _checks(demo, stack.db, ledger, run_id, settings, seconds)
        await _sync_and_rebuild(report, stack, table)
    return report


async def _waves(demo: Demo, ledger: GeneralLedger, transactions: int) -> None:
    first, rules = wave_in(demo, transactions // 2)
    await asyncio.gather(demo.submit(first), demo.submit(rules))
    await demo.drain()
    await replays_and_conflicts(demo, first)
    await demo.submit(wave_move(demo, transactions // 2))
    await demo.drain()
    await ledger.set_status(FROZEN_ACCOUNT, AccountStatus.FROZEN)
    try:
        await demo.submit(wave_out(demo, transactions))
        await demo.drain()
    finally:
        await ledger.set_status(FROZEN_ACCOUNT, AccountStatus.OPEN)


async def _checks(demo: Demo, db: Any, ledger: GeneralLedger, run_id: str,
                  settings: Settings, seconds: float) -> TerminalDemoReport:
    track = demo.track
    settled = {x for x, (state, _) in track.final.items() if state == "settled"}
    entries = await db[GL_ENTRIES].count_documents({})
    ordered = sorted(settled)
    with_entry = 0
    for start in range(0, len(ordered), CHECK_CHUNK):
        outcomes = await demo.client.statuses(ordered[start:start + CHECK_CHUNK])
        with_entry += len(await ledger.existing_entry_ids(
            [o.entry_id for o in outcomes.values() if o.entry_id]))
    trial = await ledger.trial_balance()
    chain = await ledger.verify_chain()
    return TerminalDemoReport(
        run_id=run_id, database=settings.mongodb_database, transactions=len(track.kind_of),
        seconds=round(seconds, 2), throughput_tx_per_s=round(len(track.final) / seconds, 1),
        kinds=_kinds(track), lost_transactions=len(track.open_ids),
        duplicated_entries=max(entries - len(settled), 0),
        settled_without_entry=len(settled) - with_entry,
        trial_balance_zero=trial.zero, chain_ok=chain.ok,
        unexpected_outcomes=len(track.unexpected), unexpected_sample=track.unexpected[:10],
    )


def _kinds(track: Tracker) -> list[KindFigures]:
    figures: dict[str, KindFigures] = {}

    def of(kind: str) -> KindFigures:
        return figures.setdefault(kind, KindFigures(kind=kind))

    for external_id in track.sent_at:
        figure = of(track.kind_of[external_id])
        figure.submitted += 1
        state, reason = track.final.get(external_id, ("open", None))
        if state == "settled":
            figure.settled += 1
        elif state == "rejected":
            figure.rejected += 1
            figure.reasons[str(reason)] = figure.reasons.get(str(reason), 0) + 1
    for kind, count in track.refused.items():
        of(kind).refused += count
    for kind, count in track.replayed.items():
        of(kind).replayed += count
    for kind, values in track.latency_ms.items():
        ordered = sorted(values)
        of(kind).latency_ms_p50 = round(_pct(ordered, 0.5), 1)
        of(kind).latency_ms_p99 = round(_pct(ordered, 0.99), 1)
    return sorted(figures.values(), key=lambda f: f.kind)


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _sync_and_rebuild(report: TerminalDemoReport, stack: DemoStack,
                            table: ClearingTable) -> None:
    """After the drain: the ledger sync must find nothing to add, the terminal reconciliation
    nothing wrong, and a ledger rebuilt from TigerBeetle must equal the one the pipeline
    wrote (activities/terminal_recovery.py)."""
    from activities.terminal_recovery import terminal_ops
    from messages.clearing import TerminalReconcileInput

    ops = terminal_ops(stack.db, stack.tb, limits=stack.tb.limits, table=table)
    await ops.ensure_indexes()
    synced = await ops.sync.run_until_caught_up()
    report.unsynced_after_drain = synced.totals.new_entries + synced.totals.unmatched
    reconciled = await ops.reconciler.run(
        TerminalReconcileInput(run_id=f"{report.run_id}-reconcile", catch_up=False))
    report.reconcile_ok = reconciled.ok
    rebuilt = await ops.rebuild_ledger(drop_existing=True, run_id=f"{report.run_id}-rebuild")
    report.rebuilt_ledger_equal = rebuilt.equal
    if not rebuilt.ok:
        report.notes.append(f"ledger rebuild: trial balance zero {rebuilt.trial_balance_zero}, "
                            f"chain {rebuilt.chain_ok}, reconciliation {rebuilt.reconcile_ok}")


def render(report: TerminalDemoReport) -> Table:
    table = Table(title=f"terminal demo {report.run_id}: {report.transactions} transactions "
                        f"in {report.seconds:.1f} s ({report.throughput_tx_per_s} tx/s)")
    for name in ("kind", "submitted", "settled", "rejected", "refused", "replayed",
                 "p50 ms", "p99 ms", "reasons"):
        table.add_column(name, justify="left" if name in ("kind", "reasons") else "right")
    for f in report.kinds:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(f.reasons.items()))
        table.add_row(f.kind, str(f.submitted), str(f.settled), str(f.rejected), str(f.refused),
                      str(f.replayed), _ms(f.latency_ms_p50), _ms(f.latency_ms_p99), reasons)
    return table


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def check_lines(report: TerminalDemoReport) -> list[str]:
    def mark(good: bool) -> str:
        return "ok" if good else "FAILED"

    def optional(value: object, good: bool) -> str:
        return "n/a" if value is None else f"{value} {mark(good)}"

    lines = [
        f"lost transactions      {report.lost_transactions} {mark(report.lost_transactions == 0)}",
        f"duplicated entries     {report.duplicated_entries} "
        f"{mark(report.duplicated_entries == 0)}",
        f"settled without entry  {report.settled_without_entry} "
        f"{mark(report.settled_without_entry == 0)}",
        f"trial balance zero     {mark(report.trial_balance_zero)}",
        f"hash chain             {mark(report.chain_ok)}",
        f"unexpected outcomes    {report.unexpected_outcomes} "
        f"{mark(report.unexpected_outcomes == 0)}",
        f"unsynced after drain   "
        f"{optional(report.unsynced_after_drain, report.unsynced_after_drain == 0)}",
        f"reconciliation         {optional(report.reconcile_ok, report.reconcile_ok is True)}",
        f"rebuilt ledger equal   "
        f"{optional(report.rebuilt_ledger_equal, report.rebuilt_ledger_equal is True)}",
    ]
    lines += [f"  unexpected: {line}" for line in report.unexpected_sample]
    lines += [f"note: {note}" for note in report.notes]
    lines.append(f"database {report.database}: {'OK' if report.ok else 'FAILED'}")
    return lines
