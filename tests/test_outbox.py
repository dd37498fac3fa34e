"""The transactional outbox of the dual-write phases (stores.outbox, activities.outbox_drain),
against the real servers: the legacy write and its record are committed together or not at
all (a writer killed with SIGKILL mid-stream), the drainer applies many wallets per pass each
in its legacy order (a debit needing the credit before it), and a drainer that died after
TigerBeetle and before marking its records is simply run again (each transfer once).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio
import tigerbeetle as tb
from wallet_support import (
    DUAL_PAIR,
    REPO_ROOT,
    assert_same_sequence,
    isolated_settings,
    key,
    kill_when_stopped,
    worker_env,
)

from activities.outbox_drain import OutboxBatcher, OutboxDrainer
from activities.reconciliation.evidence import EvidenceReader
from activities.reconciliation.scan import attach_tigerbeetle, subjects_of
from activities.reverse_outbox import ReverseOutboxDrainer
from activities.store_ops import apply_to
from activities.wallet import ImportedVersions, TigerBeetleBacklog
from messages.wallet import WalletCommand
from stores.bundle import Stores, make_stores
from stores.legacy_store import WALLET_TRANSACTIONS
from stores.outbox import (
    ABANDONED,
    APPLIED,
    OUTBOX_SHARDS,
    PENDING,
    WALLET_OUTBOX,
    OutboxIntent,
    outbox_shard,
)
from stores.tb_batches import BatchedClient
from stores.tigerbeetle_client import TigerBeetleClient
from walletconfig.settings import Settings
from walletcore.errors import StoreUnavailableError, WalletError
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, SubtractCredit, Void, WalletOperation
from walletcore.phases import Phase
from walletcore.reconcile import (
    IssueKind,
    OpEffect,
    PhaseWindow,
    legacy_op_may_be_in_flight,
    tb_op_may_be_in_flight,
)
from workers.wiring import make_importer

KILLS = 3
ANSWERS_BEFORE_KILL = 15

# A writer process: legacy writes with their outbox record, one wallet, printing each answer.
WRITER = """
import asyncio, sys
from decimal import Decimal
from messages.wallet import WalletCommand
from stores.bundle import make_stores
from stores.outbox import OutboxIntent
from walletconfig.settings import Settings
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, SubtractCredit, Void
from walletcore.phases import Phase

async def main() -> None:
    stores = await make_stores(Settings.from_env(), tb_addresses=sys.argv[2])
    client = sys.argv[1]
    wallet = WalletKey(client_id=client, country="MEX", currency="MXN")
    i = 0
    while True:
        i += 1
        txn = f"{client}.{i}"
        if i % 5 == 4:
            op = Void(wallet=wallet, transaction_id=txn, original_transaction_id=f"{client}.{i-1}")
        elif i % 2:
            op = AddCredit(wallet=wallet, transaction_id=txn, amount=Decimal("2.00"))
        else:
            op = SubtractCredit(wallet=wallet, transaction_id=txn, amount=Decimal("1.00"))
        intent = OutboxIntent(command=WalletCommand.of(op), phase=Phase.DUAL_WRITE, epoch=1,
                              since_version=None)
        await stores.legacy.apply(op, outbox=intent)
        print(txn, flush=True)

