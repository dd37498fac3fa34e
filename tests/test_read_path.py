"""The phase-aware read router against real MongoDB, Redis and the TigerBeetle emulator:
shadow comparisons (match / mismatch / in-flight), sticky cutover, fallback and breaker."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest_asyncio
import redis.asyncio
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from mongobase.mongo import u128_to_hex
from observability.exposition import serve_metrics
from registries.account_registry import ACCOUNT_REGISTRY, AccountRecord, AccountRegistry
from registries.transfer_registry import TransferRegistry
from stores.legacy_store import LegacyStore
from stores.migration_state import MigrationStateStore
from stores.read_metrics import ReadMetricsStore, ReadOutcome
from stores.tigerbeetle_client import TigerBeetleClient, connect_tigerbeetle
from stores.tigerbeetle_store import TigerBeetleStore, customer_account
from walletclient.read_path import ReadPathConfig, ReadRouter
from walletconfig.settings import Settings
from walletcore.breaker import BreakerConfig, BreakerState
from walletcore.ids import account_id
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit
from walletcore.phases import MigrationState, Phase
from walletcore.rollout import in_rollout
from walletmig.processes import free_port


@dataclass
class Env:
    legacy: LegacyStore
    tb: TigerBeetleStore
    dead_tb: TigerBeetleStore
    state: MigrationStateStore
    metrics: ReadMetricsStore
    epoch: int = 0

    async def set_phase(self, scope: str, phase: Phase, rollout: int = 0) -> None:
        self.epoch += 1
        await self.state.set(MigrationState(scope=scope, phase=phase, rollout_percent=rollout,
                                            epoch=self.epoch))

    def router(self, *, dead: bool = False, **config: Any) -> ReadRouter:
        return ReadRouter(self.legacy, self.dead_tb if dead else self.tb, self.state,
                          self.metrics, config=ReadPathConfig(**config))


@pytest_asyncio.fixture(loop_scope="session")
async def env(
    settings: Settings, mongo_db: AsyncDatabase[dict[str, Any]],
    mongo_client: AsyncMongoClient[dict[str, Any]], redis_client: redis.asyncio.Redis,
) -> AsyncIterator[Env]:
    live: TigerBeetleClient = connect_tigerbeetle(settings.tb_addresses, timeout_s=5)
    dead: TigerBeetleClient = connect_tigerbeetle(f"tbemu://127.0.0.1:{free_port()}",
                                                  timeout_s=0.3)
    accounts = AccountRegistry(mongo_db, redis_client)
    transfers = TransferRegistry(mongo_db)
    legacy = LegacyStore(mongo_db)
    for store in (accounts, transfers, legacy):
        await store.ensure_indexes()
    # Migration state in a database of its own: this test's phases must not steer the
    # session's other tests that share the ledger pairs.
    state_db = mongo_client[f"readpath_{uuid.uuid4().hex[:8]}"]
    try:
        yield Env(legacy=legacy, tb=TigerBeetleStore(live, accounts, transfers),
                  dead_tb=TigerBeetleStore(dead, accounts, transfers),
                  state=MigrationStateStore(state_db, cache_ttl_s=0),
                  metrics=ReadMetricsStore(mongo_db))
    finally:
        await live.close()
        await dead.close()


async def make_wallet(env: Env, unique_id: Callable[..., str], *, tb_too: bool = True,
                      client: str | None = None) -> WalletKey:
    wallet = WalletKey(client_id=client or unique_id("rp"), country="USA", currency="USD")
    op = AddCredit(wallet=wallet, transaction_id=unique_id("tx"), amount=Decimal("10.00"))
    await env.legacy.add_credit(op)
    if tb_too:
        await env.tb.add_credit(op)
    return wallet


async def outcomes(env: Env, wallet: WalletKey) -> list[str]:
    await env.metrics.flush()
    since = datetime.now(UTC) - timedelta(minutes=5)
    return [o.outcome.value for o in await env.metrics.observations(
        since, wallet=wallet.canonical)]


async def test_legacy_and_dual_write_read_mongodb(env: Env, unique_id: Callable[..., str]) -> None:
    wallet = await make_wallet(env, unique_id)
    router = env.router()
    for phase in (Phase.LEGACY, Phase.DUAL_WRITE):
        await env.set_phase("USD:USA", phase)
        assert (await router.get_balance(wallet)).source == "mongodb"
    assert await outcomes(env, wallet) == []


async def test_shadow_match_mismatch_and_in_flight(env: Env,
                                                   unique_id: Callable[..., str]) -> None:
    await env.set_phase("USD:USA", Phase.SHADOW_READ)
    router = env.router(recheck_delay_ms=50, rechecks_max=2)
    same = await make_wallet(env, unique_id)
    answer = await router.get_balance(same)
    assert answer.source == "mongodb" and answer.credit == Decimal("10.00")
    await router.drain()
    assert await outcomes(env, same) == ["match"]

    # MongoDB ahead of TigerBeetle for good: a real mismatch, named field by field.
    ahead = await make_wallet(env, unique_id)
    await env.legacy.add_credit(AddCredit(wallet=ahead, transaction_id=unique_id("tx"),
                                          amount=Decimal("1.00")))
    await router.get_balance(ahead)
    await router.drain()
    assert await outcomes(env, ahead) == ["mismatch"]
    found = await env.metrics.observations(datetime.now(UTC) - timedelta(minutes=5),
                                           wallet=ahead.canonical)
    assert "credit: mongodb 11.00 tigerbeetle 10.00" in (found[0].detail or "")

    # TigerBeetle catches up during the re-check: in flight, not a mismatch. The backlog
    # applies the operation once the first look has seen the lag (the router asks its pending
    # operations then: none), so it lands between the look and the re-check by construction (a
    # fixed pause could fall before the look or after the last re-check on a loaded host).
    lagging = await make_wallet(env, unique_id)
    op = AddCredit(wallet=lagging, transaction_id=unique_id("tx"), amount=Decimal("2.50"))
    await env.legacy.add_credit(op)
    looks: list[WalletKey] = []

    async def backlog_applies_after_the_look(wallet: WalletKey) -> int:
        looks.append(wallet)
        if len(looks) == 1:
            await env.tb.add_credit(op)
        return 0

    slow = ReadRouter(env.legacy, env.tb, env.state, env.metrics,
                      config=ReadPathConfig(recheck_delay_ms=50, rechecks_max=1),
                      pending_ops=backlog_applies_after_the_look)
    await slow.get_balance(lagging)
    await slow.drain()
    assert looks == [lagging]  # the first look differed, the re-check matched
    assert await outcomes(env, lagging) == ["in_flight"]

    # A pending-backlog oracle classifies at once.
    async def one_pending(_: WalletKey) -> int:
        return 1

    pending = await make_wallet(env, unique_id, tb_too=False)
    oracle = ReadRouter(env.legacy, env.tb, env.state, env.metrics, pending_ops=one_pending)
    await oracle.get_balance(pending)
    await oracle.drain()
    assert await outcomes(env, pending) == ["in_flight"]

    # TigerBeetle down: MongoDB still answers; the shadow read records tb_error.
    dead = env.router(dead=True, shadow_timeout_ms=300)
    assert (await dead.get_balance(same)).source == "mongodb"
    await dead.drain()
    assert (await outcomes(env, same))[-1] == "tb_error"


async def test_cutover_is_sticky_and_falls_back(env: Env, unique_id: Callable[..., str]) -> None:
    inside = next(c for c in (unique_id("in") for _ in range(1000)) if in_rollout(c, 50))
    outside = next(c for c in (unique_id("out") for _ in range(1000)) if not in_rollout(c, 50))
    w_in = await make_wallet(env, unique_id, client=inside)
    w_out = await make_wallet(env, unique_id, client=outside)
    await env.set_phase("USD:USA", Phase.READ_CUTOVER, 50)
    router = env.router()
    for _ in range(3):
        assert (await router.get_balance(w_in)).source == "tigerbeetle"
        assert (await router.get_balance(w_out)).source == "mongodb"
    assert await outcomes(env, w_in) == ["tb_served"] * 3

    # TigerBeetle unreachable: MongoDB answers; after 2 failures the circuit opens and reads
    # skip TigerBeetle without waiting for its timeout.
    broken = env.router(dead=True, tb_timeout_ms=300,
                        breaker=BreakerConfig(failure_threshold=2, open_ms=60_000))
    for _ in range(4):
        answer = await broken.get_balance(w_in)
        assert answer.source == "mongodb" and answer.credit == Decimal("10.00")
    assert broken.breaker.state == BreakerState.OPEN
    assert (await outcomes(env, w_in))[3:] == ["fallback_error"] * 2 + ["fallback_open"] * 2

    summary = await env.metrics.summary(["USD:USA"], datetime.now(UTC) - timedelta(minutes=1))
    assert summary.count(ReadOutcome.FALLBACK_OPEN) >= 2 and summary.tb_p95_ms is not None


async def test_tb_primary_and_complete_read_tigerbeetle(env: Env,
                                                        unique_id: Callable[..., str]) -> None:
    wallet = await make_wallet(env, unique_id)
    await env.set_phase("USD:USA", Phase.TB_PRIMARY, 100)
    router = env.router()
    assert (await router.get_balance(wallet)).source == "tigerbeetle"
    dead = env.router(dead=True, tb_timeout_ms=300)
    assert (await dead.get_balance(wallet)).source == "mongodb"  # reverse projection fallback
    await env.set_phase("USD:USA", Phase.COMPLETE, 100)
    assert (await router.get_balance(wallet)).source == "tigerbeetle"


async def test_wallet_reader_is_the_router_without_metrics(
    env: Env, unique_id: Callable[..., str]
) -> None:
    """ReadRouter with no metrics store: the same routing
    (balance and history), nothing recorded, no shadow comparison started."""
    inside = next(c for c in (unique_id("in") for _ in range(1000)) if in_rollout(c, 50))
    outside = next(c for c in (unique_id("out") for _ in range(1000)) if not in_rollout(c, 50))
    w_in = await make_wallet(env, unique_id, client=inside)
    w_out = await make_wallet(env, unique_id, client=outside)
    reader = ReadRouter(env.legacy, env.tb, env.state)

    await env.set_phase("USD:USA", Phase.SHADOW_READ)
    assert (await reader.get_balance(w_in)).source == "mongodb"
    await reader.drain()  # nothing was started
    await env.set_phase("USD:USA", Phase.READ_CUTOVER, 50)
    assert (await reader.get_balance(w_in)).source == "tigerbeetle"
    assert (await reader.get_balance(w_out)).source == "mongodb"
    assert len(await reader.history(w_in, 10)) == 1
    assert len(await reader.history(w_out, 10)) == 1
    assert await outcomes(env, w_in) == [] and await outcomes(env, w_out) == []


PROBE_WAIT_S = 30.0  # for a half-open probe of the live cluster to answer within tb_timeout_ms


def scraped_breaker_open(url: str) -> float:
    """`walletmig_circuit_breaker_open{scope="*"}` as a scrape of this process sees it."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    found = [s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == "walletmig_circuit_breaker_open" and s.labels == {"scope": "*"}]
    assert len(found) == 1, found  # one series: the label set is bounded
    return found[0]


