"""What one gateway process holds open: the stores, the Temporal client, the wallet client and
read path, the API-key and Idempotency-Key stores, the rate limiter.

Every client connects lazily, so the API starts (and /healthz answers) while a dependency is
down; /readyz names it and requests needing it get 503 (a MongoDB older than 8.0 counts as
down: MongoServerCheck). The gateway's own indexes (the Idempotency-Key TTL) are created at
start and retried in the background until MongoDB answers.
Reads go through walletclient.read_path.ReadRouter (phase-aware) and are recorded in the read
metrics, like every other reader's, as the migration gates' evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pymongo import AsyncMongoClient
from starlette.requests import Request
from starlette.types import Scope
from temporalio.client import Client

from gateway.auth import Authenticator
from gateway.coalesce import CoalescedIdempotency, CoalescedLegacyReads, CoalescedLookups
from gateway.problems import dependency_unavailable
from gateway.ratelimit import GatewayRateLimiter
from gateway.settings import ApiSettings
from mongobase.mongo import require_wire_version, server_hello
from stores.api_keys import ApiKeyStore
from stores.bundle import Stores, make_stores
from stores.clearing_store import ClearingStore
from stores.general_ledger import GeneralLedger
from stores.idempotency_keys import IdempotencyStore
from stores.read_metrics import ReadMetricsStore
from stores.tigerbeetle_store import TigerBeetleStore
from walletclient.clearing_client import ClearingClient
from walletclient.read_path import ReadRouter
from walletclient.temporal_connect import connect_from_settings
from walletclient.wallet_client import WalletClient
from walletcore.errors import ConfigurationError

log = logging.getLogger(__name__)

METRICS_FLUSH_INTERVAL_S = 0.5
INDEX_RETRY_INTERVAL_S = 5.0
REFUSAL_RECHECK_S = 30.0  # a MongoDB found too old is asked again after this (an upgrade)


class MongoServerCheck:
    """Whether the MongoDB server is recent enough for the platform's writes (MongoDB 8.0: the
    client-level bulkWrite; mongobase.mongo.require_wire_version is the rule). The workers
    check at start-up (stores.bundle.make_stores); the API starts while MongoDB may be down,
    so it asks the first time a probe or a money-moving request needs the answer, and keeps
    the answer while the connection lasts: `forget` (MongoDB found failing by /readyz) makes
    the next need ask again, since the server that comes back may be another release. A
    refusal is asked again after `refusal_recheck_s`: a quick upgrade in place may never be
    seen failing, and the API must not need a restart to serve again."""

    def __init__(
        self, client: AsyncMongoClient[Any], *, refusal_recheck_s: float = REFUSAL_RECHECK_S
    ) -> None:
        assert refusal_recheck_s >= 0
        self._client = client
        self._lock = asyncio.Lock()  # concurrent first needs send one `hello`
        self.passed = False  # read on every money-moving request: the cheap path
        self.refusal: ConfigurationError | None = None
        self.refusal_recheck_s = refusal_recheck_s
        self._refused_at_s = 0.0  # time.monotonic() of the refusal

    async def require(self) -> None:
        """The refusal (ConfigurationError, one line) when the server is too old; what PyMongo
        raises when it is unreachable (not remembered)."""
        if self.refusal is not None and (
            time.monotonic() - self._refused_at_s >= self.refusal_recheck_s
        ):
            self.forget()  # ask again: the server may have been upgraded meanwhile
        if not self.passed and self.refusal is None:
            async with self._lock:
                if not self.passed and self.refusal is None:
                    self.judge(await server_hello(self._client))
        if self.refusal is not None:
            raise self.refusal

    async def require_for_request(self) -> None:
        """`require` for a request: a refusal is a 503 naming MongoDB (the operator must
        upgrade it), never an internal error from the first write it would fail."""
        try:
            await self.require()
        except ConfigurationError as refusal:
            raise dependency_unavailable("mongodb", refusal.message) from None

    def judge(self, hello: Mapping[str, Any]) -> None:
        """Remember the verdict on a server's `hello` answer (mongobase.mongo.server_hello)."""
        try:
            require_wire_version(hello)
        except ConfigurationError as refusal:
            self.passed, self.refusal = False, refusal
            self._refused_at_s = time.monotonic()
            return
        self.passed, self.refusal = True, None

    def forget(self) -> None:
        self.passed, self.refusal = False, None