asyncio.run(main())
"""


@pytest_asyncio.fixture(loop_scope="session")
async def stores(settings: Settings, tb_addresses: str) -> AsyncIterator[Stores]:
    opened = await make_stores(isolated_settings(settings, "outbox"), tb_addresses=tb_addresses)
    await opened.imports.ensure_indexes()
    try:
        yield opened
    finally:
        await opened.close()


def intent(op: WalletOperation) -> OutboxIntent:
    return OutboxIntent(command=WalletCommand.of(op), phase=Phase.DUAL_WRITE, epoch=1,
                        since_version=None)


async def write(stores: Stores, op: WalletOperation) -> None:
    await stores.legacy.apply(op, outbox=intent(op))


def drainer(
    stores: Stores, *, batched: bool = True
) -> tuple[OutboxDrainer, TigerBeetleBacklog]:
    """The drainer the worker builds (activities.wallet): the batched fast path first, the
    per-record path (`TigerBeetleBacklog`) for the rest; `batched=False`: per record only."""
    importer = make_importer(stores)
    imported = ImportedVersions(importer)
    applier = TigerBeetleBacklog(stores.legacy, stores.tigerbeetle, importer, imported)
    batcher = OutboxBatcher(stores.legacy.outbox, stores.tigerbeetle, imported)
    return OutboxDrainer(stores.legacy.outbox, applier, batcher if batched else None), applier


def wallet_ops(wallet: WalletKey) -> list[WalletOperation]:
    """A debit that only the credit before it funds, and a void: order matters."""
    c = wallet.client_id
    return [
        AddCredit(wallet=wallet, transaction_id=f"{c}.1", amount=Decimal("10.00")),
        SubtractCredit(wallet=wallet, transaction_id=f"{c}.2", amount=Decimal("10.00")),
        AddCredit(wallet=wallet, transaction_id=f"{c}.3", amount=Decimal("4.00")),
        Void(wallet=wallet, transaction_id=f"{c}.4", original_transaction_id=f"{c}.2"),
        SubtractCredit(wallet=wallet, transaction_id=f"{c}.5", amount=Decimal("14.00")),
    ]


async def drain_all(d: OutboxDrainer, stores: Stores) -> None:
    deadline = time.monotonic() + 60
    while await stores.legacy.outbox.collection.count_documents({"state": PENDING}) > 0:
        assert time.monotonic() < deadline, "outbox not drained"
        for shard in range(OUTBOX_SHARDS):
            await d.drain_pass(shard)


# A drainer process killed with SIGKILL inside its batch: argv = TB addresses, where to stop
# ("registry": TigerBeetle created, nothing registered; "mark": registered, nothing marked),
# shard. It prints "stopped" there and waits to be killed.
BATCH_CRASHER = """
import asyncio, sys
from activities.outbox_drain import OutboxBatcher, OutboxDrainer
from activities.wallet import ImportedVersions, TigerBeetleBacklog
from stores.bundle import make_stores
from walletconfig.settings import Settings
from workers.wiring import make_importer

async def main() -> None:
    stores = await make_stores(Settings.from_env(), tb_addresses=sys.argv[1])
    importer = make_importer(stores)
    imported = ImportedVersions(importer)
    outbox = stores.legacy.outbox
    drainer = OutboxDrainer(
        outbox, TigerBeetleBacklog(stores.legacy, stores.tigerbeetle, importer, imported),
        OutboxBatcher(outbox, stores.tigerbeetle, imported))

    async def stop(*args: object, **kwargs: object) -> None:
        print("stopped", flush=True)
        await asyncio.sleep(3600)

    if sys.argv[2] == "registry":
        stores.tigerbeetle.transfers.record_many = stop
    else:
        outbox.mark_applied = stop
    await drainer.drain_pass(int(sys.argv[3]))
    print("finished without stopping", flush=True)

