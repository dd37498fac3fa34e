"""Soak/stress test of the emulator server: `python -m tb_emulator.soak --duration-s 180`.

Several processes, each with many asyncio clients doing mixed creates/lookups/queries
(pipelined on shared connections), plus misbehaving peers: connections dropped mid-frame or
with requests in flight, clients timing out then reusing their connection, raw pipelines,
oversized/malformed frames, a peer that stops reading its replies, connection churn.
A probe in the parent measures every second how long one lookup takes: a stall (a request
that gets no reply while others do) shows as a probe or client latency beyond the limit.
Exit code 0 only if nothing stalled and every ledger's debits equal its credits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from typing import Any, Final

import tigerbeetle as tb

from tb_emulator import wire
from tb_emulator.client import EmulatorClientAsync, EmulatorClientSync, RequestTimeoutError
from tb_emulator.server import EmulatorProcess, temp_data_file

ACCOUNTS_PER_WORKER: Final = 200
LEDGER_BASE: Final = 700
CLIENT_TIMEOUT_S: Final = 90.0  # Generous: on 2 shared cores, a busy server is slow, not stuck.
STALL_S: Final = 30.0  # A reply later than this is reported as a stall.


def _frame(request_id: int, op: int, body: bytes, version: int = wire.VERSION) -> bytes:
    return wire.HEADER.pack(len(body), request_id, op, 0, version) + body


def _ids_body(ids: list[int]) -> bytes:
    return wire.pack_ids(ids)


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes]:
    body_size, request_id, op, status, _ = wire.HEADER.unpack(
        await reader.readexactly(wire.HEADER_SIZE))
    body = await reader.readexactly(body_size) if body_size else b""
    return request_id, op, status, body


class Worker:
    def __init__(self, index: int, host: str, port: int, clients: int, duration_s: float) -> None:
        self.index = index
        self.host = host
        self.port = port
        self.clients = clients
        self.deadline = time.monotonic() + duration_s
        self.rng = random.Random(index)
        self.ledger = LEDGER_BASE + index
        self.account_ids = [(index + 1) << 64 | i for i in range(1, ACCOUNTS_PER_WORKER + 1)]
        self.next_transfer_id = (index + 1) << 96
        self.transfer_ids: list[int] = []
        self.stats: dict[str, Any] = {
            "requests": 0, "events": 0, "stalls": [], "errors": [], "max_latency_s": 0.0,
            "timeouts_injected": 0, "chaos": {}}

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _alive(self) -> bool:
        return time.monotonic() < self.deadline

    def _count(self, name: str) -> None:
        chaos = self.stats["chaos"]
        chaos[name] = chaos.get(name, 0) + 1

    async def _timed(self, name: str, call: Any) -> Any:
        started = time.monotonic()
        try:
            return await call
        except RequestTimeoutError as e:
            self.stats["stalls"].append(f"{name}: {e}")
            return None
        finally:
            latency_s = time.monotonic() - started
            self.stats["requests"] += 1
            self.stats["max_latency_s"] = max(self.stats["max_latency_s"], latency_s)
            if latency_s > STALL_S:
                self.stats["stalls"].append(f"{name}: {latency_s:.1f} s")

    def _transfers(self, count: int) -> list[tb.Transfer]:
        transfers = []
        for _ in range(count):
            debit, credit = self.rng.sample(self.account_ids, 2)
            self.next_transfer_id += 1
            transfers.append(tb.Transfer(
                id=self.next_transfer_id, debit_account_id=debit, credit_account_id=credit,
                amount=self.rng.randint(1, 1000), ledger=self.ledger, code=1))
        return transfers

    async def setup(self) -> None:
        client = EmulatorClientAsync(0, self.address, timeout_s=CLIENT_TIMEOUT_S)
        try:
            await client.create_accounts([
                tb.Account(id=i, ledger=self.ledger, code=1, flags=tb.AccountFlags.HISTORY)
                for i in self.account_ids])
        finally:
            await client.close()

    async def run(self) -> dict[str, Any]:
        await self.setup()
        tasks = [self._normal(i) for i in range(self.clients)]
        tasks += [self._chaos(name) for name in CHAOS]
        await asyncio.gather(*tasks)
        await self._check_balances()
        return self.stats

    # -- well-behaved clients (a shared connection each, pipelined requests) -----------------

    async def _normal(self, n: int) -> None:
        client = EmulatorClientAsync(0, self.address, timeout_s=CLIENT_TIMEOUT_S)
        try:
            while self._alive():
                width = self.rng.choice((1, 1, 2, 4, 8, 40))  # 40 > 32 per-connection limit.
                await asyncio.gather(*(self._one(client) for _ in range(width)))
        except Exception as e:
            self.stats["errors"].append(f"client {n}: {type(e).__name__}: {e}")
        finally:
            await client.close()

    async def _one(self, client: EmulatorClientAsync) -> None:
        rng = self.rng
        kind = rng.random()
        if kind < 0.45:
            count = rng.choice((1, 1, 1, 1, 10, 10, 100, 1000)) if rng.random() < 0.98 else 8189
            transfers = self._transfers(count)
            results = await self._timed("create_transfers", client.create_transfers(transfers))
            if results is not None:
                self.stats["events"] += count
                if any(r.status != tb.CreateTransferStatus.CREATED for r in results):
                    self.stats["errors"].append(f"create_transfers: {results[:1]}")
                self.transfer_ids.extend(t.id for t in transfers[:50])
                del self.transfer_ids[:-5000]
        elif kind < 0.65:
            # Now and then a full batch (repeats allowed): a reply in PARTIAL chunks.
            size = rng.choice((1, 10, 200)) if rng.random() < 0.97 else wire.BATCH_EVENTS_MAX
            ids = rng.choices(self.account_ids, k=size)
            found = await self._timed("lookup_accounts", client.lookup_accounts(ids))
            if found is not None and len(found) != len(ids):
                self.stats["errors"].append(f"lookup_accounts: {len(found)} of {len(ids)}")
        elif kind < 0.75 and self.transfer_ids:
            size = 100 if rng.random() < 0.97 else wire.BATCH_EVENTS_MAX
            ids = rng.choices(self.transfer_ids, k=size)
            await self._timed("lookup_transfers", client.lookup_transfers(ids))
        elif kind < 0.85:
            f = tb.AccountFilter(
                account_id=rng.choice(self.account_ids), user_data_128=0, user_data_64=0,
                user_data_32=0, code=0, timestamp_min=0, timestamp_max=0,
                limit=rng.choice((10, 8189)),
                flags=tb.AccountFilterFlags.DEBITS | tb.AccountFilterFlags.CREDITS
                | tb.AccountFilterFlags.REVERSED)
            if rng.random() < 0.5:
                await self._timed("get_account_transfers", client.get_account_transfers(f))
            else:
                await self._timed("get_account_balances", client.get_account_balances(f))
        else:
            q = tb.QueryFilter(user_data_128=0, user_data_64=0, user_data_32=0,
                               ledger=self.ledger, code=1, timestamp_min=0, timestamp_max=0,
                               limit=rng.choice((10, 1000)), flags=tb.QueryFilterFlags.REVERSED)
            await self._timed("query_transfers", client.query_transfers(q))

    # -- misbehaving peers ------------------------------------------------------------------

    async def _chaos(self, name: str) -> None:
        method = getattr(self, "_chaos_" + name)
        while self._alive():
            try:
                await method()
                self._count(name)
            except (OSError, asyncio.IncompleteReadError):
                self._count(name + "_connection_error")
            except Exception as e:
                self.stats["errors"].append(f"chaos {name}: {type(e).__name__}: {e}")
            await asyncio.sleep(self.rng.uniform(0.05, 0.5))

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port,
                                             limit=wire.BODY_SIZE_MAX + 4096)

    async def _chaos_drop_mid_frame(self) -> None:
        _, writer = await self._open()
        body = wire.pack_transfers(self._transfers(self.rng.randint(1, 500)))
        frame = _frame(1, wire.Op.CREATE_TRANSFERS, body)
        writer.write(frame[:self.rng.randint(1, len(frame) - 1)])
        await writer.drain()
        writer.transport.abort()

    async def _chaos_drop_inflight(self) -> None:
        # Full requests (applied), then gone before the replies: replies must be dropped.
        _, writer = await self._open()
        for rid in range(1, self.rng.randint(2, 80)):
            writer.write(_frame(rid, wire.Op.CREATE_TRANSFERS,
                                wire.pack_transfers(self._transfers(self.rng.randint(1, 50)))))
        await writer.drain()
        if self.rng.random() < 0.5:
            writer.transport.abort()
        else:
            writer.close()

    async def _chaos_raw_pipeline(self) -> None:
        reader, writer = await self._open()
        try:
            count = self.rng.randint(50, 300)
            payload = b"".join(
                _frame(rid, wire.Op.LOOKUP_ACCOUNTS,
                       _ids_body(self.rng.sample(self.account_ids, 8)))
                for rid in range(1, count + 1))
            writer.write(payload)
            seen = set()
            async with asyncio.timeout(STALL_S):
                for _ in range(count):
                    rid, _, status, _ = await _read_frame(reader)
                    if rid == 0 and status == wire.Status.BUSY:  # Connection limit: legit.
                        self._count("busy")
                        return
                    assert status == wire.Status.OK, status
                    seen.add(rid)
            assert seen == set(range(1, count + 1)), "pipelined replies missing"
        except TimeoutError:
            self.stats["stalls"].append("raw pipeline: replies missing")
        finally:
            writer.transport.abort()

    async def _chaos_timeouts(self) -> None:
        # Requests time out client-side; their late replies arrive on the same connection.
        client = EmulatorClientAsync(0, self.address, timeout_s=0.001)
        try:
            for _ in range(20):
                try:
                    await client.create_transfers(self._transfers(self.rng.randint(1, 200)))
                except RequestTimeoutError:
                    self.stats["timeouts_injected"] += 1
            client.timeout_s = CLIENT_TIMEOUT_S
            ids = self.rng.sample(self.account_ids, 5)
            found = await self._timed("lookup_after_timeouts", client.lookup_accounts(ids))
            if found is not None:
                assert [a.id for a in found] == ids
        finally:
            await client.close()

    async def _chaos_slow_reader(self) -> None:
        # Asks for big replies, stops reading for a while (server-side backpressure), then
        # reads them all or hangs up (maybe in the middle of a chunked reply).
        reader, writer = await self._open()
        try:
            count = self.rng.randint(10, 120)
            if self.rng.random() < 0.7:
                body = _ids_body(self.account_ids)  # 200 found accounts: ~25 KiB a reply.
            else:  # 8189 ids: 4 frames of up to 256 KiB each.
                count //= 10
                body = _ids_body(self.rng.choices(self.account_ids, k=wire.BATCH_EVENTS_MAX))
            writer.write(b"".join(_frame(rid, wire.Op.LOOKUP_ACCOUNTS, body)
                                  for rid in range(1, count + 1)))
            await asyncio.sleep(self.rng.uniform(1, 8))
            if self.rng.random() < 0.3:
                return
            async with asyncio.timeout(STALL_S):
                answered = 0
                while answered < count:
                    if (await _read_frame(reader))[2] != wire.Status.PARTIAL:
                        answered += 1
        except TimeoutError:
            self.stats["stalls"].append("slow reader: replies missing")
        finally:
            writer.transport.abort()

    async def _chaos_malformed(self) -> None:
        reader, writer = await self._open()
        try:
            choice = self.rng.randrange(6)
            if choice == 0:  # Oversized but in sync: TOO_MUCH_DATA, connection stays usable.
                writer.write(_frame(1, wire.Op.LOOKUP_ACCOUNTS, bytes(wire.BODY_SIZE_MAX + 16)))
                writer.write(_frame(2, wire.Op.LOOKUP_ACCOUNTS, _ids_body(self.account_ids[:1])))
                replies = [await _read_frame(reader) for _ in range(2)]
                assert replies[0][2] == wire.Status.TOO_MUCH_DATA
                assert replies[1][2] == wire.Status.OK
            elif choice == 1:  # Huge size: MALFORMED then hang up.
                writer.write(wire.HEADER.pack(0xFFFFFFFF, 7, 1, 0, wire.VERSION))
                assert (await _read_frame(reader))[2] == wire.Status.MALFORMED
            elif choice == 2:
                writer.write(_frame(3, wire.Op.LOOKUP_ACCOUNTS, b"", version=99))
                assert (await _read_frame(reader))[2] == wire.Status.MALFORMED
            elif choice == 3:
                writer.write(_frame(4, 77, b"xx"))
                assert (await _read_frame(reader))[2] == wire.Status.INVALID_OPERATION
            elif choice == 4:
                writer.write(_frame(5, wire.Op.CREATE_TRANSFERS, os.urandom(200)))
                assert (await _read_frame(reader))[2] == wire.Status.INVALID_DATA_SIZE
            else:
                writer.write(os.urandom(self.rng.randint(1, 4000)))
                await writer.drain()
                with contextlib.suppress(asyncio.IncompleteReadError, TimeoutError):
                    async with asyncio.timeout(1):
                        await _read_frame(reader)
        finally:
            writer.transport.abort()

    async def _chaos_churn(self) -> None:
        writers = []
        for _ in range(self.rng.randint(1, 8)):
            _, writer = await self._open()
            writers.append(writer)
        await asyncio.sleep(self.rng.uniform(0, 1))
        for writer in writers:
            writer.transport.abort()

    async def _check_balances(self) -> None:
        client = EmulatorClientAsync(0, self.address, timeout_s=CLIENT_TIMEOUT_S)
        try:
            found = await client.lookup_accounts(self.account_ids)
            debits = sum(a.debits_posted for a in found)
            credits = sum(a.credits_posted for a in found)
            if len(found) != len(self.account_ids) or debits != credits:
                self.stats["errors"].append(f"ledger {self.ledger}: {debits} != {credits}")
            self.stats["ledger_posted"] = debits
        finally:
            await client.close()


CHAOS: Final = ("drop_mid_frame", "drop_inflight", "raw_pipeline", "timeouts", "slow_reader",
                "malformed", "churn")


def _worker_main(index: int, host: str, port: int, clients: int, duration_s: float,
                 results: Any) -> None:
    stats = asyncio.run(Worker(index, host, port, clients, duration_s).run())
    results.put((index, stats))


def _probe(address: str, deadline: float) -> dict[str, Any]:
    """Every 0.5 s one lookup on a fresh-ish connection: its latency is the server's."""
    latencies = []
    stalls = []
    client = EmulatorClientSync(0, address, timeout_s=CLIENT_TIMEOUT_S)
    try:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                client.lookup_accounts([1 << 64 | 1])
            except RequestTimeoutError as e:
                stalls.append(f"probe: {e}")
            latency_s = time.monotonic() - started
            latencies.append(latency_s)
            if latency_s > STALL_S:
                stalls.append(f"probe: {latency_s:.1f} s at {time.strftime('%X')}")
            time.sleep(0.5)
    finally:
        client.close()
    latencies.sort()
    return {"probes": len(latencies), "stalls": stalls,
            "p50_s": latencies[len(latencies) // 2] if latencies else None,
            "max_s": latencies[-1] if latencies else None}


def run(address: str | None, processes: int, clients: int, duration_s: float) -> dict[str, Any]:
    emulator = None
    data_dir = None
    if address is None:
        data_dir, data_file = temp_data_file("tbemu-soak-")
        emulator = EmulatorProcess(data_file).start()
        address = emulator.address
    host, _, port_text = address.rpartition(":")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    children = [context.Process(target=_worker_main,
                                args=(i, host, int(port_text), clients, duration_s, results))
                for i in range(processes)]
    started = time.monotonic()
    try:
        for child in children:
            child.start()
        probe = _probe(address, started + duration_s)
        workers = {}
        for _ in children:
            index, stats = results.get(timeout=duration_s + 300)
            workers[index] = stats
        for child in children:
            child.join(30)
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
        if emulator is not None:
            emulator.stop()
    report: dict[str, Any] = {
        "elapsed_s": round(time.monotonic() - started, 1), "probe": probe, "workers": workers,
        "ok": not probe["stalls"] and all(
            not w["stalls"] and not w["errors"] for w in workers.values()),
    }
    if emulator is not None:
        report["server_log_tail"] = emulator.read_log()[-3000:]
    if data_dir is not None:
        if report["ok"]:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            report["data_dir"] = data_dir  # Kept for a post-mortem (log + data file).
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tb_emulator.soak", description=__doc__)
    parser.add_argument("--address", help="host:port of a running emulator (default: start one)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4, help="well-behaved clients per process")
    parser.add_argument("--duration-s", type=float, default=120.0)
    args = parser.parse_args(argv)
    report = run(args.address, args.processes, args.clients, args.duration_s)
    json.dump(report, sys.stdout, indent=1, default=str)
    print()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
