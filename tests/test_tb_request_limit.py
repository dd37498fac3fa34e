"""The emulator's request limit (`--limit-request`, `--development`), as a real TigerBeetle
0.17.9 server and client apply it (issue 13's measurements): the server announces the limit at
register and the adapter refuses, before sending, a batch one past the real client's maximum.

    limit    creates  lookups   query/get_account_* limit
    1 MiB     8189     8189      8189
    32 KiB     253     2031      8189
    4 KiB       29      239      8189

One emulator process per limit (module scope, started and killed by PID like
tests/test_tb_server.py); every test uses ids and ledgers of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tigerbeetle as tb
from wallet_support import REQUEST_LIMITS, RequestLimit, limited_emulator

from stores.tigerbeetle_client import TimeoutClientAsync, connect_tigerbeetle
from tb_emulator import request_limit, wire
from tb_emulator.client import EmulatorClientAsync, EmulatorClientSync
from tb_emulator.server import EmulatorProcess
from walletcore import tb_limits

ROWS = 300  # Rows a query returns: 37.5 KiB of 128-byte rows, more than 32 KiB.
_ids = itertools.count(1)


Limit = RequestLimit
LIMITS = REQUEST_LIMITS


@pytest.fixture(scope="module", params=LIMITS, ids=[limit.name for limit in LIMITS])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[EmulatorProcess, Limit]]:
    limit: Limit = request.param
    with limited_emulator(limit) as process:
        yield process, limit


def fresh_ids(count: int) -> list[int]:
    """Ids no other test uses (the server is shared by the module)."""
    start = next(_ids)
    for _ in range(count - 1):
        next(_ids)
    return list(range(start, start + count))


def accounts(ids: list[int], ledger: int = 1) -> list[tb.Account]:
    return [tb.Account(id=i, ledger=ledger, code=1, flags=tb.AccountFlags.HISTORY) for i in ids]


def transfers(ids: list[int], debit: int, credit: int, ledger: int = 1) -> list[tb.Transfer]:
    return [tb.Transfer(id=i, debit_account_id=debit, credit_account_id=credit, amount=1,
                        ledger=ledger, code=1) for i in ids]


def create_in_batches(client: EmulatorClientSync, events: list[Any], batch: int) -> None:
    create = client.create_accounts if isinstance(events[0], tb.Account) else (
        client.create_transfers)
    for start in range(0, len(events), batch):
        results = create(events[start:start + batch])
        assert {r.status.name for r in results} == {"CREATED"}


# ------------------------------------------------------------------------------------------
# Creates and lookups: max passes, max + 1 is refused by the adapter before sending
# ------------------------------------------------------------------------------------------


def test_create_accounts_at_max_and_max_plus_one(server: tuple[EmulatorProcess, Limit]) -> None:
    process, limit = server
    ids = fresh_ids(2 * limit.creates_max + 1)
    fit, too_many = ids[:limit.creates_max], ids[limit.creates_max:]
    assert len(too_many) == limit.creates_max + 1
    with EmulatorClientSync(0, process.address) as client:
        with pytest.raises(tb.TooMuchDataError):
            client.create_accounts(accounts(too_many))
        results = client.create_accounts(accounts(fit))
        assert len(results) == limit.creates_max
        assert {r.status for r in results} == {tb.CreateAccountStatus.CREATED}
        assert client.lookup_accounts([too_many[0], too_many[-1]]) == []  # Never sent.


def test_create_transfers_at_max_and_max_plus_one(server: tuple[EmulatorProcess, Limit]) -> None:
    process, limit = server
    debit, credit = fresh_ids(2)
    ids = fresh_ids(2 * limit.creates_max + 1)
    fit, too_many = ids[:limit.creates_max], ids[limit.creates_max:]
    with EmulatorClientSync(0, process.address) as client:
        client.create_accounts(accounts([debit, credit]))
        with pytest.raises(tb.TooMuchDataError):
            client.create_transfers(transfers(too_many, debit, credit))
        results = client.create_transfers(transfers(fit, debit, credit))
        assert len(results) == limit.creates_max
        assert {r.status for r in results} == {tb.CreateTransferStatus.CREATED}
        assert client.lookup_transfers([too_many[0], too_many[-1]]) == []  # Never sent.
        (account,) = client.lookup_accounts([debit])
        assert account.debits_posted == limit.creates_max


def test_lookup_accounts_at_max_and_max_plus_one(server: tuple[EmulatorProcess, Limit]) -> None:
    process, limit = server
    ids = fresh_ids(limit.lookups_max + 1)
    with EmulatorClientSync(0, process.address) as client:
        create_in_batches(client, accounts(ids[:3]), limit.creates_max)
        with pytest.raises(tb.TooMuchDataError):
            client.lookup_accounts(ids)
        found = client.lookup_accounts(ids[:limit.lookups_max])
        assert [a.id for a in found] == ids[:3]


def test_lookup_transfers_at_max_and_max_plus_one(server: tuple[EmulatorProcess, Limit]) -> None:
    process, limit = server
    debit, credit = fresh_ids(2)
    ids = fresh_ids(limit.lookups_max + 1)
    with EmulatorClientSync(0, process.address) as client:
        client.create_accounts(accounts([debit, credit]))
        client.create_transfers(transfers(ids[:3], debit, credit))
        with pytest.raises(tb.TooMuchDataError):
            client.lookup_transfers(ids)
        found = client.lookup_transfers(ids[:limit.lookups_max])
        assert [t.id for t in found] == ids[:3]


async def test_async_adapter_refuses_without_the_server(
    server: tuple[EmulatorProcess, Limit],
) -> None:
    """Once registered, max + 1 of every operation is refused with the server stopped
    (SIGSTOP): the adapter decides alone, like the real client; max still goes to the server."""
    process, limit = server
    ids = fresh_ids(limit.lookups_max + 1)
    client = EmulatorClientAsync(0, process.address, timeout_s=5)
    try:
        assert client.announced_request_limit_bytes is None
        assert await client.request_limit_bytes() == limit.limit_bytes
        os.kill(process.pid, signal.SIGSTOP)
        try:
            calls: list[Callable[[], Awaitable[Any]]] = [
                lambda: client.create_accounts(accounts(ids[:limit.creates_max + 1])),
                lambda: client.create_transfers(transfers(ids[:limit.creates_max + 1], 1, 2)),
                lambda: client.lookup_accounts(ids[:limit.lookups_max + 1]),
                lambda: client.lookup_transfers(ids[:limit.lookups_max + 1]),
            ]
            for call in calls:
                with pytest.raises(tb.TooMuchDataError):
                    await asyncio.wait_for(call(), 1)  # No reply needed: none could come.
        finally:
            os.kill(process.pid, signal.SIGCONT)
        assert await client.lookup_accounts(ids[:limit.lookups_max]) == []
        assert await client.lookup_transfers(ids[:limit.lookups_max]) == []
        results = await client.create_accounts(accounts(ids[:limit.creates_max]))
        assert {r.status for r in results} == {tb.CreateAccountStatus.CREATED}
    finally:
        await client.close()


async def test_a_client_whose_first_request_is_refused_still_closes(
    server: tuple[EmulatorProcess, Limit],
) -> None:
    """The first request on a fresh connection too big: refused, and close() returns (its
    reader task never ran, so close() itself must close the socket)."""
    process, limit = server
    client = EmulatorClientAsync(0, process.address, timeout_s=5)
    with pytest.raises(tb.TooMuchDataError):
        await client.lookup_accounts(fresh_ids(max(limit.lookups_max, 8189) + 1))
    await asyncio.wait_for(client.close(), 5)


def test_sync_adapter_exposes_the_announced_limit(server: tuple[EmulatorProcess, Limit]) -> None:
    process, limit = server
    with EmulatorClientSync(0, process.address) as client:
        assert client.announced_request_limit_bytes is None
        assert client.request_limit_bytes() == limit.limit_bytes
        assert client.announced_request_limit_bytes == limit.limit_bytes


# ------------------------------------------------------------------------------------------
# Queries: limit 8189 at any request limit (replies are not bound by it), 8190 refused
# ------------------------------------------------------------------------------------------


def _query(ledger: int, limit: int) -> tb.QueryFilter:
    return tb.QueryFilter(user_data_128=0, user_data_64=0, user_data_32=0, ledger=ledger, code=0,
                          timestamp_min=0, timestamp_max=0, limit=limit,
                          flags=tb.QueryFilterFlags.NONE)


def _account_filter(account_id: int, limit: int) -> tb.AccountFilter:
    return tb.AccountFilter(account_id=account_id, user_data_128=0, user_data_64=0,
                            user_data_32=0, code=0, timestamp_min=0, timestamp_max=0, limit=limit,
                            flags=tb.AccountFilterFlags.DEBITS | tb.AccountFilterFlags.CREDITS)


@pytest.fixture(scope="module")
def history(server: tuple[EmulatorProcess, Limit]) -> tuple[int, int]:
    """(ledger, debit account) with ROWS accounts and ROWS transfers on a ledger of its own:
    each query below answers more bytes than a 32 KiB (or 4 KiB) request may carry."""
    process, limit = server
    ledger = 1000 + LIMITS.index(limit)
    ids = fresh_ids(ROWS)
    with EmulatorClientSync(0, process.address) as client:
        create_in_batches(client, accounts(ids, ledger), limit.creates_max)
        create_in_batches(client, transfers(fresh_ids(ROWS), ids[0], ids[1], ledger),
                          limit.creates_max)
    return ledger, ids[0]


@pytest.mark.parametrize("operation", ["query_accounts", "query_transfers"])
def test_query_limit_8189_at_any_request_limit(
    server: tuple[EmulatorProcess, Limit], history: tuple[int, int], operation: str
) -> None:
    process, _ = server
    ledger, _ = history
    with EmulatorClientSync(0, process.address) as client:
        query = getattr(client, operation)
        assert len(query(_query(ledger, tb_limits.TB_EVENTS_MAX))) == ROWS
        with pytest.raises(tb.TooMuchDataError):
            query(_query(ledger, tb_limits.TB_EVENTS_MAX + 1))


@pytest.mark.parametrize("operation", ["get_account_transfers", "get_account_balances"])
def test_get_account_limit_8189_at_any_request_limit(
    server: tuple[EmulatorProcess, Limit], history: tuple[int, int], operation: str
) -> None:
    process, _ = server
    _, account_id = history
    with EmulatorClientSync(0, process.address) as client:
        get = getattr(client, operation)
        assert len(get(_account_filter(account_id, tb_limits.TB_EVENTS_MAX))) == ROWS
        with pytest.raises(tb.TooMuchDataError):
            get(_account_filter(account_id, tb_limits.TB_EVENTS_MAX + 1))


# ------------------------------------------------------------------------------------------
# The server refuses what a client should not have sent
# ------------------------------------------------------------------------------------------


def _exchange(port: int, frames: list[bytes]) -> list[tuple[int, int, bytes]]:
    """Sends the frames on one raw connection; (request id, status, body) of each reply (a big
    lookup's PARTIAL frames left out)."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"".join(frames))
        reader = sock.makefile("rb")
        while len(replies) < len(frames):
            size, request_id, _, status, _ = wire.HEADER.unpack(reader.read(wire.HEADER_SIZE))
            body = reader.read(size)
            if status != wire.Status.PARTIAL:
                replies.append((request_id, status, body))
    return replies


def test_server_refuses_oversized_requests(server: tuple[EmulatorProcess, Limit]) -> None:
    process, limit = server
    ids = fresh_ids(limit.lookups_max + 1)
    too_many = fresh_ids(limit.creates_max + 1)

    def frame(request_id: int, op: int, body: bytes) -> bytes:
        return wire.frame(request_id, op, 0, body)

    replies = _exchange(process.port, [
        frame(1, wire.Op.REGISTER, b""),
        frame(2, wire.Op.CREATE_ACCOUNTS, wire.pack_accounts(accounts(too_many))),
        frame(3, wire.Op.LOOKUP_TRANSFERS, wire.pack_ids(ids)),
        frame(4, wire.Op.CREATE_ACCOUNTS, wire.pack_accounts(accounts(too_many[:-1]))),
        frame(5, wire.Op.LOOKUP_TRANSFERS, wire.pack_ids(ids[:limit.lookups_max])),
    ])
    status = wire.Status
    assert [(r[0], r[1]) for r in replies] == [
        (1, status.OK), (2, status.TOO_MUCH_DATA), (3, status.TOO_MUCH_DATA), (4, status.OK),
        (5, status.OK)]
    assert wire.REGISTER_REPLY.unpack(replies[0][2]) == (limit.limit_bytes,)
    assert b"request limit" in replies[1][2]


# ------------------------------------------------------------------------------------------
# Command line, the platform's copy of the rule, the client factory
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["2MiB", "4095", "1048577", "32KB", "1.5MiB", "0", "-4KiB"])
def test_out_of_range_or_malformed_sizes_are_one_line_errors(tmp_path: Path, size: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tb_emulator", "--data-file", str(tmp_path / "x.tbemu"),
         "--port", "0", f"--limit-request={size}"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--limit-request" in result.stderr and size in result.stderr
    assert not (tmp_path / "x.tbemu").exists()


def test_sizes_parse_like_the_real_server() -> None:
    parse = request_limit.parse_request_limit
    assert parse("32KiB") == parse("32kib") == parse("32768") == parse("32_768") == 32768
    assert parse("1MiB") == parse("1024KiB") == parse("1048576B") == 1 << 20
    assert parse("4KiB") == 4096
    assert parse(" 64 KiB ") == 65536


def test_explicit_limit_wins_over_development(tmp_path: Path) -> None:
    process = EmulatorProcess(str(tmp_path / "data.tbemu"), development=True,
                              limit_request="64KiB").start()
    try:
        assert process.request_limit_bytes == 65536
        with EmulatorClientSync(0, process.address) as client:
            assert client.request_limit_bytes() == 65536
            with pytest.raises(tb.TooMuchDataError):
                client.create_accounts(accounts(fresh_ids(tb_limits.create_batch_max(65536) + 1)))
    finally:
        process.kill()


def test_emulator_and_platform_rules_agree_on_every_limit() -> None:
    limits = range(request_limit.REQUEST_LIMIT_BYTES_MIN, request_limit.REQUEST_LIMIT_BYTES_MAX + 1)
    for limit_bytes in limits:
        batch_max = wire.batch_max_by_op(limit_bytes) if limit_bytes % 509 == 0 else None
        creates = request_limit.create_batch_max(limit_bytes)
        lookups = request_limit.lookup_batch_max(limit_bytes)
        assert creates == tb_limits.create_batch_max(limit_bytes)
        assert lookups == tb_limits.lookup_batch_max(limit_bytes)
        if batch_max is not None:
            assert batch_max[wire.Op.CREATE_TRANSFERS] == creates
            assert batch_max[wire.Op.LOOKUP_ACCOUNTS] == lookups
    for name in ("MIN", "MAX", "DEFAULT", "DEVELOPMENT"):
        attribute = f"REQUEST_LIMIT_BYTES_{name}"
        assert getattr(request_limit, attribute) == getattr(tb_limits, attribute)
    assert request_limit.ROWS_MAX == tb_limits.QUERY_LIMIT_MAX == wire.BATCH_EVENTS_MAX


async def test_connect_tigerbeetle_reports_the_limit(server: tuple[EmulatorProcess, Limit]) -> None:
    process, limit = server
    emulator = connect_tigerbeetle(f"tbemu://{process.address}", timeout_s=5,
                                   request_limit_bytes=tb_limits.REQUEST_LIMIT_BYTES_MAX)
    try:  # The emulator's announced limit wins over the configured one.
        assert await emulator.request_limit_bytes() == limit.limit_bytes
    finally:
        await emulator.close()
    # The real client keeps the announced limit to itself: the configured one is reported.
    real = connect_tigerbeetle("tigerbeetle://127.0.0.1:1", timeout_s=0.5,
                               request_limit_bytes=limit.limit_bytes)
    assert isinstance(real, TimeoutClientAsync)
    try:
        assert await real.request_limit_bytes() == limit.limit_bytes
    finally:
        await real.close()
    for wrong in (4095, (1 << 20) + 1):
        with pytest.raises(ValueError, match="TB_REQUEST_LIMIT_BYTES"):
            connect_tigerbeetle("3000", request_limit_bytes=wrong)
