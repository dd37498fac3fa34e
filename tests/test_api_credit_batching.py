"""The credit path's batching (gateway.coalesce): FlightBatcher sends what was asked while a
batch was out as the next batch; CoalescedIdempotency on the session's real MongoDB and Redis
keeps the Idempotency-Key rules with its claims, reads and inserts batched."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import redis.asyncio as redis_asyncio

from gateway.coalesce import FlightBatcher
from stores.idempotency_keys import KeyedRequest, StoredResponse


async def test_keys_asked_in_flight_leave_together() -> None:
    """While the first batch is out (held until released, by construction), the keys asked
    meanwhile wait and go as one second batch; each caller gets its own keys."""
    sent: list[list[int]] = []
    started, release = asyncio.Event(), asyncio.Event()

    async def fetch(keys: list[int]) -> dict[int, int]:
        sent.append(keys)
        started.set()
        await release.wait()
        return {k: k * 10 for k in keys if k != 7}  # 7: not found

    batcher: FlightBatcher[int, int] = FlightBatcher(fetch)
    first = asyncio.ensure_future(batcher.get([1]))
    await started.wait()  # the first batch is out
    later = [asyncio.ensure_future(batcher.get([k, 7])) for k in (2, 3, 4)]
    await asyncio.sleep(0)  # let them queue
    assert sent == [[1]]
    release.set()
    assert await first == {1: 10}
    assert [await f for f in later] == [{2: 20}, {3: 30}, {4: 40}]
    assert sent == [[1], [2, 7, 3, 4]] and batcher.requests == 2 and batcher.reads == 4


async def test_a_failed_batch_fails_its_callers_only() -> None:
    calls = 0

    async def fetch(keys: list[str]) -> dict[str, str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("down")
        return {k: k.upper() for k in keys}

    batcher: FlightBatcher[str, str] = FlightBatcher(fetch)
    failed = await asyncio.gather(batcher.get(["a"]), batcher.get(["b"]), return_exceptions=True)
    assert all(isinstance(f, ConnectionError) for f in failed)
    assert await batcher.get(["c"]) == {"c": "C"}


async def test_batched_idempotency_keeps_the_rules(mongo_db: Any, redis_url: str) -> None:
    """Twenty keys claimed and answered at once (one batch of each kind: they are asked in one
    pass); each is replayed, another body is a mismatch, a second answer does not replace the
    first; the same key answered twice at once: one answer stands."""
    from gateway.coalesce import CoalescedIdempotency

    redis = redis_asyncio.Redis.from_url(redis_url)
    try:
        store = CoalescedIdempotency(mongo_db, redis, lease_s=30)
        await store.ensure_indexes()
        owner = f"owner-{uuid.uuid4().hex[:8]}"
        asked = [KeyedRequest(owner=owner, key=f"k-{n}", operation="add_credit",
                              fingerprint=f"f-{n}", transaction_id=f"t-{n}")
                 for n in range(20)]  # fmt: skip
        claims = await asyncio.gather(*(store.claim(a) for a in asked))
        assert [c.outcome for c in claims] == ["acquired"] * 20
        assert store.leases.requests == 1 and store.finds.requests == 1
        answers = [StoredResponse(status=200, media_type="application/json", body=f'{{"n":{n}}}')
                   for n in range(20)]  # fmt: skip
        done = await asyncio.gather(*(
            store.complete(a, token=str(c.token), response=r)
            for a, c, r in zip(asked, claims, answers, strict=True)))  # fmt: skip
        assert done == [True] * 20 and store.inserts.requests == 1
        replays = await asyncio.gather(*(store.claim(a) for a in asked))
        assert [(c.outcome, c.response) for c in replays] == [("replay", r) for r in answers]
        other = asked[0].model_copy(update={"fingerprint": "another body"})
        assert (await store.claim(other)).outcome == "mismatch"
        late = StoredResponse(status=503, media_type="application/problem+json", body="{}")
        assert not await store.complete(asked[0], token="late", response=late)
        assert (await store.claim(asked[0])).response == answers[0]

        twice = KeyedRequest(owner=owner, key="twice", operation="add_credit", fingerprint="f",
                             transaction_id="t-twice")  # fmt: skip
        claim = await store.claim(twice)
        assert claim.outcome == "acquired"
        both = await asyncio.gather(
            store.complete(twice, token=str(claim.token), response=answers[1]),
            store.complete(twice, token=str(claim.token), response=late))  # fmt: skip
        assert sorted(both) == [False, True]
        assert (await store.claim(twice)).response in (answers[1], late)
    finally:
        await redis.aclose()


async def test_batchers_sharing_a_lane_have_one_batch_out() -> None:
    """Two FlightBatchers sharing a lock (the Idempotency-Key's reads and inserts and the audit
    appender share one): while one's batch is out (held by construction), the other's keys
    wait and then leave as one batch, taken once the lock is free."""
    lane = asyncio.Lock()
    sent: list[tuple[str, list[int]]] = []
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(keys: list[int]) -> dict[int, int]:
        sent.append(("slow", keys))
        started.set()
        await release.wait()
        return {k: k for k in keys}

    async def quick(keys: list[int]) -> dict[int, int]:
        sent.append(("quick", keys))
        return {k: -k for k in keys}

    first: FlightBatcher[int, int] = FlightBatcher(slow, shared=lane)
    second: FlightBatcher[int, int] = FlightBatcher(quick, shared=lane)
    held = asyncio.ensure_future(first.get([1]))
    await started.wait()  # the first batcher's batch is out, holding the lane
    waiting = [asyncio.ensure_future(second.get([k])) for k in (2, 3)]
    await asyncio.sleep(0)
    waiting.append(asyncio.ensure_future(second.get([4])))  # a later pass: same batch
    for _ in range(3):
        await asyncio.sleep(0)
    assert sent == [("slow", [1])]
    release.set()
    assert await held == {1: 1}
    assert [await f for f in waiting] == [{2: -2}, {3: -3}, {4: -4}]
    assert sent == [("slow", [1]), ("quick", [2, 3, 4])] and second.requests == 1
    assert not lane.locked()