async def test_breaker_state_is_exported(env: Env, unique_id: Callable[..., str]) -> None:
    """Every breaker state change moves the gauge: closed 0, open 1, half open 1 (reads still
    fall back but for the probe), closed again 0 once a probe succeeds."""
    inside = next(c for c in (unique_id("in") for _ in range(1000)) if in_rollout(c, 50))
    wallet = await make_wallet(env, unique_id, client=inside)
    await env.set_phase("USD:USA", Phase.READ_CUTOVER, 50)
    server = serve_metrics(0, "127.0.0.1")
    try:
        broken = env.router(dead=True, tb_timeout_ms=300,
                            breaker=BreakerConfig(failure_threshold=2, open_ms=500))
        assert await asyncio.to_thread(scraped_breaker_open, server.url) == 0
        for _ in range(2):
            assert (await broken.get_balance(wallet)).source == "mongodb"
        assert broken.breaker.state == BreakerState.OPEN
        assert await asyncio.to_thread(scraped_breaker_open, server.url) == 1

        # TigerBeetle reachable again (the same router, the live cluster): after open_ms the
        # half-open probe succeeds and the breaker closes.
        broken._tb = env.tb
        deadline = time.monotonic() + PROBE_WAIT_S
        while True:
            await asyncio.sleep(0.6)  # past open_ms: the next read is the half-open probe
            if (await broken.get_balance(wallet)).source == "tigerbeetle":
                break
            # The probe outlived tb_timeout_ms (300 ms: a loaded host's stall) and fell back:
            # the breaker opened again, and the next probe comes after open_ms.
            assert broken.breaker.state == BreakerState.OPEN
            assert time.monotonic() < deadline, "no half-open probe of the live cluster answered"
        assert broken.breaker.state.value == "closed"
        assert await asyncio.to_thread(scraped_breaker_open, server.url) == 0
    finally:
        server.close()


