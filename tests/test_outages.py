"""Outages as callers see them (issue 16): kill -9 MongoDB, then Temporal, then Redis, each for
a few seconds, while callers send credits and debits to 10 wallets in dual_write, retrying each
transaction id on retryable errors (as the client library asks).

Caller-facing: every call answers within the client's bound (plus scheduling slack), every
error is a typed, retryable walletcore error (never a pymongo, redis or temporalio exception),
a MongoDB outage longer than the wallet workflow's write bound reaches callers as
StoreUnavailableError naming MongoDB, the client itself re-sends through Temporal's outage, and
Redis (only the registries' cache) costs callers nothing. Reads (the read router straight on the
stores, and the read workflow through Temporal) answer typed and bounded too.

Afterwards, independently of the platform's own report: every acknowledged operation is in
MongoDB exactly once (`wallet_transactions` by `_id`) and in TigerBeetle exactly once
(`lookup_transfers` on `walletcore.ids.transfer_id`, and nothing else on the account), and both
stores' balances equal the callers' ledger.

The module runs a private stack (`walletmig.devstack`, free ports, a temporary state dir) and
its own worker process: the session's shared servers, which other tests use, are never killed.
Outages are short so the module stays well under 4 minutes.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from wallet_support import (
    DUAL_PAIR,
    REPO_ROOT,
    balances_equal,
    key,
    kill_9,
    session_id_key,
    set_phase,
    start_worker,
    stop_workers,
    wait_drained,
    worker_env,
)

from stores.bundle import Stores, open_stores
from walletclient.read_path import ReadRouter
from walletclient.wallet_client import RETRY_WINDOW_S_DEFAULT, BacklogReport, WalletClient
from walletconfig.settings import Settings
from walletcore.errors import OutcomeUnknownError, StoreUnavailableError, WalletError
from walletcore.ids import transfer_id
from walletcore.keys import WalletKey
from walletcore.money import to_minor
from walletcore.operations import AddCredit, SubtractCredit
from walletcore.phases import Phase
from walletmig import devstack
from walletmig.demo_check import account_transfers

WALLETS = 10
CALLERS = 4
# The callers' bound is the client's default (15 s): above the wallet workflow's 10 s write
# bound, so a MongoDB outage is answered by the workflow ("MongoDB: ...") before it gives up.
WINDOW_S = RETRY_WINDOW_S_DEFAULT
ANSWER_SLACK_S = 5.0  # event-loop and process scheduling on a loaded 2-core machine
# Acknowledged writes before the first kill and after the last restart (a count, not a time:
# a fixed pause is too short on a loaded host and idle on a quick one).
STEADY_ANSWERS = 40
# Longer than the workflow's 10 s write bound: the calls in flight at the kill hear of it.
MONGO_OUTAGE_S = 12.0
# Longer than the window: calls in flight end in OutcomeUnknownError; resent after the restart
# they are applied once (most come back as replays: they had been applied).
TEMPORAL_OUTAGE_S = 16.0
REDIS_OUTAGE_S = 3.0
RECOVERY_ANSWERS = 20  # acknowledged writes after a restart before the next kill
RECOVERY_TIMEOUT_S = 90.0
RESEND_PAUSE_S = 0.2
CALL_PAUSE_S = 0.02
READ_PAUSE_S = 0.2
FINISH_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 120.0
SEED = Decimal("100.00")
CREDIT = Decimal("2.50")
DEBIT = Decimal("1.25")
Op = AddCredit | SubtractCredit


@dataclass(frozen=True)
class Call:
    stage: str  # the chaos stage when the call started
    kind: str  # "write", "read", "read via temporal"
    txn: str | None  # a write's transaction id
    started: float  # time.monotonic()
    ended: float
    error: BaseException | None

    @property
    def elapsed_s(self) -> float:
        return self.ended - self.started


@dataclass
class Traffic:
    """Callers, a reader and what they were told."""

    client: WalletClient
    router: ReadRouter
    wallets: list[WalletKey]
    run: str
    stage: str = "steady"
    stages: list[tuple[str, float]] = field(default_factory=lambda: [("steady", time.monotonic())])
    answered: int = 0
    replayed: set[str] = field(default_factory=set)  # acknowledged as already applied
    calls: list[Call] = field(default_factory=list)
    acked: dict[WalletKey, list[Op]] = field(default_factory=lambda: defaultdict(list))
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self.caller(n)) for n in range(CALLERS)]
        self.tasks += [asyncio.create_task(self.reader(via_temporal=v)) for v in (False, True)]

    def enter(self, stage: str) -> None:
        self.stage = stage
        self.stages.append((stage, time.monotonic()))

    def during(self, stage: str) -> list[Call]:
        """Calls in flight at some moment of `stage` (not only those started in it)."""
        spans = list(zip(self.stages, [*self.stages[1:], ("end", float("inf"))], strict=True))
        ((_, begin), (_, end)), = [(a, b) for a, b in spans if a[0] == stage]
        return [c for c in self.calls if c.started < end and c.ended > begin]

    def raise_failed(self) -> None:
        """A caller that stopped on an untyped error fails the test now, with that error."""
        for task in self.tasks:
            if task.done():
                task.result()

    async def send_until_acked(self, op: Op) -> None:
        """The caller's contract: resend the same transaction id on a retryable error."""
        while True:
            stage, started = self.stage, time.monotonic()
            try:
                result = await self.client.apply(op)
            except Exception as err:
                self.calls.append(
                    Call(stage, "write", op.transaction_id, started, time.monotonic(), err))
                assert isinstance(err, WalletError) and err.retryable, (
                    f"{op.transaction_id} in stage {stage!r}: {type(err).__module__}."
                    f"{type(err).__name__}: {err}"
                )
                await asyncio.sleep(RESEND_PAUSE_S)
                continue
            self.calls.append(
                Call(stage, "write", op.transaction_id, started, time.monotonic(), None))
            assert result.transaction_id == op.transaction_id
            if result.replayed:
                self.replayed.add(op.transaction_id)
            self.acked[op.wallet].append(op)
            self.answered += 1
            return

    async def caller(self, n: int) -> None:
        for i in range(1_000_000):
            if self.stop.is_set():
                return
            wallet = self.wallets[(n + i * CALLERS) % WALLETS]
            txn = f"{self.run}.{n}.{i}"
            op: Op = (SubtractCredit(wallet=wallet, transaction_id=txn, amount=DEBIT) if i % 3 == 2
                      else AddCredit(wallet=wallet, transaction_id=txn, amount=CREDIT))  # fmt: skip
            await self.send_until_acked(op)
            await asyncio.sleep(CALL_PAUSE_S)

    async def reader(self, *, via_temporal: bool) -> None:
        """Balance reads through Temporal (read workflow) or on the stores (read router)."""
        for i in range(1_000_000):
            if self.stop.is_set():
                return
            wallet = self.wallets[i % WALLETS]
            stage, started = self.stage, time.monotonic()
            try:
                if via_temporal:
                    await self.client.get_balance(wallet)
                else:
                    await self.router.get_balance(wallet)
                error: BaseException | None = None
            except Exception as err:
                error = err
            kind = "read via temporal" if via_temporal else "read"
            self.calls.append(Call(stage, kind, None, started, time.monotonic(), error))
            await asyncio.sleep(READ_PAUSE_S)

    async def progress(self, answers: int, timeout_s: float) -> None:
        target = self.answered + answers
        deadline = time.monotonic() + timeout_s
        while self.answered < target:
            self.raise_failed()
            assert time.monotonic() < deadline, (
                f"stage {self.stage!r}: {self.answered - target + answers} of {answers} answers "
                f"in {timeout_s:g} s"
            )
            await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[devstack.StackConfig]:
    """A stack of this module's own (never the session's shared servers): it gets killed."""
    state_dir = Path(tempfile.mkdtemp(prefix="walletmig-outage-stack-"))
    # Durable, as `walletmig dev up` runs it: without its fsync per commit (durable=False) a
    # kill -9 of SecantusDB lost an acknowledged write here.
    config = devstack.StackConfig.with_free_ports(state_dir, ready_timeout_s=120)
    failed_before = request.session.testsfailed
    try:
        for result in devstack.up(config, list(devstack.SERVERS)):
            if result.state == "skipped":
                pytest.skip(f"{result.name} unavailable: {result.detail}")
        yield config
    finally:
        devstack.down(config)
    if request.session.testsfailed == failed_before:
        shutil.rmtree(state_dir, ignore_errors=True)
    else:
        print(f"\ntest_outages: stack state and server logs kept in {state_dir}")


