"""`walletmig bench backfill|reconcile --wallets N [--json]`: throughput next to a raw baseline.

Both seed N legacy wallets in a fresh ledger pair of their own (a random country code, so
nothing else is touched), straight into the `wallets` collection in bulk (the store API would
make seeding the slow part). Then, in the same run:
- backfill: the raw speed of batched `create_transfers` (8189 per request) through the adapter,
  then the import itself (WalletImporter pages, the activity code) -> wallets/s and ratio. The
  baseline's results are checked (every transfer created, both accounts posted N) and the import
  must account for every wallet.
- reconcile: the raw read (MongoDB cursor + `lookup_accounts` of 8189 ids, a bare loop), then
  Reconciler.wallet_page over the same wallets -> wallets/s and ratio. Both are warmed the same
  way first (one untimed pass each, same wallets), and every wallet must match.
Memory: peak RSS before and after (pages are bounded, so it must not grow with N).
"""

from __future__ import annotations

import random
import resource
import string
import time
import uuid
from decimal import Decimal
from typing import Any

import tigerbeetle as tb
from bson.decimal128 import Decimal128

from activities.backfill import WalletImporter
from activities.history_import import ImportBooks
from activities.reconciliation import Books, Reconciler
from messages.backfill import WALLETS_PER_PAGE_MAX, BackfillPageInput
from messages.reconciliation import PAGE_MAX, WalletPageInput
from mongobase.mongo import now_ms
from registries.account_registry import AccountRegistry
from stores.backfill_imports import ImportLedger
from stores.bundle import Stores, make_stores
from stores.legacy_store import WALLETS, LegacyStore
from stores.reports import ReportStore
from stores.tigerbeetle_store import TigerBeetleStore
from walletconfig.settings import Settings
from walletcore.ids import account_id, hash_u128
from walletcore.keys import WalletKey
from walletcore.ledgers import DEFAULT_LEDGERS, LedgerTable

