"""Opening the stores: one function shared by worker, reader, CLI and benchmarks.

`make_stores(params)` (any object with the `StoreParams` attributes, e.g. the process's
`walletconfig.settings.Settings`) connects MongoDB, Redis and TigerBeetle (emulator or
cluster), builds the registries and store adapters and ensures indexes; `Stores.close()`
releases the clients.

TigerBeetle's request limit is asked of the client once, here: the emulator announces its own,
a real cluster's client reports the configured TB_REQUEST_LIMIT_BYTES. Every store gets the
client cut to it (stores.tb_batches.BatchedClient) and its `BatchLimits` for page sizes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as redis_asyncio
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from mongobase.mongo import database_of, make_mongo_client, require_supported_server
from registries.account_registry import AccountRegistry
from registries.transfer_registry import TransferRegistry
from stores.backfill_imports import ImportLedger
from stores.history_import import HistoryCheckpoints
from stores.legacy_store import LegacyStore
from stores.migration_state import MigrationStateStore
from stores.tb_batches import BatchedClient
from stores.tigerbeetle_client import TigerBeetleClient, connect_tigerbeetle
from stores.tigerbeetle_store import TigerBeetleStore
from walletcore.tb_limits import BatchLimits


class StoreParams(Protocol):
    """The plain parameters the stores need: addresses, names and bounds, nothing else."""

    @property
    def mongodb_uri(self) -> str: ...
    @property
    def mongodb_database(self) -> str: ...
    @property
    def redis_url(self) -> str: ...
    @property
    def tb_addresses(self) -> str: ...
    @property
    def tb_cluster_id(self) -> int: ...
    @property
    def tb_request_timeout_s(self) -> float: ...
    @property
    def tb_request_limit_bytes(self) -> int: ...
    @property
    def registry_cache_ttl_s(self) -> int: ...
    @property
    def deployment_tag(self) -> int: ...


@dataclass
class Stores:
    """Everything that talks to a data server, opened once per process."""

    mongo_client: AsyncMongoClient[dict[str, Any]]
    db: AsyncDatabase[dict[str, Any]]
    redis: redis_asyncio.Redis
    tb_client: TigerBeetleClient  # cut to `limits` (a stores.tb_batches.BatchedClient)
    limits: BatchLimits  # every TigerBeetle batch and page size under the cluster's limit
    accounts: AccountRegistry
    transfers: TransferRegistry
    legacy: LegacyStore
    tigerbeetle: TigerBeetleStore
    migration: MigrationStateStore
    imports: ImportLedger  # the backfill's claims (indexes: workers.wiring.ensure_ops_indexes)
    history: HistoryCheckpoints  # the --with-history import's checkpoints

    async def close(self) -> None:
        # Each close is independent: one failing must not leak the others.
        with contextlib.suppress(Exception):
            await self.tb_client.close()
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        with contextlib.suppress(Exception):
            await self.mongo_client.close()


async def make_stores(
    settings: StoreParams, *, ensure_indexes: bool = True, tb_addresses: str | None = None
) -> Stores:
    """Open clients and build the stores. `tb_addresses` overrides settings (tests).
    Asks TigerBeetle its request limit first (the emulator answers once it is reachable)."""
    tb_client = await connect_batched(settings, tb_addresses=tb_addresses)
    limits = tb_client.limits
    mongo_client = make_mongo_client(settings.mongodb_uri)
    db = database_of(mongo_client, settings.mongodb_database)
    redis = redis_asyncio.Redis.from_url(settings.redis_url)
    accounts = AccountRegistry(db, redis, ttl_s=settings.registry_cache_ttl_s)
    transfers = TransferRegistry(db)
    legacy = LegacyStore(db)
    stores = Stores(
        mongo_client=mongo_client,
        db=db,
        redis=redis,
        tb_client=tb_client,
        limits=limits,
        accounts=accounts,
        transfers=transfers,
        legacy=legacy,
        tigerbeetle=TigerBeetleStore(tb_client, accounts, transfers,
                                     deployment_tag=settings.deployment_tag, limits=limits),
        migration=MigrationStateStore(db),
        imports=ImportLedger(db),
        history=HistoryCheckpoints(db),
    )
    if ensure_indexes:  # the processes that write (the API starts while MongoDB may be down)
        try:
            await require_supported_server(mongo_client)
            await legacy.ensure_indexes()
            await accounts.ensure_indexes()
            await transfers.ensure_indexes()
        except BaseException:
            await stores.close()
            raise
    return stores


async def connect_batched(
    settings: StoreParams, *, tb_addresses: str | None = None
) -> BatchedClient:
    """The TigerBeetle client cut to the request limit it reports (see the module docstring)."""
    client = connect_tigerbeetle(
        tb_addresses or settings.tb_addresses,
        cluster_id=settings.tb_cluster_id,
        timeout_s=settings.tb_request_timeout_s,
        request_limit_bytes=settings.tb_request_limit_bytes,
    )
    try:
        limits = BatchLimits(request_limit_bytes=await client.request_limit_bytes())
    except BaseException:
        with contextlib.suppress(Exception):
            await client.close()
        raise
    return BatchedClient(client, limits)


@contextlib.asynccontextmanager
async def open_stores(settings: StoreParams, **kwargs: Any) -> AsyncIterator[Stores]:
    stores = await make_stores(settings, **kwargs)
    try:
        yield stores
    finally:
        await stores.close()