async def outage(traffic: Traffic, stack: devstack.StackConfig, name: str, down_s: float) -> None:
    """kill -9 `name`, keep it down `down_s`, restart it as `walletmig dev up` does, and wait
    until callers are answered again."""
    traffic.enter(f"{name} down")
    kill_9(stack, name)
    await asyncio.sleep(down_s)
    traffic.raise_failed()
    traffic.enter(f"{name} restarting")
    (result,) = await asyncio.to_thread(devstack.up, stack, [name])
    assert result.state == "up", result
    traffic.enter(f"{name} back")
    await traffic.progress(RECOVERY_ANSWERS, RECOVERY_TIMEOUT_S)


@pytest.mark.slow
async def test_kill_9_mongodb_temporal_redis_under_dual_write(
    stack: devstack.StackConfig, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    settings = Settings.from_env(
        temporal_address=stack.temporal_address, mongodb_uri=stack.mongodb_uri,
        mongodb_database=f"outages_{run}", redis_url=stack.redis_url,
        tb_addresses=stack.tb_addresses, state_dir=stack.state_dir,
    )  # fmt: skip
    queue = f"outages-{run}"
    temporal = await Client.connect(stack.temporal_address, data_converter=pydantic_data_converter)
    client = WalletClient(temporal, queue, id_key=session_id_key(), idle_timeout_s=300)
    wallets = [key(f"outage-{run}-{n}", DUAL_PAIR) for n in range(WALLETS)]
    async with open_stores(settings) as stores:
        await set_phase(stores, DUAL_PAIR, Phase.DUAL_WRITE)
        worker = start_worker(worker_env(settings, queue), tmp_path / "worker.log")
        try:
            traffic = Traffic(client, ReadRouter(stores.legacy, stores.tigerbeetle,
                                                 stores.migration), wallets, run)  # fmt: skip
            for wallet in wallets:  # the worker is warm and every wallet funded before a kill
                await traffic.send_until_acked(
                    AddCredit(wallet=wallet, transaction_id=f"{run}.seed.{wallet.client_id}",
                              amount=SEED))  # fmt: skip
            await _chaos(traffic, stack)
            _check_callers(traffic)
            for wallet in wallets:
                await _check_wallet(stores, client, wallet, traffic.acked[wallet])
            await _check_backlog_command(settings, queue)
        except BaseException:
            print(f"worker log {tmp_path / 'worker.log'}; stack logs {stack.state_dir / 'logs'}")
            raise
        finally:
            stop_workers([worker])


async def _chaos(traffic: Traffic, stack: devstack.StackConfig) -> None:
    traffic.start()
    try:
        await traffic.progress(STEADY_ANSWERS, RECOVERY_TIMEOUT_S)  # under way: then a kill
        await outage(traffic, stack, "mongo", MONGO_OUTAGE_S)
        await outage(traffic, stack, "temporal", TEMPORAL_OUTAGE_S)
        await outage(traffic, stack, "redis", REDIS_OUTAGE_S)
        traffic.enter("steady again")
        await traffic.progress(STEADY_ANSWERS, RECOVERY_TIMEOUT_S)
    finally:
        traffic.stop.set()
        _, pending = await asyncio.wait(traffic.tasks, timeout=FINISH_TIMEOUT_S)
        for task in pending:
            task.cancel()
    traffic.raise_failed()  # a caller's failed assertion (an untyped error) surfaces here
    assert not pending, f"{len(pending)} callers did not finish within {FINISH_TIMEOUT_S:g} s"


def _check_callers(traffic: Traffic) -> None:
    """Bounded answers, typed errors only, the outage named where the bound allows it."""
    calls = traffic.calls
    summary = Counter((c.stage, c.kind, type(c.error).__name__ if c.error else "ok")
                      for c in calls)  # fmt: skip
    slowest = max(c.elapsed_s for c in calls)
    print(f"\ncalls by (stage, kind, outcome): {dict(summary)}; slowest {slowest:.1f} s; "
          f"client re-sends {traffic.client.retries}; writes acknowledged {traffic.answered}, "
          f"{len(traffic.replayed)} of them as replays")
    for c in calls:
        if c.error is not None:
            print(f"  {c.stage} {c.kind} {c.elapsed_s:.1f} s {type(c.error).__name__}: "
                  f"{str(c.error)[:300]}")
    assert slowest <= WINDOW_S + ANSWER_SLACK_S, sorted(
        (round(c.elapsed_s, 1), c.stage, c.kind) for c in calls)[-5:]
    untyped = [c for c in calls if c.error is not None and not isinstance(c.error, WalletError)]
    assert not untyped, [(c.stage, c.kind, repr(c.error)) for c in untyped[:5]]
    errors = [c for c in calls if c.error is not None]
    assert all(isinstance(c.error, StoreUnavailableError) for c in errors), [
        (c.stage, c.kind, repr(c.error)) for c in errors if not
        isinstance(c.error, StoreUnavailableError)][:5]  # fmt: skip
    mongo = traffic.during("mongo down")
    named = [c for c in mongo if c.kind == "write" and c.error is not None
             and "MongoDB" in str(c.error)]  # fmt: skip
    assert named, "no caller was told MongoDB was unavailable"
    reads_named = [c for c in mongo if c.kind == "read" and c.error is not None
                   and str(c.error).startswith("MongoDB")]  # fmt: skip
    assert reads_named, "no read on the stores was told MongoDB was unavailable"
    # Temporal's outage outlasted the window: the writes in flight were told the outcome is
    # unknown (OutcomeUnknownError, never an RPCError), and resent later they were applied once.
    temporal = [c for c in traffic.during("temporal down") if c.kind == "write"]
    unknown = [c for c in temporal if isinstance(c.error, OutcomeUnknownError)]
    assert unknown, [(c.elapsed_s, repr(c.error)) for c in temporal]
    assert all(c.error is None or isinstance(c.error, OutcomeUnknownError)
               for c in temporal), [repr(c.error) for c in temporal]
    redis = [c for c in calls if c.stage.startswith("redis") and c.error is not None]
    # The same transaction id succeeded on a later resend, every time.
    acked = {op.transaction_id for ops in traffic.acked.values() for op in ops}
    assert {c.txn for c in errors if c.kind == "write"} <= acked
    assert not redis, f"Redis is only a cache, yet callers saw {[repr(c.error) for c in redis]}"


async def _check_wallet(stores: Stores, client: WalletClient, wallet: WalletKey,
                        acked: list[Op]) -> None:
    """Independent of the platform's report: each acknowledged operation once in MongoDB and
    once in TigerBeetle, nothing else, and both balances equal to the callers' ledger."""
    status = await wait_drained(client, wallet, timeout_s=DRAIN_TIMEOUT_S,
                                outbox=stores.legacy.outbox)
    assert status is None or status.divergence_count == 0, status
    ids = sorted(op.transaction_id for op in acked)
    assert len(set(ids)) == len(ids)
    docs = await stores.db["wallet_transactions"].find(
        {"wallet": wallet.canonical}, {"_id": 1}).to_list(None)  # fmt: skip
    assert sorted(d["_id"] for d in docs) == ids, wallet
    found = await stores.tb_client.lookup_transfers([transfer_id(t) for t in ids])
    by_id = {t.id: t for t in found}
    assert len(found) == len(by_id) == len(ids), (wallet, len(found), len(ids))
    for op in acked:
        transfer = by_id[transfer_id(op.transaction_id)]
        assert transfer.amount == to_minor(op.amount, wallet.currency), op.transaction_id
    record = await stores.accounts.get(wallet)
    assert record is not None, wallet
    on_account = {t.id for t in await account_transfers(stores.tb_client, record.account_id)}
    assert on_account == set(by_id), (wallet, len(on_account), len(by_id))
    credit, debit, _ = await balances_equal(stores, wallet)
    # SubtractCredit is a subclass of AddCredit: test for it first.
    net = sum((-op.amount if isinstance(op, SubtractCredit) else op.amount for op in acked),
              Decimal(0))  # fmt: skip
    assert credit - debit == net, (wallet, credit, debit, net)


async def _check_backlog_command(settings: Settings, queue: str) -> None:
    """`walletmig wallet backlog`: every wallet workflow examined, nothing owed any more."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "walletmig", "wallet", "backlog", "--json", "--task-queue", queue,
        cwd=REPO_ROOT, env=worker_env(settings, queue), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out
    report = BacklogReport.model_validate_json(out)
    assert report.running == WALLETS and report.answered == WALLETS and report.listed_all, report
    assert report.backlog_total == 0 and report.backlog_age_s == 0, report


async def test_temporal_unreachable_is_a_typed_bounded_answer() -> None:
    """No Temporal at all: writes end in OutcomeUnknownError, reads and the status query in
    StoreUnavailableError, each within the bound; never a temporalio exception."""
    from walletmig.processes import free_port

    window_s = 2.0
    temporal = await Client.connect(f"127.0.0.1:{free_port()}", lazy=True,
                                    data_converter=pydantic_data_converter)  # fmt: skip
    client = WalletClient(temporal, "nowhere", id_key=session_id_key(),
                          retry_window_s=window_s)
    wallet = key("unreachable", DUAL_PAIR)
    calls = {
        "apply": client.apply(AddCredit(wallet=wallet, transaction_id="t1", amount=CREDIT)),
        "get_balance": client.get_balance(wallet),
        "status": client.status(wallet),
        "backlog_report": client.backlog_report(limit=5),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as caught:
            await call
        elapsed_s = time.monotonic() - started
        assert elapsed_s <= window_s + ANSWER_SLACK_S, (name, elapsed_s)
        assert "Temporal unreachable" in str(caught.value), (name, caught.value)
        assert isinstance(caught.value, OutcomeUnknownError) == (name == "apply"), name


async def test_cancelled_server_selection_waits_never_wedge_pymongo() -> None:
    """mongobase.cancel_safe: tasks waiting on a pymongo condition (as server selection does,
    in 1 ms slices), cancelled at random moments, always leave its lock free. pymongo's own
    `wait_for` version wedges this within a few rounds on Python 3.11."""
    import random

    import pymongo.asynchronous.topology
    from pymongo.lock import _async_create_condition, _async_create_lock

    from mongobase import cancel_safe

    assert cancel_safe.install() == (sys.version_info < (3, 12))
    # What server selection calls (the name is private to pymongo).
    wait = getattr(pymongo.asynchronous.topology, cancel_safe.PATCHED_NAME)
    assert wait is cancel_safe.cond_wait or sys.version_info >= (3, 12)
    rng = random.Random(16)
    lock = _async_create_lock()
    condition = _async_create_condition(lock)

    async def selector() -> None:
        async with lock:
            for _ in range(20):
                await wait(condition, 0.001)

    for _ in range(50):
        tasks = [asyncio.ensure_future(selector()) for _ in range(4)]
        await asyncio.sleep(rng.random() * 0.005)
        for task in tasks:
            if rng.random() < 0.7:
                task.cancel()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        assert not [r for r in results if isinstance(r, RuntimeError)], results
        assert not lock.locked(), "a cancelled wait kept the lock: the client would wedge"
