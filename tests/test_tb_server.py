"""The TigerBeetle emulator server process, its log and its client adapter.

Every test starts its own emulator process(es) on free ports and stops them by PID.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import shutil
import signal
import socket
import struct
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tigerbeetle as tb

from stores.tigerbeetle_client import TimeoutClientAsync, connect_tigerbeetle
from tb_emulator import server as server_module
from tb_emulator import wire
from tb_emulator.client import (
    DEFAULT_TIMEOUT_S,
    EmulatorClientAsync,
    EmulatorClientSync,
    RequestTimeoutError,
    parse_address,
)
from tb_emulator.engine import make_engine
from tb_emulator.server import EmulatorProcess, EmulatorServer, HealthSettings, ServerLimits
from tb_emulator.wal import (
    FILE_HEADER,
    FILE_MAGIC,
    FILE_VERSION,
    RECORD_HEADER,
    WriteAheadLog,
    encode_record,
)

CREATED = tb.CreateTransferStatus.CREATED
STATE_WAIT_S = 15.0  # a state the server reaches in well under a second, on a loaded host too


async def until(check: Callable[[], bool], what: str, timeout_s: float = STATE_WAIT_S) -> None:
    """Until `check()` holds (the server's tasks run meanwhile), at most `timeout_s`: a test
    waits for the state it asserts, not for a fixed time a loaded host may need more of."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "data.tbemu")
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def emulator(data_file: str) -> Iterator[EmulatorProcess]:
    process = EmulatorProcess(data_file).start()
    yield process
    process.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def accounts(*ids: int) -> list[tb.Account]:
    return [tb.Account(id=i, ledger=1, code=1, flags=tb.AccountFlags.HISTORY) for i in ids]


def transfer(tid: int, debit: int, credit: int, amount: int) -> tb.Transfer:
    return tb.Transfer(id=tid, debit_account_id=debit, credit_account_id=credit, amount=amount,
                       ledger=1, code=1)


def state(
    client: EmulatorClientSync, account_ids: list[int], transfer_ids: list[int]
) -> tuple[list[tb.Account], list[tb.Transfer]]:
    return client.lookup_accounts(account_ids), client.lookup_transfers(transfer_ids)


def count_records(path: str) -> int:
    wal = WriteAheadLog(path)
    try:
        return sum(1 for _ in wal.recover())
    finally:
        wal.close()


# ------------------------------------------------------------------------------------------
# Durability
# ------------------------------------------------------------------------------------------


async def test_ack_means_fsynced(data_file: str) -> None:
    """In-process server: record what each write+fdatasync covered; a create's reply must only
    arrive once a sync covering its log record has returned."""
    server = EmulatorServer(data_file)
    await server.start()
    wal = server._wal
    assert wal is not None
    synced_sizes: list[int] = []
    real_append_sync = wal.append_sync

    def recording_append_sync(chunks: list[bytes]) -> float:
        sync_s = real_append_sync(chunks)  # The real write + fdatasync.
        synced_sizes.append(wal.size)
        return sync_s

    wal.append_sync = recording_append_sync  # type: ignore[method-assign]
    client = EmulatorClientAsync(0, f"127.0.0.1:{server.port}")
    try:
        created = await client.create_accounts(accounts(1, 2))
        assert all(r.status == tb.CreateAccountStatus.CREATED for r in created)
        for i in range(5):
            sizes_before = len(synced_sizes)
            size_on_disk_before = os.path.getsize(data_file)
            results = await client.create_transfers([transfer(100 + i, 1, 2, 10)])
            assert results[0].status == CREATED
            assert len(synced_sizes) > sizes_before, "replied before any fsync"
            assert synced_sizes[-1] == os.path.getsize(data_file) > size_on_disk_before
        # Concurrent creates share fsyncs (group commit) but are all durable when answered.
        syncs_before = len(synced_sizes)
        batch = [client.create_transfers([transfer(200 + i, 1, 2, 1)]) for i in range(50)]
        for results in await asyncio.gather(*batch):
            assert results[0].status == CREATED
        syncs = len(synced_sizes) - syncs_before
        assert 1 <= syncs <= 50
    finally:
        await client.close()
        await server.close()
    assert count_records(data_file) == 1 + 5 + 50


def test_restart_recovers_exact_state(data_file: str) -> None:
    process = EmulatorProcess(data_file).start()
    try:
        with EmulatorClientSync(0, process.address) as client:
            client.create_accounts(accounts(1, 2, 3))
            client.create_transfers([transfer(10, 1, 2, 5), transfer(11, 2, 3, 7)])
            pending = tb.Transfer(id=12, debit_account_id=1, credit_account_id=3, amount=4,
                                  ledger=1, code=1, flags=tb.TransferFlags.PENDING, timeout=3600)
            client.create_transfers([pending])
            failed = client.create_transfers([transfer(13, 1, 99, 1)])  # Burns id 13.
            assert failed[0].status == tb.CreateTransferStatus.CREDIT_ACCOUNT_NOT_FOUND
            before = state(client, [1, 2, 3], [10, 11, 12, 13])
            balances_before = client.get_account_balances(tb.AccountFilter(
                account_id=1, user_data_128=0, user_data_64=0, user_data_32=0, code=0,
                timestamp_min=0, timestamp_max=0, limit=100,
                flags=tb.AccountFilterFlags.DEBITS | tb.AccountFilterFlags.CREDITS))
        process.kill()  # kill -9
        process.start()
        assert "recovered_requests=4" in process.ready_line
        with EmulatorClientSync(0, process.address) as client:
            assert state(client, [1, 2, 3], [10, 11, 12, 13]) == before
            assert client.get_account_balances(tb.AccountFilter(
                account_id=1, user_data_128=0, user_data_64=0, user_data_32=0, code=0,
                timestamp_min=0, timestamp_max=0, limit=100,
                flags=tb.AccountFilterFlags.DEBITS | tb.AccountFilterFlags.CREDITS,
            )) == balances_before
            again = client.create_transfers([transfer(13, 1, 2, 1)])
            assert again[0].status == tb.CreateTransferStatus.ID_ALREADY_FAILED
            # New timestamps continue after the recovered ones.
            new = client.create_transfers([transfer(14, 1, 2, 1)])
            assert new[0].timestamp > max(t.timestamp for t in before[1])
    finally:
        process.kill()


def _write_requests(
    data_file: str, count: int
) -> tuple[list[tb.Account], list[tb.Transfer], int]:
    """`count` logged requests; returns the state and the log size before the last one."""
    process = EmulatorProcess(data_file).start()
    try:
        with EmulatorClientSync(0, process.address) as client:
            client.create_accounts(accounts(1, 2))
            size_before_last = 0
            for i in range(count - 1):
                size_before_last = os.path.getsize(data_file)  # Acked means fsynced.
                assert client.create_transfers([transfer(100 + i, 1, 2, 1)])[0].status == CREATED
            return client.lookup_accounts([1, 2]), client.lookup_transfers(
                [100 + i for i in range(count - 1)]), size_before_last
    finally:
        process.stop()


@pytest.mark.parametrize("damage", ["garbage", "cut_mid_record", "flipped_byte", "huge_length"])
def test_torn_or_corrupt_tail_is_truncated(data_file: str, damage: str) -> None:
    accounts_before, transfers_before, size_before_last = _write_requests(data_file, 4)
    good_size = os.path.getsize(data_file)
    last_record = good_size - size_before_last
    assert last_record > RECORD_HEADER.size
    expected_records = 4
    with open(data_file, "r+b") as f:
        if damage == "garbage":
            f.seek(0, os.SEEK_END)
            f.write(os.urandom(1000))
        elif damage == "cut_mid_record":
            f.truncate(good_size - 10)
            expected_records = 3
        elif damage == "flipped_byte":
            f.seek(good_size - 5)
            byte = f.read(1)
            f.seek(good_size - 5)
            f.write(bytes([byte[0] ^ 0xFF]))
            expected_records = 3
        else:  # A length field pointing far beyond the file.
            f.seek(0, os.SEEK_END)
            f.write(struct.pack("<IIQI", 0xFFFFFF, 0, 0, 0))
    process = EmulatorProcess(data_file).start()
    try:
        assert f"recovered_requests={expected_records}" in process.ready_line
        valid = good_size if expected_records == 4 else good_size - last_record
        assert os.path.getsize(data_file) == valid  # Tail truncated on disk.
        with EmulatorClientSync(0, process.address) as client:
            ids = [t.id for t in transfers_before]
            found = client.lookup_transfers(ids)
            if expected_records == 4:
                assert found == transfers_before
                assert client.lookup_accounts([1, 2]) == accounts_before
            else:
                assert found == transfers_before[:-1]  # The damaged request is gone whole.
            # The log keeps working after truncation.
            assert client.create_transfers([transfer(999, 1, 2, 1)])[0].status == CREATED
        process.kill()
        process.start()
        assert f"recovered_requests={expected_records + 1}" in process.ready_line
    finally:
        process.kill()


def test_refuses_foreign_file(data_file: str) -> None:
    Path(data_file).write_bytes(b"this is not an emulator log, do not touch" * 10)
    process = EmulatorProcess(data_file, startup_timeout_s=20)
    with pytest.raises(RuntimeError, match="not a tb_emulator"):
        process.start()
    assert Path(data_file).read_bytes().startswith(b"this is not")


def test_second_server_on_same_file_is_refused(emulator: EmulatorProcess) -> None:
    other = EmulatorProcess(emulator.data_file, startup_timeout_s=20)
    with pytest.raises(RuntimeError, match="in use"):
        other.start()


# ------------------------------------------------------------------------------------------
# Malformed input on the socket
# ------------------------------------------------------------------------------------------


def _raw(address: tuple[str, int], payload: bytes) -> list[tuple[int, int, int, int, bytes]]:
    """Sends raw bytes, returns every reply frame until the server closes or goes quiet."""
    replies = []
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(payload)
        sock.settimeout(1.0)
        buf = b""
        try:
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            pass
    while len(buf) >= wire.HEADER_SIZE:
        size, rid, op, status, version = wire.HEADER.unpack_from(buf)
        body = buf[wire.HEADER_SIZE:wire.HEADER_SIZE + size]
        replies.append((rid, op, status, version, body))
        buf = buf[wire.HEADER_SIZE + size:]
    return replies


def _frame(rid: int, op: int, body: bytes, version: int = wire.VERSION) -> bytes:
    return wire.HEADER.pack(len(body), rid, op, 0, version) + body


def test_malformed_frames_get_error_replies(emulator: EmulatorProcess) -> None:
    address = ("127.0.0.1", emulator.port)
    with EmulatorClientSync(0, emulator.address) as client:
        client.create_accounts(accounts(1, 2))
        client.create_transfers([transfer(10, 1, 2, 3)])
    S = wire.Status
    # Recoverable errors: the connection stays usable, in order.
    replies = _raw(address, b"".join([
        _frame(1, 99, b"x" * 16),  # unknown operation
        _frame(2, wire.Op.CREATE_TRANSFERS, b"x" * 100),  # size does not match its head
        _frame(3, wire.Op.QUERY_ACCOUNTS, b"\0" * 2 * wire.QUERY_FILTER.size),  # two filters
        _frame(4, wire.Op.LOOKUP_ACCOUNTS, b"\0" * 16 * 8190),  # > 8189 events
        _frame(5, wire.Op.CREATE_TRANSFERS, b"\0" * 128 * 8190),  # > 8189 events, > 1 MiB
        _frame(6, wire.Op.LOOKUP_ACCOUNTS, (1).to_bytes(16, "little")),  # fine
    ]))
    assert [(r[0], r[2]) for r in replies] == [
        (1, S.INVALID_OPERATION), (2, S.INVALID_DATA_SIZE), (3, S.INVALID_DATA_SIZE),
        (4, S.TOO_MUCH_DATA), (5, S.TOO_MUCH_DATA), (6, S.OK)]
    assert wire.unpack_lookup_accounts(replies[5][4], [1])[0].id == 1
    # Unrecoverable framing: error reply, then the server hangs up.
    for payload in (
        _frame(7, wire.Op.LOOKUP_ACCOUNTS, b"", version=99),
        wire.HEADER.pack(0xFFFFFFFF, 8, wire.Op.CREATE_TRANSFERS, 0, wire.VERSION),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        replies = _raw(address, payload)
        assert len(replies) == 1 and replies[0][2] == S.MALFORMED
    # Garbage, truncated frames and abrupt disconnects do not hurt the server or the log.
    for _ in range(20):
        _raw(address, os.urandom(200))
    with socket.create_connection(address) as sock:
        sock.sendall(_frame(9, wire.Op.CREATE_TRANSFERS, b"\0" * 128)[:-50])
    with EmulatorClientSync(0, emulator.address) as client:
        assert client.lookup_transfers([10])[0].amount == 3
        assert client.create_transfers([transfer(11, 1, 2, 4)])[0].status == CREATED
    emulator.kill()
    emulator.start()
    assert "recovered_requests=3" in emulator.ready_line
    with EmulatorClientSync(0, emulator.address) as client:
        assert [t.id for t in client.lookup_transfers([10, 11])] == [10, 11]


def test_batch_limits(emulator: EmulatorProcess) -> None:
    with EmulatorClientSync(0, emulator.address) as client:
        with pytest.raises(tb.TooMuchDataError):
            client.create_transfers([transfer(i + 1, 1, 2, 1) for i in range(8190)])
        with pytest.raises(tb.TooMuchDataError):
            client.lookup_accounts(list(range(1, 8191)))
        with pytest.raises(tb.TooMuchDataError):
            client.query_accounts(tb.QueryFilter(
                user_data_128=0, user_data_64=0, user_data_32=0, ledger=0, code=0,
                timestamp_min=0, timestamp_max=0, limit=8190, flags=tb.QueryFilterFlags.NONE))
        client.create_accounts(accounts(1, 2))
        results = client.create_transfers([transfer(i + 1, 1, 2, 1) for i in range(8189)])
        assert len(results) == 8189 and all(r.status == CREATED for r in results)
        assert [r.timestamp for r in results] == list(
            range(results[0].timestamp, results[0].timestamp + 8189))
        assert len(client.lookup_transfers(list(range(1, 8190)))) == 8189
        assert client.create_transfers([]) == []


def test_client_validates_like_the_real_client(emulator: EmulatorProcess) -> None:
    with EmulatorClientSync(0, emulator.address) as client:
        with pytest.raises(tb.IntegerOverflowError, match=r"id==.* too large to fit in 128"):
            client.create_accounts([tb.Account(id=1 << 128, ledger=1, code=1)])
        with pytest.raises(tb.IntegerOverflowError, match="amount==-1 cannot be negative"):
            client.create_transfers([transfer(1, 1, 2, -1)])
        with pytest.raises(tb.IntegerOverflowError, match="code==65536"):
            client.create_accounts([tb.Account(id=1, ledger=1, code=65536)])
        with pytest.raises(tb.IntegerOverflowError, match="ledger"):
            client.create_transfers([tb.Transfer(id=1, ledger=1 << 32)])
        with pytest.raises(TypeError):
            client.create_transfers([tb.Transfer(id=1, amount=1.5)])  # type: ignore[arg-type]
        with pytest.raises(tb.IntegerOverflowError, match="limit"):
            client.query_transfers(tb.QueryFilter(
                user_data_128=0, user_data_64=0, user_data_32=0, ledger=0, code=0,
                timestamp_min=0, timestamp_max=0, limit=-1, flags=tb.QueryFilterFlags.NONE))
        # Like the real client (ctypes), lookups wrap ids instead of range-checking them.
        assert client.lookup_accounts([(1 << 128) + 5]) == []
        # The valid events in a failed batch were never sent.
        assert client.lookup_accounts([1]) == []
        assert client.create_accounts(accounts(1))[0].status == tb.CreateAccountStatus.CREATED
        # 128-bit values round-trip exactly.
        big = (1 << 128) - 2
        client.create_accounts([tb.Account(id=big, user_data_128=big, user_data_64=(1 << 64) - 1,
                                           user_data_32=(1 << 32) - 1, ledger=(1 << 32) - 1,
                                           code=65535, flags=tb.AccountFlags.HISTORY)])
        (acct,) = client.lookup_accounts([big])
        assert (acct.user_data_128, acct.user_data_64, acct.code) == (big, (1 << 64) - 1, 65535)
        assert isinstance(acct.flags, tb.AccountFlags)


# ------------------------------------------------------------------------------------------
# Client adapter: timeouts, reconnects, factory
# ------------------------------------------------------------------------------------------


async def test_timeout_when_server_down() -> None:
    address = f"127.0.0.1:{free_port()}"  # Nothing listens there.
    client = EmulatorClientAsync(0, address, timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError) as info:
        await client.lookup_accounts([1])
    assert isinstance(info.value, TimeoutError)
    # Well under the default 10 s (the 0.5 s was applied), with room for a loaded host.
    assert 0.4 < time.monotonic() - started < DEFAULT_TIMEOUT_S / 2
    await client.close()
    with (EmulatorClientSync(0, address, timeout_s=0.5) as sync_client,
          pytest.raises(RequestTimeoutError)):
        sync_client.lookup_accounts([1])


async def test_timeout_when_server_hangs(emulator: EmulatorProcess) -> None:
    # The short timeout only while the server hangs: the requests around it must not time out
    # on a loaded host (0.5 s for the first connect, or right after SIGCONT, is a bet).
    client = EmulatorClientAsync(0, emulator.address, timeout_s=10)
    try:
        await client.create_accounts(accounts(1, 2))
        os.kill(emulator.pid, signal.SIGSTOP)
        try:
            client.timeout_s = 0.5
            with pytest.raises(RequestTimeoutError):
                await client.lookup_accounts([1])
        finally:
            os.kill(emulator.pid, signal.SIGCONT)
            client.timeout_s = 10
        assert (await client.lookup_accounts([1]))[0].id == 1
    finally:
        await client.close()


RESTART_REQUEST_TIMEOUT_S = 60.0  # the server's restart on a loaded host fits in it


async def test_reconnects_after_restart(emulator: EmulatorProcess) -> None:
    """Restart on the same port while a request is waiting (asserted: it has found the
    server unreachable at least once): it is resent, not lost, and lands once."""
    client = EmulatorClientAsync(0, emulator.address, timeout_s=RESTART_REQUEST_TIMEOUT_S)
    try:
        await client.create_accounts(accounts(1, 2))
        emulator.kill()
        pending = asyncio.ensure_future(client.create_transfers([transfer(5, 1, 2, 9)]))
        await until(lambda: client.reconnect_attempts > 0 or pending.done(),
                    "the request to find the server down")
        assert not pending.done(), pending  # the server is down: nothing can answer
        await asyncio.to_thread(emulator.start)
        assert (await pending)[0].status == CREATED
        assert client.reconnect_attempts > 0
        assert (await client.lookup_transfers([5]))[0].amount == 9
    finally:
        await client.close()
    with pytest.raises(tb.ClientClosedError):
        await client.lookup_accounts([1])


async def test_concurrent_requests_on_one_connection(emulator: EmulatorProcess) -> None:
    client = EmulatorClientAsync(0, emulator.address)
    try:
        await client.create_accounts(accounts(*range(1, 11)))
        jobs: list[Any] = [
            client.create_transfers([transfer(1000 + i, 1 + i % 10, 1 + (i + 1) % 10, 1)])
            for i in range(200)]
        jobs += [client.lookup_accounts([1 + i % 10]) for i in range(100)]
        results = await asyncio.gather(*jobs)
        assert all(r[0].status == CREATED for r in results[:200])
        assert all(len(r) == 1 for r in results[200:])
        totals = await client.lookup_accounts(list(range(1, 11)))
        assert sum(a.debits_posted for a in totals) == 200 == sum(a.credits_posted for a in totals)
    finally:
        await client.close()


async def test_register_on_a_full_server_retries_until_a_slot_frees(data_file: str) -> None:
    """A server at connections_max answers a new connection's REGISTER with BUSY: the adapter
    reconnects until its timeout, like after any refused connection."""
    server = EmulatorServer(data_file, limits=ServerLimits(connections_max=1))
    await server.start()
    address = f"127.0.0.1:{server.port}"
    first = EmulatorClientAsync(0, address, timeout_s=5)
    second = EmulatorClientAsync(0, address, timeout_s=0.5)
    try:
        assert await first.request_limit_bytes() == 1 << 20
        with pytest.raises(RequestTimeoutError):
            await second.request_limit_bytes()
        assert second.announced_request_limit_bytes is None
        await first.close()
        second.timeout_s = 5
        assert await second.request_limit_bytes() == 1 << 20
    finally:
        await first.close()
        await second.close()
        await server.close()


async def test_connect_tigerbeetle_factory(emulator: EmulatorProcess) -> None:
    client = connect_tigerbeetle(f"tbemu://{emulator.address}", timeout_s=5)
    assert isinstance(client, EmulatorClientAsync)
    try:
        created = await client.create_accounts(accounts(7))
        assert created[0].status == tb.CreateAccountStatus.CREATED
    finally:
        await client.close()
    assert parse_address("tbemu://127.0.0.1:3001") == ("127.0.0.1", 3001)
    assert parse_address("3001") == ("127.0.0.1", 3001)
    # Anything else is the real client, with a timeout around every call.
    real = connect_tigerbeetle(f"tigerbeetle://127.0.0.1:{free_port()}", timeout_s=0.5)
    assert isinstance(real, TimeoutClientAsync)
    try:
        with pytest.raises(RequestTimeoutError):
            await real.lookup_accounts([1])
    finally:
        await real.close()


def test_file_header_layout() -> None:
    assert FILE_HEADER.size == 16 and RECORD_HEADER.size == 20


# ------------------------------------------------------------------------------------------
# Wire format
# ------------------------------------------------------------------------------------------


def test_wire_roundtrip_extremes() -> None:
    import random

    rng = random.Random(7)
    top = (1 << 128) - 1

    def u(bits: int) -> int:
        return rng.choice([0, 1, (1 << bits) - 1, rng.getrandbits(bits)])

    accounts_in = [tb.Account(id=u(128), debits_pending=u(128), debits_posted=u(128),
                              credits_pending=u(128), credits_posted=u(128),
                              user_data_128=u(128), user_data_64=u(64), user_data_32=u(32),
                              ledger=u(32), code=u(16), flags=tb.AccountFlags(rng.getrandbits(6)),
                              timestamp=u(64)) for _ in range(500)]
    transfers_in = [tb.Transfer(id=u(128), debit_account_id=u(128), credit_account_id=top,
                                amount=u(128), pending_id=u(128), user_data_128=u(128),
                                user_data_64=u(64), user_data_32=u(32), timeout=u(32),
                                ledger=u(32), code=u(16),
                                flags=tb.TransferFlags(rng.getrandbits(9)), timestamp=u(64))
                    for _ in range(500)]
    assert wire.unpack_accounts(wire.pack_accounts(accounts_in)) == accounts_in
    assert wire.unpack_transfers(wire.pack_transfers(transfers_in)) == transfers_in
    rows = [[getattr(a, f) for f, _, _ in wire.ACCOUNTS.fields] for a in accounts_in]
    assert wire.unpack_accounts(wire.pack_account_rows(rows)) == accounts_in
    ids = [u(128) for _ in range(100)]
    assert wire.unpack_ids(wire.pack_ids(ids)) == ids
    assert wire.unpack_accounts(wire.pack_accounts([])) == []


def test_sparse_create_results_are_exact() -> None:
    import random

    rng = random.Random(3)
    statuses = list(tb.CreateTransferStatus)
    for _ in range(200):
        base = rng.choice([1, 10**18, 2**63])
        count = rng.randint(0, 300)
        results = []
        for i in range(count):
            if rng.random() < 0.7:
                results.append(tb.CreateTransferResult(base + i, CREATED))
            else:  # failures, EXISTS with old timestamps, imported literals, odd CREATED
                results.append(tb.CreateTransferResult(rng.getrandbits(63), rng.choice(statuses)))
        decoded = wire.unpack_create_transfer_results(wire.pack_create_results(results))
        assert decoded == results
        assert all(type(r.status) is tb.CreateTransferStatus for r in decoded)


def test_lookup_reply_keeps_the_request_ids_only_when_all_found(
    emulator: EmulatorProcess,
) -> None:
    """A lookup that finds every id (ALL_FOUND) gets its id column from the request; results
    must still be exactly the real client's: canonical plain-int ids, order, duplicates,
    misses."""
    with EmulatorClientSync(0, emulator.address) as client:
        client.create_accounts(accounts(1, 2, 3))
        expected = {a.id: a for a in client.lookup_accounts([1, 2, 3])}
        assert [a.id for a in expected.values()] == [1, 2, 3]
        for ids, want in (
            ([3, 1, 3], [3, 1, 3]),  # all found, duplicates: echoed
            ([True, 2 + (1 << 128)], [1, 2]),  # bool and wrapped ids: echoed as plain ints
            ([3, 99, 1], [3, 1]),  # a miss: ids sent back
            ([-1, 2], [2]),  # -1 wraps to u128 max: not found
            ([], []),
        ):
            found = client.lookup_accounts(ids)
            assert found == [expected[i] for i in want]
            assert all(type(a.id) is int for a in found)


async def test_big_lookups_arrive_in_chunks_that_read_one_state(emulator: EmulatorProcess) -> None:
    """A lookup of more than wire.LOOKUP_CHUNK_IDS ids is answered in PARTIAL frames. The
    result must equal the same lookup done in one-frame pieces (order, duplicates, misses,
    128-bit ids), and every chunk must read the same state: transfers stream between accounts
    of the first and the last chunk meanwhile, and each lookup must still balance."""
    base = tb.id()
    first = [base + i for i in range(wire.LOOKUP_CHUNK_IDS)]
    last = [base + 10_000 + i for i in range(wire.BATCH_EVENTS_MAX - 3 * wire.LOOKUP_CHUNK_IDS)]
    middle = [base + 20_000 + i for i in range(2 * wire.LOOKUP_CHUNK_IDS)]
    ids = first + middle + last
    assert len(ids) == wire.BATCH_EVENTS_MAX and len(wire.lookup_chunks(len(ids))) == 4
    client = EmulatorClientAsync(0, emulator.address, timeout_s=30)
    writer = EmulatorClientAsync(0, emulator.address, timeout_s=30)
    try:
        for start in range(0, len(ids), wire.BATCH_EVENTS_MAX // 2):
            batch = ids[start:start + wire.BATCH_EVENTS_MAX // 2]
            assert not [r for r in await client.create_accounts(accounts(*batch))
                        if r.status != tb.CreateAccountStatus.CREATED]

        # Misses in one chunk only (its ids come from its rows, the others' from the request),
        # a duplicate across chunks. The pieces stay under one chunk: a single OK frame each.
        mixed = [*ids[:5000], base - 1, base - 2, *ids[5000:8000], ids[0], *ids[8000:8186]]
        assert len(mixed) == wire.BATCH_EVENTS_MAX
        pieces = [mixed[i:i + 1000] for i in range(0, len(mixed), 1000)]
        for lookup in (client.lookup_accounts, writer.lookup_accounts):
            whole = await lookup(mixed)
            assert whole == [a for piece in pieces for a in await lookup(piece)]
            assert [a.id for a in whole] == [i for i in mixed if i >= base]

        stop = asyncio.Event()

        async def stream_transfers() -> int:
            tid = base + 100_000
            while not stop.is_set():
                batch = [transfer(tid + k, first[k % len(first)], last[k % len(last)], k + 1)
                         for k in range(500)]
                tid += len(batch)
                assert not [r for r in await writer.create_transfers(batch)
                            if r.status != CREATED]
            return tid

        streaming = asyncio.create_task(stream_transfers())
        balanced = 0
        for _ in range(15):
            found = await client.lookup_accounts(ids)
            assert [a.id for a in found] == ids
            assert sum(a.debits_posted for a in found) == sum(a.credits_posted for a in found)
            balanced += sum(a.debits_posted for a in found) > 0
        stop.set()
        await streaming
        assert balanced > 0  # Writes did land between (and during) the lookups.
        transfer_ids = list(range(base + 100_000, base + 100_000 + wire.BATCH_EVENTS_MAX))
        with EmulatorClientSync(0, emulator.address) as sync:
            transfers = sync.lookup_transfers(transfer_ids)
            assert transfers == [t for i in range(0, len(transfer_ids), 1000)
                                 for t in sync.lookup_transfers(transfer_ids[i:i + 1000])]
            assert sync.lookup_accounts(mixed) == [
                a for piece in pieces for a in sync.lookup_accounts(piece)]  # No writes now.
    finally:
        await client.close()
        await writer.close()


def test_client_errors_come_in_the_real_clients_order(emulator: EmulatorProcess) -> None:
    """The real client converts the arguments first, then refuses a closed client, then an
    oversized batch (tigerbeetle/client.py: _acquire_packet, then the submit status)."""
    too_many = accounts(*range(1, wire.BATCH_EVENTS_MAX + 2))
    bad = [*too_many[:-1], tb.Account(id=-1, ledger=1, code=1)]
    client = EmulatorClientSync(0, emulator.address)
    with pytest.raises(tb.IntegerOverflowError):
        client.create_accounts(bad)
    with pytest.raises(tb.TooMuchDataError):
        client.create_accounts(too_many)
    with pytest.raises(TypeError):
        client.lookup_accounts([1.5] * (wire.BATCH_EVENTS_MAX + 1))  # type: ignore[list-item]
    client.close()
    with pytest.raises(tb.IntegerOverflowError):
        client.create_accounts(bad)
    with pytest.raises(tb.ClientClosedError):
        client.create_accounts(too_many)
    with pytest.raises(tb.ClientClosedError):
        client.get_account_transfers(tb.AccountFilter(
            account_id=1, user_data_128=0, user_data_64=0, user_data_32=0, code=0,
            timestamp_min=0, timestamp_max=0, limit=wire.BATCH_EVENTS_MAX + 1,
            flags=tb.AccountFilterFlags.DEBITS))


def test_lookup_rows_wire_roundtrip() -> None:
    engine = make_engine()
    created = tb.CreateAccountStatus.CREATED
    big = (1 << 128) - 2
    assert all(r.status == created for r in engine.create_accounts([
        *accounts(5, 6, 1 << 100),
        tb.Account(id=big, user_data_128=big, user_data_64=(1 << 64) - 1,
                   user_data_32=(1 << 32) - 1, ledger=(1 << 32) - 1, code=65535,
                   flags=tb.AccountFlags.HISTORY | tb.AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS),
    ]))
    assert engine.create_transfers([transfer(1, 5, 1 << 100, (1 << 64) + 3)])[0].status == CREATED
    for ids in ([1 << 100, 5, 6, 5, big], [5, 7, big], [9], []):
        expected = engine.lookup_accounts(ids)
        rows, count = engine.lookup_accounts_rows(ids)
        all_found = count == len(ids)
        body = wire.pack_lookup_rows(rows, count, all_found)
        assert wire.unpack_lookup_accounts(body, ids) == expected
        assert wire.pack_lookup_accounts(expected, all_found) == body  # engines without rows
        assert all(isinstance(a.flags, tb.AccountFlags) and type(a.id) is int for a in expected)
    body = wire.pack_lookup_rows(*engine.lookup_accounts_rows([5, 6]), all_found=True)
    for bad, request in ((body, [5]), (body[:-1], [5, 6]), (body[:4] + b"\2" + body[5:], [5, 6])):
        with pytest.raises(wire.WireError):
            wire.unpack_lookup_accounts(bad, request)


def test_raw_creates_match_object_creates() -> None:
    """create_*_raw on wire-decoded rows == create_* on objects, result for result."""
    import random

    rng = random.Random(11)
    a_objects, b_raw = make_engine(), make_engine()
    for engine in (a_objects, b_raw):  # Same clock readings: same timestamps.
        engine.clock_ns = iter(range(10**9, 10**12, 10**6)).__next__
    account_batch = [*accounts(1, 2, 3, 2), tb.Account(id=4, ledger=0, code=1)]
    want = a_objects.create_accounts(account_batch)
    ts, statuses = b_raw.create_accounts_raw(
        wire.ACCOUNTS.unpack_rows(wire.pack_accounts(account_batch)))
    assert [(r.timestamp, r.status) for r in want] == list(zip(ts, statuses, strict=True))
    for _ in range(5):
        batch = [transfer(rng.randrange(1, 60), rng.randrange(0, 5), rng.randrange(1, 5),
                          rng.randrange(0, 3)) for _ in range(40)]
        want_t = a_objects.create_transfers(batch)
        t_ts, t_statuses = b_raw.create_transfers_raw(
            wire.TRANSFERS.unpack_rows(wire.pack_transfers(batch)))
        assert [(r.timestamp, r.status) for r in want_t] == list(
            zip(t_ts, t_statuses, strict=True))
        body = wire.pack_create_result_lists(t_ts, t_statuses)
        assert wire.unpack_create_transfer_results(body) == want_t
    assert b_raw.lookup_accounts([1, 2, 3]) == a_objects.lookup_accounts([1, 2, 3])


# ------------------------------------------------------------------------------------------
# Liveness: no request may wait forever (found by `python -m tb_emulator.soak`)
# ------------------------------------------------------------------------------------------


def _v1_body(codec: wire.ColumnCodec, objects: list[Any]) -> bytes:
    """A v1 log body: every column block present, no (count, mask) head."""
    blocks = []
    for name, kind, _ in codec.fields:
        values = [int(getattr(o, name)) for o in objects]
        if kind == wire.U128:
            blocks.append(array("Q", [v & wire.U64_MASK for v in values]).tobytes())
            blocks.append(array("Q", [v >> 64 for v in values]).tobytes())
        else:
            blocks.append(array(kind, values).tobytes())
    return b"".join(blocks)


async def test_v1_data_file_is_upgraded_and_recovered(data_file: str) -> None:
    """The report's data file (written before the v2 wire format) must still recover."""
    big = (1 << 100) + 5  # Exercises the u128 high block.
    records = [
        (wire.Op.CREATE_ACCOUNTS, _v1_body(wire.ACCOUNTS, accounts(1, big))),
        (wire.Op.CREATE_TRANSFERS, _v1_body(wire.TRANSFERS, [
            transfer(10, 1, big, 7), transfer(11, big, 1, 2)])),
    ]
    with open(data_file, "wb") as f:
        f.write(FILE_HEADER.pack(FILE_MAGIC, 1, 0))
        for i, (op, body) in enumerate(records):
            f.write(encode_record(1_000_000 + i, op, body))
        f.write(b"torn")
    for attempt in range(2):  # Upgraded once, then an ordinary v2 file.
        server = EmulatorServer(data_file)
        await server.start()
        client = EmulatorClientAsync(0, f"127.0.0.1:{server.port}", timeout_s=5)
        try:
            assert server.recovered_requests == 2 + attempt
            found = await client.lookup_accounts([1, big])
            assert [(a.debits_posted, a.credits_posted) for a in found] == [
                (7 + attempt, 2), (2, 7 + attempt)]
            assert [t.amount for t in await client.lookup_transfers([10, 11])] == [7, 2]
            if attempt == 0:
                assert (await client.create_transfers([transfer(12, 1, big, 1)]))[0].status \
                    == CREATED
        finally:
            await client.close()
            await server.close()
        with open(data_file, "rb") as f:
            assert FILE_HEADER.unpack(f.read(FILE_HEADER.size))[1] == FILE_VERSION
    assert not os.path.exists(data_file + ".upgrade")


async def test_failing_reply_callback_does_not_stop_group_commit(data_file: str) -> None:
    """A callback raising inside the flusher used to end its task: every later request then
    waited forever on an idle, listening server (the reported symptom)."""
    server = EmulatorServer(data_file)
    await server.start()
    commit = server._commit
    assert commit is not None
    client = EmulatorClientAsync(0, f"127.0.0.1:{server.port}", timeout_s=5)
    try:
        def boom() -> None:
            raise RuntimeError("boom")

        # Registered first: its reply, like every reply, waits behind earlier waiters, and
        # this artificial one waits for a log write that only the client's create brings.
        await client.request_limit_bytes()
        commit.when_durable(commit.written + 1, boom)  # Due with the next sync.
        assert (await client.create_accounts(accounts(1, 2)))[0].status \
            == tb.CreateAccountStatus.CREATED
        assert (await client.create_transfers([transfer(5, 1, 2, 3)]))[0].status == CREATED
        assert server.fatal is None
    finally:
        await client.close()
        await server.close()


async def test_dead_flusher_stops_the_server_instead_of_hanging(data_file: str) -> None:
    server = EmulatorServer(data_file)
    await server.start()
    commit = server._commit
    assert commit is not None

    class BrokenWaiters(collections.deque[Any]):
        def popleft(self) -> Any:
            raise RuntimeError("flusher bug")

    commit._waiters = BrokenWaiters()
    client = EmulatorClientAsync(0, f"127.0.0.1:{server.port}", timeout_s=2)
    try:
        with pytest.raises((RequestTimeoutError, ConnectionError)):
            await client.create_accounts(accounts(1))
        await asyncio.wait_for(server.serve_forever(), 5)  # Stopped, not hung.
        assert isinstance(server.fatal, RuntimeError)
    finally:
        await client.close()
        await server.close()


async def _pipeline(
    port: int, requests: list[bytes], read: bool = True
) -> list[tuple[int, int]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(requests))
        await writer.drain()
        replies = []
        for _ in requests if read else ():
            size, rid, _, status, _ = wire.HEADER.unpack(
                await reader.readexactly(wire.HEADER_SIZE))
            await reader.readexactly(size)
            replies.append((rid, status))
        return replies
    finally:
        writer.transport.abort()


async def test_inflight_limits_with_group_commit_never_deadlock(data_file: str) -> None:
    """Far more pipelined requests than the per-connection and server-wide limits, from many
    connections, some hanging up mid-stream: every survivor gets every reply, and dead
    connections give their slots back (a leak would block the server for good)."""
    limits = ServerLimits(connections_max=64, inflight_per_connection_max=2, inflight_max=4)
    server = EmulatorServer(data_file, limits=limits)
    await server.start()
    try:
        async with EmulatorClientAsync(0, f"127.0.0.1:{server.port}", timeout_s=10) as client:
            await client.create_accounts(accounts(*range(1, 11)))

        def requests(conn: int, count: int) -> list[bytes]:
            return [
                _frame(rid, wire.Op.CREATE_TRANSFERS, wire.pack_transfers(
                    [transfer(conn << 32 | rid, 1 + rid % 10, 1 + (rid + 1) % 10, 1)]))
                if rid % 2 else _frame(rid, wire.Op.LOOKUP_ACCOUNTS, wire.pack_ids([1, 2]))
                for rid in range(1, count + 1)]

        jobs = [_pipeline(server.port, requests(c, 30)) for c in range(16)]
        jobs += [_pipeline(server.port, requests(100 + c, 30), read=False) for c in range(8)]
        results = await asyncio.wait_for(asyncio.gather(*jobs), 20)
        for replies in results[:16]:
            assert sorted(replies) == [(rid, wire.Status.OK) for rid in range(1, 31)]
        async with EmulatorClientAsync(0, f"127.0.0.1:{server.port}", timeout_s=10) as client:
            # Dropped connections' handlers finish and free their slots (and connections).
            await until(lambda: server._inflight == 0 and not server._connections,
                        "the dropped connections' slots to be freed")
            assert len(await client.lookup_accounts([1])) == 1
    finally:
        await server.close()


async def test_peer_that_stops_reading_stalls_only_itself(
    data_file: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(server_module, "DRAIN_ABOVE_BYTES", 1 << 16)
    health = HealthSettings(stall_warning_s=0.3, check_interval_s=0.1)
    server = EmulatorServer(data_file, health=health)
    await server.start()
    ids = list(range(1, 2001))
    client = EmulatorClientAsync(0, f"127.0.0.1:{server.port}", timeout_s=10)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await client.create_accounts(accounts(*ids))
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        count = 200  # ~200 x 32 KiB of replies it does not read.
        writer.write(b"".join(_frame(rid, wire.Op.LOOKUP_ACCOUNTS, wire.pack_ids(ids))
                              for rid in range(1, count + 1)))
        await until(lambda: any(c.draining_since for c in server._connections.values()),
                    "the peer's connection to drain")
        started = time.monotonic()
        assert len(await client.lookup_accounts([1, 2])) == 2  # Others are served meanwhile.
        assert await client.create_transfers([transfer(7, 1, 2, 5)])
        # Stalled behind the peer they would time out (10 s); served, they take milliseconds
        # (the bound leaves a loaded host room).
        assert time.monotonic() - started < 5
        await until(lambda: "has not read its replies" in caplog.text, "the stall warning")
        for rid in range(1, count + 1):  # Then it reads: every reply, in order.
            size, reply_id, _, status, _ = wire.HEADER.unpack(
                await asyncio.wait_for(reader.readexactly(wire.HEADER_SIZE), 10))
            await reader.readexactly(size)
            assert (reply_id, status) == (rid, wire.Status.OK)
        writer.transport.abort()
    finally:
        sock.close()
        await client.close()
        await server.close()


async def test_health_summary_and_stall_warnings(
    data_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator sees a slow fsync as a STALL warning (and when it is over), a busy
    server as one summary line per interval, and a blocked event loop with its stacks."""
    caplog.set_level(logging.INFO, logger="tb_emulator")
    health = HealthSettings(summary_interval_s=0.5, stall_warning_s=0.3, check_interval_s=0.05,
                            loop_watchdog=True)
    server = EmulatorServer(data_file, health=health)
    await server.start()
    wal = server._wal
    assert wal is not None
    real_append_sync = wal.append_sync

    def slow_append_sync(chunks: list[bytes]) -> float:
        time.sleep(0.8)  # A disk that stalls.
        return 0.8 + real_append_sync(chunks)

    client = EmulatorClientAsync(0, f"127.0.0.1:{server.port}", timeout_s=10)
    try:
        await client.create_accounts(accounts(1, 2))
        wal.append_sync = slow_append_sync  # type: ignore[method-assign]
        await client.create_transfers([transfer(3, 1, 2, 1)])
        wal.append_sync = real_append_sync  # type: ignore[method-assign]
        await until(lambda: all(line in caplog.text for line in (
            "STALL: a request has waited", "fsync running for", "stall over after")),
            "the stall's warnings")
        assert server.stall_warnings >= 1

        def summaries() -> list[str]:
            return [r.message for r in caplog.records if r.message.startswith("health:")]

        def fsync_max_ms() -> int:
            return max((int(m[1]) for m in re.finditer(
                r"fsyncs=\d+ p99=[\d.]+ ms max=(\d+)", "\n".join(summaries()))), default=0)

        await until(lambda: fsync_max_ms() >= 800, "a summary with the slow fsync")
        seen = len(summaries())
        time.sleep(0.6)  # Blocks the event loop the server runs on.
        await until(lambda: "event loop blocked for" in caplog.text, "the watchdog's warning")
        # Idle: no more summary lines, over two summary intervals the monitor has closed (each
        # restarts its window): a fixed wait could pass with none closed on a loaded host.
        windows = {server._window_started}

        def two_more_windows() -> bool:
            windows.add(server._window_started)
            return len(windows) >= 3

        await until(two_more_windows, "two idle summary intervals")
        assert len(summaries()) <= seen + 1
    finally:
        await client.close()
        await server.close()


async def test_reset_connections_waiting_for_a_slot_are_reaped(
    data_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saturated server (slow disk, every inflight slot taken): peers that hang up while
    their requests wait for a slot must not keep holding connection slots, or new clients
    get BUSY until the backlog drains (seen in the soak)."""
    monkeypatch.setattr(server_module, "SLOT_WAIT_POLL_S", 0.05)
    limits = ServerLimits(connections_max=4, inflight_per_connection_max=1, inflight_max=1)
    server = EmulatorServer(data_file, limits=limits)
    await server.start()
    wal = server._wal
    assert wal is not None
    real_append_sync = wal.append_sync
    disk_back = threading.Event()

    def slow_append_sync(chunks: list[bytes]) -> float:
        # A disk that stalls until the test has checked the reaping: the holder keeps the
        # slot meanwhile by construction (a fixed stall could end first on a loaded host).
        assert disk_back.wait(STATE_WAIT_S), "the test never released the disk"
        return real_append_sync(chunks)

    wal.append_sync = slow_append_sync  # type: ignore[method-assign]
    create = _frame(1, wire.Op.CREATE_ACCOUNTS, wire.pack_accounts(accounts(1)))
    lookup = _frame(2, wire.Op.LOOKUP_ACCOUNTS, wire.pack_ids([1]))
    try:
        holder = asyncio.ensure_future(_pipeline(server.port, [create]))  # Takes the slot.
        await until(lambda: server._inflight == 1, "the holder's request to take the slot")
        seen_waiting: set[object] = set()  # the server's side of each peer seen waiting

        def peers_waiting(count: int) -> bool:
            seen_waiting.update(w for w, c in server._connections.items()
                                if c.blocked_since is not None)
            return len(seen_waiting) >= count

        for n in range(3):  # Wait for a slot (seen by the server), then hang up.
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(lookup)
            await until(lambda n=n: peers_waiting(n + 1), f"peer {n} to wait for a slot")
            writer.transport.abort()
        # The hung-up peers are reaped while the holder still has the slot (the disk stalls).
        await until(lambda: len(server._connections) == 1, "the hung-up peers to be reaped")
        waiting = asyncio.ensure_future(_pipeline(server.port, [lookup]))
        await until(lambda: len(server._connections) == 2 or waiting.done(),
                    "the new client's connection (or its answer)")
        disk_back.set()
        replies = await asyncio.wait_for(waiting, 10)
        assert replies == [(2, wire.Status.OK)]  # Not (0, BUSY).
        assert await holder == [(1, wire.Status.OK)]
    finally:
        disk_back.set()
        wal.append_sync = real_append_sync  # type: ignore[method-assign]
        await server.close()


async def test_idle_server_packs_the_rows_writes_left_stale(data_file: str) -> None:
    server = EmulatorServer(data_file)
    await server.start()
    client = EmulatorClientAsync(0, f"127.0.0.1:{server.port}", timeout_s=10)
    try:
        ids = list(range(1, 601))
        await client.create_accounts(accounts(*ids))
        await client.create_transfers([transfer(1000 + i, i, 601 - i, i) for i in ids[:300]])
        engine: Any = server._engine
        assert engine._stale_rows  # Writes only mark them.
        await until(lambda: not engine._stale_rows, "the idle server to pack the stale rows")
        assert engine.rows_are_current()
        assert [a.id for a in await client.lookup_accounts(ids)] == ids
    finally:
        await client.close()
        await server.close()