async def test_tb_read_is_right_under_an_account_id_collision(
    env: Env, unique_id: Callable[..., str], mongo_db: AsyncDatabase[dict[str, Any]],
    redis_client: redis.asyncio.Redis,
) -> None:
    """The balance read looks up the derived id (nonce 0) beside the registry read: when another
    wallet holds that id (a collision: this wallet got nonce 1), the registry's id answers, not
    the squatter's account. Cold (a fresh registry) and warm (the id remembered)."""
    wallet = WalletKey(client_id=unique_id("col"), country="USA", currency="USD")
    squatter = WalletKey(client_id=unique_id("sq"), country="USA", currency="USD")
    taken = account_id(wallet, 0)
    ledger = (await env.tb.accounts.get_or_create(
        WalletKey(client_id=unique_id("lg"), country="USA", currency="USD"),
        allow_overdraft=False)).ledger
    forged = AccountRecord(wallet=squatter, account_id=taken, ledger=ledger, nonce=0,
                           allow_overdraft=True, created_at=datetime.now(UTC))
    await mongo_db[ACCOUNT_REGISTRY].insert_one({
        "_id": squatter.canonical, "client_id": squatter.client_id, "country": "USA",
        "currency": "USD", "issuer_type": None, "account_id": u128_to_hex(taken),
        "ledger": ledger, "nonce": 0, "allow_overdraft": True, "created_at": forged.created_at})
    try:
        # The squatter's account at the derived id, empty, under a deployment tag of its own
        # (reconciliation of this deployment never looks at it).
        (status,) = await env.tb.client.create_accounts([customer_account(forged, 1, 0x5C0A7)])
        assert status.status.name == "CREATED", status
        await env.tb.add_credit(AddCredit(wallet=wallet, transaction_id=unique_id("tx"),
                                          amount=Decimal("10.00")))
        assert (await env.tb.accounts.get(wallet)).nonce == 1  # type: ignore[union-attr]
        cold = TigerBeetleStore(env.tb.client, AccountRegistry(mongo_db, redis_client),
                                env.tb.transfers)
        for _ in range(2):  # cold, then warm (the id remembered)
            assert (await cold.get_balance(wallet)).credit == Decimal("10.00")
        # Prefetched ids: only derived (nonce 0) ones are taken; the collided wallet (and the
        # squatter, whose recorded id is not its own derived id) keep the registry path.
        fresh = AccountRegistry(mongo_db, redis_client)
        assert await fresh.remember_pair("USD:USA") > 0
        assert not fresh.remembers(wallet) and not fresh.remembers(squatter)
        prefetched = TigerBeetleStore(env.tb.client, fresh, env.tb.transfers)
        assert (await prefetched.get_balance(wallet)).credit == Decimal("10.00")
    finally:
        await mongo_db[ACCOUNT_REGISTRY].delete_one({"_id": squatter.canonical})
        await env.tb.accounts.invalidate(squatter)


