"""The clearing pipeline end to end on the real stack: ClearingClient -> ClearingBatchWorkflow
-> ClearingActivities -> TigerBeetle (emulator) and the general ledger (MongoDB).

A worker of the module's own runs the workflow and activities in this process, over a
database and terminal ledgers of the module's own and a routing table with three test kinds
beside the defaults:
`test_hold` (a 1 s hold: the checks never get their 5 s budget, the hold expires), and
`test_frozen` / `test_closed` on accounts of their own (their status is set per database).
The 32 KiB emulator and the kill -9 run their own worker and database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from clearing_support import FINAL, lookup, records_caught_up
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from temporalio.client import Client
from temporalio.worker import Worker
from wallet_support import eventually

from activities.clearing import ClearingActivities, build_clearing_activities
from messages.clearing import PostVoidBatch, StepInput, TransactionOutcome, VoidItem
from messages.clearing_pipeline import FinalizeBatch
from stores.bundle import connect_batched
from stores.clearing_blocklist import BlockedParties
from stores.clearing_store import ClearingStore
from stores.general_ledger import GL_ENTRIES, GeneralLedger
from stores.tb_batches import BatchedClient
from tb_emulator.server import EmulatorProcess
from walletclient.clearing_client import ClearingClient
from walletconfig.settings import ENVIRONMENT, Settings
from walletcore.clearing import (
    DEFAULT_CLEARING_TABLE,
    ClearingTable,
    ExternalTransaction,
    KindLimits,
    Route,
    pending_transfer_id,
    post_transfer_id,
    void_transfer_id,
)
from walletcore.errors import ConflictError
from walletcore.gl_chart import (
    DEFAULT_CHART,
    AccountStatus,
    AccountType,
    ChartOfAccounts,
    GLAccount,
)
from walletcore.journal import entry_id_of
from workers.wallet_worker import workflow_runner
from workflows.clearing import ClearingBatchWorkflow

Db = AsyncDatabase[dict[str, Any]]
REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 60.0
FROZEN_ACCOUNT = 6910
CLOSED_ACCOUNT = 6900


def _test_table() -> ClearingTable:
    extra = (
        GLAccount(number=CLOSED_ACCOUNT, name="Test-Closed", type=AccountType.EXPENSE,
                  currencies=("USD",)),
        GLAccount(number=FROZEN_ACCOUNT, name="Test-Frozen", type=AccountType.EXPENSE,
                  currencies=("USD",)),
    )
    usd = random.randrange(10_000, 2**31)  # ledgers of the module's own: mirrors from zero
    chart = ChartOfAccounts(accounts=(*DEFAULT_CHART.accounts, *extra),
                            ledgers={"USD": usd, "USDC": usd + 1})
    limits = {"USD": KindLimits(amount_min=Decimal("0.01"), amount_max=Decimal("1000"),
                                velocity_count_max=1000, velocity_amount_max=Decimal("100000"))}
    routes = (
        Route(kind="test_hold", code=2901, debit_account=6100, credit_account=2300,
              pending_timeout_s=1, limits=limits),
        Route(kind="test_frozen", code=2902, debit_account=FROZEN_ACCOUNT, credit_account=2300,
              pending_timeout_s=300, limits=limits),
        Route(kind="test_closed", code=2903, debit_account=CLOSED_ACCOUNT, credit_account=2300,
              pending_timeout_s=300, limits=limits),
    )
    return ClearingTable(chart=chart, routes=(*DEFAULT_CLEARING_TABLE.routes, *routes))


TABLE = _test_table()


class Pipeline:
    """A client, its stores and the module's worker."""

    def __init__(self, client: ClearingClient, db: Db, tb_client: BatchedClient,
                 activities: ClearingActivities) -> None:
        self.client = client
        self.db = db
        self.tb = tb_client
        self.activities = activities
        self.clearing = ClearingStore(db)
        self.ledger = GeneralLedger(db, chart=activities.table.chart)
        self.blocked = BlockedParties(db)

    async def run(self, txns: Sequence[ExternalTransaction]) -> dict[str, TransactionOutcome]:
        """Submit one batch and wait for every accepted or replayed id."""
        result = await self.client.submit_many(txns)
        assert not result.refused, result.refused
        outcomes = await self.client.wait([t.external_id for t in txns], WAIT_S)
        open_ = {x: o.state for x, o in outcomes.items() if o.state not in ("settled", "rejected")}
        assert not open_, f"not final after {WAIT_S} s: {open_}"
        return outcomes


