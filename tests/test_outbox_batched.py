"""The outbox drainer's batched fast path (activities.outbox_drain.OutboxBatcher), on by default,
against the real servers: many wallets drained while writers keep writing and the backfill
imports wallets at the same time (some imported before, some by the backfill, some by the
drainer's own claim at since_version, some created by their first dual-write), after which
the unapplied-writes count is 0 and both stores hold the same log; the count leaves out
writes younger than the gates' grace (a write in flight is not unapplied); a wallet whose
import is held elsewhere does not stop the batch of the others; the batch feeds the backlog
gauges and the store operation series as the per-record path does; and what batching
saves, measured side by side (create_transfers requests and drainer CPU per record; also
tb_primary's reverse projection batched in MongoDB transactions vs one by one).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from test_outbox import (
    counting,
    drain_all,
    drainer,
    movement_ops,
    tb_primary_write,
    write,
    write_interleaved,
)
from wallet_support import (
    DUAL_PAIR,
    assert_same_sequence,
    isolated_stores,
    key,
)

from activities.backfill import ENSURE_WAIT_ATTEMPTS_MAX, ENSURE_WAIT_S
from activities.migration import IN_FLIGHT_GRACE_S, SWITCH_MARGIN_S, MigrationActivities
from activities.outbox_drain import BATCHED_DEFAULT
from activities.reverse_outbox import ReverseOutboxDrainer
from messages.backfill import BackfillPageInput
from messages.migration import EvidenceRequest
from mongobase.mongo import now_ms
from stores.backfill_imports import ImportRecord, ImportStatus
from stores.bundle import Stores
from stores.legacy_store import LOG_ORDER_INDEX, WALLET_TRANSACTIONS
from stores.outbox import APPLIED, OUTBOX_SHARDS, WALLET_OUTBOX, outbox_shard
from walletconfig.settings import Settings
from walletcore.balances import MinorBalance
from walletcore.errors import StoreUnavailableError, WalletError
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, SubtractCredit, Void, WalletOperation
from walletcore.phases import Phase
from workers.wiring import make_importer

SCOPES = [":".join(DUAL_PAIR)]
RACE_WALLETS = 60
RACE_WRITERS = 6  # each owns its wallets: one writer per wallet, as its workflow serializes
RACE_OPS_PER_WALLET = 8
DRAIN_DEADLINE_S = 90.0


@pytest_asyncio.fixture(loop_scope="session")
async def own(settings: Settings, tb_addresses: str) -> AsyncIterator[Stores]:
    """A database of the test's own: the unapplied-writes count reads the whole scope."""
    async with isolated_stores(settings, "outbox_batched", tb_addresses) as opened:
        yield opened


def test_the_batched_path_is_the_default() -> None:
    assert BATCHED_DEFAULT  # WALLETMIG_OUTBOX_BATCHED=off is the off switch


async def _writer(stores: Stores, wallets: list[WalletKey], rng: random.Random) -> int:
    """Credits, debits (some refused by MongoDB: no record) and voids, wallets interleaved."""
    written = 0
    done: dict[str, list[str]] = {w.canonical: [] for w in wallets}
    for step in range(RACE_OPS_PER_WALLET):
        for wallet in wallets:
            txn = f"{wallet.client_id}.{step}"
            roll = rng.random()
            op: WalletOperation
            if step == 0:  # a credit first: a wallet without history is created by it (every
                # later op a refused subtract would otherwise leave it unwritten: 1 in 256)
                op = AddCredit(wallet=wallet, transaction_id=txn,
                               amount=Decimal(rng.randrange(1, 20)))
            elif roll < 0.15 and done[wallet.canonical]:
                original = done[wallet.canonical].pop(rng.randrange(len(done[wallet.canonical])))
                op = Void(wallet=wallet, transaction_id=txn, original_transaction_id=original)
            elif roll < 0.5:
                op = SubtractCredit(wallet=wallet, transaction_id=txn,
                                    amount=Decimal(rng.randrange(1, 30)))
            else:
                op = AddCredit(wallet=wallet, transaction_id=txn,
                               amount=Decimal(rng.randrange(1, 20)))
            try:
                await write(stores, op)
            except WalletError as err:  # refused (funds, a void MongoDB will not take): no record
                if err.retryable:
                    raise
                continue
            written += 1
            if not isinstance(op, Void):
                done[wallet.canonical].append(txn)
        await asyncio.sleep(0)
    return written