@dataclass
class GatewayState:
    settings: ApiSettings
    stores: Stores
    temporal: Client
    wallets: WalletClient
    reader: ReadRouter
    metrics: ReadMetricsStore
    api_keys: ApiKeyStore
    authenticator: Authenticator
    idempotency: IdempotencyStore
    limiter: GatewayRateLimiter
    terminal: ClearingClient  # the credit terminal (its workflow runs on the migration queue)
    ledger: GeneralLedger  # the terminal's general ledger (read-only here)
    mongo_server: MongoServerCheck
    # The process's MongoDB lane: one batch in flight between the Idempotency-Key's reads and
    # inserts and the audit appender (gateway.coalesce, gateway.audit).
    mongo_lane: asyncio.Lock
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def state_of(request: Request) -> GatewayState:
    return state_in(request.scope)


def state_in(scope: Scope) -> GatewayState:
    """The process's state from an ASGI scope (the application is `scope["app"]`, as Starlette
    and gateway.fastpath set it): the raw read path has no Request object."""
    state = scope["app"].state.gateway
    assert isinstance(state, GatewayState), "the app's lifespan has not run"
    return state


@contextlib.asynccontextmanager
async def open_state(settings: ApiSettings) -> AsyncIterator[GatewayState]:
    platform = settings.platform
    stores = await make_stores(platform, ensure_indexes=False)
    limiter = GatewayRateLimiter.from_limits(
        settings.rate_limit_redis_url, strategy=settings.rate_limit_strategy,
        money=settings.rate_limit_money, read=settings.rate_limit_read,
        money_fail_open=settings.rate_limit_fail_open_money,
        read_fail_open=settings.rate_limit_fail_open_read,
    )  # fmt: skip
    try:
        temporal = await connect_from_settings(platform, lazy=True)
        state = _assemble(settings, stores, temporal, limiter)
        state.tasks.append(asyncio.create_task(state.metrics.run_flusher(METRICS_FLUSH_INTERVAL_S)))
        state.tasks.append(asyncio.create_task(_ensure_indexes(state)))
        try:
            yield state
        finally:
            for task in state.tasks:
                task.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
    finally:
        await limiter.close()
        await stores.close()


def _assemble(
    settings: ApiSettings, stores: Stores, temporal: Client, limiter: GatewayRateLimiter
) -> GatewayState:
    platform = settings.platform
    metrics = ReadMetricsStore(stores.db)
    api_keys = ApiKeyStore(stores.db)
    ledger = GeneralLedger(stores.db)
    mongo_lane = asyncio.Lock()
    return GatewayState(
        settings=settings,
        stores=stores,
        temporal=temporal,
        # The write's own bound is the gateway's write timeout (the request waits for it).
        wallets=WalletClient(
            temporal, platform.wallet_task_queue, id_key=platform.id_key(),
            retry_window_s=settings.write_timeout_s,
        ),
        # A pair's account ids are loaded once it reads TigerBeetle (bounded by the registry's
        # read map): a wallet's first read through the API needs no registry round trip. Its
        # TigerBeetle store is the bundle's over the same client and registries, with the
        # concurrent reads' account lookups sent as one request, and its legacy store the
        # bundle's (same database, defaults) with concurrent wallet reads sent as one find
        # (gateway.coalesce).
        reader=ReadRouter(CoalescedLegacyReads(stores.db), _coalesced_reads(settings, stores),
                          stores.migration, metrics, prefetch_ids=stores.accounts.remember_pair),
        metrics=metrics,
        api_keys=api_keys,
        authenticator=Authenticator(api_keys, cache_ttl_s=settings.key_cache_ttl_s),
        idempotency=CoalescedIdempotency(  # documents read and inserted per loop pass
            stores.db, stores.redis, ttl_s=settings.idempotency_ttl_s,
            lease_s=settings.idempotency_lease_s, mongo_lane=mongo_lane,
        ),
        limiter=limiter,
        terminal=ClearingClient(
            temporal, ClearingStore(stores.db), platform.migration_task_queue, ledger=ledger
        ),
        ledger=ledger,
        mongo_server=MongoServerCheck(stores.db.client),
        mongo_lane=mongo_lane,
    )


def _coalesced_reads(settings: ApiSettings, stores: Stores) -> TigerBeetleStore:
    return TigerBeetleStore(
        CoalescedLookups(stores.tb_client, stores.limits), stores.accounts, stores.transfers,
        deployment_tag=settings.platform.deployment_tag, limits=stores.limits,
    )  # fmt: skip


async def _ensure_indexes(state: GatewayState) -> None:
    """The gateway's indexes, retried until MongoDB answers (the API serves meanwhile)."""
    while True:
        try:
            await state.idempotency.ensure_indexes()
            await state.api_keys.ensure_indexes()
            await state.metrics.ensure_indexes()
            return
        except Exception as exc:
            log.warning("creating the gateway's indexes failed, retrying: %r", exc)
            await asyncio.sleep(INDEX_RETRY_INTERVAL_S)
