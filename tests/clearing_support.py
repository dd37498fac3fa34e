"""Helpers for the clearing fault tests (tests/test_clearing_crash.py): a private stack whose
servers may be killed, the pipeline on it, a mixed stream with its expected outcomes, and the
independent checks of the books afterwards.

The checks read TigerBeetle (`lookup_transfers` on the derived ids, `lookup_accounts` on the
mirrors) and the ledger's collections directly; they use the platform only for the derived ids
and the routing table (walletcore), never its reconciliation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import tigerbeetle as tb
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from temporalio.client import Client
from temporalio.worker import Worker

from activities.clearing import build_clearing_activities
from activities.terminal_sync import LedgerSync, TerminalSyncActivities
from messages.clearing import TransactionOutcome
from mongobase.mongo import bson_to_int, make_mongo_client
from stores.clearing_blocklist import BlockedParties
from stores.clearing_store import ClearingStore
from stores.general_ledger import GL_BALANCES, GL_ENTRIES, GeneralLedger
from stores.tb_batches import BatchedClient
from walletclient.clearing_client import ClearingClient
from walletcore.clearing import (
    DEFAULT_CLEARING_TABLE,
    ClearingState,
    ClearingTable,
    ExternalTransaction,
    KindLimits,
    Route,
    pending_transfer_id,
    post_transfer_id,
    void_transfer_id,
)
from walletcore.gl_chart import ChartOfAccounts
from walletcore.journal import NS_PER_S, entry_id_of
from walletmig import devstack
from workers.wallet_worker import workflow_runner
from workflows.clearing import ClearingBatchWorkflow
from workflows.terminal_sync import LedgerSyncWorkflow

Db = AsyncDatabase[dict[str, Any]]
LOOKUP_CHUNK = 2000  # ids per lookup: well under any request limit
SETTLED, REJECTED = ClearingState.SETTLED.value, ClearingState.REJECTED.value
FINAL = frozenset({SETTLED, REJECTED})


# Recorded histories of the terminal's workflows (ClearingBatchWorkflow, LedgerSyncWorkflow):
# test_clearing_crash.py::test_replay_recorded_clearing_history replays each with today's code.
# WALLETMIG_RECORD_HISTORIES=1 records the missing ones (=all: every one), as tests/test_replay.
CLEARING_HISTORIES = Path(__file__).parent / "data" / "clearing_histories"
RECORD_MODE = os.environ.get("WALLETMIG_RECORD_HISTORIES", "")


async def record_history(temporal: Client, workflow_id: str, name: str) -> bool:
    """Save the workflow's history as CLEARING_HISTORIES/<name>.json when recording is on
    (missing ones with RECORD_MODE=1, every one with =all). True when saved."""
    path = CLEARING_HISTORIES / f"{name}.json"
    if not (RECORD_MODE == "all" or (RECORD_MODE == "1" and not path.exists())):
        return False
    handle = temporal.get_workflow_handle(workflow_id)
    history = await handle.fetch_history()
    CLEARING_HISTORIES.mkdir(parents=True, exist_ok=True)
    payload = {"workflow_id": workflow_id, "history": json.loads(history.to_json())}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return True


# ---- a private stack -----------------------------------------------------------------------


@contextlib.contextmanager
def private_stack(components: Sequence[str], prefix: str) -> Iterator[devstack.StackConfig]:
    """`components` of a stack of the caller's own (never the session's shared servers: these
    get killed), durable as `walletmig dev up` runs them; state kept on failure."""
    state_dir = Path(tempfile.mkdtemp(prefix=f"walletmig-{prefix}-"))
    config = devstack.StackConfig.with_free_ports(state_dir, ready_timeout_s=120)
    ok = False
    try:
        for result in devstack.up(config, list(components)):
            assert result.state == "up", result
        yield config
        ok = True
    finally:
        devstack.down(config)
        if ok:
            shutil.rmtree(state_dir, ignore_errors=True)
        else:
            print(f"\n{prefix}: stack state and server logs kept in {state_dir}")


async def restart(stack: devstack.StackConfig, name: str) -> float:
    """Start `name` again on the same port and data dir; returns the seconds it took."""
    started = time.monotonic()
    (result,) = await asyncio.to_thread(devstack.up, stack, [name])
    assert result.state == "up", result
    return time.monotonic() - started


# ---- the pipeline on it ----------------------------------------------------------------------


SHORT_HOLD = "crash_short_hold"  # a 1 s hold: never enough for the checks, it expires
MID_HOLD = "crash_mid_hold"  # enough for the checks, not for an outage of TigerBeetle
# Each test using it waits for it to expire (an outage of MID_HOLD_S + 2 s), so it is kept
# short for the suite's time (was 10 s).
MID_HOLD_S = 6
LONG_HOLD = "crash_long_hold"  # time for the checks after a MongoDB outage of MID_HOLD_S
LONG_HOLD_S = 40


def private_table() -> ClearingTable:
    """The default routes on ledgers of the caller's own (the mirrors start from zero, so
    their balances must equal this run's ledger exactly), and the SHORT, MID and LONG holds."""
    usd = random.randrange(10_000, 2**31)
    chart = ChartOfAccounts(accounts=DEFAULT_CLEARING_TABLE.chart.accounts,
                            ledgers={"USD": usd, "USDC": usd + 1})
    limits = {"USD": KindLimits(amount_min=Decimal("0.01"), amount_max=Decimal("1000"),
                                velocity_count_max=1000, velocity_amount_max=Decimal("100000"))}
    short = Route(kind=SHORT_HOLD, code=2911, debit_account=6100, credit_account=2300,
                  pending_timeout_s=1, limits=limits)
    mid = Route(kind=MID_HOLD, code=2912, debit_account=6100, credit_account=2300,
                pending_timeout_s=MID_HOLD_S, limits=limits)
    long = Route(kind=LONG_HOLD, code=2913, debit_account=6100, credit_account=2300,
                 pending_timeout_s=LONG_HOLD_S, limits=limits)
    return ClearingTable(chart=chart,
                         routes=(*DEFAULT_CLEARING_TABLE.routes, short, mid, long))