async def _drain_shards(stores: Stores, stop: asyncio.Event) -> None:
    """One loop per shard, as the drainer workflows run them, until `stop` and drained."""
    d, _ = drainer(stores)

    async def shard_loop(shard: int) -> None:
        while not (stop.is_set() and await stores.legacy.outbox.pending_total(shard) == 0):
            try:
                if await d.drain_pass(shard) == 0:
                    await asyncio.sleep(0.05)
            except AssertionError:
                raise
            except Exception as err:  # as the activity does: pause, go on (printed if it fails)
                print(f"shard {shard}: pass failed, retrying: {err!r}")
                await asyncio.sleep(0.5)

    await asyncio.wait_for(asyncio.gather(*(shard_loop(s) for s in range(OUTBOX_SHARDS))),
                           DRAIN_DEADLINE_S)


async def _backfill(stores: Stores, run: str, limit: int = 7) -> None:
    """The backfill's pages over the scope, racing the writers and the drainer's claims."""
    importer = make_importer(stores)
    after: str | None = None
    while True:
        page = await importer.page(BackfillPageInput(run_id=f"backfill-{run}", pair=SCOPES[0],
                                                     after=after, limit=limit))
        after = page.last_key
        if page.exhausted:
            return
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_unapplied_count_is_zero_after_a_batched_drain_racing_writers_and_backfill(
    own: Stores,
) -> None:
    run = uuid.uuid4().hex[:8]
    rng = random.Random(run)
    wallets = [key(f"race-{run}-{n}", DUAL_PAIR) for n in range(RACE_WALLETS)]
    importer = make_importer(own)
    # Legacy history before dual_write (no records) for all but a sixth (created by their
    # first dual-write); a third imported before the traffic, the backfill races for the rest.
    for n, wallet in enumerate(wallets):
        if n % 6:
            await own.legacy.apply(AddCredit(wallet=wallet, transaction_id=f"{wallet.client_id}.s",
                                             amount=Decimal(50)))
        if n % 3 == 0 and n % 6:
            await importer.ensure_imported(wallet, f"pre-{run}")
    switch_at = datetime.now(UTC) - timedelta(seconds=SWITCH_MARGIN_S)
    stop = asyncio.Event()
    drain = asyncio.create_task(_drain_shards(own, stop))
    groups = [wallets[i::RACE_WRITERS] for i in range(RACE_WRITERS)]
    writers = [asyncio.create_task(_writer(own, g, random.Random(rng.random()))) for g in groups]
    await asyncio.sleep(0.3)
    await _backfill(own, run)
    written = sum(await asyncio.gather(*writers))
    stop.set()
    await drain
    docs = await own.db[WALLET_OUTBOX].find({"wallet": {"$in": [w.canonical for w in wallets]}},
                                            {"state": 1, "error_type": 1}).to_list(None)
    assert len(docs) == written
    assert all(d["state"] == APPLIED and "error_type" not in d for d in docs), [
        d for d in docs if d["state"] != APPLIED or "error_type" in d]
    acts = MigrationActivities(own.db, own.migration)
    assert await acts.unapplied_writes(SCOPES, Phase.DUAL_WRITE, switch_at) == 0
    for wallet in wallets:
        await assert_same_sequence(own, wallet)  # each transfer once, in legacy order


async def test_a_write_in_flight_is_unapplied_only_once_older_than_the_grace(
    own: Stores,
) -> None:
    run = uuid.uuid4().hex[:8]
    switch_at = datetime.now(UTC) - timedelta(seconds=SWITCH_MARGIN_S)
    wallet = key(f"grace-{run}", DUAL_PAIR)
    await write(own, AddCredit(wallet=wallet, transaction_id=f"{wallet.client_id}.1",
                               amount=Decimal(3)))
    acts = MigrationActivities(own.db, own.migration)

    async def count(grace_s: float) -> int | None:
        return await acts.unapplied_writes(SCOPES, Phase.DUAL_WRITE, switch_at,
                                           in_flight_grace_s=grace_s)

    assert await count(0) == 1  # the outbox holds it, TigerBeetle not yet
    assert await count(IN_FLIGHT_GRACE_S) == 0  # the gates: in flight, not unapplied
    await asyncio.sleep(IN_FLIGHT_GRACE_S + 0.5)
    assert await count(IN_FLIGHT_GRACE_S) == 1  # stuck: the gates see it
    d, _ = drainer(own)
    await drain_all(d, own)
    assert await count(0) == 0 and await count(IN_FLIGHT_GRACE_S) == 0


