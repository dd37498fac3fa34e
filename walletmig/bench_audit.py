"""`python -m walletmig.bench_audit`: what the audit chain costs, group commit against one
transaction per record, side by side in one run (not a timed test).

For each concurrency, both ways append the same credit records to chains of their own in a
scratch database (dropped at the end): records/s, p50/p99 latency and this process's CPU ms per
record (far less noisy than throughput on a shared machine). One transaction per record is run
only at low concurrency: above it, write conflicts on the chain head make it livelock.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from mongobase.mongo import make_mongo_client
from stores.audit_chain import AUDIT_RECORDS, AuditAppender, AuditChain, wallet_operation_record
from walletconfig.settings import ENVIRONMENT
from walletcore.errors import StoreUnavailableError
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit
from walletcore.wallet_ids import wallet_ref

RECORDS_MAX = 100_000
CONCURRENCY_MAX = 1024
SINGLE_CONCURRENCY_MAX = 4  # one transaction per record beyond this: conflicts, livelock
PCT_P99 = 0.99
BENCH_ID_KEY = bytes(32)  # pseudonyms of bench wallets only


def _record(n: int) -> dict[str, Any]:
    op = AddCredit(wallet=WalletKey(client_id=f"bench-{n}", country="USA", currency="USD"),
                   transaction_id=f"bench-t-{n}", amount=Decimal("1.50"))  # fmt: skip
    return wallet_operation_record(op, wallet_ref=wallet_ref(BENCH_ID_KEY, op.wallet), source="api",
                                   actor="bench", operation="add_credit")  # fmt: skip


async def _measure(
    label: str, append: Callable[[dict[str, Any]], Awaitable[Any]], records: int, callers: int
) -> str:
    latencies_ms: list[float] = []
    gate = asyncio.Semaphore(callers)

    async def one(n: int) -> None:
        async with gate:
            start = time.perf_counter()
            await append(_record(n))
            latencies_ms.append((time.perf_counter() - start) * 1000)

    cpu_start, wall_start = time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(*(one(n) for n in range(records)))
    except StoreUnavailableError as err:
        return f"{label:28s} callers={callers:4d} FAILED: {err}"
    wall_s = time.perf_counter() - wall_start
    cpu_ms_per_record = (time.process_time() - cpu_start) * 1000 / records
    latencies_ms.sort()
    p50, p99 = latencies_ms[len(latencies_ms) // 2], latencies_ms[int(records * PCT_P99) - 1]
    return (f"{label:28s} callers={callers:4d} {records / wall_s:8.0f} records/s  p50 "
            f"{p50:7.1f} ms  p99 {p99:7.1f} ms  CPU {cpu_ms_per_record:.3f} ms/record")  # fmt: skip


async def run(uri: str, records: int, concurrency: list[int], rounds: int) -> None:
    client = make_mongo_client(uri)
    db = client[f"bench_audit_{uuid.uuid4().hex[:8]}"]
    try:
        chain = AuditChain(db)
        await chain.ensure_indexes()
        for callers in concurrency:
            for round_no in range(rounds):
                appender = AuditAppender(chain, f"group-{callers}-{round_no}")
                print(await _measure("group commit", appender.append, records, callers))
                await appender.close()
                if callers <= SINGLE_CONCURRENCY_MAX:
                    name = f"single-{callers}-{round_no}"
                    single = AuditChain(db)

                    async def append_one(record: dict[str, Any], name: str = name,
                                         single: AuditChain = single) -> Any:  # fmt: skip
                        return await single.append(AUDIT_RECORDS, name, [record])

                    print(await _measure("one transaction per record", append_one,
                                         min(records, 200), callers))  # fmt: skip
        start = time.perf_counter()
        verified = await chain.verify()
        checked = sum(report.checked for report in verified.chains)
        print(f"verify: {checked} documents in {time.perf_counter() - start:.2f} s, "
              f"ok={verified.ok}")  # fmt: skip
    finally:
        await client.drop_database(db.name)
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m walletmig.bench_audit", description=__doc__)
    parser.add_argument("--mongodb-uri", default=os.environ.get(
        "MONGODB_URI", ENVIRONMENT["MONGODB_URI"][1]))  # fmt: skip
    parser.add_argument("--records", type=int, default=600, help="appends per measurement")
    parser.add_argument("--concurrency", default="1,4,16,64", help="concurrent callers, a list")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not 1 <= args.records <= RECORDS_MAX or not all(
            1 <= c <= CONCURRENCY_MAX for c in concurrency) or not 1 <= args.rounds <= 10:
        parser.error(f"--records 1..{RECORDS_MAX}, --concurrency 1..{CONCURRENCY_MAX}, "
                     "--rounds 1..10")  # fmt: skip
    asyncio.run(run(args.mongodb_uri, args.records, concurrency, args.rounds))


if __name__ == "__main__":
    main()