@dataclass
class Terminal:
    client: ClearingClient
    db: Db
    tb: BatchedClient
    table: ClearingTable
    queue: str

    @property
    def ledger(self) -> GeneralLedger:
        return GeneralLedger(self.db, chart=self.table.chart)


@contextlib.asynccontextmanager
async def terminal(temporal: Client, mongodb_uri: str, tb: BatchedClient,
                   blocked: Sequence[str] = ()) -> AsyncIterator[Terminal]:
    """The clearing worker in this process over a fresh database, and its client."""
    mongo: AsyncMongoClient[dict[str, Any]] = make_mongo_client(mongodb_uri)
    db = mongo[f"clearing_crash_{uuid.uuid4().hex[:8]}"]
    table = private_table()
    try:
        activities = await build_clearing_activities(db, tb, tb.limits, table=table)
        for party in blocked:
            await BlockedParties(db).block(party, "sanctions")
        queue = f"clearing-crash-{uuid.uuid4().hex[:8]}"
        ledger = GeneralLedger(db, chart=table.chart)
        # The catch-up sync too (what the Temporal Schedule starts): it resumes batches left
        # `received`, on its own task queue, like the migration worker serves both.
        sync = LedgerSync(tb, ledger, ClearingStore(db), table=table)
        async with Worker(temporal, task_queue=queue,
                          workflows=[ClearingBatchWorkflow, LedgerSyncWorkflow],
                          activities=[*activities.all(), *TerminalSyncActivities(sync).all()],
                          workflow_runner=workflow_runner()):
            client = ClearingClient(temporal, ClearingStore(db), queue, ledger=ledger,
                                    table=table)
            yield Terminal(client, db, tb, table, queue)
    finally:
        await mongo.close()


# ---- the stream ------------------------------------------------------------------------------

# Kinds that need no funds (debit an asset or an expense, credit a liability or equity).
FUNDED_FREE = (("ach_credit_in", "USD"), ("stripe_settlement", "USD"),
               ("usdc_vault_deposit", "USDC"), ("ops_expense", "USD"), ("ops_expense", "USDC"),
               ("capital_contribution", "USD"))
CYCLE = 20  # one of each refusal per CYCLE transactions