@contextlib.asynccontextmanager
async def pipeline(
    temporal: Client, db: Db, tb_client: BatchedClient, table: ClearingTable
) -> AsyncIterator[Pipeline]:
    activities = await build_clearing_activities(db, tb_client, tb_client.limits, table=table)
    queue = f"clearing-{uuid.uuid4().hex[:8]}"
    async with Worker(temporal, task_queue=queue, workflows=[ClearingBatchWorkflow],
                      activities=activities.all(), workflow_runner=workflow_runner()):
        ledger = GeneralLedger(db, chart=table.chart)
        client = ClearingClient(temporal, ClearingStore(db), queue, ledger=ledger, table=table)
        yield Pipeline(client, db, tb_client, activities)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pipe(
    temporal_client: Client, mongo_client: AsyncMongoClient[dict[str, Any]], settings: Settings,
) -> AsyncIterator[Pipeline]:
    db = mongo_client[f"walletmig_clearing_pipe_{uuid.uuid4().hex[:8]}"]
    tb_client = await connect_batched(settings)
    try:
        async with pipeline(temporal_client, db, tb_client, TABLE) as p:
            await p.ledger.set_status(FROZEN_ACCOUNT, AccountStatus.FROZEN)
            await p.ledger.set_status(CLOSED_ACCOUNT, AccountStatus.CLOSED)
            yield p
    finally:
        await tb_client.close()
        await mongo_client.drop_database(db.name)


@pytest.fixture
def txn(unique_id: Callable[..., str]) -> Callable[..., ExternalTransaction]:
    def make(kind: str, amount: str, currency: str = "USD", **fields: Any) -> ExternalTransaction:
        fields.setdefault("counterparty", unique_id("party"))
        return ExternalTransaction(external_id=fields.pop("external_id", unique_id("ext")),
                                   kind=kind, amount=Decimal(amount), currency=currency, **fields)

    return make


async def _transfers(tb_client: BatchedClient, ids: list[int]) -> set[int]:
    return {t.id for t in await tb_client.lookup_transfers(ids)}


async def assert_settled(p: Pipeline, outcomes: dict[str, TransactionOutcome]) -> None:
    """Settled with its entry; the entry exists once and mirrors the post transfer."""
    for external_id, outcome in outcomes.items():
        assert outcome.state == "settled", (external_id, outcome)
        assert outcome.entry_id == entry_id_of(post_transfer_id(external_id))
        chained = await p.ledger.get_entry(outcome.entry_id)
        assert chained is not None and chained.entry.external_id == external_id
    posts = [post_transfer_id(x) for x in outcomes]
    found = {t.id: t for t in await p.tb.lookup_transfers(posts)}
    assert set(found) == set(posts)
    for external_id in outcomes:
        chained = await p.ledger.get_entry(entry_id_of(post_transfer_id(external_id)))
        assert chained is not None
        assert chained.entry.tb_timestamp == found[post_transfer_id(external_id)].timestamp


async def assert_rejected(p: Pipeline, outcome: TransactionOutcome, reason: str) -> None:
    """Rejected with `reason`; no entry; the hold was never posted."""
    assert (outcome.state, outcome.reason) == ("rejected", reason), outcome
    external_id = outcome.external_id
    assert outcome.entry_id is None
    assert await p.ledger.get_entry(entry_id_of(post_transfer_id(external_id))) is None
    assert post_transfer_id(external_id) not in await _transfers(
        p.tb, [post_transfer_id(external_id)])


async def assert_books_balanced(p: Pipeline) -> None:
    trial = await p.ledger.trial_balance()
    assert trial.zero, trial
    chain = await p.ledger.verify_chain()
    assert chain.ok, chain


# ---- the happy path ------------------------------------------------------------------------


async def test_every_kind_settles_with_its_entry(
    pipe: Pipeline, txn: Callable[..., ExternalTransaction]
) -> None:
    """Three waves, because a hold counts only posted funds: money comes in first, then moves
    on, then leaves."""
    funding = [
        txn("capital_contribution", "50000.00"), txn("ach_credit_in", "2500.00"),
        txn("stripe_settlement", "1200.50"), txn("usdc_vault_deposit", "1000.000001", "USDC"),
        txn("ops_expense", "99.99"), txn("ops_expense", "5.000001", "USDC"),
    ]
    moving = [
        txn("ach_settlement_in", "2000.00"), txn("ach_debit_out", "300.00"),
        txn("usdc_vault_withdrawal", "250.5", "USDC"), txn("payroll_run", "1000.00"),
    ]
    leaving = [txn("ach_settlement_out", "300.00")]
    for wave in (funding, moving, leaving):
        await assert_settled(pipe, await pipe.run(wave))
    kinds = {t.kind for t in (*funding, *moving, *leaving)}
    assert kinds == {r.kind for r in DEFAULT_CLEARING_TABLE.routes}
    await assert_books_balanced(pipe)
    statement = await pipe.ledger.statement(2180, "USDC")
    assert {line.external_id for line in statement.lines} >= {
        funding[3].external_id, moving[2].external_id}


