"""Emulator benchmark: transfers/s and batch latency through the client adapter to a fresh
emulator process, side by side with the engine in-process; plus lookup_accounts of a full batch.

    python -m tb_emulator.bench --transfers 200000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

import tigerbeetle as tb

from tb_emulator.client import EmulatorClientAsync
from tb_emulator.engine import make_engine
from tb_emulator.server import EmulatorProcess, temp_data_file
from tb_emulator.wire import BATCH_EVENTS_MAX

LEDGER: Final = 1
CODE: Final = 1
LOOKUP_ROUNDS: Final = 20


def _accounts(count: int, id_base: int) -> list[tb.Account]:
    return [
        tb.Account(id=id_base + i, ledger=LEDGER, code=CODE)
        for i in range(count)
    ]


def _transfer_batches(
    transfers: int, account_ids: Sequence[int], batch: int, id_base: int, seed: int
) -> list[list[tb.Transfer]]:
    rng = random.Random(seed)
    n = len(account_ids)
    batches: list[list[tb.Transfer]] = []
    for start in range(0, transfers, batch):
        rows = []
        for i in range(start, min(start + batch, transfers)):
            debit = rng.randrange(n)
            credit = (debit + 1 + rng.randrange(n - 1)) % n
            rows.append(tb.Transfer(
                id=id_base + i, debit_account_id=account_ids[debit],
                credit_account_id=account_ids[credit], amount=rng.randrange(1, 1000),
                ledger=LEDGER, code=CODE,
            ))
        batches.append(rows)
    return batches


def _percentile_ms(samples_s: list[float], q: float) -> float:
    ordered = sorted(samples_s)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index] * 1000, 2)


def _failures(results: Sequence[tb.CreateTransferResult | tb.CreateAccountResult]) -> int:
    created = 0xFFFFFFFF
    return sum(1 for r in results if r.status != created)


def _process_cpu_s(pid: int) -> float | None:
    """User+system CPU seconds of a process (Linux /proc), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs since boot (Linux /proc/stat), None elsewhere.
    Steal is time the hypervisor gave this VM's CPUs to others: on a shared host it slows
    every figure here, so the report says how much there was."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[7], sum(fields[:8])
    except (OSError, ValueError, IndexError):
        return None


async def _adapter_run(
    server_pid: int,
    address: str,
    accounts: list[tb.Account],
    batches: list[list[tb.Transfer]],
    concurrency: int,
    lookup_ids: list[int],
) -> dict[str, Any]:
    client = EmulatorClientAsync(0, address, timeout_s=120)
    try:
        for start in range(0, len(accounts), BATCH_EVENTS_MAX):
            results = await client.create_accounts(accounts[start:start + BATCH_EVENTS_MAX])
            assert _failures(results) == 0
        latencies: list[float] = []
        failures = 0
        queue = iter(batches)

        async def worker() -> None:
            nonlocal failures
            for rows in queue:
                t0 = time.perf_counter()
                results = await client.create_transfers(rows)
                latencies.append(time.perf_counter() - t0)
                failures += _failures(results)

        server_cpu_before = _process_cpu_s(server_pid)
        client_cpu_before = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        client_cpu = time.process_time() - client_cpu_before
        server_cpu_after = _process_cpu_s(server_pid)
        lookups: list[float] = []
        for _ in range(LOOKUP_ROUNDS):
            t0 = time.perf_counter()
            found = await client.lookup_accounts(lookup_ids)
            lookups.append(time.perf_counter() - t0)
            assert len(found) == len(lookup_ids)
    finally:
        await client.close()
    count = sum(map(len, batches))
    report = {
        "transfers_per_s": round(count / elapsed),
        "elapsed_s": round(elapsed, 2),
        "batch_p50_ms": _percentile_ms(latencies, 0.5),
        "batch_p99_ms": _percentile_ms(latencies, 0.99),
        "failed_events": failures,
        "concurrency": concurrency,
        "lookup_accounts_p50_ms": _percentile_ms(lookups, 0.5),
        # The first lookup after the writes also packs every stale account row it reads.
        "lookup_accounts_first_ms": round(lookups[0] * 1000, 2),
        # Per CPU-second figures do not depend on how busy the machine is.
        "transfers_per_client_cpu_s": round(count / client_cpu) if client_cpu else None,
    }
    if server_cpu_before is not None and server_cpu_after is not None:
        server_cpu = server_cpu_after - server_cpu_before
        report["transfers_per_server_cpu_s"] = round(count / server_cpu) if server_cpu else None
    return report


def _in_process_run(
    accounts: list[tb.Account], batches: list[list[tb.Transfer]], lookup_ids: list[int]
) -> dict[str, Any]:
    engine = make_engine()
    for start in range(0, len(accounts), BATCH_EVENTS_MAX):
        assert _failures(engine.create_accounts(accounts[start:start + BATCH_EVENTS_MAX])) == 0
    latencies: list[float] = []
    failures = 0
    cpu_before = time.process_time()
    started = time.perf_counter()
    for rows in batches:
        t0 = time.perf_counter()
        results = engine.create_transfers(rows)
        latencies.append(time.perf_counter() - t0)
        failures += _failures(results)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    lookups: list[float] = []
    for _ in range(LOOKUP_ROUNDS):
        t0 = time.perf_counter()
        engine.lookup_accounts(lookup_ids)
        lookups.append(time.perf_counter() - t0)
    engine.close()
    count = sum(map(len, batches))
    return {
        "transfers_per_s": round(count / elapsed),
        "elapsed_s": round(elapsed, 2),
        "batch_p50_ms": _percentile_ms(latencies, 0.5),
        "batch_p99_ms": _percentile_ms(latencies, 0.99),
        "failed_events": failures,
        "lookup_accounts_p50_ms": _percentile_ms(lookups, 0.5),
        "lookup_accounts_first_ms": round(lookups[0] * 1000, 2),
        "transfers_per_cpu_s": round(count / cpu) if cpu else None,
    }