@dataclass
class Stream:
    """Transactions and what each must end as: "settled" or the rejection reason."""

    run: str
    blocked_party: str
    expected: dict[str, str] = field(default_factory=dict)
    txns: dict[str, ExternalTransaction] = field(default_factory=dict)
    # An end as good as the expected one, by id (check_books accepts either).
    also: dict[str, str] = field(default_factory=dict)

    def batch(self, index: int, size: int) -> list[ExternalTransaction]:
        """`size` (a multiple of CYCLE) transactions: mostly settling kinds, and per CYCLE an
        amount over the limit, a blocked party, a reservation beyond the funds, a duplicate
        reference (its first holder settles) and a hold that expires."""
        assert size % CYCLE == 0
        out: list[ExternalTransaction] = []
        for n in range(size):
            x = f"{self.run}-{index}-{n}"
            party = f"p-{x}"
            slot = n % CYCLE
            kind, currency = FUNDED_FREE[n % len(FUNDED_FREE)]
            amount = Decimal(f"{1 + n % 9}.{n % 100:02d}")
            fields: dict[str, Any] = {}
            expect = SETTLED
            if slot == 3:
                kind, currency, amount, expect = "ach_credit_in", "USD", Decimal("30000"), \
                    "amount_above_max"
            elif slot == 7:
                kind, currency, party, expect = "ach_credit_in", "USD", self.blocked_party, \
                    "blocked_counterparty"
            elif slot == 11:  # 2180 holds far less USDC than this: TigerBeetle refuses it
                kind, currency, amount, expect = "usdc_vault_withdrawal", "USDC", \
                    Decimal("250000"), "pending_refused:exceeds_credits"
            elif slot == 19:  # its hold expires: reported, never posted
                kind, currency, expect = SHORT_HOLD, "USD", "expired"
            elif slot in (15, 16):
                kind, currency, party = "ach_credit_in", "USD", f"p-{self.run}-{index}-{n - slot}"
                fields["reference"] = f"TRACE-{self.run}-{index}-{n - slot}"
                expect = SETTLED if slot == 15 else "duplicate_reference"
            txn = ExternalTransaction(external_id=x, kind=kind, amount=amount,
                                      currency=currency, counterparty=party, **fields)
            self.expected[x] = expect
            self.txns[x] = txn
            out.append(txn)
        return out


