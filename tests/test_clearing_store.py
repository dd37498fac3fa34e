"""The clearing store (system of reference) against the real MongoDB-compatible server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from stores.clearing_store import VELOCITY_CHUNK_MAX, ClearingStore, StateChange
from walletcore.clearing import (
    DEFAULT_CLEARING_TABLE,
    ClearingState,
    ExternalTransaction,
    post_transfer_id,
)
from walletcore.clearing_checks import (
    CheckContext,
    VelocityQuery,
    needs_of,
    reference_key,
    run_checks,
)
from walletcore.errors import ConflictError, InvalidInputError
from walletcore.journal import entry_id_of

Db = AsyncDatabase[dict[str, Any]]
S = ClearingState


@pytest.fixture(scope="module")
def db(mongo_client: AsyncMongoClient[dict[str, Any]]) -> Db:
    return mongo_client[f"walletmig_clearing_{uuid.uuid4().hex[:10]}"]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def store(db: Db) -> AsyncIterator[ClearingStore]:
    clearing = ClearingStore(db)
    await clearing.ensure_indexes()
    yield clearing
    await db.client.drop_database(db.name)


@pytest.fixture
def make(unique_id: Callable[..., str]) -> Callable[..., ExternalTransaction]:
    def build(external_id: str | None = None, **overrides: Any) -> ExternalTransaction:
        fields: dict[str, Any] = {
            "external_id": external_id or unique_id("ext"), "kind": "ach_credit_in",
            "amount": Decimal("12.34"), "currency": "USD", "counterparty": "bank-a",
        }
        fields.update(overrides)
        return ExternalTransaction(**fields)

    return build


async def test_record_many_then_replay_and_conflict(
    store: ClearingStore, make: Callable[..., ExternalTransaction], unique_id: Callable[..., str]
) -> None:
    occurred = datetime(2024, 5, 6, 7, 8, 9, 123_456, tzinfo=UTC)
    batch = [make(), make(reference="TRACE-1", occurred_at=occurred, memo="m"),
             make(kind="usdc_vault_deposit", currency="USDC", amount=Decimal("0.000001"))]
    first_batch = unique_id("batch")
    first = await store.record_many(batch, first_batch)
    assert first.new == [t.external_id for t in batch] and not first.conflicts
    assert [r.state for r in first.records] == [S.RECEIVED] * 3
    stored = await store.get(batch[1].external_id)
    assert stored is not None and stored.transaction == batch[1]
    assert stored.transaction.fingerprint == batch[1].fingerprint and stored.batch_id == first_batch
    # The same content again (and 12.340 is 12.34): a replay owned by the first batch.
    same = batch[0].model_copy(update={"amount": Decimal("12.340")})
    changed = batch[2].model_copy(update={"amount": Decimal("0.000002")})
    fresh = make()
    again = await store.record_many([same, changed, fresh], unique_id("batch"))
    assert again.new == [fresh.external_id]
    assert [r.external_id for r in again.records] == [same.external_id, fresh.external_id]
    assert again.records[0].batch_id == first_batch
    assert list(again.conflicts) == [changed.external_id]
    assert again.conflicts[changed.external_id].field == "external_id"
    with pytest.raises(ConflictError) as raised:
        await store.record(changed, unique_id("batch"))
    assert changed.external_id in str(raised.value)
    assert (await store.record(same, unique_id("batch"))).batch_id == first_batch


async def test_the_same_id_twice_in_one_batch(
    store: ClearingStore, make: Callable[..., ExternalTransaction], unique_id: Callable[..., str]
) -> None:
    txn = make()
    result = await store.record_many([txn, txn, txn.model_copy(update={"counterparty": "z"})],
                                     unique_id("batch"))
    assert result.new == [txn.external_id] and len(result.records) == 2
    assert list(result.conflicts) == [txn.external_id]


async def test_concurrent_records_of_one_id_yield_one_record(
    store: ClearingStore, make: Callable[..., ExternalTransaction], unique_id: Callable[..., str]
) -> None:
    txn = make()
    results = await asyncio.gather(
        *(store.record_many([txn], unique_id("batch")) for _ in range(12))
    )
    assert sum(len(r.new) for r in results) == 1
    owners = {r.records[0].batch_id for r in results}
    assert len(owners) == 1 and not any(r.conflicts for r in results)
    # Different content raced in: exactly one content wins, every other one conflicts.
    rival = make()
    variants = [rival.model_copy(update={"amount": Decimal(f"{i + 1}.00")}) for i in range(8)]
    raced = await asyncio.gather(*(store.record_many([v], unique_id("b")) for v in variants))
    assert sum(len(r.new) for r in raced) == 1 and sum(len(r.conflicts) for r in raced) == 7


async def test_states_move_forward_only(
    store: ClearingStore, make: Callable[..., ExternalTransaction], unique_id: Callable[..., str]
) -> None:
    batch_id = unique_id("batch")
    txns = [make() for _ in range(4)]
    ids = [t.external_id for t in txns]
    await store.record_many(txns, batch_id)
    moved = await store.transition_many(S.PENDING, [StateChange(external_id=i) for i in ids])
    assert moved.done == ids and moved.changed == 4 and not moved.refused
    again = await store.transition_many(S.PENDING, [StateChange(external_id=i) for i in ids])
    assert again.done == ids and again.changed == 0  # idempotent
    posted = await store.transition_many(S.POSTED, [
        StateChange(external_id=ids[0], tb_timestamp=123), StateChange(external_id=ids[1])])
    assert posted.done == ids[:2]
    voided = await store.transition_many(S.VOIDED, [
        StateChange(external_id=ids[2], reason="blocked_counterparty")])
    assert voided.done == [ids[2]]
    # Backward, sideways and unknown moves are refused with the current state.
    back = await store.transition_many(S.PENDING, [
        StateChange(external_id=ids[0]), StateChange(external_id="nope-" + ids[0]),
        StateChange(external_id=ids[3])])
    assert back.done == [ids[3]]
    assert back.refused == {ids[0]: S.POSTED, "nope-" + ids[0]: None}
    sideways = await store.transition_many(S.VOIDED, [StateChange(external_id=ids[0])])
    assert sideways.refused == {ids[0]: S.POSTED}
    await store.transition_many(S.SETTLED, [StateChange(external_id=ids[0])])
    rejected = await store.transition_many(S.REJECTED, [StateChange(external_id=ids[2])])
    assert rejected.done == [ids[2]]
    record = await store.get(ids[2])
    assert record is not None and record.state is S.REJECTED
    assert record.reason == "blocked_counterparty"  # kept from the void
    settled = await store.get(ids[0])
    assert settled is not None and settled.tb_timestamp == 123
    assert settled.entry_id == entry_id_of(post_transfer_id(ids[0]))
    with pytest.raises(InvalidInputError):
        await store.transition_many(S.POSTED, [StateChange(external_id=ids[1])] * 2)
    # A forward jump in one write (received -> settled); never from another branch.
    jumper = make()
    await store.record_many([jumper], batch_id)
    jump = await store.transition_many(S.SETTLED, [StateChange(external_id=jumper.external_id),
                                                   StateChange(external_id=ids[2])])
    assert jump.done == [jumper.external_id] and jump.refused == {ids[2]: S.REJECTED}


async def test_transition_batch_moves_a_whole_batch(
    store: ClearingStore, make: Callable[..., ExternalTransaction], unique_id: Callable[..., str]
) -> None:
    batch_id = unique_id("batch")
    txns = [make() for _ in range(5)]
    await store.record_many(txns, batch_id)
    assert await store.transition_batch(batch_id, S.RECEIVED, S.PENDING) == 5
    await store.transition_many(S.EXPIRED, [StateChange(external_id=txns[0].external_id,
                                                        reason="expired")])
    assert await store.transition_batch(batch_id, S.PENDING, S.POSTED) == 4
    assert await store.transition_batch(batch_id, S.PENDING, S.POSTED) == 0
    with pytest.raises(ConflictError):
        await store.transition_batch(batch_id, S.POSTED, S.PENDING)
    records = await store.by_batch(batch_id)
    assert [r.external_id for r in records] == [t.external_id for t in txns]  # intake order
    assert [r.state for r in records] == [S.EXPIRED] + [S.POSTED] * 4
    assert [r.external_id for r in await store.by_batch(batch_id, state=S.EXPIRED)] == [
        txns[0].external_id]
    oldest = await store.find_by_state(S.EXPIRED, 8189)
    assert txns[0].external_id in {r.external_id for r in oldest}
    counts = await store.count_by_state()
    assert counts[S.POSTED] >= 4 and set(counts) == set(ClearingState)


async def test_settle_batch_lists_settled_without_writing_them(
    store: ClearingStore, db: Db, make: Callable[..., ExternalTransaction],
    unique_id: Callable[..., str],
) -> None:
    """Settled = listed on the batch document; the transaction documents stay as recorded,
    every reader sees `settled`, nothing moves them on, and the batch closes when all of it is
    final (a late intake into a closed batch opens it again)."""
    batch_id = unique_id("batch")
    txns = [make() for _ in range(4)]
    ids = [t.external_id for t in txns]
    await store.record_many(txns, batch_id)
    assert ids[0] in {r.external_id for r in await store.find_by_state(S.RECEIVED, 8189)}
    await store.transition_many(S.REJECTED, [StateChange(external_id=ids[3], reason="r")])
    counts_before = await store.count_by_state()
    first = await store.settle_batch(batch_id, ids[:2])
    assert first.settled == first.changed == 2 and not first.refused
    assert not first.closed  # ids[2] is open
    again = await store.settle_batch(batch_id, ids[:2])
    assert again.settled == 2 and again.changed == 0 and not again.closed  # idempotent
    stored = await db["clearing_transactions"].find_one({"_id": ids[0]})
    assert stored is not None and stored["state"] == "received"  # never written
    record = await store.get(ids[0])
    assert record is not None and record.state is S.SETTLED
    assert record.entry_id == entry_id_of(post_transfer_id(ids[0]))
    assert [r.state for r in await store.by_batch(batch_id)] == [S.SETTLED] * 2 + [
        S.RECEIVED, S.REJECTED]
    assert [r.external_id for r in await store.by_batch(batch_id, state=S.RECEIVED)] == [ids[2]]
    assert [r.external_id for r in await store.by_batch(batch_id, state=S.SETTLED)] == ids[:2]
    # Settled is final: no guard that lets `received` through moves it.
    refused = await store.transition_many(S.REJECTED, [StateChange(external_id=ids[0])])
    assert refused.refused == {ids[0]: S.SETTLED} and refused.changed == 0
    assert await store.transition_batch(batch_id, S.RECEIVED, S.PENDING) == 1  # ids[2] only
    last = await store.settle_batch(batch_id, [ids[2], ids[3]])
    assert last.settled == last.changed == 1 and last.refused == {ids[3]: S.REJECTED}
    assert last.closed
    assert batch_id not in {r.batch_id for r in await store.find_by_state(S.RECEIVED, 8189)}
    counts = await store.count_by_state()
    assert counts[S.SETTLED] == counts_before[S.SETTLED] + 3
    # A pure replay leaves the batch closed (and a batch of replays only is closed at once);
    # a late new transaction opens it again.
    await store.record_many(txns[:1], batch_id)
    assert (await db["clearing_batches"].find_one({"_id": batch_id}) or {})["open"] is False
    replays = unique_id("batch")
    assert (await store.record_many(txns[:2], replays)).records[0].batch_id == batch_id
    assert (await db["clearing_batches"].find_one({"_id": replays}) or {})["open"] is False
    late = make()
    await store.record_many([late], batch_id)
    assert [r.external_id for r in await store.find_by_state(S.RECEIVED, 8189)
            if r.batch_id == batch_id] == [late.external_id]
    with pytest.raises(InvalidInputError):
        await store.find_by_state(S.SETTLED, 10)


async def test_velocity_counts_live_transactions_in_the_window(
    store: ClearingStore, make: Callable[..., ExternalTransaction], unique_id: Callable[..., str]
) -> None:
    party = unique_id("party")
    old_batch, this_batch = unique_id("batch"), unique_id("batch")
    history = [make(counterparty=party, amount=Decimal("10.00")) for _ in range(3)]
    other_kind = make(counterparty=party, kind="stripe_settlement", amount=Decimal("7.00"))
    refused = make(counterparty=party, amount=Decimal("500.00"))
    await store.record_many([*history, other_kind, refused], old_batch)
    await store.transition_many(S.REJECTED, [StateChange(external_id=refused.external_id,
                                                         reason="pending_refused")])
    current = [make(counterparty=party, amount=Decimal("1.00")) for _ in range(2)]
    await store.record_many(current, this_batch)
    query = VelocityQuery(kind="ach_credit_in", counterparty=party, currency="USD",
                          window_s=3600)
    stripe = VelocityQuery(kind="stripe_settlement", counterparty=party, currency="USD",
                           window_s=60)
    now = datetime.now(UTC) + timedelta(seconds=1)
    windows = await store.velocity([query, stripe], now=now, exclude_batch=this_batch)
    assert (windows[query.key].count, windows[query.key].amount_minor) == (3, 3000)
    assert (windows[stripe.key].count, windows[stripe.key].amount_minor) == (1, 700)
    everything = await store.velocity([query], now=now, exclude_batch=None)
    assert everything[query.key].count == 5
    later = await store.velocity([query], now=now + timedelta(hours=2), exclude_batch=None)
    assert query.key not in later


async def test_velocity_over_many_counterparties_spans_chunks(
    store: ClearingStore, make: Callable[..., ExternalTransaction], unique_id: Callable[..., str]
) -> None:
    """More counterparties than one aggregate takes (VELOCITY_CHUNK_MAX): every one is
    counted once, with its own amount, in order of the intake (a batch read sorts by `ix`)."""
    parties = [unique_id("party") for _ in range(VELOCITY_CHUNK_MAX * 2 + 5)]
    history = [make(counterparty=p, amount=Decimal(i + 1)) for i, p in enumerate(parties)]
    batch_id = unique_id("batch")
    await store.record_many(history, batch_id)
    assert [r.external_id for r in await store.by_batch(batch_id)] == [
        t.external_id for t in history]
    queries = [VelocityQuery(kind="ach_credit_in", counterparty=p, currency="USD",
                             window_s=3600) for p in parties]
    now = datetime.now(UTC) + timedelta(seconds=1)
    windows = await store.velocity(queries, now=now, exclude_batch=None)
    assert [(windows[q.key].count, windows[q.key].amount_minor) for q in queries] == [
        (1, (i + 1) * 100) for i in range(len(parties))]


async def test_reference_holders_feed_the_duplicate_check(
    store: ClearingStore, make: Callable[..., ExternalTransaction], unique_id: Callable[..., str]
) -> None:
    party = unique_id("party")
    first = make(counterparty=party, reference="R-1")
    await store.record_many([first], unique_id("batch"))
    batch_id = unique_id("batch")
    batch = [make(counterparty=party, reference="R-1"), make(counterparty=party, reference="R-2"),
             make(counterparty=party, reference="R-2")]
    await store.record_many(batch, batch_id)
    holders = await store.reference_holders([(party, "R-1"), (party, "R-2"), (party, "R-9")])
    assert holders[reference_key(party, "R-1")] == [first.external_id, batch[0].external_id]
    assert holders[reference_key(party, "R-2")] == [batch[1].external_id, batch[2].external_id]
    assert reference_key(party, "R-9") not in holders
    # The whole read side of a batch's checks, as the checks activity will do it.
    needs = needs_of(batch, DEFAULT_CLEARING_TABLE)
    context = CheckContext(
        velocity=await store.velocity(needs.velocity, now=datetime.now(UTC),
                                      exclude_batch=batch_id),
        reference_holders=await store.reference_holders(needs.references),
    )
    outcomes = run_checks(batch, context, DEFAULT_CLEARING_TABLE)
    assert [o.passed for o in outcomes] == [False, True, False]
    # A voided holder no longer holds its reference.
    await store.transition_many(S.PENDING, [StateChange(external_id=first.external_id)])
    await store.transition_many(S.VOIDED, [StateChange(external_id=first.external_id)])
    after = await store.reference_holders([(party, "R-1")])
    assert after[reference_key(party, "R-1")] == [batch[0].external_id]


async def test_bounds(store: ClearingStore) -> None:
    with pytest.raises(InvalidInputError):
        await store.find_by_state(S.PENDING, 0)
    with pytest.raises(InvalidInputError):
        await store.get_many(["x"] * 8190)