async def test_the_gate_builds_the_log_order_index_and_counts_the_same(own: Stores) -> None:
    """The unapplied-writes gate's evidence round builds the log-order index its scan reads
    (an index range scan, not a collection scan per round); the count is the same with the
    index as without it, and a write outside the scope is never counted."""
    txns = own.db[WALLET_TRANSACTIONS]
    if LOG_ORDER_INDEX in {ix["name"] async for ix in await txns.list_indexes()}:
        await txns.drop_index(LOG_ORDER_INDEX)  # built by an earlier test of this database
    run = uuid.uuid4().hex[:8]
    switch_at = datetime.now(UTC) - timedelta(seconds=SWITCH_MARGIN_S + 1)
    wallets = [key(f"gate-{run}-{n}", DUAL_PAIR) for n in range(3)]
    for n, wallet in enumerate(wallets):  # dual-writes, not drained: unapplied
        for i in range(n + 1):
            await write(own, AddCredit(wallet=wallet, transaction_id=f"{wallet.client_id}.{i}",
                                       amount=Decimal(1)))
    outside = key(f"gate-{run}-legacy")  # another pair's write: not the scope's
    await own.legacy.apply(AddCredit(wallet=outside, transaction_id=f"{outside.client_id}.1",
                                     amount=Decimal(1)))
    unindexed = await MigrationActivities(own.db, own.migration).unapplied_writes(
        SCOPES, Phase.DUAL_WRITE, switch_at)
    assert unindexed == 1 + 2 + 3
    acts = MigrationActivities(own.db, own.migration)
    await acts.collect_evidence(EvidenceRequest(
        migration_id=f"gate-{run}", scopes=SCOPES, phase=Phase.DUAL_WRITE,
        since=switch_at, window_s=60, write_switch_at=switch_at))
    assert await acts.ensure_gate_index(wait_s=120)  # the round started the build: its end
    assert LOG_ORDER_INDEX in {ix["name"] async for ix in await txns.list_indexes()}
    assert await acts.unapplied_writes(SCOPES, Phase.DUAL_WRITE, switch_at) == unindexed
    d, _ = drainer(own)
    await drain_all(d, own)
    assert await acts.unapplied_writes(SCOPES, Phase.DUAL_WRITE, switch_at) == 0


@pytest.mark.slow
async def test_a_wallet_whose_import_is_held_elsewhere_does_not_stop_the_batch(
    own: Stores,
) -> None:
    run = uuid.uuid4().hex[:8]
    wallets = [key(f"held-{run}-{n}", DUAL_PAIR) for n in range(OUTBOX_SHARDS * 4)]
    shard = outbox_shard(wallets[0].canonical)
    wallets = [w for w in wallets if outbox_shard(w.canonical) == shard]
    assert len(wallets) >= 2
    held, others = wallets[0], wallets[1:]
    empty = MinorBalance(credit_minor=0, debit_minor=0, historical_credit_minor=0)
    claim = ImportRecord(wallet=held.canonical, version=0, balance=empty,
                         status=ImportStatus.CLAIMED, claimed_by=f"elsewhere-{run}",
                         claimed_at=now_ms())
    assert held.canonical in await own.imports.claim_many([claim])  # a live importer's claim
    await write_interleaved(own, [movement_ops(w) for w in wallets])
    d, _ = drainer(own)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError):  # the held wallet's per-record path, after
        await d.drain_pass(shard)
    assert time.monotonic() - started >= ENSURE_WAIT_ATTEMPTS_MAX * ENSURE_WAIT_S
    for wallet in others:  # ... the batch applied the others
        assert await own.legacy.outbox.pending_count(wallet) == 0, wallet
        await assert_same_sequence(own, wallet)
    assert await own.legacy.outbox.pending_count(held) == len(movement_ops(held))
    record = await own.imports.get(held.canonical)
    assert record is not None  # the claim goes stale: the wallet's own importer takes it over
    assert await own.imports.take_over(record, "wallet-workflow", stale_s=0)
    await drain_all(d, own)
    await assert_same_sequence(own, held)


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_the_batch_feeds_the_backlog_gauges_and_the_store_series(own: Stores) -> None:
    run = uuid.uuid4().hex[:8]
    wallets = [key(f"gauge-{run}-{n}", DUAL_PAIR) for n in range(OUTBOX_SHARDS * 6)]
    plans = [movement_ops(w) for w in wallets]
    await write_interleaved(own, plans)
    d, _ = drainer(own)
    ops = "walletmig_wallet_operations_total"
    seconds = "walletmig_store_operation_seconds_count"
    labels = {"store": "tigerbeetle", "outcome": "ok"}
    before = {kind: (_sample(ops, operation=kind, **labels),
                     _sample(seconds, store="tigerbeetle", operation=kind))
              for kind in ("credit", "debit")}
    seen: list[float] = []

    def beat() -> None:
        """Sampled from the drain's heartbeat, which the batch calls once TigerBeetle holds it and
        before it is marked: the batch is counted then by construction (a 1 ms poll could miss
        a quick host's window)."""
        seen.append(_sample("walletmig_backlog_items", direction="to_tigerbeetle"))

    with counting(own) as requests:
        applied = sum([await d.drain_pass(shard, beat) for shard in range(OUTBOX_SHARDS)])
    assert applied == sum(len(p) for p in plans)
    assert requests.create_requests <= OUTBOX_SHARDS, vars(requests)  # the batch applied them
    assert max(seen) > 0, "the backlog gauge never saw the batch"
    assert _sample("walletmig_backlog_items", direction="to_tigerbeetle") == 0
    assert _sample("walletmig_backlog_oldest_age_seconds", direction="to_tigerbeetle") == 0
    for kind, count in (("credit", 3 * len(wallets)), ("debit", 2 * len(wallets))):
        ok_before, seconds_before = before[kind]
        assert _sample(ops, operation=kind, **labels) - ok_before == count, kind
        assert (_sample(seconds, store="tigerbeetle", operation=kind)
                - seconds_before) == count, kind


