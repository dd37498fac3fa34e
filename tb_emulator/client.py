"""Client adapter for the emulator: drop-in for `tigerbeetle.ClientAsync` / `ClientSync`.

Same methods, arguments, return types and exceptions as the real client, plus what a network
client needs: a per-request timeout (`RequestTimeoutError`, a `TimeoutError`), reconnects,
and transparent resend of in-flight requests after a reconnect (TigerBeetle ids make creates
idempotent: a resent create that had been applied answers `EXISTS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, Self

import tigerbeetle as tb
from tigerbeetle.client import InitError

from tb_emulator import request_limit, wire

DEFAULT_TIMEOUT_S: Final = 10.0
RECONNECT_DELAY_MIN_S: Final = 0.01
RECONNECT_DELAY_MAX_S: Final = 0.5
SCHEME: Final = "tbemu://"


class RequestTimeoutError(TimeoutError):
    """A request got no reply within its timeout (server down, overloaded or unreachable)."""


class EmulatorProtocolError(Exception):
    """The server answered with an error status the real client has no exception for."""


def parse_address(replica_addresses: str) -> tuple[str, int]:
    """`tbemu://host:port`, `host:port` or `port` (TigerBeetle's forms). Only the first
    address is used: the emulator is a single process."""
    text = replica_addresses.strip()
    if text.startswith(SCHEME):
        text = text[len(SCHEME):]
    first = text.split(",")[0].strip()
    if not first:
        raise InitError(f"address invalid: {replica_addresses!r}")
    host, sep, port_text = first.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", first
    try:
        port = int(port_text)
    except ValueError:
        raise InitError(f"address invalid: {replica_addresses!r}") from None
    if not 0 < port < 65536:
        raise InitError(f"address invalid: {replica_addresses!r}")
    return host.strip("[]") or "127.0.0.1", port


# ------------------------------------------------------------------------------------------
# Request encoding / reply decoding (shared by both clients)
# ------------------------------------------------------------------------------------------

Decoder = Callable[[memoryview], Any]


class Request(NamedTuple):
    """An encoded request. Encoding converts every field first (TypeError,
    IntegerOverflowError); the client then refuses a closed client, and only then a request
    that does not fit (`_refuse`): the real client's order. `events` is checked against the
    limit the server announced at register; `oversized` (a filter's `limit` above the rows a
    reply can hold) holds whatever the limit."""

    request_id: int
    op: int
    frame: bytes
    events: int
    oversized: bool = False
    sent_ids: Sequence[int] | None = None  # lookup_accounts: the ids as the server sees them.


def _request(request_id: int, op: int, body: bytes, events: int, oversized: bool = False
             ) -> Request:
    return Request(request_id, op, wire.frame(request_id, op, 0, body), events, oversized)


def encode_create_accounts(request_id: int, accounts: Sequence[tb.Account]) -> Request:
    return _request(request_id, wire.Op.CREATE_ACCOUNTS, wire.pack_accounts(accounts),
                    len(accounts))


def encode_create_transfers(request_id: int, transfers: Sequence[tb.Transfer]) -> Request:
    return _request(request_id, wire.Op.CREATE_TRANSFERS, wire.pack_transfers(transfers),
                    len(transfers))


def encode_lookup(request_id: int, op: int, ids: Sequence[int]) -> Request:
    body, sent_ids = wire.pack_lookup_ids(ids)
    request = _request(request_id, op, body, len(ids))
    return request._replace(sent_ids=sent_ids) if op == wire.Op.LOOKUP_ACCOUNTS else request


def encode_account_filter(request_id: int, op: int, f: tb.AccountFilter) -> Request:
    # The real client refuses a limit it could not take the reply of, like an oversized batch.
    body = wire.pack_account_filter(f)
    return _request(request_id, op, body, 1, f.limit > wire.BATCH_EVENTS_MAX)


def encode_query_filter(request_id: int, op: int, f: tb.QueryFilter) -> Request:
    body = wire.pack_query_filter(f)
    return _request(request_id, op, body, 1, f.limit > wire.BATCH_EVENTS_MAX)


REGISTER_REQUEST_ID: Final = 0  # Never a request's id (_next_id skips 0).
REGISTER_REPLY_SIZE_MAX: Final = 4096  # The limit, or a BUSY/error message (at most 4 KiB).


def register_frame() -> bytes:
    return wire.frame(REGISTER_REQUEST_ID, wire.Op.REGISTER, 0, b"")


def register_reply(request_id: int, op: int, status: int, body: bytes | bytearray) -> int:
    """The request limit a REGISTER reply announces. ConnectionRefusedError (an OSError: the
    caller retries) if the server turned the connection away as busy."""
    if request_id == 0 and status == wire.Status.BUSY:
        raise ConnectionRefusedError("tb_emulator: too many connections")
    if (request_id, op, status, len(body)) != (
            REGISTER_REQUEST_ID, wire.Op.REGISTER, wire.Status.OK, wire.REGISTER_REPLY.size):
        message = bytes(body[:200]).decode(errors="replace")
        raise EmulatorProtocolError(
            f"tb_emulator register failed: op={op} status={status}: {message}")
    (limit_bytes,) = wire.REGISTER_REPLY.unpack(body)
    if not (request_limit.REQUEST_LIMIT_BYTES_MIN <= limit_bytes
            <= request_limit.REQUEST_LIMIT_BYTES_MAX):
        raise EmulatorProtocolError(f"tb_emulator announced a request limit of {limit_bytes}")
    return int(limit_bytes)


def _rows(size: int, decode: Decoder) -> Decoder:
    def check(body: memoryview) -> Any:
        if len(body) % size:
            raise EmulatorProtocolError(f"reply of {len(body)} bytes is not rows of {size}")
        return decode(body)

    return check


DECODERS: Final[dict[int, Decoder]] = {
    wire.Op.CREATE_ACCOUNTS: wire.unpack_create_account_results,
    wire.Op.CREATE_TRANSFERS: wire.unpack_create_transfer_results,
    # LOOKUP_ACCOUNTS needs the request's ids: wire.unpack_lookup_accounts. Decoders check
    # their sizes.
    wire.Op.LOOKUP_TRANSFERS: wire.unpack_transfers,
    wire.Op.GET_ACCOUNT_TRANSFERS: wire.unpack_transfers,
    wire.Op.GET_ACCOUNT_BALANCES: _rows(wire.BALANCE.size, wire.unpack_balances),
    wire.Op.QUERY_ACCOUNTS: wire.unpack_accounts,
    wire.Op.QUERY_TRANSFERS: wire.unpack_transfers,
}


def _refuse(request: Request, closed: bool, batch_max: dict[int, int] | None) -> None:
    """What the real client refuses before sending, in its order. `batch_max`: by operation,
    under the limit the server announced (None before the first register: checked again once
    connected)."""
    if closed:
        raise tb.ClientClosedError()
    if request.oversized or (batch_max is not None and request.events > batch_max[request.op]):
        raise tb.TooMuchDataError()


class ReplyChunks:
    """A lookup's PARTIAL reply frames, decoded as each arrives: the client decodes one chunk
    while the server packs the next. One per request attempt (a resend starts over)."""

    __slots__ = ("frames", "items", "op", "request_ids")

    def __init__(self, op: int, request_ids: Sequence[int] | None) -> None:
        self.op = op
        self.request_ids = request_ids  # lookup_accounts: the sent ids.
        self.items: list[Any] = []
        self.frames = 0

    def add(self, body: memoryview) -> None:
        """One PARTIAL frame's body: exactly wire.LOOKUP_CHUNK_IDS of the request's ids."""
        start = self.frames * wire.LOOKUP_CHUNK_IDS
        self.frames += 1
        self.items += self._decode(body, start, start + wire.LOOKUP_CHUNK_IDS)

    def finish(self, body: memoryview) -> list[Any]:
        """The last (OK) frame's body: the rest of the request's ids."""
        self.items += self._decode(body, self.frames * wire.LOOKUP_CHUNK_IDS, None)
        return self.items

    def _decode(self, body: memoryview, start: int, end: int | None) -> list[Any]:
        try:
            if self.op == wire.Op.LOOKUP_TRANSFERS:
                return wire.unpack_transfers(body)
            assert self.request_ids is not None
            return wire.unpack_lookup_accounts(body, self.request_ids[start:end])
        except wire.WireError as e:
            raise EmulatorProtocolError(f"malformed reply: {e}") from e


def decode_reply(
    op: int, status: int, body: memoryview, request_ids: Sequence[int] | None = None,
    chunks: ReplyChunks | None = None,
) -> Any:
    """`request_ids`: a lookup_accounts' ids (a reply that finds them all leaves them out).
    `chunks`: the request's PARTIAL frames so far, if it is a lookup."""
    if status == wire.Status.OK:
        if chunks is not None and chunks.frames:
            return chunks.finish(body)
        try:
            if op == wire.Op.LOOKUP_ACCOUNTS:
                assert request_ids is not None
                return wire.unpack_lookup_accounts(body, request_ids)
            return DECODERS[op](body)
        except wire.WireError as e:
            raise EmulatorProtocolError(f"malformed reply: {e}") from e
    if status == wire.Status.TOO_MUCH_DATA:
        raise tb.TooMuchDataError()
    message = bytes(body).decode(errors="replace")
    try:
        name = wire.Status(status).name
    except ValueError:
        name = str(status)
    raise EmulatorProtocolError(f"tb_emulator replied {name}: {message}")


# ------------------------------------------------------------------------------------------
# Async client
# ------------------------------------------------------------------------------------------


class _AsyncConnection:
    """One TCP connection; a reader task routes replies to futures by request id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[tuple[int, int, memoryview]]] = {}
        self.chunks: dict[int, ReplyChunks] = {}  # Lookups in flight, by request id.
        self.loop = asyncio.get_running_loop()
        self.task = self.loop.create_task(self._read_loop())
        self.closed = False

    async def _read_loop(self) -> None:
        error: BaseException = ConnectionResetError("tb_emulator connection closed")
        try:
            read = self.reader.readexactly
            unpack = wire.HEADER.unpack
            while True:
                body_size, request_id, op, status, version = unpack(await read(wire.HEADER_SIZE))
                if version != wire.VERSION or body_size > wire.BODY_SIZE_MAX:
                    error = ConnectionResetError("tb_emulator sent a malformed frame")
                    break
                body = await read(body_size) if body_size else b""
                if status == wire.Status.PARTIAL:
                    self._add_chunk(request_id, memoryview(body))
                    continue
                future = self.pending.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result((op, status, memoryview(body)))
                elif request_id == 0 and status == wire.Status.BUSY:
                    error = ConnectionRefusedError("tb_emulator: too many connections")
        except (OSError, asyncio.IncompleteReadError, EOFError) as e:
            error = ConnectionResetError(f"tb_emulator connection lost: {e!r}")
        except asyncio.CancelledError:
            pass
        finally:
            self.closed = True
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(error)
            self.pending.clear()
            self.writer.close()

    def _add_chunk(self, request_id: int, body: memoryview) -> None:
        chunks = self.chunks.get(request_id)
        future = self.pending.get(request_id)
        if chunks is None or future is None or future.done():
            return  # Its caller gave up (timeout): nothing to decode for.
        try:
            chunks.add(body)
        except EmulatorProtocolError as e:
            del self.pending[request_id]
            future.set_exception(e)

    async def close(self) -> None:
        self.closed = True
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        # A reader task cancelled before it ever ran never closed the writer itself; close it
        # here, or wait_closed() waits forever (a first request refused as too big did that).
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class _Registration:
    """What the server announced at the last register (None before the first connection)."""

    announced_request_limit_bytes: int | None = None
    _batch_max: dict[int, int] | None = None  # Most events per request, by operation.

    def _registered(self, limit_bytes: int) -> None:
        if limit_bytes != self.announced_request_limit_bytes:
            self._batch_max = wire.batch_max_by_op(limit_bytes)
            self.announced_request_limit_bytes = limit_bytes


class EmulatorClientAsync(_Registration):
    """Same interface as `tigerbeetle.ClientAsync`, talking to the emulator server."""

    def __init__(
        self, cluster_id: int, replica_addresses: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        wire.validate_uint("cluster_id", 128, cluster_id)
        assert timeout_s > 0
        self.cluster_id = cluster_id
        self.host, self.port = parse_address(replica_addresses)
        self.timeout_s = timeout_s
        self._connection: _AsyncConnection | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._connect_loop: asyncio.AbstractEventLoop | None = None
        self._request_ids = itertools.count(1)
        self._closed = False
        # Requests that found the server unreachable (connection lost or refused) and will be
        # resent: an observable reconnect attempt (a test restarts the server only once one
        # of its requests waits on it).
        self.reconnect_attempts = 0

    async def request_limit_bytes(self) -> int:
        """The request limit the server announced, in bytes; connects (registers) first if
        this client has not yet, with the timeout and reconnects of any request."""
        if self.announced_request_limit_bytes is None:
            await self.lookup_accounts([])  # Reads nothing; registers on the way.
        assert self.announced_request_limit_bytes is not None
        return self.announced_request_limit_bytes

    # -- the tigerbeetle.ClientAsync interface ---------------------------------------------

    async def create_accounts(self, accounts: list[tb.Account]) -> list[tb.CreateAccountResult]:
        result: list[tb.CreateAccountResult] = await self._submit(
            encode_create_accounts(self._next_id(), accounts))
        return result

    async def create_transfers(self, transfers: list[tb.Transfer]) -> list[tb.CreateTransferResult]:
        result: list[tb.CreateTransferResult] = await self._submit(
            encode_create_transfers(self._next_id(), transfers))
        return result

    async def lookup_accounts(self, accounts: list[int]) -> list[tb.Account]:
        result: list[tb.Account] = await self._submit(
            encode_lookup(self._next_id(), wire.Op.LOOKUP_ACCOUNTS, accounts))
        return result

    async def lookup_transfers(self, transfers: list[int]) -> list[tb.Transfer]:
        result: list[tb.Transfer] = await self._submit(
            encode_lookup(self._next_id(), wire.Op.LOOKUP_TRANSFERS, transfers))
        return result

    async def get_account_transfers(self, filter: tb.AccountFilter) -> list[tb.Transfer]:
        result: list[tb.Transfer] = await self._submit(
            encode_account_filter(self._next_id(), wire.Op.GET_ACCOUNT_TRANSFERS, filter))
        return result

    async def get_account_balances(self, filter: tb.AccountFilter) -> list[tb.AccountBalance]:
        result: list[tb.AccountBalance] = await self._submit(
            encode_account_filter(self._next_id(), wire.Op.GET_ACCOUNT_BALANCES, filter))
        return result

    async def query_accounts(self, query_filter: tb.QueryFilter) -> list[tb.Account]:
        result: list[tb.Account] = await self._submit(
            encode_query_filter(self._next_id(), wire.Op.QUERY_ACCOUNTS, query_filter))
        return result

    async def query_transfers(self, query_filter: tb.QueryFilter) -> list[tb.Transfer]:
        result: list[tb.Transfer] = await self._submit(
            encode_query_filter(self._next_id(), wire.Op.QUERY_TRANSFERS, query_filter))
        return result

    async def close(self) -> None:
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            if connection.loop is asyncio.get_running_loop():
                await connection.close()
            else:
                with contextlib.suppress(Exception):
                    connection.writer.transport.abort()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self.close()

    # -- transport --------------------------------------------------------------------------

    def _next_id(self) -> int:
        return next(self._request_ids) & wire.U64_MASK or 1

    async def _submit(self, request: Request) -> Any:
        request_id, op, frame, _, _, request_ids = request
        _refuse(request, self._closed, self._batch_max)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        delay = RECONNECT_DELAY_MIN_S
        while True:
            if self._closed:
                raise tb.ClientClosedError()
            future: asyncio.Future[tuple[int, int, memoryview]] | None = None
            connection: _AsyncConnection | None = None
            chunks: ReplyChunks | None = None
            try:
                async with asyncio.timeout_at(deadline):
                    connection = await self._connect()
                    if connection.closed:  # Its reader already failed every pending request.
                        raise ConnectionResetError("tb_emulator connection closed")
                    _refuse(request, self._closed, self._batch_max)  # Registered by now.
                    future = loop.create_future()
                    connection.pending[request_id] = future
                    chunks = ReplyChunks(op, request_ids) if op in wire.LOOKUP_OPS else None
                    if chunks is not None:
                        connection.chunks[request_id] = chunks
                    connection.writer.write(frame)
                    reply_op, status, body = await future
            except TimeoutError:
                raise RequestTimeoutError(
                    f"tb_emulator {wire.Op(op).name.lower()} got no reply within "
                    f"{self.timeout_s} s from {self.host}:{self.port}"
                ) from None
            except OSError:
                # Lost or refused connection: reconnect and resend until the deadline.
                if connection is not None and self._connection is connection:
                    self._connection = None
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise RequestTimeoutError(
                        f"tb_emulator at {self.host}:{self.port} unreachable for "
                        f"{self.timeout_s} s") from None
                self.reconnect_attempts += 1
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, RECONNECT_DELAY_MAX_S)
                continue
            finally:
                if connection is not None:  # No-op when the reply arrived (reader popped it).
                    connection.pending.pop(request_id, None)
                    connection.chunks.pop(request_id, None)
            if reply_op != op:
                raise EmulatorProtocolError(f"reply operation {reply_op} != request {op}")
            return decode_reply(op, status, body, request_ids, chunks)

    async def _connect(self) -> _AsyncConnection:
        connection = self._connection
        loop = asyncio.get_running_loop()
        if connection is not None and not connection.closed:
            if connection.loop is loop:
                return connection
            # Used from another event loop (like the real client allows): start over there.
            with contextlib.suppress(Exception):  # The old loop may be closed already.
                connection.writer.transport.abort()
            self._connection = None
            self._connect_lock = None
        if self._connect_lock is None or self._connect_loop is not loop:
            self._connect_lock = asyncio.Lock()
            self._connect_loop = loop
        async with self._connect_lock:
            connection = self._connection
            if connection is not None and not connection.closed:
                return connection
            reader, writer = await asyncio.open_connection(
                self.host, self.port, limit=wire.BODY_SIZE_MAX + 4096)
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self._registered(await _register_async(reader, writer))
            except BaseException:
                writer.transport.abort()
                raise
            connection = _AsyncConnection(reader, writer)
            if self._closed:
                await connection.close()
                raise tb.ClientClosedError()
            self._connection = connection
            return connection




async def _register_async(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """REGISTER on a fresh connection, before its reader task starts: the announced limit."""
    writer.write(register_frame())
    try:
        header = await reader.readexactly(wire.HEADER_SIZE)
        body_size, request_id, op, status, version = wire.HEADER.unpack(header)
        _check_register_header(version, body_size)
        body = await reader.readexactly(body_size) if body_size else b""
    except asyncio.IncompleteReadError:  # An EOFError: make it the OSError that retries.
        raise ConnectionResetError("tb_emulator closed the connection at register") from None
    return register_reply(request_id, op, status, body)


def _check_register_header(version: int, body_size: int) -> None:
    if version != wire.VERSION:
        raise EmulatorProtocolError(
            f"tb_emulator speaks wire version {version}, this client {wire.VERSION}")
    if body_size > REGISTER_REPLY_SIZE_MAX:
        raise ConnectionResetError("tb_emulator sent a malformed frame at register")


# ------------------------------------------------------------------------------------------
# Sync client
# ------------------------------------------------------------------------------------------


class EmulatorClientSync(_Registration):
    """Same interface as `tigerbeetle.ClientSync`. One request at a time per client
    (a lock serializes threads); for scripts, replay and conformance."""

    def __init__(
        self, cluster_id: int, replica_addresses: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        wire.validate_uint("cluster_id", 128, cluster_id)
        assert timeout_s > 0
        self.cluster_id = cluster_id
        self.host, self.port = parse_address(replica_addresses)
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._request_ids = itertools.count(1)
        self._header = bytearray(wire.HEADER_SIZE)
        self._closed = False

    def request_limit_bytes(self) -> int:
        """The request limit the server announced, in bytes; connects (registers) first if
        this client has not yet, with the timeout and reconnects of any request."""
        if self.announced_request_limit_bytes is None:
            self.lookup_accounts([])  # Reads nothing; registers on the way.
        assert self.announced_request_limit_bytes is not None
        return self.announced_request_limit_bytes

    def create_accounts(self, accounts: list[tb.Account]) -> list[tb.CreateAccountResult]:
        result: list[tb.CreateAccountResult] = self._submit(
            encode_create_accounts(self._next_id(), accounts))
        return result

    def create_transfers(self, transfers: list[tb.Transfer]) -> list[tb.CreateTransferResult]:
        result: list[tb.CreateTransferResult] = self._submit(
            encode_create_transfers(self._next_id(), transfers))
        return result

    def lookup_accounts(self, accounts: list[int]) -> list[tb.Account]:
        result: list[tb.Account] = self._submit(
            encode_lookup(self._next_id(), wire.Op.LOOKUP_ACCOUNTS, accounts))
        return result

    def lookup_transfers(self, transfers: list[int]) -> list[tb.Transfer]:
        result: list[tb.Transfer] = self._submit(
            encode_lookup(self._next_id(), wire.Op.LOOKUP_TRANSFERS, transfers))
        return result

    def get_account_transfers(self, filter: tb.AccountFilter) -> list[tb.Transfer]:
        result: list[tb.Transfer] = self._submit(
            encode_account_filter(self._next_id(), wire.Op.GET_ACCOUNT_TRANSFERS, filter))
        return result

    def get_account_balances(self, filter: tb.AccountFilter) -> list[tb.AccountBalance]:
        result: list[tb.AccountBalance] = self._submit(
            encode_account_filter(self._next_id(), wire.Op.GET_ACCOUNT_BALANCES, filter))
        return result

    def query_accounts(self, query_filter: tb.QueryFilter) -> list[tb.Account]:
        result: list[tb.Account] = self._submit(
            encode_query_filter(self._next_id(), wire.Op.QUERY_ACCOUNTS, query_filter))
        return result

    def query_transfers(self, query_filter: tb.QueryFilter) -> list[tb.Transfer]:
        result: list[tb.Transfer] = self._submit(
            encode_query_filter(self._next_id(), wire.Op.QUERY_TRANSFERS, query_filter))
        return result

    def close(self) -> None:
        self._closed = True
        with self._lock:
            self._disconnect()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self.close()

    def _next_id(self) -> int:
        return next(self._request_ids) & wire.U64_MASK or 1

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _submit(self, request: Request) -> Any:
        request_id, op, frame, _, _, request_ids = request
        _refuse(request, self._closed, self._batch_max)
        deadline = time.monotonic() + self.timeout_s
        delay = RECONNECT_DELAY_MIN_S
        with self._lock:
            while True:
                if self._closed:
                    raise tb.ClientClosedError()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RequestTimeoutError(
                        f"tb_emulator {wire.Op(op).name.lower()} got no reply within "
                        f"{self.timeout_s} s from {self.host}:{self.port}")
                chunks = ReplyChunks(op, request_ids) if op in wire.LOOKUP_OPS else None
                try:
                    sock = self._connected(remaining)
                    _refuse(request, self._closed, self._batch_max)  # Registered by now.
                    reply = self._roundtrip(sock, request_id, frame, remaining, chunks)
                except TimeoutError:
                    self._disconnect()  # A late reply must not be read as the next one's.
                    raise RequestTimeoutError(
                        f"tb_emulator {wire.Op(op).name.lower()} got no reply within "
                        f"{self.timeout_s} s from {self.host}:{self.port}") from None
                except OSError:
                    self._disconnect()
                    time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
                    delay = min(delay * 2, RECONNECT_DELAY_MAX_S)
                    continue
                reply_op, status, body = reply
                if reply_op != op:
                    raise EmulatorProtocolError(f"reply operation {reply_op} != request {op}")
                return decode_reply(op, status, body, request_ids, chunks)

    def _connected(self, timeout_s: float) -> socket.socket:
        """The connection, opened and registered if there is none."""
        if self._sock is not None:
            return self._sock
        sock = socket.create_connection((self.host, self.port), timeout=timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(register_frame())
            header = self._header
            _recv_exactly(sock, memoryview(header))
            body_size, request_id, op, status, version = wire.HEADER.unpack(header)
            _check_register_header(version, body_size)
            body = bytearray(body_size)
            _recv_exactly(sock, memoryview(body))
            self._registered(register_reply(request_id, op, status, body))
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return sock

    def _roundtrip(
        self, sock: socket.socket, request_id: int, frame: bytes, timeout_s: float,
        chunks: ReplyChunks | None,
    ) -> tuple[int, int, memoryview]:
        sock.settimeout(timeout_s)
        sock.sendall(frame)
        while True:
            header = self._header
            _recv_exactly(sock, memoryview(header))
            body_size, reply_id, op, status, version = wire.HEADER.unpack(header)
            if version != wire.VERSION or body_size > wire.BODY_SIZE_MAX:
                raise ConnectionResetError("tb_emulator sent a malformed frame")
            body = bytearray(body_size)
            _recv_exactly(sock, memoryview(body))
            if reply_id == request_id:
                if status != wire.Status.PARTIAL:
                    return op, status, memoryview(body)
                if chunks is None:
                    raise EmulatorProtocolError(f"chunked reply to operation {op}")
                chunks.add(memoryview(body))
            if reply_id == 0 and status == wire.Status.BUSY:
                raise ConnectionRefusedError("tb_emulator: too many connections")


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionResetError("tb_emulator closed the connection")
        view = view[n:]