WALLETS_MAX = 10_000_000
SEED_BATCH = 5000


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Bench:
    def __init__(self, stores: Stores, wallets: int) -> None:
        assert 0 < wallets <= WALLETS_MAX
        self.stores = stores
        self.wallets = wallets
        self.country = "".join(random.choices(string.ascii_uppercase, k=3))
        self.pair = f"USD:{self.country}"
        self.ledger = random.randint(100_000, 2**31)
        self.ledgers = LedgerTable({**DEFAULT_LEDGERS, self.pair: self.ledger})
        db = stores.db
        self.legacy = LegacyStore(db, ledgers=self.ledgers)
        self.accounts = AccountRegistry(db, stores.redis, ledgers=self.ledgers)
        self.tb_store = TigerBeetleStore(stores.tb_client, self.accounts, stores.transfers,
                                         self.ledgers)
        self.imports = ImportLedger(db)
        self.importer = WalletImporter(self.legacy, self.tb_store, ImportBooks(
            imports=self.imports, history=stores.history, migration=stores.migration))
        self.reconciler = Reconciler(self.legacy, self.tb_store, Books(
            imports=self.imports, migration=stores.migration, reports=ReportStore(db)))

    async def seed(self) -> float:
        started = time.perf_counter()
        prefix = uuid.uuid4().hex[:8]
        now = now_ms()
        for start in range(0, self.wallets, SEED_BATCH):
            docs = []
            for i in range(start, min(start + SEED_BATCH, self.wallets)):
                credits, debits = random.randint(0, 10**6), random.randint(0, 10**6)
                net = credits - debits
                key = WalletKey(client_id=f"b{prefix}{i:08d}", country=self.country,
                                currency="USD")
                docs.append({
                    "_id": key.canonical, "client_id": key.client_id, "country": self.country,
                    "currency": "USD", "issuer_type": None,
                    "credit": Decimal128(Decimal(max(net, 0)).scaleb(-2)),
                    "debit": Decimal128(Decimal(max(-net, 0)).scaleb(-2)),
                    "historical_credit": Decimal128(Decimal(credits).scaleb(-2)),
                    "allow_overdraft": True, "version": 2, "created_at": now, "updated_at": now,
                })
            await self.stores.db[WALLETS].insert_many(docs, ordered=False)
        return time.perf_counter() - started

    async def raw_create_transfers(self) -> float:
        """Batched create_transfers of `wallets` transfers between two fresh accounts."""
        client = self.stores.tb_client
        a, b = hash_u128(f"bench:{uuid.uuid4()}:a"), hash_u128(f"bench:{uuid.uuid4()}:b")
        await client.create_accounts([tb.Account(id=a, ledger=self.ledger, code=1),
                                      tb.Account(id=b, ledger=self.ledger, code=1)])
        tag = uuid.uuid4().hex
        refused = 0
        started = time.perf_counter()
        for start in range(0, self.wallets, PAGE_MAX):
            batch = [tb.Transfer(id=hash_u128(f"bench:{tag}:{i}"), debit_account_id=a,
                                 credit_account_id=b, amount=1, ledger=self.ledger, code=1)
                     for i in range(start, min(start + PAGE_MAX, self.wallets))]
            results = await client.create_transfers(batch)
            assert len(results) == len(batch), (len(results), len(batch))
            refused += sum(1 for r in results if r.status != tb.CreateTransferStatus.CREATED)
        rate = self.wallets / (time.perf_counter() - started)
        # A baseline that did less work is no baseline: every transfer landed, on both sides.
        assert refused == 0, f"{refused} baseline transfers refused"
        posted = {x.id: x for x in await client.lookup_accounts([a, b])}
        assert posted[a].debits_posted == posted[b].credits_posted == self.wallets, posted
        return rate

    async def backfill(self) -> tuple[float, int]:
        started = time.perf_counter()
        after: str | None = None
        imported = 0
        while True:
            page = await self.importer.page(BackfillPageInput(
                run_id="bench", pair=self.pair, after=after, limit=WALLETS_PER_PAGE_MAX))
            assert not page.failed, list(page.failed.items())[:3]
            imported += page.imported + page.already
            after = page.last_key
            if page.exhausted:
                break
        return self.wallets / (time.perf_counter() - started), imported

    async def raw_read(self) -> float:
        started = time.perf_counter()
        cursor = self.stores.db[WALLETS].find(
            {"currency": "USD", "country": self.country}).sort("_id", 1).batch_size(PAGE_MAX)
        ids: list[int] = []
        seen = 0
        async for doc in cursor:
            ids.append(account_id(WalletKey.from_canonical(doc["_id"])))
            if len(ids) == PAGE_MAX:
                seen += len(await self.stores.tb_client.lookup_accounts(ids))
                ids = []
        if ids:
            seen += len(await self.stores.tb_client.lookup_accounts(ids))
        assert seen == self.wallets, (seen, self.wallets)
        return self.wallets / (time.perf_counter() - started)

    async def reconcile(self) -> tuple[float, int]:
        started = time.perf_counter()
        after: str | None = None
        matched = 0
        run_id = f"bench-{uuid.uuid4().hex[:6]}"
        while True:
            page = await self.reconciler.wallet_page(WalletPageInput(
                run_id=run_id, pair=self.pair, after=after,
                limit=PAGE_MAX, in_flight_max_age_s=300))
            matched += page.matched
            after = page.last_key
            if page.exhausted:
                break
        return self.wallets / (time.perf_counter() - started), matched


async def run_bench(kind: str, settings: Settings, wallets: int) -> dict[str, Any]:
    stores = await make_stores(settings)
    try:
        await ImportLedger(stores.db).ensure_indexes()
        bench = Bench(stores, wallets)
        rss_before = _rss_mb()
        seed_s = await bench.seed()
        out: dict[str, Any] = {"bench": kind, "wallets": wallets, "pair": bench.pair,
                               "seed_s": round(seed_s, 2)}
        if kind == "backfill":
            raw = await bench.raw_create_transfers()
            rate, imported = await bench.backfill()
            assert imported == wallets, f"imported {imported} of {wallets} wallets"
            out.update(raw_create_transfers_per_s=round(raw), backfill_wallets_per_s=round(rate),
                       imported=imported, ratio=round(rate / raw, 3))
        else:
            await bench.backfill()
            # Warm both sides the same way (same wallets, one untimed pass each), so neither
            # timed pass pays for the other's cold caches.
            await bench.raw_read()
            await bench.reconcile()
            raw = await bench.raw_read()
            rate, matched = await bench.reconcile()
            assert matched == wallets, f"reconciliation matched {matched} of {wallets} wallets"
            out.update(raw_read_wallets_per_s=round(raw), reconcile_wallets_per_s=round(rate),
                       matched=matched, ratio=round(rate / raw, 3))
        out.update(peak_rss_mb_before=round(rss_before, 1), peak_rss_mb_after=round(_rss_mb(), 1))
        return out
    finally:
        await stores.close()