# ---- rejections ----------------------------------------------------------------------------


async def test_each_check_rejects_with_its_reason_and_no_entry(
    pipe: Pipeline, txn: Callable[..., ExternalTransaction], unique_id: Callable[..., str]
) -> None:
    blocked = unique_id("Evil-Bank")
    await pipe.blocked.block(blocked.lower(), "sanctions")
    burst = unique_id("burst")
    heavy = unique_id("heavy")
    ref_party = unique_id("refs")
    cases: list[tuple[ExternalTransaction, str | None]] = [
        (txn("ach_credit_in", "25000.01"), "amount_above_max"),
        (txn("ach_credit_in", "10.00", counterparty=blocked.upper()), "blocked_counterparty"),
        (txn("test_frozen", "10.00"), "account_frozen"),
        (txn("test_closed", "10.00"), "account_closed"),
        (txn("ach_credit_in", "1.00", counterparty=ref_party, reference="TRACE-1"), None),
        (txn("ach_credit_in", "2.00", counterparty=ref_party, reference="TRACE-1"),
         "duplicate_reference"),
        # capital_contribution: 10 per counterparty and window; the 11th is one too many.
        *[(txn("capital_contribution", "1.00", counterparty=burst), None) for _ in range(10)],
        (txn("capital_contribution", "1.00", counterparty=burst), "velocity_count_exceeded"),
        # ach_credit_in: 100000 per counterparty and window.
        *[(txn("ach_credit_in", "25000.00", counterparty=heavy), None) for _ in range(4)],
        (txn("ach_credit_in", "0.01", counterparty=heavy), "velocity_amount_exceeded"),
    ]
    outcomes = await pipe.run([t for t, _ in cases])
    for t, reason in cases:
        if reason is None:
            assert outcomes[t.external_id].state == "settled", outcomes[t.external_id]
        else:
            await assert_rejected(pipe, outcomes[t.external_id], reason)
            voids = await _transfers(pipe.tb, [void_transfer_id(t.external_id)])
            assert voids == {void_transfer_id(t.external_id)}, "the hold is voided"
    await assert_books_balanced(pipe)


async def test_a_reservation_beyond_the_funds_is_refused(
    pipe: Pipeline, txn: Callable[..., ExternalTransaction]
) -> None:
    """Balances never go below zero: a withdrawal larger than the deposits is refused by
    TigerBeetle at the pending step (no hold, no entry). The module's ledgers are its own."""
    owed = (await pipe.tb.lookup_accounts([TABLE.chart.mirror(2180, "USDC").id]))[0]
    too_much = txn("usdc_vault_withdrawal", "250000", "USDC")
    assert owed.credits_posted - owed.debits_posted < too_much.amount_minor
    outcome = (await pipe.run([too_much]))[too_much.external_id]
    # 2180 is debited (a liability may not go below zero) before 1010 is credited.
    await assert_rejected(pipe, outcome, "pending_refused:exceeds_credits")
    assert not await _transfers(pipe.tb, [pending_transfer_id(too_much.external_id)])


async def test_a_hold_the_checks_cannot_decide_in_time_expires(
    pipe: Pipeline, txn: Callable[..., ExternalTransaction]
) -> None:
    held = txn("test_hold", "12.00")
    other = txn("ach_credit_in", "12.00")
    outcomes = await pipe.run([held, other])
    await assert_rejected(pipe, outcomes[held.external_id], "expired")
    assert outcomes[other.external_id].state == "settled"
    assert await _transfers(pipe.tb, [pending_transfer_id(held.external_id)])
    assert not await _transfers(pipe.tb, [void_transfer_id(held.external_id)])
    await assert_books_balanced(pipe)


# ---- duplicates ----------------------------------------------------------------------------


