from __future__ import annotations
import time
from datetime import timedelta
from typing import Any
from bson import Decimal128
import test_backfill_history as h
from test_backfill_history import env, fresh_tb  # noqa
from stores.mongo import now_ms
import activities.history_import as hi

def timed(name, fn):
    async def wrap(*a, **k):
        s = time.perf_counter()
        try:
            return await fn(*a, **k)
        finally:
            print(f"  {name}: {time.perf_counter()-s:.2f}s")
    return wrap

async def test_bench(env: Any, unique_id: Any) -> None:
    for name in ("_scan", "_events", "_existing", "_plan_timestamps", "_create_accounts", "_create_transfers", "_record", "_check_cluster", "_start"):
        setattr(hi.HistoryImporter, name, timed(name, getattr(hi.HistoryImporter, name)))
    wallets = [env.key(f"{unique_id('b')}-{i}") for i in range(1000)]
    now = now_ms() - timedelta(minutes=10)
    await env.db["wallets"].insert_many([{"_id": k.canonical, "client_id": k.client_id,
        "country": k.country, "currency": k.currency, "issuer_type": None,
        "credit": Decimal128("0"), "debit": Decimal128("0"), "historical_credit": Decimal128("0"),
        "allow_overdraft": True, "version": 8, "created_at": now, "updated_at": now} for k in wallets])
    docs = []
    for v in range(1, 9):
        for i, k in enumerate(wallets):
            docs.append({"_id": f"{k.client_id}-{v}", "wallet": k.canonical, "type": "credit",
                         "amount": Decimal128("1.00"), "amount_minor": 100, "reference_id": None,
                         "original_transaction_id": None, "voided_by": None,
                         "balance_after": {}, "wallet_version": v,
                         "created_at": now + timedelta(milliseconds=v * 1000 + i // 7)})
    await env.db["wallet_transactions"].insert_many(docs)
    start = time.perf_counter()
    out = await h.import_history(env, limit=4096)
    elapsed = time.perf_counter() - start
    print(f"\nBENCH {out.imported} events in {elapsed:.2f}s = {out.imported/elapsed:.0f}/s pages {out.pages}")
    assert out.imported == 8000 and out.failed == 0
