"""Faults on the credit terminal (issue 14): kill -9 of the TigerBeetle emulator and of the
MongoDB server (SecantusDB) in the middle of a stream of terminal submissions, and the
double-entry invariant as a property of walletcore's pure clearing functions.

The stream: two callers send batches of 40 mixed transactions (settling kinds in USD and USDC,
and per 20 an amount over the limit, a blocked counterparty, a reservation TigerBeetle refuses
for lack of funds, a duplicate reference and a 1 s hold that expires), 400 in all plus the
batches sent right before the kills (40, then 400: a long TigerBeetle request or ledger
transaction to cut). The server is SIGKILLed twice (the second time once the
pipeline runs again) with batches in flight (asserted: accepted, not final at the kill), kept
down a few seconds while the callers go on (resending the same batch while MongoDB is down,
as the client's contract asks), and restarted on the same port and data dir.

Afterwards, read independently (tests/clearing_support.py: TigerBeetle's `lookup_transfers` on
the derived ids and `lookup_accounts` on the mirrors, the ledger's collections directly): every
accepted transaction ended exactly as expected (settled, or rejected with its reason), its
TigerBeetle transfers match (hold + post, hold + void, or nothing), each posted transfer has
exactly one journal entry and no entry is doubled, the trial balance is zero, the stored
balances and the mirrors' posted balances equal the entries, and no hold is left pending.
The same external ids resent concurrently under other batch ids are replays (one transfer,
one entry); other content under a used id is a ConflictError.

Also: TigerBeetle down past some holds' timeout (reported expired), MongoDB down while the
checks are due (the short holds expire, those with time left are checked again and settle),
ids raced in overlapping batches, a submitter killed between recording and starting (the
catch-up sync's run resumes its batch), a typed error from intake while MongoDB is down, and
the terminal's recorded workflow histories replayed with today's code.

The module's servers are its own (clearing_support.private_stack), never the session's: they
get killed. Temporal is the session's.

The clearing worker's kill -9: test_clearing_pipeline.py::test_kill_9_of_the_worker_mid_stream.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import pytest_asyncio
from clearing_support import (
    CLEARING_HISTORIES,
    FINAL,
    LONG_HOLD,
    LONG_HOLD_S,
    MID_HOLD,
    MID_HOLD_S,
    SETTLED,
    Stream,
    Submitted,
    Terminal,
    check_books,
    lookup,
    open_batches,
    open_holds,
    private_stack,
    reach_stage,
    record_history,
    records_caught_up,
    restart,
    stages,
    submit_until_recorded,
    terminal,
    wait_final,
    wait_holds,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer
from wallet_support import kill_9

from messages.clearing import LedgerSyncInput, LedgerSyncOutcome, ResumeReceivedInput
from messages.clearing_pipeline import batch_workflow_id
from stores.bundle import connect_batched
from stores.clearing_store import ClearingStore
from stores.tb_batches import BatchedClient
from walletclient.temporal_connect import data_converter
from walletconfig.settings import Settings
from walletcore.clearing import (
    DEFAULT_CLEARING_TABLE,
    ExternalTransaction,
    RejectReason,
    pending_spec,
    post_spec,
    post_transfer_id,
    settlement_entry,
    void_spec,
    void_transfer_id,
)
from walletcore.errors import StoreUnavailableError
from walletcore.journal import AccountBalance, balance_deltas, trial_balance
from walletcore.money import from_minor
from walletmig import devstack
from workers.wallet_worker import workflow_runner
from workflows.clearing import ClearingBatchWorkflow
from workflows.terminal_sync import LedgerSyncWorkflow

BATCH_SIZE = 40
CALLERS = 2
BATCHES_PER_CALLER = 5  # 400 transactions, plus the batch sent at each kill (440 more)
KILLS = 2  # the second once the pipeline runs again after the first
# The batch sent right before each kill; the second is large, so its TigerBeetle request
# (post_void) or ledger transaction (settle) lasts long enough to be cut.
KILL_BATCH_SIZES = (BATCH_SIZE, 400)
DOWN_S = 3.0
SUBMIT_TIMEOUT_S = 60.0
FINAL_WAIT_S = 90.0
UNDER_WAY_WAIT_S = 60.0
STAGE_WAIT_S = 15.0  # the last batch before a kill reaches the kill's target stage
# A kill batch that was final already when its stage was seen (a quick host settled it between
# two polls): another one is sent, at most this many per kill.
KILL_BATCH_TRIES = 3
BLOCKED = "evil-bank-crash"


@pytest.fixture(scope="module")
def stack() -> Iterator[devstack.StackConfig]:
    with private_stack(["mongo", "tigerbeetle"], "clearing-crash") as config:
        yield config


@pytest_asyncio.fixture(loop_scope="session")
async def tb_client(stack: devstack.StackConfig) -> AsyncIterator[BatchedClient]:
    """A client of the private emulator (reconnects across its restart)."""
    settings = Settings.from_env(
        temporal_address="127.0.0.1:1", mongodb_uri=stack.mongodb_uri,
        mongodb_database="unused", redis_url="redis://127.0.0.1:1",
        tb_addresses=stack.tb_addresses, state_dir=stack.state_dir)
    client = await connect_batched(settings)
    try:
        yield client
    finally:
        await client.close()


@dataclass
class KillReport:
    """What was in flight at one kill."""

    open_ids: int
    open_batches: int
    stages: Counter[str]
    restart_s: float
    kill_batch: list[ExternalTransaction]
    kill_batch_stage: str
    open_holds: int  # of the open transactions: holds neither posted nor voided yet
    open_before_kill: int  # transactions not final at the last look before the kill
    sent: int  # transactions in the kill batches sent (more than one if one was final)

    def line(self) -> str:
        return (f"{self.open_ids} transactions in {self.open_batches} batches in flight "
                f"(stages {dict(self.stages)}; the last batch's at the kill: "
                f"{self.kill_batch_stage}; {self.open_holds} of them held in TigerBeetle, "
                f"unresolved), restarted in {self.restart_s:.1f} s")


async def _under_way(term: Terminal, ids: list[str]) -> None:
    """Until one of `ids` is final: the pipeline runs (again)."""
    deadline = time.monotonic() + UNDER_WAY_WAIT_S
    while True:
        outcomes = await term.client.statuses(ids)
        if any(o.state in FINAL for o in outcomes.values()):
            return
        assert time.monotonic() < deadline, "no outcome final: the pipeline does not run"
        await asyncio.sleep(0.1)


async def _stage_or_unknown(term: Terminal, batch_id: str) -> str:
    try:
        return await term.client.stage(batch_id)
    except Exception as err:  # the query timed out: no evidence either way
        return f"unknown:{type(err).__name__}"


async def _stream_through_kills(
    term: Terminal, stream: Stream, stack: devstack.StackConfig, server: str,
    out: Submitted, *, snapshot_after_kill: bool, targets: tuple[str, ...],
) -> list[KillReport]:
    """Callers send their batches in KILLS + 1 waves. Before each kill, once an outcome of
    the last wave is final (the pipeline runs), one more batch is sent and `server` is
    SIGKILLed as soon as that batch's workflow reached the kill's target stage while some of
    its transactions are still open and, asked right after the kill, its workflow was not
    done (that batch, at least, was in flight at the kill: one found final or done already
    is followed by another); the next wave goes out during the outage, the restart follows
    DOWN_S later."""
    assert len(targets) == KILLS
    kills_done = [asyncio.Event() for _ in range(KILLS)]
    reports: list[KillReport] = []
    kill_batches = itertools.count(CALLERS * BATCHES_PER_CALLER)

    async def caller(n: int) -> None:
        for b in range(BATCHES_PER_CALLER):
            wave = min(b * (KILLS + 1) // BATCHES_PER_CALLER, KILLS)
            if wave:
                await kills_done[wave - 1].wait()
            batch = stream.batch(n * BATCHES_PER_CALLER + b, BATCH_SIZE)
            await submit_until_recorded(term, batch, out, timeout_s=SUBMIT_TIMEOUT_S)
            await asyncio.sleep(0.2)

    async def crash(k: int) -> None:
        await _under_way(term, out.accepted)
        sent = 0
        for _ in range(KILL_BATCH_TRIES):
            sent += KILL_BATCH_SIZES[k]
            kill_batch = stream.batch(next(kill_batches), KILL_BATCH_SIZES[k])
            batch_id = await submit_until_recorded(term, kill_batch, out,
                                                   timeout_s=SUBMIT_TIMEOUT_S)
            await reach_stage(term, batch_id, targets[k], STAGE_WAIT_S)
            in_flight = await open_batches(term, out.accepted)
            if batch_id not in in_flight:
                continue
            kill_9(stack, server)
            # Asked after the kill (the worker answers; stages only move on): a kill batch
            # not done yet was in flight at the kill. Done already (it ended between the
            # look above and the kill): the server is restarted and another batch sent.
            at_kill = await _stage_or_unknown(term, batch_id)
            if at_kill != "done" and not at_kill.startswith("unknown"):
                break
            await restart(stack, server)
        else:
            raise AssertionError(f"each of {KILL_BATCH_TRIES} kill batches was done at the "
                                 f"kill (or when it reached {targets[k]})")
        open_before_kill = sum(len(ids) for ids in in_flight.values())
        if snapshot_after_kill:
            in_flight = await open_batches(term, out.accepted)
        kills_done[k].set()
        seen = await stages(term, list(in_flight))
        open_ids = [x for ids in in_flight.values() for x in ids]
        if server != "tigerbeetle":
            holds = await open_holds(term.tb, open_ids)
        await asyncio.sleep(DOWN_S)
        took = await restart(stack, server)
        if server == "tigerbeetle":  # what the restarted emulator holds of the batches
            holds = await open_holds(term.tb, open_ids)
        reports.append(KillReport(open_ids=len(open_ids), open_batches=len(in_flight),
                                  stages=seen, restart_s=took, kill_batch=kill_batch,
                                  kill_batch_stage=at_kill, open_holds=holds,
                                  open_before_kill=open_before_kill, sent=sent))

    async def crashes() -> None:
        for k in range(KILLS):
            await crash(k)

    await asyncio.gather(crashes(), *(caller(n) for n in range(CALLERS)))
    assert len(reports) == KILLS
    for report in reports:  # by construction (the loop above): a guard against its change
        assert report.open_before_kill > 0, "nothing was in flight at a kill"
    return reports


async def _resend_concurrently(term: Terminal, kill_batch: list[ExternalTransaction]) -> None:
    """The batch sent at the kill, twice more at once under other batch ids: all replays
    (recorded once, by its own batch); one id with other content: a ConflictError."""
    results = await asyncio.gather(*(term.client.submit_many(kill_batch) for _ in range(2)))
    for result in results:
        assert not result.accepted and not result.refused, result
        assert {r.external_id for r in result.replayed} == {t.external_id for t in kill_batch}
    changed = kill_batch[0].model_copy(update={"amount": kill_batch[0].amount + 1})
    refused = await term.client.submit_many([changed])
    assert [(r.external_id, r.error, r.field) for r in refused.refused] == [
        (changed.external_id, "ConflictError", "external_id")]


async def _run(term: Terminal, stack: devstack.StackConfig, server: str, *,
               snapshot_after_kill: bool, targets: tuple[str, ...]) -> None:
    stream = Stream(run=uuid.uuid4().hex[:8], blocked_party=BLOCKED)
    out = Submitted()
    started = time.monotonic()
    kills = await _stream_through_kills(term, stream, stack, server, out,
                                        snapshot_after_kill=snapshot_after_kill,
                                        targets=targets)
    for kill in kills:
        await _resend_concurrently(term, kill.kill_batch)
    if server == "tigerbeetle":
        # A reservation request the kill cut after the emulator logged it: TigerBeetle burnt
        # the refused ids, so the resumed pending step hears id_already_failed instead of
        # the first refusal's reason (still refused by TigerBeetle: nothing held or posted).
        stream.also.update((x, f"{RejectReason.PENDING_REFUSED}:id_already_failed")
                           for x, reason in stream.expected.items()
                           if reason.startswith(f"{RejectReason.PENDING_REFUSED}:"))
    outcomes = await wait_final(term, out.accepted, FINAL_WAIT_S)
    assert len(outcomes) == CALLERS * BATCHES_PER_CALLER * BATCH_SIZE + sum(
        k.sent for k in kills)
    # Callers hear of an outage as the retryable walletcore error, never a pymongo one.
    assert set(out.errors) <= {"StoreUnavailableError"}, out.errors
    books = await check_books(term, stream, out.accepted, outcomes)
    counts = await records_caught_up(term.db, len(outcomes), books.settled)
    print(f"\n{server} kill -9 x{KILLS}: " + "; ".join(k.line() for k in kills))
    print(f"  submit attempts {out.attempts} for {len(out.batches)} batches, errors while "
          f"down {dict(out.errors)}; outcomes: settled {books.settled}, rejected "
          f"{dict(books.rejected)}; entries {books.entries}, posted transfers "
          f"{books.posted_transfers}; records {({s.value: n for s, n in counts.items() if n})}; "
          f"{time.monotonic() - started:.1f} s")


@pytest.mark.slow
async def test_kill_9_of_tigerbeetle_mid_stream(
    temporal_client: Client, stack: devstack.StackConfig, tb_client: BatchedClient,
) -> None:
    """While the emulator is down, intake goes on (MongoDB and Temporal are up) and the
    batches' TigerBeetle steps retry; the restarted emulator (its log replayed) holds every
    hold and post it acknowledged, and the pipeline resumes where each batch stopped."""
    async with terminal(temporal_client, stack.mongodb_uri, tb_client, [BLOCKED]) as term:
        await _run(term, stack, "tigerbeetle", snapshot_after_kill=True,
                   targets=("pending", "post_void"))


@pytest.mark.slow
async def test_kill_9_of_mongodb_mid_stream(
    temporal_client: Client, stack: devstack.StackConfig, tb_client: BatchedClient,
) -> None:
    """While MongoDB is down, intake fails and the callers resend the same batch (same batch
    id) until it is recorded; the batches' store and ledger steps retry; a ledger transaction
    cut by the kill leaves nothing (the entries and balances commit together or not)."""
    async with terminal(temporal_client, stack.mongodb_uri, tb_client, [BLOCKED]) as term:
        await _run(term, stack, "mongo", snapshot_after_kill=False,
                   targets=("checks", "settle"))


def _mid_hold_batch(stream: Stream, index: int) -> tuple[list[ExternalTransaction], dict[str, str]]:
    """A stream batch with every other transaction on a MID_HOLD_S hold (expected expired),
    and what each of those ends as if its checks decide (the stream's own expectation)."""
    batch = stream.batch(index, BATCH_SIZE)
    checked: dict[str, str] = {}
    for n in range(0, BATCH_SIZE, 2):
        txn = batch[n].model_copy(update={"kind": MID_HOLD, "currency": "USD",
                                          "amount": Decimal("2.50")})
        batch[n] = stream.txns[txn.external_id] = txn
        checked[txn.external_id] = stream.expected[txn.external_id]
        stream.expected[txn.external_id] = "expired"
    return batch, checked


@pytest.mark.slow
async def test_tigerbeetle_down_past_the_holds_timeout(
    temporal_client: Client, stack: devstack.StackConfig, tb_client: BatchedClient,
) -> None:
    """The emulator dies once a batch's holds exist, before its posts (while its checks run
    or before), and stays down longer than some of its holds' timeout (MID_HOLD, 6 s): after
    the restart those posts meet expired holds and are reported `expired` (never posted, no
    entry); the batch's long holds are posted and settle. Nothing stays pending.
    The kill's moment is asserted, not assumed: a batch whose posts or voids landed before the
    kill (a quick pipeline, a slow test process) ends as its checks decided, another is sent."""
    stream = Stream(run=uuid.uuid4().hex[:8], blocked_party=BLOCKED)
    started = time.monotonic()
    async with terminal(temporal_client, stack.mongodb_uri, tb_client, [BLOCKED]) as term:
        out = Submitted()
        for attempt in range(KILL_BATCH_TRIES):
            batch, checked = _mid_hold_batch(stream, attempt)
            mid = [t.external_id for t in batch if t.kind == MID_HOLD]
            batch_id = await submit_until_recorded(term, batch, out,
                                                   timeout_s=SUBMIT_TIMEOUT_S)
            # Killed as soon as the holds exist (TigerBeetle polled directly), so the pending
            # step's end and the checks lie between the kill's moment and any post.
            await wait_holds(term, mid, STAGE_WAIT_S)  # (some others' holds it refuses)
            kill_9(stack, "tigerbeetle")
            killed_at = time.monotonic()
            at_kill = await term.client.stage(batch_id)  # the worker answers: it runs
            await asyncio.sleep(MID_HOLD_S + 2)
            took = await restart(stack, "tigerbeetle")
            # A post or void that exists now landed before the kill: the restarted emulator
            # refuses them on the expired holds. The state this test is about: none landed.
            landed = set(await lookup(term.tb, [f(x) for x in mid
                                                for f in (post_transfer_id, void_transfer_id)]))
            if not landed:
                break
            for x in mid:  # decided by their checks before the kill: they end as decided
                if {post_transfer_id(x), void_transfer_id(x)} & landed:
                    stream.expected[x] = checked[x]
        else:
            pytest.fail(f"posts or voids landed before each of {KILL_BATCH_TRIES} kills")
        outcomes = await wait_final(term, out.accepted, FINAL_WAIT_S)
        final_after_s = time.monotonic() - killed_at
        books = await check_books(term, stream, out.accepted, outcomes)
        await records_caught_up(term.db, len(outcomes), books.settled)
    print(f"\ntigerbeetle down {MID_HOLD_S + 2} s from stage {at_kill} (restart {took:.1f} s, "
          f"kill {attempt + 1}): all final {final_after_s:.1f} s after the kill; settled "
          f"{books.settled}, rejected {dict(books.rejected)}; {time.monotonic() - started:.1f} s")
    assert len(mid) == BATCH_SIZE // 2
    assert {outcomes[x].reason for x in mid} == {"expired"}


def _mid_long_batch(stream: Stream, index: int) -> list[ExternalTransaction]:
    """BATCH_SIZE settling transactions, every other one on a MID_HOLD (expected expired),
    the others on a LONG_HOLD (expected settled)."""
    batch = [ExternalTransaction(external_id=f"{stream.run}-{index}-{n}", kind=kind,
                                 amount=Decimal("3.25"), currency="USD",
                                 counterparty=f"p-{stream.run}-{index}-{n}")
             for n, kind in enumerate([MID_HOLD, LONG_HOLD] * (BATCH_SIZE // 2))]
    for txn in batch:
        stream.txns[txn.external_id] = txn
        stream.expected[txn.external_id] = "expired" if txn.kind == MID_HOLD else SETTLED
    return batch


@pytest.mark.slow
async def test_mongodb_down_while_the_checks_run(
    temporal_client: Client, stack: devstack.StackConfig, tb_client: BatchedClient,
) -> None:
    """MongoDB dies once a batch's holds exist (its checks, which read MongoDB, come next)
    and stays down longer than half the batch's holds (MID_HOLD, 6 s); the other half hold
    LONG_HOLD_S (40 s). The first checks attempt, bounded by the MID holds' expiry, fails; the
    MID holds expire (reported `expired`, never posted); the LONG ones, ~30 s left, are
    checked again (workflows/clearing.py PATCH_RECHECK) once MongoDB is back, and settle. The
    books balance. The kill's moment is asserted, not assumed: a batch whose checks had ended
    at the kill (a quick pipeline, a slow test process) settles, and another one is sent."""
    stream = Stream(run=uuid.uuid4().hex[:8], blocked_party=BLOCKED)
    started = time.monotonic()
    async with terminal(temporal_client, stack.mongodb_uri, tb_client) as term:
        out = Submitted()
        for attempt in range(KILL_BATCH_TRIES):
            batch = _mid_long_batch(stream, attempt)
            batch_id = await submit_until_recorded(term, batch, out,
                                                   timeout_s=SUBMIT_TIMEOUT_S)
            # The holds exist: the pending step read the batch; its checks need MongoDB next.
            await wait_holds(term, [t.external_id for t in batch], STAGE_WAIT_S)
            kill_9(stack, "mongo")
            at_kill = await term.client.stage(batch_id)  # the worker answers: it runs
            if at_kill in ("pending", "checks"):
                break
            # The checks had passed: every hold is posted (or about to be), all settle.
            stream.expected.update((t.external_id, SETTLED) for t in batch)
            await restart(stack, "mongo")
        else:
            pytest.fail(f"the checks had ended at each of {KILL_BATCH_TRIES} kills")
        await asyncio.sleep(MID_HOLD_S + 2)
        took = await restart(stack, "mongo")
        outcomes = await wait_final(term, out.accepted, LONG_HOLD_S + FINAL_WAIT_S)
        await temporal_client.get_workflow_handle(batch_workflow_id(batch_id)).result()
        await record_history(temporal_client, batch_workflow_id(batch_id),
                             "clearing_checks_failed")
        long_ids = [t.external_id for t in batch if t.kind == LONG_HOLD]
        mid_ids = [t.external_id for t in batch if t.kind == MID_HOLD]
        long_outcomes = Counter(outcomes[x].reason or outcomes[x].state for x in long_ids)
        mid_outcomes = Counter(outcomes[x].reason or outcomes[x].state for x in mid_ids)
        print(f"\nmongodb down {MID_HOLD_S + 2} s from stage {at_kill} (restart {took:.1f} "
              f"s, kill {attempt + 1}): MID holds {dict(mid_outcomes)}, LONG holds "
              f"{dict(long_outcomes)}; {time.monotonic() - started:.1f} s")
        assert mid_outcomes == {"expired": len(mid_ids)}, mid_outcomes
        assert long_outcomes == {"settled": len(long_ids)}, (
            f"holds with time left after the outage did not settle: {dict(long_outcomes)}")
        books = await check_books(term, stream, out.accepted, outcomes)
        await records_caught_up(term.db, len(outcomes), books.settled)


async def test_the_same_ids_raced_in_overlapping_batches_settle_once(
    temporal_client: Client, stack: devstack.StackConfig, tb_client: BatchedClient,
) -> None:
    """Eight submits at once: a batch three times under its own batch id (a caller's retries
    racing its first attempt), twice under other ids, a batch overlapping it twice, and other
    content for two of its ids. Each id is accepted by exactly one call; other content is a
    ConflictError for whichever content lost the race; afterwards one transfer and one entry
    per settled id, carrying the winning content, and the books balance."""
    stream = Stream(run=uuid.uuid4().hex[:8], blocked_party=BLOCKED)
    base = stream.batch(0, BATCH_SIZE)
    overlap = [*base[10:20], *stream.batch(1, 20)]
    changed = [t.model_copy(update={"amount": t.amount + 1}) for t in (base[0], base[5])]
    async with terminal(temporal_client, stack.mongodb_uri, tb_client, [BLOCKED]) as term:
        own = f"b-{uuid.uuid4().hex}"
        sends: list[list[ExternalTransaction]] = [base] * 5 + [overlap] * 2 + [changed]
        batch_ids: list[str | None] = [own] * 3 + [None] * 5
        results = await asyncio.gather(*(term.client.submit_many(b, batch_id=i)
                                         for b, i in zip(sends, batch_ids, strict=True)))
        accepted = Counter(x for r in results for x in r.accepted)
        ids = list(dict.fromkeys(t.external_id for b in sends for t in b))
        assert set(accepted) == set(ids) and set(accepted.values()) == {1}, accepted
        refusals = [(r.external_id, r.error, r.field) for res in results for r in res.refused]
        assert {x for x, _, _ in refusals} <= {t.external_id for t in changed}, refusals
        assert {(e, f) for _, e, f in refusals} <= {("ConflictError", "external_id")}
        records = await ClearingStore(term.db).get_many(ids)
        for txn in changed:  # the content recorded first won; every other sender was refused
            winner = records[txn.external_id].transaction
            stream.txns[txn.external_id] = winner
            losers = sum(1 for b in sends for t in b
                         if t.external_id == txn.external_id and t.amount != winner.amount)
            assert sum(1 for x, _, _ in refusals if x == txn.external_id) == losers
        outcomes = await wait_final(term, ids, FINAL_WAIT_S)
        books = await check_books(term, stream, ids, outcomes)
        await records_caught_up(term.db, len(outcomes), books.settled)
    winners = {t.external_id: str(stream.txns[t.external_id].amount) for t in changed}
    print(f"\nraced: {len(ids)} ids, {len(refusals)} conflicts, winners {winners}; "
          f"settled {books.settled}, rejected {dict(books.rejected)}")


async def test_a_submitter_killed_between_recording_and_starting(
    temporal_client: Client, stack: devstack.StackConfig, tb_client: BatchedClient,
) -> None:
    """Two batches recorded as `submit_many` records them, by submitters that die before
    starting their workflows. One is resent by its own submitter (same batch id): it starts
    and settles. The other's ids, resent at once by another caller under another batch id,
    are replays of a young owner (left alone: its submitter may still start it) and stay
    `received` until the catch-up sync's run (what the Temporal Schedule starts, no manual
    `resume`) starts the owner's batch; a second run, the manual `resume` and the owner's
    submitter coming back late start nothing more (one run of the batch's workflow). Each id
    ends once, the books balance."""
    stream = Stream(run=uuid.uuid4().hex[:8], blocked_party=BLOCKED)
    first, second = stream.batch(0, 20), stream.batch(1, 20)
    async with terminal(temporal_client, stack.mongodb_uri, tb_client, [BLOCKED]) as term:
        store = ClearingStore(term.db)
        first_id, second_id = f"b-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
        for batch, batch_id in ((first, first_id), (second, second_id)):
            recorded = await store.record_many(batch, batch_id)  # ... and the submitter dies
            assert len(recorded.new) == len(batch)
        again = await term.client.submit_many(first, batch_id=first_id)
        assert not again.accepted and {r.batch_id for r in again.replayed} == {first_id}
        other = await term.client.submit_many(second)
        assert not other.accepted and {r.batch_id for r in other.replayed} == {second_id}
        first_ids = [t.external_id for t in first]
        second_ids = [t.external_id for t in second]
        await wait_final(term, first_ids, FINAL_WAIT_S)
        await temporal_client.get_workflow_handle(batch_workflow_id(first_id)).result()
        await record_history(temporal_client, batch_workflow_id(first_id), "clearing_batch")
        await asyncio.sleep(2.0)
        waiting = await term.client.statuses(second_ids)
        assert {o.state for o in waiting.values()} == {"received"}, "no one started it"
        assert await _catch_up(temporal_client, term, "first") == [second_id]
        handle = temporal_client.get_workflow_handle(batch_workflow_id(second_id))
        run_id = (await handle.describe()).run_id
        assert await _catch_up(temporal_client, term, "second") == []  # running: left alone
        assert await term.client.resume(older_than_s=0) == []
        late = await term.client.submit_many(second, batch_id=second_id)  # its submitter
        assert not late.accepted and {r.batch_id for r in late.replayed} == {second_id}
        assert (await handle.describe()).run_id == run_id, "the batch was started twice"
        ids = [*first_ids, *second_ids]
        outcomes = await wait_final(term, ids, FINAL_WAIT_S)
        books = await check_books(term, stream, ids, outcomes)
        await records_caught_up(term.db, len(outcomes), books.settled)


async def _catch_up(temporal: Client, term: Terminal, run: str) -> list[str]:
    """One catch-up sync run as the Temporal Schedule starts it (LedgerSyncWorkflow, `once`),
    resuming batches `received` for any time: the batches it started."""
    outcome: LedgerSyncOutcome = await temporal.execute_workflow(
        LedgerSyncWorkflow.run,
        LedgerSyncInput(once=True, resume=ResumeReceivedInput(older_than_s=0)),
        id=f"sync-catch-up-{term.queue}-{run}", task_queue=term.queue,
        execution_timeout=timedelta(minutes=2))
    assert outcome.caught_up
    return outcome.resumed


OUTAGE_ANSWER_MAX_S = 15.0  # the client's server selection (5 s) plus scheduling slack


async def test_intake_during_a_mongodb_outage_is_a_typed_retryable_error(
    temporal_client: Client, stack: devstack.StackConfig, tb_client: BatchedClient,
) -> None:
    """A submit and a status read while MongoDB is down answer within the bound with a
    retryable walletcore error naming MongoDB; the same batch resent after the restart is
    recorded once and settles."""
    stream = Stream(run=uuid.uuid4().hex[:8], blocked_party=BLOCKED)
    batch = stream.batch(0, 20)[:3]  # settling kinds only
    batch_id = f"b-{uuid.uuid4().hex}"
    async with terminal(temporal_client, stack.mongodb_uri, tb_client) as term:
        kill_9(stack, "mongo")
        answers: dict[str, tuple[float, BaseException | None]] = {}
        try:
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "submit_many": lambda: term.client.submit_many(batch, batch_id=batch_id),
                "statuses": lambda: term.client.statuses([t.external_id for t in batch]),
            }
            for name, call in calls.items():
                started = time.monotonic()
                try:
                    await call()
                    error: BaseException | None = None
                except Exception as err:
                    error = err
                answers[name] = (time.monotonic() - started, error)
        finally:
            await restart(stack, "mongo")
        seen = {n: (round(s, 1), repr(e)[:120]) for n, (s, e) in answers.items()}
        print(f"\nwhile MongoDB is down: {seen}")
        for name, (elapsed_s, answer) in answers.items():
            assert elapsed_s < OUTAGE_ANSWER_MAX_S, (name, elapsed_s)
            assert isinstance(answer, StoreUnavailableError), (name, repr(answer))
            assert answer.retryable and "MongoDB" in str(answer), (name, answer)
        out = Submitted()
        await submit_until_recorded(term, batch, out, timeout_s=SUBMIT_TIMEOUT_S)
        outcomes = await wait_final(term, out.accepted, FINAL_WAIT_S)
        assert {o.state for o in outcomes.values()} == {"settled"}, outcomes


# ---- recorded histories of the terminal's workflows ----------------------------------------


def _histories() -> list[Path]:
    return sorted(CLEARING_HISTORIES.glob("*.json"))


@pytest.mark.parametrize("path", _histories(), ids=lambda p: p.stem)
async def test_replay_recorded_clearing_history(path: Path) -> None:
    """Histories recorded by this module and test_terminal_sync (WALLETMIG_RECORD_HISTORIES=1)
    before each workflow change replay with today's code: clearing_checks_failed (the checks
    timed out, every hold left to expire: before PATCH_RECHECK), clearing_batch (a batch that
    settled), ledger_sync_once (a catch-up run before PATCH_RESUME_RECEIVED)."""
    data = json.loads(path.read_text())
    history = WorkflowHistory.from_json(data["workflow_id"], data["history"])
    replayer = Replayer(workflows=[ClearingBatchWorkflow, LedgerSyncWorkflow],
                        data_converter=data_converter(), workflow_runner=workflow_runner())
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure!r}"


def test_clearing_histories_present() -> None:
    names = {p.stem for p in _histories()}
    expected = {"clearing_checks_failed", "clearing_batch", "ledger_sync_once"}
    assert expected <= names, f"missing recorded histories: {sorted(expected - names)}"


# ---- the double-entry invariant over random batches (pure walletcore) -----------------------

TABLE = DEFAULT_CLEARING_TABLE
ROUTES = [(r.kind, c) for r in TABLE.routes for c in r.currencies]


@st.composite
def batches(draw: st.DrawFn) -> list[tuple[ExternalTransaction, bool]]:
    """Transactions of random kinds, currencies and amounts within their limits, each posted
    (True) or voided (False)."""
    count = draw(st.integers(min_value=1, max_value=60))
    out: list[tuple[ExternalTransaction, bool]] = []
    for index in range(count):
        kind, currency = draw(st.sampled_from(ROUTES))
        limits = TABLE.limits(kind, currency)
        minor = draw(st.integers(min_value=limits.amount_min, max_value=limits.amount_max))
        txn = ExternalTransaction(
            external_id=f"prop-{index}", kind=kind, currency=currency,
            amount=from_minor(minor, currency), counterparty=f"party-{index % 3}")
        out.append((txn, draw(st.booleans())))
    return out


@settings(max_examples=80, deadline=None)
@given(batches())
def test_posted_transfers_and_entries_keep_double_entry(
    batch: list[tuple[ExternalTransaction, bool]],
) -> None:
    """Per transaction, the hold, the post and the void move the same amount between the
    same mirrors; the posted ones' entries balance per currency, move exactly the route's
    accounts, and their balances equal what the post transfers do to the mirrors (the
    reconciliation's premise); voided ones leave no trace in the books."""
    posted = [t for t, post in batch if post]
    mirror_posted: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for txn, post in batch:
        hold, done = pending_spec(txn, TABLE), (post_spec if post else void_spec)(txn, TABLE)
        assert done.pending_id == hold.id and done.amount == hold.amount == txn.amount_minor
        assert (done.debit_account_id, done.credit_account_id, done.ledger) == (
            hold.debit_account_id, hold.credit_account_id, hold.ledger)
        assert hold.debit_account_id != hold.credit_account_id
        if post:
            mirror_posted[done.debit_account_id][0] += done.amount
            mirror_posted[done.credit_account_id][1] += done.amount
    entries = [settlement_entry(t, TABLE, 10**18 + i) for i, t in enumerate(posted)]
    deltas = balance_deltas(entries)
    balances = [AccountBalance(account=a, currency=c, debits_minor=d, credits_minor=cr)
                for (a, c), (d, cr) in deltas.items()]
    assert trial_balance(balances).zero
    assert len({e.entry_id for e in entries}) == len(entries)
    by_mirror = {TABLE.chart.mirror(a, c).id: [d, cr] for (a, c), (d, cr) in deltas.items()}
    assert by_mirror == dict(mirror_posted)
    for currency in {t.currency for t in posted}:
        moved = sum(t.amount_minor for t in posted if t.currency == currency)
        assert sum(d for (_, c), (d, _) in deltas.items() if c == currency) == moved