async def test_the_same_external_id_twice_is_one_transfer_and_one_entry(
    pipe: Pipeline, txn: Callable[..., ExternalTransaction]
) -> None:
    first = txn("ach_credit_in", "7.00", reference="R-1")
    outcome = (await pipe.run([first]))[first.external_id]
    again = await pipe.client.submit_many([first.model_copy(update={"amount": Decimal("7")})])
    assert again.accepted == [] and [r.external_id for r in again.replayed] == [
        first.external_id]
    assert (await pipe.client.wait([first.external_id], 5))[first.external_id] == outcome
    # Concurrently, in separate batches and twice within one batch.
    twin = txn("stripe_settlement", "3.00")
    results = await asyncio.gather(*(pipe.client.submit_many([twin, twin]) for _ in range(4)))
    assert sorted(len(r.accepted) for r in results) == [0, 0, 0, 1]
    assert all(not r.refused for r in results)
    await assert_settled(pipe, await pipe.client.wait([twin.external_id], WAIT_S))
    entries = pipe.db[GL_ENTRIES]
    for external_id in (first.external_id, twin.external_id):
        assert await entries.count_documents({"external_id": external_id}) == 1
    # Other content under a used id: a conflict, named; nothing changes.
    changed = first.model_copy(update={"amount": Decimal("8.00")})
    refused = await pipe.client.submit_many([changed])
    assert [(r.external_id, r.error, r.field) for r in refused.refused] == [
        (first.external_id, "ConflictError", "external_id")]
    with pytest.raises(ConflictError):
        await pipe.client.submit(changed)
    assert await pipe.client.status(first.external_id) == outcome


async def test_bad_input_is_refused_before_recording(
    pipe: Pipeline, txn: Callable[..., ExternalTransaction], unique_id: Callable[..., str]
) -> None:
    good = txn("ach_credit_in", "1.00")
    result = await pipe.client.submit_many([
        good,
        {"external_id": unique_id("x"), "kind": "teleport", "amount": "1", "currency": "USD",
         "counterparty": "p"},
        {"external_id": unique_id("x"), "kind": "ach_credit_in", "amount": "1.001",
         "currency": "USD", "counterparty": "p"},
        {"external_id": unique_id("x"), "kind": "ach_credit_in", "amount": "1",
         "currency": "USDC", "counterparty": "p"},
    ])
    assert result.accepted == [good.external_id]
    assert [(r.error, r.field) for r in result.refused] == [
        ("InvalidInputError", "kind"), ("InvalidAmountError", "amount"),
        ("InvalidInputError", "currency")]
    for refused in result.refused:
        assert await pipe.client.status(refused.external_id) is None


# ---- a small request limit -----------------------------------------------------------------


@pytest.fixture
def small_emulator(tmp_path: Path) -> Iterator[EmulatorProcess]:
    """An emulator of the test's own started with --development (32 KiB: 253 creates)."""
    process = EmulatorProcess(str(tmp_path / "data.tbemu"), development=True).start()
    try:
        yield process
    finally:
        process.kill()
        shutil.rmtree(tmp_path, ignore_errors=True)


async def test_a_batch_larger_than_one_request_is_chunked(
    temporal_client: Client, mongo_client: AsyncMongoClient[dict[str, Any]], settings: Settings,
    small_emulator: EmulatorProcess, txn: Callable[..., ExternalTransaction],
) -> None:
    db = mongo_client[f"walletmig_clearing_small_{uuid.uuid4().hex[:8]}"]
    tb_client = await connect_batched(settings, tb_addresses=f"tbemu://{small_emulator.address}")
    assert tb_client.limits.create_batch_max == 253
    try:
        async with pipeline(temporal_client, db, tb_client, DEFAULT_CLEARING_TABLE) as p:
            batch = [txn("ach_credit_in", f"{1 + n % 7}.25") for n in range(600)]
            batch[100] = txn("ach_credit_in", "30000")  # one refusal among them
            outcomes = await p.run(batch)
            refused = outcomes.pop(batch[100].external_id)
            await assert_rejected(p, refused, "amount_above_max")
            await assert_settled(p, outcomes)
            await assert_books_balanced(p)
            assert await p.db[GL_ENTRIES].count_documents({}) == 599
    finally:
        await tb_client.close()
        await mongo_client.drop_database(db.name)


# ---- kill -9 of the worker -----------------------------------------------------------------