MEASURE_WALLETS = 100
MEASURE_OPS = 5  # records per wallet (movement_ops): 500 records a run


@pytest.mark.slow
async def test_batched_vs_per_record_requests_and_cpu_per_record(
    settings: Settings, tb_addresses: str
) -> None:
    """Side by side in one run, on the same servers: the same 500 records of 100 imported
    wallets drained per record and batched (printed: create_transfers requests and this
    process's CPU per record; the servers' CPU is not in it)."""
    figures: dict[str, tuple[float, float]] = {}
    for batched in (False, True):
        async with isolated_stores(settings, "outbox_measure", tb_addresses) as stores:
            run = uuid.uuid4().hex[:8]
            wallets = [key(f"measure-{run}-{n}", DUAL_PAIR) for n in range(MEASURE_WALLETS)]
            await asyncio.gather(*(stores.legacy.apply(AddCredit(
                wallet=w, transaction_id=f"{w.client_id}.s", amount=Decimal(1))) for w in wallets))
            # Imported before (the steady state of dual_write).
            await _backfill(stores, run, limit=MEASURE_WALLETS)
            for step in range(MEASURE_OPS):  # one write per wallet at a time, wallets at once
                await asyncio.gather(*(write(stores, movement_ops(w)[step]) for w in wallets))
            records = MEASURE_WALLETS * MEASURE_OPS
            d, _ = drainer(stores, batched=batched)
            with counting(stores) as requests:
                cpu = time.process_time()
                await drain_all(d, stores)
                cpu_ms = (time.process_time() - cpu) * 1000
            figures["batched" if batched else "per record"] = (
                requests.create_requests / records, cpu_ms / records)
    print("\n".join(f"{name}: {req:.4f} create_transfers requests per record, "
                    f"{cpu:.3f} ms drainer CPU per record" for name, (req, cpu) in figures.items()))
    assert figures["batched"][0] * 50 < figures["per record"][0], figures


@pytest.mark.slow
async def test_reverse_batched_vs_one_by_one_cpu_per_record(
    settings: Settings, tb_addresses: str
) -> None:
    """tb_primary's reverse projection side by side in one run, same servers: the same 400
    records of 100 wallets (MongoDB holds each already) drained one by one and batched
    (printed: this process's CPU per record; `walletmig bench wallet-ops` and the stack's
    server CPU tell the rest); both leave each wallet's log equal in both stores."""
    figures: dict[str, float] = {}
    for batched in (False, True):
        async with isolated_stores(settings, "reverse_measure", tb_addresses) as stores:
            run = uuid.uuid4().hex[:8]
            wallets = [key(f"rmeasure-{run}-{n}", DUAL_PAIR) for n in range(MEASURE_WALLETS)]
            d = ReverseOutboxDrainer(stores.legacy.outbox, stores.legacy, stores.tigerbeetle,
                                     batched=batched)
            await asyncio.gather(*(tb_primary_write(stores, AddCredit(
                wallet=w, transaction_id=f"{w.client_id}.0", amount=Decimal(100)))
                for w in wallets))
            await _reverse_drain(d, stores)
            for step in range(1, 5):  # one write per wallet at a time, wallets at once
                kind = SubtractCredit if step % 2 == 0 else AddCredit
                await asyncio.gather(*(tb_primary_write(stores, kind(
                    wallet=w, transaction_id=f"{w.client_id}.{step}", amount=Decimal(1)))
                    for w in wallets))
            cpu = time.process_time()
            await _reverse_drain(d, stores)
            figures["batched" if batched else "one by one"] = (
                (time.process_time() - cpu) * 1000 / (MEASURE_WALLETS * 4))
            for wallet in wallets[:10]:
                await assert_same_sequence(stores, wallet)
    print("\n".join(f"reverse {name}: {cpu:.3f} ms drainer CPU per record"
                    for name, cpu in figures.items()))


async def _reverse_drain(d: ReverseOutboxDrainer, stores: Stores) -> None:
    deadline = time.monotonic() + DRAIN_DEADLINE_S
    while await stores.legacy.outbox.pending_total() > 0:
        assert time.monotonic() < deadline, "reverse outbox not drained"
        for shard in range(OUTBOX_SHARDS):
            await d.drain_pass(shard)