def run_benchmark(
    transfers: int = 1_000_000,
    accounts: int = 10_000,
    batch: int = BATCH_EVENTS_MAX,
    *,
    concurrency: int = 2,
    seed: int = 42,
    in_process: bool = True,
    recovery: bool = True,
    print_results: bool = True,
) -> dict[str, Any]:
    """Runs both sides on the same generated data; prints a summary, returns the figures."""
    assert 0 < transfers <= 100_000_000 and 2 <= accounts <= 10_000_000
    assert 0 < batch <= BATCH_EVENTS_MAX and 0 < concurrency <= 64
    id_base = tb.id()  # Realistic 128-bit ids (both u64 halves non-zero).
    account_list = _accounts(accounts, id_base)
    account_ids = [a.id for a in account_list]
    batches = _transfer_batches(transfers, account_ids, batch, id_base + accounts, seed)
    lookup_ids = random.Random(seed).sample(account_ids, min(BATCH_EVENTS_MAX, accounts))
    gc.collect()
    gc.freeze()  # The generated objects live all run long; keep the GC off them.
    ticks_before = _cpu_ticks()

    directory, data_file = temp_data_file("tbemu-bench-")
    process = EmulatorProcess(data_file, startup_timeout_s=600)
    try:
        process.start()
        adapter = asyncio.run(
            _adapter_run(process.pid, process.address, account_list, batches, concurrency,
                         lookup_ids))
        if recovery:  # kill -9, then time the replay of the whole log.
            process.kill()
            t0 = time.perf_counter()
            process.start()
            adapter["recovery_s"] = round(time.perf_counter() - t0, 2)
            adapter["log_bytes"] = os.path.getsize(data_file)
    finally:
        process.kill()
        shutil.rmtree(directory, ignore_errors=True)
    report: dict[str, Any] = {
        "transfers": transfers, "accounts": accounts, "batch": batch, "adapter": adapter,
    }
    if in_process:
        report["in_process"] = _in_process_run(account_list, batches, lookup_ids)
    gc.unfreeze()
    ticks_after = _cpu_ticks()
    if ticks_before is not None and ticks_after is not None:
        steal = ticks_after[0] - ticks_before[0]
        total = ticks_after[1] - ticks_before[1]
        report["cpu_steal_percent"] = round(100 * steal / total, 1) if total else 0.0
    if print_results:
        _print(report)
    return report


def _print(report: dict[str, Any]) -> None:
    print(f"tb_emulator benchmark: {report['transfers']:,} transfers, "
          f"{report['accounts']:,} accounts, batch {report['batch']}")
    columns = [("adapter -> emulator process", report["adapter"])]
    if "in_process" in report:
        columns.append(("engine in-process", report["in_process"]))
    print(f"{'':28}" + "".join(f"{name:>30}" for name, _ in columns))
    for key, label in (("transfers_per_s", "transfers/s"), ("batch_p50_ms", "batch p50 ms"),
                       ("batch_p99_ms", "batch p99 ms"),
                       ("lookup_accounts_p50_ms", "lookup_accounts 8189 p50 ms"),
                       ("lookup_accounts_first_ms", "  first one after writes ms"),
                       ("failed_events", "failed events"),
                       ("transfers_per_server_cpu_s", "transfers/server CPU-s"),
                       ("transfers_per_client_cpu_s", "transfers/client CPU-s"),
                       ("transfers_per_cpu_s", "transfers/CPU-s"),
                       ("recovery_s", "restart (log replay) s")):
        print(f"{label:28}" + "".join(
            f"{values[key]:>30,}" if key in values else f"{'-':>30}" for _, values in columns))
    print(f"(adapter: {report['adapter']['concurrency']} batches in flight, fsync per group "
          f"commit, latency includes queueing behind the other in-flight batches; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
          + (f", CPU steal {report['cpu_steal_percent']} %" if "cpu_steal_percent" in report
             else "") + ")")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tb_emulator.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transfers", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=BATCH_EVENTS_MAX)
    parser.add_argument("--concurrency", type=int, default=2,
                        help="create_transfers batches in flight through the adapter")
    parser.add_argument("--no-in-process", action="store_true")
    parser.add_argument("--no-recovery", action="store_true", help="skip the restart timing")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    report = run_benchmark(args.transfers, args.accounts, args.batch,
                           concurrency=args.concurrency, in_process=not args.no_in_process,
                           recovery=not args.no_recovery, print_results=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
    failed = report["adapter"]["failed_events"] + report.get("in_process", {}).get(
        "failed_events", 0)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