CRASH_BATCHES = 12
CRASH_BATCH_SIZE = 150
CRASH_SUBMITTERS = 3
# A bound: the killed worker's ledger transaction holds the head until the server reaps it (the
# short-transaction MongoDB: 5 s; the bound also covers a server's default 60 s).
CRASH_WAIT_S = 150.0
# Kill attempts: each once a transaction is held in TigerBeetle and not final (its batch's
# workflow between its pending and settle steps); one whose work in flight ended between that
# look and the kill (a quick host) is followed by another kill of the restarted worker.
KILL_ATTEMPTS = 3
IN_FLIGHT_WAIT_S = 60.0  # for the stream to be under way with a transaction held, not final
RESTART_DELAY_S = 1.0


def _crash_env(settings: Settings, database: str, queue: str) -> dict[str, str]:
    values = settings.model_dump()
    env = dict(os.environ)
    env.update({name: str(values[field]) for name, (field, _) in ENVIRONMENT.items()})
    env.update({"MONGODB_DATABASE": database, "MIGRATION_TASK_QUEUE": queue,
                "WALLET_TASK_QUEUE": f"{queue}-wallet"})
    return env


def _start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "walletmig", "worker", "--log-level", "WARNING"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _in_flight(client: ClearingClient, tb_client: BatchedClient, ids: Sequence[str]
                     ) -> tuple[int, list[str]]:
    """(how many of `ids` are final, the open ones with a hold in TigerBeetle). An open
    transaction with a hold is one whose batch's workflow passed its pending step and not yet
    its settle step: work in flight on the worker. Read while no worker runs (right after a
    kill), it is what the killed worker left half done."""
    outcomes = await client.wait(list(ids), 0)
    open_ids = [x for x, o in outcomes.items() if o.state not in FINAL]
    held = await lookup(tb_client, [pending_transfer_id(x) for x in open_ids])
    return (len(outcomes) - len(open_ids),
            [x for x in open_ids if pending_transfer_id(x) in held])