async def test_router_prefetches_a_pairs_ids_once_tigerbeetle_is_read(
    env: Env, unique_id: Callable[..., str], mongo_db: AsyncDatabase[dict[str, Any]],
    redis_client: redis.asyncio.Redis,
) -> None:
    """The first read of a pair in a phase that reads TigerBeetle starts one background load of
    the pair's account ids (AccountRegistry.remember_pair): a wallet never read before is then
    answered without a registry read. Not in the phases where only MongoDB is read."""
    read, unread = (await make_wallet(env, unique_id)), (await make_wallet(env, unique_id))
    registry = AccountRegistry(mongo_db, redis_client)
    tb = TigerBeetleStore(env.tb.client, registry, env.tb.transfers)
    calls: list[str] = []

    async def prefetch(pair: str) -> int:
        calls.append(pair)
        return await registry.remember_pair(pair)

    router = ReadRouter(env.legacy, tb, env.state, env.metrics, pending_ops=None,
                        prefetch_ids=prefetch)
    await env.set_phase("USD:USA", Phase.DUAL_WRITE)
    await router.get_balance(read)
    await router.drain()
    assert calls == [] and not registry.remembers(unread)
    await env.set_phase("USD:USA", Phase.SHADOW_READ)
    for _ in range(3):
        assert (await router.get_balance(read)).source == "mongodb"
    await router.drain()
    assert calls == ["USD:USA"] and registry.remembers(unread)
    assert (await tb.get_balance(unread)).credit == Decimal("10.00")