@dataclass
class Submitted:
    """What the callers were told: accepted ids, and errors seen while a server was down."""

    accepted: list[str] = field(default_factory=list)
    batches: dict[str, list[str]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    attempts: int = 0


async def submit_until_recorded(
    term: Terminal, batch: list[ExternalTransaction], out: Submitted, *,
    timeout_s: float, pause_s: float = 0.5,
) -> str:
    """The caller's contract: resend the same batch (same batch id) until it is recorded.
    Accepted: recorded now, or by an earlier attempt whose answer was lost (replayed in the
    batch's own id)."""
    batch_id = f"b-{uuid.uuid4().hex}"
    deadline = time.monotonic() + timeout_s
    while True:
        out.attempts += 1
        try:
            result = await term.client.submit_many(batch, batch_id=batch_id)
            break
        except Exception as err:  # the store is down: any error, then resend the same
            out.errors[type(err).__name__] += 1
            assert time.monotonic() < deadline, f"batch {batch_id} not recorded: {err!r}"
            await asyncio.sleep(pause_s)
    assert not result.refused, result.refused
    mine = [*result.accepted, *(r.external_id for r in result.replayed
                                if r.batch_id == batch_id)]
    assert sorted(mine) == sorted(t.external_id for t in batch), result
    out.accepted.extend(mine)
    out.batches[batch_id] = mine
    return batch_id


async def open_batches(term: Terminal, ids: Sequence[str]) -> dict[str, list[str]]:
    """batch id -> its ids not final yet (the batches in flight)."""
    outcomes = await term.client.statuses(list(ids))
    found: dict[str, list[str]] = defaultdict(list)
    for x, o in outcomes.items():
        if o.state not in FINAL:
            found[o.batch_id or "?"].append(x)
    return dict(found)


async def stages(term: Terminal, batch_ids: Sequence[str]) -> Counter[str]:
    """Where each batch's workflow is (pending, checks, post_void, settle, ...)."""
    seen: Counter[str] = Counter()
    for batch_id in batch_ids:
        try:
            seen[await term.client.stage(batch_id)] += 1
        except Exception as err:  # not started yet, or the query timed out
            seen[f"unknown:{type(err).__name__}"] += 1
    return seen


async def reach_stage(term: Terminal, batch_id: str, wanted: str, timeout_s: float) -> str:
    """Poll the batch workflow's stage until it is `wanted` (or later, or `timeout_s`
    passed); returns the stage it was last seen in."""
    order = ("received", "pending", "checks", "post_void", "expiring", "settle", "done")
    assert wanted in order
    deadline = time.monotonic() + timeout_s
    stage = "received"
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # not started yet
            stage = await term.client.stage(batch_id)
        if order.index(stage) >= order.index(wanted):
            break
        await asyncio.sleep(0.01)
    return stage


async def open_holds(tb_client: BatchedClient, ids: Sequence[str]) -> int:
    """How many of `ids` have a hold in TigerBeetle with neither its post nor its void."""
    found = set(await lookup(tb_client, [f(x) for x in ids for f in
                                         (pending_transfer_id, post_transfer_id,
                                          void_transfer_id)]))
    return sum(1 for x in ids if pending_transfer_id(x) in found
               and post_transfer_id(x) not in found and void_transfer_id(x) not in found)


async def wait_holds(term: Terminal, ids: Sequence[str], timeout_s: float) -> float:
    """Poll TigerBeetle until every id's hold exists (the pending step has read its batch
    and reserved); returns the seconds waited."""
    started = time.monotonic()
    wanted = [pending_transfer_id(x) for x in ids]
    while len(await lookup(term.tb, wanted)) < len(wanted):
        assert time.monotonic() - started < timeout_s, "the holds were not created"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def wait_final(term: Terminal, ids: Sequence[str], timeout_s: float
                     ) -> dict[str, TransactionOutcome]:
    outcomes = await term.client.wait(list(ids), timeout_s)
    open_ = Counter(o.state for o in outcomes.values() if o.state not in FINAL)
    assert len(outcomes) == len(set(ids)), (len(outcomes), len(set(ids)))
    assert not open_, f"not final after {timeout_s} s: {open_}"
    return outcomes


# ---- independent checks ----------------------------------------------------------------------


async def lookup(tb_client: BatchedClient, ids: Sequence[int]) -> dict[int, tb.Transfer]:
    found: dict[int, tb.Transfer] = {}
    for start in range(0, len(ids), LOOKUP_CHUNK):
        for t in await tb_client.lookup_transfers(list(ids[start:start + LOOKUP_CHUNK])):
            assert t.id not in found, f"transfer {t.id:x} returned twice"
            found[t.id] = t
    return found


@dataclass
class BooksReport:
    settled: int
    rejected: Counter[str]
    entries: int
    posted_transfers: int


async def check_books(term: Terminal, stream: Stream, accepted: Sequence[str],
                      outcomes: dict[str, TransactionOutcome]) -> BooksReport:
    """Every accepted transaction ended as expected, once, on both sides; the books balance
    and equal TigerBeetle's mirrors; no hold is left."""
    assert len(set(accepted)) == len(accepted), "an id accepted twice"
    wrong = {x: (stream.expected[x], o.state, o.reason) for x, o in outcomes.items()
             if (o.state if o.state == SETTLED else o.reason)
             not in (stream.expected[x], stream.also.get(x))}
    assert not wrong, f"{len(wrong)} unexpected outcomes, e.g. {list(wrong.items())[:5]}"
    settled = sorted(x for x, o in outcomes.items() if o.state == SETTLED)
    for x in settled:
        assert outcomes[x].entry_id == entry_id_of(post_transfer_id(x)), outcomes[x]
    posts = await _check_transfers(term, stream, outcomes)
    entries = await _check_entries(term, stream, settled, posts)
    await _check_balances(term, entries)
    trial = await term.ledger.trial_balance()
    assert trial.zero, trial
    chain = await term.ledger.verify_chain()
    assert chain.ok, chain
    return BooksReport(settled=len(settled), entries=len(entries), posted_transfers=len(posts),
                       rejected=Counter(o.reason or "?" for o in outcomes.values()
                                        if o.state == REJECTED))


async def _check_transfers(term: Terminal, stream: Stream,
                           outcomes: dict[str, TransactionOutcome]) -> dict[int, tb.Transfer]:
    """Per transaction in TigerBeetle: settled = hold + post (full amount), no void; refused
    by a check = hold + void, no post; refused by TigerBeetle = nothing; expired = a hold past
    its timeout, nothing else. Returns the post transfers by id."""
    ids = list(outcomes)
    derived = [f(x) for x in ids
               for f in (pending_transfer_id, post_transfer_id, void_transfer_id)]
    found = await lookup(term.tb, derived)
    now_ns = time.time_ns()
    for x in ids:
        o, txn = outcomes[x], stream.txns[x]
        hold = found.get(pending_transfer_id(x))
        post = found.get(post_transfer_id(x))
        void = found.get(void_transfer_id(x))
        if o.state == SETTLED:
            assert hold is not None and post is not None and void is None, x
            assert post.pending_id == hold.id and post.amount == hold.amount == txn.amount_minor
        elif (o.reason or "").startswith("pending_refused"):
            assert hold is None and post is None and void is None, x
        elif o.reason == "expired":
            assert hold is not None and post is None and void is None, x
            assert hold.timestamp + hold.timeout * NS_PER_S < now_ns, f"{x} reported early"
        else:
            assert hold is not None and void is not None and post is None, (x, o.reason)
    return {t.id: t for t in found.values() if t.id in {post_transfer_id(x) for x in ids}}


async def _check_entries(term: Terminal, stream: Stream, settled: list[str],
                         posts: dict[int, tb.Transfer]) -> list[dict[str, Any]]:
    """One entry per posted transfer and per settled transaction, none doubled, each
    balanced and on its route's accounts, stamped with its post's TigerBeetle timestamp."""
    entries = await term.db[GL_ENTRIES].find({}).to_list(None)
    per_external = Counter(e["external_id"] for e in entries)
    doubled = [x for x, n in per_external.items() if n > 1]
    assert not doubled, f"doubled entries: {doubled[:5]}"
    assert sorted(per_external) == settled
    assert {int(e["_id"], 16) for e in entries} == set(posts), "an entry without its post"
    for e in entries:
        txn = stream.txns[e["external_id"]]
        route = term.table.route(txn.kind)
        post = posts[int(e["_id"], 16)]
        assert bson_to_int(e["tb_timestamp"]) == post.timestamp, e["_id"]
        lines = [(ln["account"], ln["currency"], ln["debit_minor"], ln["credit_minor"])
                 for ln in e["lines"]]
        amount = txn.amount_minor
        assert sorted(lines) == sorted([(route.debit_account, txn.currency, amount, 0),
                                        (route.credit_account, txn.currency, 0, amount)]), e
    return entries


async def _check_balances(term: Terminal, entries: list[dict[str, Any]]) -> None:
    """Trial balance from the entries' lines (zero per currency); the stored balances equal
    those sums; every mirror's posted balances equal its GL account's, nothing pending."""
    sums: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0])
    per_currency: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in entries:
        for ln in e["lines"]:
            key = (int(ln["account"]), ln["currency"])
            for side, name in enumerate(("debit_minor", "credit_minor")):
                sums[key][side] += int(ln[name])
                per_currency[ln["currency"]][side] += int(ln[name])
    unbalanced = {c: v for c, v in per_currency.items() if v[0] != v[1]}
    assert not unbalanced, f"trial balance not zero: {unbalanced}"
    stored = {(int(d["account"]), d["currency"]): [bson_to_int(d.get("debits_minor", 0)),
                                                   bson_to_int(d.get("credits_minor", 0))]
              for d in await term.db[GL_BALANCES].find({}).to_list(None)}
    moved = {k: v for k, v in stored.items() if v != [0, 0]}
    assert moved == dict(sums), "gl_balances differ from the entries"
    mirrors = term.table.chart.mirrors()
    accounts = {a.id: a for a in await term.tb.lookup_accounts([m.id for m in mirrors])}
    assert len(accounts) == len(mirrors)
    for m in mirrors:
        a = accounts[m.id]
        want = sums.get((m.gl_number, m.currency), [0, 0])
        assert [a.debits_posted, a.credits_posted] == want, (m.gl_number, m.currency)
        assert a.debits_pending == a.credits_pending == 0, f"hold left on {m.gl_number}"


async def records_caught_up(db: Db, total: int, settled: int,
                            timeout_s: float = 30.0) -> dict[ClearingState, int]:
    """The records' final states follow the entries (written right after them): waits until
    `total` are final, then `settled` of them must be settled."""
    store = ClearingStore(db)
    deadline = time.monotonic() + timeout_s
    while True:
        counts = await store.count_by_state()
        done = counts[ClearingState.SETTLED] + counts[ClearingState.REJECTED]
        if done == total or time.monotonic() > deadline:
            assert counts[ClearingState.SETTLED] == settled, counts
            assert done == total, counts
            return counts
        await asyncio.sleep(0.3)