@pytest.mark.slow
async def test_kill_9_of_the_worker_mid_stream(
    temporal_client: Client, short_txn_mongo_client: AsyncMongoClient[dict[str, Any]],
    short_txn_settings: Settings, tmp_path: Path, txn: Callable[..., ExternalTransaction],
    unique_id: Callable[..., str],
) -> None:
    """`walletmig worker` (the migration queue serves the clearing workflow) is SIGKILLed in
    the middle of a stream of batches (asserted: transactions it held in TigerBeetle were not
    final at the kill) and restarted: every accepted transaction ends settled exactly once
    (one entry, one post transfer) or rejected (no entry), the books balance.
    On the short-transaction MongoDB (conftest.short_txn_mongodb_uri): the killed worker's
    open ledger transaction holds the head 5 s, not a minute."""
    mongo_client, settings = short_txn_mongo_client, short_txn_settings
    database = f"walletmig_clearing_crash_{uuid.uuid4().hex[:8]}"
    queue = f"clearing-crash-{uuid.uuid4().hex[:8]}"
    env = _crash_env(settings, database, queue)
    db = mongo_client[database]
    ledger = GeneralLedger(db)
    client = ClearingClient(temporal_client, ClearingStore(db), queue, ledger=ledger)
    batches = [[txn("ach_credit_in", "30000.00") if n % 25 == 0 else
                txn("ach_credit_in", f"{1 + n % 9}.10", counterparty=unique_id("p"))
                for n in range(CRASH_BATCH_SIZE)] for _ in range(CRASH_BATCHES)]
    procs = [_start_worker(env, tmp_path / "worker-1.log")]
    tb_client = await connect_batched(settings)
    accepted: list[str] = []
    held_at_kill: list[str] = []
    under_way = asyncio.Event()

    async def submitter(mine: list[list[ExternalTransaction]]) -> None:
        for index, batch in enumerate(mine):
            if index == len(mine) // 2:
                # The second half starts once outcomes arrive, so the kill always finds work in
                # flight (a quick host had settled the whole first half before the kill's poll).
                await under_way.wait()
            result = await client.submit_many(batch)
            assert not result.refused and len(result.accepted) == len(batch)
            accepted.extend(result.accepted)
            await asyncio.sleep(0.2)

    async def kill_when_in_flight() -> None:
        """Once an outcome is final (the stream is under way) while a transaction is held and
        open, SIGKILL the worker; what it left held and open (read before any restart) is
        the work in flight at the kill. None (it ended before the kill): restart, again."""
        async def ready() -> bool:
            final, held = await _in_flight(client, tb_client, accepted)
            if final:
                under_way.set()
            return final > 0 and bool(held)

        try:
            for attempt in range(1, KILL_ATTEMPTS + 1):
                await eventually(ready, "a final outcome and an open held transaction",
                                 IN_FLIGHT_WAIT_S)
                procs[-1].send_signal(signal.SIGKILL)
                procs[-1].wait(timeout=10)
                held_at_kill.extend((await _in_flight(client, tb_client, accepted))[1])
                await asyncio.sleep(RESTART_DELAY_S)
                procs.append(_start_worker(env, tmp_path / f"worker-{attempt + 1}.log"))
                if held_at_kill:
                    return
            pytest.fail(f"the work in flight ended before each of {KILL_ATTEMPTS} kills")
        finally:
            under_way.set()  # the submitters never wait on a failed crash

    try:
        await asyncio.gather(kill_when_in_flight(), *(
            submitter(batches[i::CRASH_SUBMITTERS]) for i in range(CRASH_SUBMITTERS)))
        assert held_at_kill, "the worker died with work in flight"  # a guard (loop above)
        outcomes = await client.wait(accepted, CRASH_WAIT_S)
        states = {o.state for o in outcomes.values()}
        assert len(outcomes) == len(accepted) == CRASH_BATCHES * CRASH_BATCH_SIZE
        assert states <= {"settled", "rejected"}, states
        settled = sorted(x for x, o in outcomes.items() if o.state == "settled")
        rejected = [o for o in outcomes.values() if o.state == "rejected"]
        assert {o.reason for o in rejected} == {"amount_above_max"}
        assert len(rejected) == CRASH_BATCHES * (CRASH_BATCH_SIZE // 25)
        entries = db[GL_ENTRIES]
        assert await entries.count_documents({}) == len(settled)
        assert sorted(await entries.distinct("external_id")) == settled
        posts = await _transfers(tb_client, [post_transfer_id(x) for x in outcomes])
        assert posts == {post_transfer_id(x) for x in settled}
        # The records catch up with the ledger (the final state follows the entries).
        await records_caught_up(db, len(accepted), len(settled))
        assert (await ledger.trial_balance()).zero
        assert (await ledger.verify_chain()).ok
        print(f"\nworker kill -9: {len(held_at_kill)} transactions held, open at the kill; "
              f"{len(procs) - 1} kill(s)")
    finally:
        _stop(procs)
        await tb_client.close()
        await mongo_client.drop_database(database)


async def test_a_resumed_run_keeps_what_tigerbeetle_did(
    pipe: Pipeline, txn: Callable[..., ExternalTransaction], unique_id: Callable[..., str]
) -> None:
    """The activities alone, as a resumed run would call them with other decisions: a hold
    posted earlier stays posted (with its post's time), one voided earlier stays voided, a
    repeated post lands on the same transfer."""
    posted_first, voided_first = txn("ach_credit_in", "4.00"), txn("ach_credit_in", "5.00")
    batch = unique_id("batch")
    await pipe.clearing.record_many([posted_first, voided_first], batch)
    ids = [posted_first.external_id, voided_first.external_id]
    acts = pipe.activities
    holds = await acts.reserve(StepInput(batch_id=batch, external_ids=ids))
    assert holds.pending == ids and not holds.rejected
    again = await acts.reserve(StepInput(batch_id=batch, external_ids=ids))
    assert again.expires_at_ns == holds.expires_at_ns  # EXISTS: the same holds
    first = await acts.decide(PostVoidBatch(
        batch_id=batch, post=[ids[0]], void=[VoidItem(external_id=ids[1], reason="velocity")]))
    assert [p.external_id for p in first.posted] == [ids[0]]
    flipped = await acts.decide(PostVoidBatch(
        batch_id=batch, post=[ids[1]], void=[VoidItem(external_id=ids[0], reason="late")]))
    assert flipped.posted == first.posted
    assert [(v.external_id, v.reason) for v in flipped.voided] == [(ids[1], "already_voided")]
    repeated = await acts.decide(PostVoidBatch(batch_id=batch, post=[ids[0]]))
    assert repeated.posted == first.posted
    final = await acts.finalize(FinalizeBatch(batch_id=batch, posted=first.posted,
                                              rejected=flipped.voided))
    assert (final.settled, final.rejected, final.new_entries) == (1, 1, 1)
    replay = await acts.finalize(FinalizeBatch(batch_id=batch, posted=first.posted,
                                               rejected=flipped.voided))
    assert (replay.settled, replay.new_entries) == (0, 0)
    outcomes = await pipe.client.statuses(ids)
    await assert_settled(pipe, {ids[0]: outcomes[ids[0]]})
    await assert_rejected(pipe, outcomes[ids[1]], "already_voided")
    await assert_books_balanced(pipe)