asyncio.run(main())
"""


@pytest.mark.slow
async def test_a_killed_writer_leaves_the_legacy_write_and_its_record_together_or_neither(
    settings: Settings, tb_addresses: str, stores: Stores, tmp_path: Path
) -> None:
    env = worker_env(settings.model_copy(update={"mongodb_database": stores.db.name}), "-")
    run = uuid.uuid4().hex[:8]
    answered: dict[str, list[str]] = {}
    for n in range(KILLS):
        client = f"atomic-{run}-{n}"
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, client, tb_addresses], cwd=REPO_ROOT, env=env,
            stdout=subprocess.PIPE, stderr=(tmp_path / f"writer-{n}.log").open("wb"))
        assert proc.stdout is not None
        lines: list[str] = []
        target = ANSWERS_BEFORE_KILL + random.randrange(10)
        while len(lines) < target:
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line, f"writer {n} stopped: see {tmp_path}"
            lines.append(line.decode().strip())
        await asyncio.sleep(random.random() * 0.01)  # somewhere inside a write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        answered[client] = lines
    for client, lines in answered.items():
        canonical = key(client, DUAL_PAIR).canonical
        legacy = {d["_id"] for d in await stores.db[WALLET_TRANSACTIONS].find(
            {"wallet": canonical}, {"_id": 1}).to_list(None)}
        outbox = {d["_id"] for d in await stores.db[WALLET_OUTBOX].find(
            {"wallet": canonical}, {"_id": 1}).to_list(None)}
        assert set(lines) <= legacy, client  # every answer was committed ...
        assert legacy == outbox, (client, legacy ^ outbox)  # ... with its record, and no other


async def test_a_pass_applies_many_wallets_each_in_legacy_order(stores: Stores) -> None:
    run = uuid.uuid4().hex[:8]
    # More wallets than shards: some shard holds two or more of them.
    wallets = [key(f"order-{run}-{n}", DUAL_PAIR) for n in range(OUTBOX_SHARDS * 2)]
    plans = [wallet_ops(w) for w in wallets]
    for step in range(len(plans[0])):  # interleaved across wallets, as live traffic is
        for plan in plans:
            await write(stores, plan[step])
    shared = max(range(OUTBOX_SHARDS),
                 key=lambda s: sum(outbox_shard(w.canonical) == s for w in wallets))
    in_shard = [w for w in wallets if outbox_shard(w.canonical) == shared]
    assert len(in_shard) >= 2
    d, _ = drainer(stores)
    applied = await d.drain_pass(shared)  # one pass: every wallet of the shard, in order
    assert applied == len(in_shard) * len(plans[0])
    await drain_all(d, stores)
    docs = await stores.db[WALLET_OUTBOX].find(
        {"wallet": {"$in": [w.canonical for w in wallets]}}).to_list(None)
    assert len(docs) == len(wallets) * len(plans[0])
    assert all(doc["state"] == APPLIED and "error_type" not in doc for doc in docs), docs
    for wallet in wallets:
        await assert_same_sequence(stores, wallet)


async def test_a_drainer_that_died_before_marking_applies_again_once(stores: Stores) -> None:
    run = uuid.uuid4().hex[:8]
    wallets = [key(f"resume-{run}-{n}", DUAL_PAIR) for n in range(3)]
    for wallet in wallets:
        for op in wallet_ops(wallet):
            await write(stores, op)
    d, applier = drainer(stores)
    # What a drainer killed between TigerBeetle and the mark leaves: applied, still pending.
    for wallet in wallets:
        records = [r for r in await stores.legacy.outbox.pending_page(
            outbox_shard(wallet.canonical)) if r.wallet == wallet]
        half = records[: len(records) // 2 + 1]
        await applier.apply(wallet, [r.as_backlog_item() for r in half],
                            since_version=half[0].since_version)
        assert await stores.legacy.outbox.pending_count(wallet) == len(records)
    await drain_all(d, stores)
    for wallet in wallets:
        assert await stores.legacy.outbox.pending_count(wallet) == 0
        await assert_same_sequence(stores, wallet)  # each transfer once, in order


async def test_a_replay_never_rewrites_a_record(stores: Stores) -> None:
    wallet = key(f"replay-{uuid.uuid4().hex[:8]}", DUAL_PAIR)
    op = AddCredit(wallet=wallet, transaction_id=f"{wallet.client_id}.1", amount=Decimal("1"))
    await write(stores, op)
    result, facts = await stores.legacy.apply(op, outbox=intent(op))
    assert result.replayed
    assert not await stores.legacy.outbox.ensure(intent(op), facts)  # there already
    d, _ = drainer(stores)
    await drain_all(d, stores)
    assert not await stores.legacy.outbox.ensure(intent(op), facts)
    doc = await stores.db[WALLET_OUTBOX].find_one({"_id": op.transaction_id})
    assert doc is not None and doc["state"] == APPLIED
    assert await stores.db[WALLET_OUTBOX].count_documents({"state": PENDING,
                                                            "wallet": wallet.canonical}) == 0


def test_in_flight_iff_the_outbox_record_is_pending() -> None:
    window = PhaseWindow(phase=Phase.DUAL_WRITE, since_s=0.0)
    now = time.time()
    assert legacy_op_may_be_in_flight(window, now, outbox_state=PENDING, in_tigerbeetle=False)
    assert not legacy_op_may_be_in_flight(window, now, outbox_state=APPLIED, in_tigerbeetle=False)
    # Applied after TigerBeetle's cut: in flight as ever; no record: the backlog rule.
    assert legacy_op_may_be_in_flight(window, now, outbox_state=APPLIED, in_tigerbeetle=True)
    assert legacy_op_may_be_in_flight(window, now, outbox_state=None, in_tigerbeetle=False)
    legacy = PhaseWindow(phase=Phase.LEGACY)
    assert not legacy_op_may_be_in_flight(legacy, now, outbox_state=None, in_tigerbeetle=False)
    assert legacy_op_may_be_in_flight(legacy, now, outbox_state=PENDING, in_tigerbeetle=False)


class CountingClient:
    """The real TigerBeetle client, counting the create_transfers requests that reach it
    (after BatchedClient cut them at the request limit)."""

    def __init__(self, inner: TigerBeetleClient) -> None:
        self.inner = inner
        self.create_requests = 0
        self.create_events = 0

    async def create_transfers(
        self, transfers: list[tb.Transfer]
    ) -> list[tb.CreateTransferResult]:
        self.create_requests += 1
        self.create_events += len(transfers)
        return await self.inner.create_transfers(transfers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextlib.contextmanager
def counting(stores: Stores) -> Iterator[CountingClient]:
    cut = stores.tigerbeetle.client
    assert isinstance(cut, BatchedClient)
    inner = cut.client
    counter = CountingClient(inner)
    cut.client = cast(TigerBeetleClient, counter)
    try:
        yield counter
    finally:
        cut.client = inner


def movement_ops(wallet: WalletKey) -> list[WalletOperation]:
    """Credits and debits only (the batch's records); each debit needs the credit before it
    (in TigerBeetle's order inside one request). Ends at 2.00."""
    c = wallet.client_id
    return [
        AddCredit(wallet=wallet, transaction_id=f"{c}.1", amount=Decimal("10.00")),
        SubtractCredit(wallet=wallet, transaction_id=f"{c}.2", amount=Decimal("10.00")),
        AddCredit(wallet=wallet, transaction_id=f"{c}.3", amount=Decimal("4.00")),
        SubtractCredit(wallet=wallet, transaction_id=f"{c}.4", amount=Decimal("3.00")),
        AddCredit(wallet=wallet, transaction_id=f"{c}.5", amount=Decimal("1.00")),
    ]


async def write_interleaved(stores: Stores, plans: list[list[WalletOperation]]) -> None:
    for step in range(len(plans[0])):  # interleaved across wallets, as live traffic is
        for plan in plans:
            await write(stores, plan[step])


async def assert_drained_in_order(stores: Stores, wallets: list[WalletKey]) -> None:
    docs = await stores.db[WALLET_OUTBOX].find(
        {"wallet": {"$in": [w.canonical for w in wallets]}}).to_list(None)
    assert docs and all(d["state"] == APPLIED and "error_type" not in d for d in docs), docs
    for wallet in wallets:
        await assert_same_sequence(stores, wallet)  # each transfer once, in order
        balance = await stores.tigerbeetle.get_balance(wallet)
        assert balance.credit == Decimal("2.00"), (wallet, balance)


BATCH_WALLETS = 48


async def test_a_pass_batches_many_wallets_in_few_requests_each_in_order(
    settings: Settings, tb_addresses: str
) -> None:
    own = await make_stores(isolated_settings(settings, "outbox_batch"), tb_addresses=tb_addresses)
    await own.imports.ensure_indexes()
    try:
        run = uuid.uuid4().hex[:8]
        wallets = [key(f"batch-{run}-{n}", DUAL_PAIR) for n in range(BATCH_WALLETS)]
        plans = [movement_ops(w) for w in wallets]
        await write_interleaved(own, plans)
        d, _ = drainer(own)
        with counting(own) as requests:
            applied = sum([await d.drain_pass(shard) for shard in range(OUTBOX_SHARDS)])
        records = sum(len(p) for p in plans)
        assert applied == records  # one pass per shard: everything
        # Per record this took `records` requests; batched: one per shard's pass.
        assert requests.create_requests <= OUTBOX_SHARDS, vars(requests)
        assert requests.create_events == records, vars(requests)
        assert await own.legacy.outbox.pending_total() == 0
        await assert_drained_in_order(own, wallets)
    finally:
        await own.close()


@pytest.mark.parametrize("stop_at", ["registry", "mark"])
async def test_a_drainer_killed_inside_its_batch_applies_nothing_twice(
    settings: Settings, tb_addresses: str, stores: Stores, tmp_path: Path, stop_at: str
) -> None:
    run = uuid.uuid4().hex[:8]
    wallets = [key(f"kill-{stop_at}-{run}-{n}", DUAL_PAIR) for n in range(OUTBOX_SHARDS * 3)]
    shard = max(range(OUTBOX_SHARDS),
                key=lambda s: sum(outbox_shard(w.canonical) == s for w in wallets))
    wallets = [w for w in wallets if outbox_shard(w.canonical) == shard]
    await write_interleaved(stores, [movement_ops(w) for w in wallets])
    env = worker_env(settings.model_copy(update={"mongodb_database": stores.db.name}), "-")
    await kill_when_stopped(BATCH_CRASHER, [tb_addresses, stop_at, str(shard)], env,
                            tmp_path / "crasher.log", 120)
    pending = await stores.legacy.outbox.pending_of(
        [op.transaction_id for w in wallets for op in movement_ops(w)])
    assert len(pending) == len(wallets) * 5  # TigerBeetle has them; the outbox says pending
    d, _ = drainer(stores)
    with counting(stores) as requests:
        await drain_all(d, stores)
    if stop_at == "mark":  # registered: known applied without asking TigerBeetle again
        assert requests.create_events == 0, vars(requests)
    await assert_drained_in_order(stores, wallets)


# ---- tb_primary's reverse projection (wallet_outbox_to_mongodb, activities.reverse_outbox) ----


async def tb_primary_write(stores: Stores, op: WalletOperation, *, crash: bool = False) -> bool:
    """What the tb_primary write path does (activities.wallet._write_tigerbeetle): the
    MongoDB-bound intent first, then TigerBeetle; a refusal withdraws the record this call
    inserted. `crash`: stop between the two (a worker killed there). True if TB holds it."""
    outbox = stores.legacy.outbox
    await ImportedVersions(make_importer(stores)).ensure(op.wallet, record_absent=True)
    inserted = await outbox.intend_to_mongodb(WalletCommand.of(op), Phase.TB_PRIMARY, 1)
    if crash:
        return False
    try:
        await apply_to(stores.tigerbeetle, op)
    except WalletError as err:
        assert not err.retryable
        if inserted:
            await outbox.withdraw_to_mongodb(op.transaction_id)
        return False
    return True


async def reverse_drain_all(d: ReverseOutboxDrainer, stores: Stores, wallet: WalletKey) -> None:
    shard = outbox_shard(wallet.canonical)
    deadline = time.monotonic() + 60
    while await stores.legacy.outbox.pending_to_mongodb(wallet) > 0:
        assert time.monotonic() < deadline, "reverse outbox not drained"
        await d.drain_pass(shard)


async def test_reverse_intent_first_applied_in_tigerbeetle_order(stores: Stores) -> None:
    """Each wallet's records reach MongoDB in TigerBeetle's order (a debit needing the credit
    before it, a void); a refused write leaves no record; an intent whose TigerBeetle write
    never came stays pending while it may still come, is abandoned after, and a retry of the
    operation re-arms it and it is applied like any other."""
    outbox = stores.legacy.outbox
    run = uuid.uuid4().hex[:8]
    wallets = [key(f"rev-{run}-{n}", DUAL_PAIR) for n in range(3)]
    plans = [wallet_ops(w) for w in wallets]
    for step in range(len(plans[0])):  # interleaved across wallets, as live traffic is
        for plan in plans:
            assert await tb_primary_write(stores, plan[step])
    w = wallets[0]
    c = w.client_id
    refused = SubtractCredit(wallet=w, transaction_id=f"{c}.big", amount=Decimal("1000.00"))
    assert not await tb_primary_write(stores, refused)  # insufficient funds: no record
    assert await outbox.reverse_states_of([refused.transaction_id]) == {}
    lost = AddCredit(wallet=w, transaction_id=f"{c}.lost", amount=Decimal("7.00"))
    await tb_primary_write(stores, lost, crash=True)
    patient = ReverseOutboxDrainer(outbox, stores.legacy, stores.tigerbeetle)
    for wallet in wallets:
        await patient.drain_pass(outbox_shard(wallet.canonical))
    assert await outbox.reverse_states_of([lost.transaction_id]) == {lost.transaction_id: PENDING}
    hasty = ReverseOutboxDrainer(outbox, stores.legacy, stores.tigerbeetle, abandon_after_s=1e-6)
    assert await hasty.drain_pass(outbox_shard(w.canonical)) >= 1
    assert await outbox.reverse_states_of([lost.transaction_id]) == {
        lost.transaction_id: ABANDONED}
    for wallet in wallets:  # nothing of the lost one in either store
        await assert_same_sequence(stores, wallet)
    assert await tb_primary_write(stores, lost)  # the caller's retry: re-armed, then written
    await reverse_drain_all(patient, stores, w)
    log = await assert_same_sequence(stores, w)
    assert log[-1] == lost.transaction_id
    docs = await outbox.to_mongodb.find(
        {"wallet": {"$in": [x.canonical for x in wallets]}}).to_list(None)
    assert len(docs) == len(wallets) * len(plans[0]) + 1
    assert all(d["state"] == APPLIED and "error_type" not in d for d in docs), docs


async def test_a_reverse_drainer_that_died_before_marking_applies_again_once(
    stores: Stores,
) -> None:
    outbox = stores.legacy.outbox
    wallet = key(f"rev-resume-{uuid.uuid4().hex[:8]}", DUAL_PAIR)
    ops = wallet_ops(wallet)
    for op in ops:
        assert await tb_primary_write(stores, op)
    for op in ops[:3]:  # applied to MongoDB by a drainer killed before its mark
        await apply_to(stores.legacy, op)
    assert await outbox.pending_to_mongodb(wallet) == len(ops)
    assert await outbox.pending_count(wallet) == len(ops)  # both directions are counted
    await reverse_drain_all(ReverseOutboxDrainer(outbox, stores.legacy, stores.tigerbeetle),
                            stores, wallet)
    await assert_same_sequence(stores, wallet)  # each once, in order


def test_a_tigerbeetle_transfer_is_in_flight_iff_its_reverse_record_is_pending() -> None:
    now = time.time()
    for phase in Phase:  # the record says it, whatever the phase
        window = PhaseWindow(phase=phase, since_s=now - 10)
        assert tb_op_may_be_in_flight(window, now, reverse_state=PENDING)
        assert not tb_op_may_be_in_flight(window, now, reverse_state=APPLIED)
        assert not tb_op_may_be_in_flight(window, now, reverse_state=ABANDONED)
    # No record (the workflow backlog): the phase rule, as before.
    primary = PhaseWindow(phase=Phase.TB_PRIMARY, since_s=now - 10)
    assert tb_op_may_be_in_flight(primary, now, reverse_state=None)
    dual = PhaseWindow(phase=Phase.DUAL_WRITE, since_s=now - 10)
    assert not tb_op_may_be_in_flight(dual, now, reverse_state=None)


async def test_reconciliation_reads_a_pending_reverse_record_as_in_flight(stores: Stores) -> None:
    """A TigerBeetle transfer MongoDB lacks: in flight while its reverse record is pending
    (whatever the phase window says), lost_legacy_write once the record is applied (where the
    phase rule alone may call it reverse projection)."""
    outbox = stores.legacy.outbox
    wallet = key(f"rev-recon-{uuid.uuid4().hex[:8]}", DUAL_PAIR)
    first, owed = wallet_ops(wallet)[:2]
    assert await tb_primary_write(stores, first)
    await reverse_drain_all(ReverseOutboxDrainer(outbox, stores.legacy, stores.tigerbeetle),
                            stores, wallet)  # the wallet exists in MongoDB: a subject
    assert await tb_primary_write(stores, owed)  # in TigerBeetle; its record pending
    reader = EvidenceReader(stores.legacy, stores.tigerbeetle, stores.imports, stores.migration)

    async def owed_effect() -> OpEffect:
        subjects = await subjects_of(stores.legacy, [wallet.canonical])
        await attach_tigerbeetle(stores.tb_client, stores.accounts, subjects)
        (effect,) = (await reader.collect(subjects))[wallet.canonical].tb_only
        assert effect.transaction_id == owed.transaction_id
        return effect

    assert (await owed_effect()).real_kind is None
    await outbox.mark_reverse([owed.transaction_id])  # "applied", yet MongoDB lacks it
    assert (await owed_effect()).real_kind is IssueKind.LOST_LEGACY_WRITE
    await apply_to(stores.legacy, owed)  # leave the stores equal
    await assert_same_sequence(stores, wallet)


async def tb_primary_wallets(stores: Stores, label: str, count: int) -> list[WalletKey]:
    """`count` wallets of one shard that MongoDB holds already (a first tb_primary credit,
    drained), so their next records can go in a batched transaction."""
    run = uuid.uuid4().hex[:8]
    wallets = [key(f"{label}-{run}-{n}", DUAL_PAIR) for n in range(count * OUTBOX_SHARDS)]
    shard = max(range(OUTBOX_SHARDS),
                key=lambda s: sum(outbox_shard(w.canonical) == s for w in wallets))
    wallets = [w for w in wallets if outbox_shard(w.canonical) == shard][:count]
    drainer = ReverseOutboxDrainer(stores.legacy.outbox, stores.legacy, stores.tigerbeetle)
    for w in wallets:
        assert await tb_primary_write(stores, AddCredit(
            wallet=w, transaction_id=f"{w.client_id}.0", amount=Decimal("1.00")))
        await reverse_drain_all(drainer, stores, w)
    return wallets


async def test_a_reverse_batch_applies_and_marks_many_wallets_in_one_transaction(
    stores: Stores,
) -> None:
    """Each wallet's credits and debits in one transaction with their marks (a record is
    marked iff its write committed); an id already stored stops its chain for the one-by-one
    path; a record no longer pending writes nothing at all; the drainer does the rest (the
    voids) after, each wallet in TigerBeetle's order."""
    outbox = stores.legacy.outbox
    wallets = await tb_primary_wallets(stores, "rev-batch", 4)
    plans = [wallet_ops(w) for w in wallets]
    for step in range(len(plans[0])):
        for plan in plans:
            assert await tb_primary_write(stores, plan[step])
    heads = [[cast(AddCredit, op) for op in plan[:3]] for plan in plans]  # before the void
    await outbox.mark_reverse([plans[0][0].transaction_id])  # no longer pending
    assert await stores.legacy.apply_reverse_batch(heads) is None  # nothing written
    assert not await stores.legacy.transactions_held([op.transaction_id for op in heads[1]])
    await outbox.to_mongodb.update_one({"_id": plans[0][0].transaction_id},
                                       {"$set": {"state": PENDING}})
    await apply_to(stores.legacy, plans[1][0])  # a drainer died before its mark
    assert await stores.legacy.apply_reverse_batch(heads) == [3, 0, 3, 3]
    states = await outbox.reverse_states_of([op.transaction_id for plan in plans for op in plan])
    for n, plan in enumerate(plans):
        assert [states[op.transaction_id] for op in plan] == (
            [PENDING] * 5 if n == 1 else [APPLIED] * 3 + [PENDING] * 2)
    drainer = ReverseOutboxDrainer(outbox, stores.legacy, stores.tigerbeetle)
    await drainer.drain_pass(outbox_shard(wallets[0].canonical))
    for wallet in wallets:
        assert await outbox.pending_to_mongodb(wallet) == 0
        await assert_same_sequence(stores, wallet)  # each once, in TigerBeetle's order
    docs = await outbox.to_mongodb.find(
        {"wallet": {"$in": [w.canonical for w in wallets]}}).to_list(None)
    assert all(d["state"] == APPLIED and "error_type" not in d for d in docs), docs


# A reverse drainer process killed with SIGKILL inside its batched transaction (its writes
# sent, the commit not): argv = TB addresses, shard. Prints "stopped" there and waits.
REVERSE_CRASHER = """
import asyncio, sys
import stores.legacy_store as legacy_module
from activities.reverse_outbox import ReverseOutboxDrainer
from stores.bundle import make_stores
from walletconfig.settings import Settings

async def main() -> None:
    stores = await make_stores(Settings.from_env(), tb_addresses=sys.argv[1])

    async def stop(*args: object, **kwargs: object) -> None:
        print("stopped", flush=True)
        await asyncio.sleep(3600)

    legacy_module.commit = stop  # type: ignore[assignment]
    drainer = ReverseOutboxDrainer(stores.legacy.outbox, stores.legacy, stores.tigerbeetle)
    await drainer.drain_pass(int(sys.argv[2]))
    print("finished without stopping", flush=True)

asyncio.run(main())
"""


@pytest.mark.slow
async def test_a_reverse_drainer_killed_inside_its_batch_applies_each_once(
    short_txn_settings: Settings, tb_addresses: str, short_txn_stores: Stores, tmp_path: Path
) -> None:
    settings, stores = short_txn_settings, short_txn_stores  # a 5 s transaction lifetime
    outbox = stores.legacy.outbox
    wallets = await tb_primary_wallets(stores, "rev-kill", 3)
    plans = [movement_ops(w) for w in wallets]
    for step in range(len(plans[0])):
        for plan in plans:
            assert await tb_primary_write(stores, plan[step])
    shard = outbox_shard(wallets[0].canonical)
    env = worker_env(settings.model_copy(update={"mongodb_database": stores.db.name}), "-")
    await kill_when_stopped(REVERSE_CRASHER, [tb_addresses, str(shard)], env,
                            tmp_path / "crasher.log", 120)
    ids = [op.transaction_id for plan in plans for op in plan]
    states = await outbox.reverse_states_of(ids)
    assert states == dict.fromkeys(ids, PENDING)  # nothing committed, nothing marked
    assert not await stores.legacy.transactions_held(ids)
    # The killed process's transaction still holds its wallets until the server expires it
    # (mongod's transactionLifetimeLimitSeconds: 60 s by default, 5 s on the short-transaction
    # MongoDB of conftest): passes fail as conflicting until then, and the drain loop runs
    # them again, as here.
    drainer = ReverseOutboxDrainer(outbox, stores.legacy, stores.tigerbeetle)
    deadline = time.monotonic() + 180
    while set((await outbox.reverse_states_of(ids)).values()) != {APPLIED}:
        assert time.monotonic() < deadline, "the killed drainer's wallets stayed blocked"
        with contextlib.suppress(StoreUnavailableError):
            await drainer.drain_pass(shard)
    for wallet in wallets:
        await assert_same_sequence(stores, wallet)  # each once, in order
