"""The emulator server process: asyncio TCP server in front of one in-memory engine.

Each request is decoded, logged (creates only) and executed without an `await` in between, so
requests are atomic and totally ordered. Its reply is held until the log is fsynced up to the
request's position (group commit), reads included: a reply never shows state that a crash
could lose. A restart replays the log through a fresh engine with each request's logged clock.

Operators get (stderr, logger `tb_emulator.server`): one `health:` line per minute while busy
(requests, inflight/queue depth, fsync p99 measured on the disk, reply latency, event loop lag),
a `STALL:` warning while any request has waited more than a few seconds (and what it waits
for), a warning with every thread's stack if the event loop stops turning, and on SIGUSR1 a
stack dump. A dead log flusher stops the server (exit 1) rather than leaving it hung.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import faulthandler
import functools
import gc
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import tigerbeetle as tb

from tb_emulator import request_limit, wire
from tb_emulator.wal import GroupCommit, Record, WalError, WriteAheadLog, encode_record

logger = logging.getLogger("tb_emulator.server")

READY_PREFIX: Final = "tb_emulator ready"
DEFAULT_ENGINE: Final = "tb_emulator.engine:make_engine"
GC_THRESHOLD_GEN0: Final = 50_000
OVERSIZED_BODY_MAX: Final = 4 * wire.BODY_SIZE_MAX  # Read and refused; beyond: malformed.
DRAIN_ABOVE_BYTES: Final = 4 * wire.BODY_SIZE_MAX  # Stop reading a peer that does not read.
REPLY_LATENCIES_KEPT: Final = 65536
# A connection whose requests are already buffered runs them back to back (readexactly does
# not suspend): after this long it yields, so one pipelining peer cannot hold the event loop
# (and the flusher: the disk would idle) for seconds. Measured in the soak: loop lag 2.3 s.
TURN_MAX_S: Final = 0.02
SLOT_WAIT_POLL_S: Final = 1.0  # A handler waiting for an inflight slot checks its peer this often.
# Stale lookup rows packed while idle: a slice (~0.3 ms of work) per quiet interval.
ROW_PACK_SLICE: Final = 256
ROW_PACK_INTERVAL_S: Final = 0.005


class EngineLike(Protocol):
    clock_ns: Callable[[], int]

    def create_accounts(self, accounts: list[tb.Account]) -> list[tb.CreateAccountResult]: ...
    def create_transfers(self, transfers: list[tb.Transfer]) -> list[tb.CreateTransferResult]: ...
    def lookup_accounts(self, ids: list[int]) -> list[tb.Account]: ...
    def lookup_transfers(self, ids: list[int]) -> list[tb.Transfer]: ...
    def get_account_transfers(self, f: tb.AccountFilter) -> list[tb.Transfer]: ...
    def get_account_balances(self, f: tb.AccountFilter) -> list[tb.AccountBalance]: ...
    def query_accounts(self, f: tb.QueryFilter) -> list[tb.Account]: ...
    def query_transfers(self, f: tb.QueryFilter) -> list[tb.Transfer]: ...
    def close(self) -> None: ...


class RawEngine(EngineLike, Protocol):
    """Optional fast paths (tb_emulator.engine has them): rows in, (timestamps, statuses)
    out. Rows come from the wire decoder, so every field is an in-range int."""

    def create_accounts_raw(
        self, rows: Sequence[Sequence[Any]]) -> tuple[list[int], list[tb.CreateAccountStatus]]: ...
    def create_transfers_raw(
        self, rows: Sequence[Sequence[Any]]) -> tuple[list[int], list[tb.CreateTransferStatus]]: ...


def load_engine_factory(spec: str) -> Callable[[], EngineLike]:
    """`module:function`; the default is the real engine. Tests may pass another."""
    module_name, _, attr = spec.partition(":")
    factory: Callable[[], EngineLike] = getattr(importlib.import_module(module_name), attr)
    return factory


@dataclass(frozen=True)
class ServerLimits:
    connections_max: int = 256
    inflight_per_connection_max: int = 32  # Executed, not yet replied (pipelining depth).
    inflight_max: int = 256  # Server-wide; bounds memory held by the group commit.
    # TigerBeetle's --limit-request: announced at register; bounds every batch
    # (tb_emulator.request_limit).
    request_limit_bytes: int = request_limit.REQUEST_LIMIT_BYTES_DEFAULT

    def __post_init__(self) -> None:
        assert 0 < self.connections_max <= 65536
        assert 0 < self.inflight_per_connection_max <= self.inflight_max <= 65536
        assert (request_limit.REQUEST_LIMIT_BYTES_MIN <= self.request_limit_bytes
                <= request_limit.REQUEST_LIMIT_BYTES_MAX)


@dataclass(frozen=True)
class HealthSettings:
    """What the server tells its operator (stderr, `tb_emulator.server` logger)."""

    summary_interval_s: float = 60.0  # One summary line at most this often, only when busy.
    stall_warning_s: float = 5.0  # A request waiting longer (for the log or a slot): WARNING.
    check_interval_s: float = 1.0
    loop_watchdog: bool = False  # A thread that reports (with stacks) a blocked event loop.

    def __post_init__(self) -> None:
        assert 0 < self.check_interval_s <= self.stall_warning_s
        assert self.check_interval_s <= self.summary_interval_s


class EmulatorServer:
    def __init__(
        self,
        data_file: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        engine_factory: Callable[[], EngineLike] | None = None,
        limits: ServerLimits | None = None,
        health: HealthSettings | None = None,
    ) -> None:
        self.data_file = data_file
        self.host = host
        self.port = port
        self.limits = limits or ServerLimits()
        self._batch_max = wire.batch_max_by_op(self.limits.request_limit_bytes)
        self._register_reply = wire.REGISTER_REPLY.pack(self.limits.request_limit_bytes)
        self._engine_factory = engine_factory or load_engine_factory(DEFAULT_ENGINE)
        self._engine: EngineLike | None = None
        self._raw_creates = False
        self._wal: WriteAheadLog | None = None
        self._commit: GroupCommit | None = None
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.StreamWriter, _Connection] = {}
        self._inflight = 0
        self._inflight_released = asyncio.Event()
        self._last_clock_ns = 0
        self._stopped = asyncio.Event()
        self.recovered_requests = 0
        self.requests = 0
        self.fatal: BaseException | None = None
        self.health = health or HealthSettings()
        self._monitor_task: asyncio.Task[None] | None = None
        self._packer_task: asyncio.Task[None] | None = None
        self._watchdog_stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._heartbeat = time.monotonic()  # Last tick of the monitor task (event loop alive).
        self._stall_since: float | None = None
        self._stall_warned = 0.0
        self._window_started = time.monotonic()
        self._window_requests = 0
        self._inflight_peak = 0
        self._loop_lag_max_s = 0.0
        self._reply_latencies: collections.deque[float] = collections.deque(
            maxlen=REPLY_LATENCIES_KEPT)
        self.stall_warnings = 0

    # --------------------------------------------------------------------------------------
    # Lifecycle
    # --------------------------------------------------------------------------------------

    async def start(self) -> None:
        started = time.perf_counter()
        self._wal = WriteAheadLog(self.data_file)
        self._engine = self._engine_factory()
        self._raw_creates = all(hasattr(self._engine, name) for name in (
            "create_accounts_raw", "create_transfers_raw"))
        for record in self._wal.recover():
            self._replay(record)
            self.recovered_requests += 1
        recover_ms = (time.perf_counter() - started) * 1000
        self._commit = GroupCommit(self._wal)
        self._commit.start(self._on_log_failure)
        self._server = await asyncio.start_server(
            self._handle_connection, self.host, self.port, limit=wire.BODY_SIZE_MAX + 4096,
            backlog=self.limits.connections_max,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._heartbeat = self._window_started = time.monotonic()
        self._monitor_task = asyncio.get_running_loop().create_task(self._monitor())
        pack_stale_rows = getattr(self._engine, "pack_stale_rows", None)
        if pack_stale_rows is not None:
            self._packer_task = asyncio.get_running_loop().create_task(
                self._pack_rows_between_requests(pack_stale_rows))
        if self.health.loop_watchdog:
            self._watchdog = threading.Thread(
                target=self._watch_loop, name="tb_emulator-watchdog", daemon=True)
            self._watchdog.start()
        logger.info(
            "recovered %d requests in %.0f ms (%d torn bytes truncated)",
            self.recovered_requests, recover_ms, self._wal.truncated_bytes,
        )

    def ready_line(self) -> str:
        return (
            f"{READY_PREFIX} host={self.host} port={self.port} data_file={self.data_file} "
            f"recovered_requests={self.recovered_requests} "
            f"request_limit_bytes={self.limits.request_limit_bytes} pid={os.getpid()}"
        )

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()
        self._watchdog_stop.set()
        if self._watchdog is not None:
            self._watchdog.join(5)
            self._watchdog = None
        for task in (self._monitor_task, self._packer_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._monitor_task = self._packer_task = None
        if self._commit is not None:
            if self.fatal is None:
                await self._commit.drain()
            await self._commit.stop()
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._wal is not None:
            self._wal.close()
            self._wal = None

    def _on_log_failure(self, error: BaseException) -> None:
        # Nothing after a failed fsync may be acknowledged: drop every connection and stop.
        self.fatal = error
        for writer in list(self._connections):
            writer.transport.abort()
        self._stopped.set()

    # --------------------------------------------------------------------------------------
    # Requests
    # --------------------------------------------------------------------------------------

    def _next_clock_ns(self) -> int:
        # Monotonic across requests and restarts even if the wall clock steps back.
        now = time.time_ns()
        if now <= self._last_clock_ns:
            now = self._last_clock_ns + 1
        self._last_clock_ns = now
        return now

    def _replay(self, record: Record) -> None:
        engine = self._engine
        assert engine is not None
        clock_ns = record.clock_ns
        self._last_clock_ns = max(self._last_clock_ns, clock_ns)
        engine.clock_ns = lambda: clock_ns
        try:
            if record.operation not in wire.CREATE_OPS:
                raise WalError(f"unexpected operation {record.operation} in the log")
            self._run_create(record.operation, self._decode_create(record.operation, record.body))
        except WalError:
            raise
        except Exception:
            # Same input, same engine: the live run raised the same way (and answered
            # INTERNAL_ERROR), so continuing reproduces its state exactly.
            logger.exception("replayed request raised (as it did when first executed)")

    def _execute(
        self, request_id: int, op: int, body: memoryview, emit: Callable[[bytes], None]
    ) -> tuple[bytes, int]:
        """Returns (reply frame, log position the reply must wait for). Never awaits.
        `emit` takes the PARTIAL frames a big lookup sends ahead of its reply frame."""
        engine = self._engine
        commit = self._commit
        assert engine is not None and commit is not None
        event_size = wire.EVENT_SIZE.get(op)
        codec = wire.CREATE_CODECS.get(op)
        if event_size is None and codec is None:
            if op == wire.Op.REGISTER:  # Announce the request limit, as the real server does.
                return _ok(request_id, op, self._register_reply), 0
            return _error(request_id, op, wire.Status.INVALID_OPERATION, f"operation {op}"), 0
        try:
            count = codec.count(body) if codec is not None else _row_count(body, event_size)
        except wire.WireError as e:
            return _error(request_id, op, wire.Status.INVALID_DATA_SIZE, str(e)), 0
        if count > self._batch_max[op]:  # The client refuses these first; a peer may not.
            return _error(request_id, op, wire.Status.TOO_MUCH_DATA,
                          f"{count} events > {self._batch_max[op]} (request limit "
                          f"{self.limits.request_limit_bytes} bytes)"), 0
        if op in wire.SINGLE_EVENT_OPS and count != 1:
            return _error(request_id, op, wire.Status.INVALID_DATA_SIZE,
                          f"expected exactly one filter, got {count}"), 0
        self.requests += 1
        clock_ns = self._next_clock_ns()
        engine.clock_ns = lambda: clock_ns
        try:
            if op in wire.CREATE_OPS:
                events = self._decode_create(op, body)  # Decodable before it is logged.
                if count:
                    commit.append(encode_record(clock_ns, op, body))
                return _ok(request_id, op, self._run_create(op, events)), commit.written
            return self._execute_read(request_id, op, body, engine, emit), commit.written
        except tb.TooMuchDataError as e:
            return _error(request_id, op, wire.Status.TOO_MUCH_DATA, str(e)), commit.written
        except WalError:
            raise
        except Exception as e:
            logger.exception("request %d (operation %d) failed", request_id, op)
            return _error(request_id, op, wire.Status.INTERNAL_ERROR,
                          f"{type(e).__name__}: {e}"), commit.written

    def _decode_create(self, op: int, body: bytes | memoryview) -> list[Any]:
        """Field tuples for the engine's raw creates (no dataclass per event), else objects."""
        codec = wire.CREATE_CODECS[op]
        return codec.unpack_rows(body) if self._raw_creates else codec.unpack(body)

    def _run_create(self, op: int, events: list[Any]) -> bytes:
        """Executes a decoded create; returns the reply body."""
        engine = self._engine
        assert engine is not None
        if self._raw_creates:  # (timestamps, statuses): no result object per event.
            raw: RawEngine = engine  # type: ignore[assignment]
            if op == wire.Op.CREATE_TRANSFERS:
                return wire.pack_create_result_lists(*raw.create_transfers_raw(events))
            return wire.pack_create_result_lists(*raw.create_accounts_raw(events))
        if op == wire.Op.CREATE_TRANSFERS:
            return wire.pack_create_results(engine.create_transfers(events))
        return wire.pack_create_results(engine.create_accounts(events))

    @staticmethod
    def _execute_read(
        request_id: int, op: int, body: memoryview, engine: EngineLike,
        emit: Callable[[bytes], None],
    ) -> bytes:
        """Returns the reply frame; a big lookup's leading chunks go to `emit` as PARTIAL
        frames. No await between chunks: every chunk reads the same state."""
        if op in wire.LOOKUP_OPS:
            ids = wire.unpack_ids(body)
            chunks = wire.lookup_chunks(len(ids))
            for start, end in chunks[:-1]:
                emit(wire.frame(request_id, op, wire.Status.PARTIAL,
                                _lookup_reply(engine, op, ids[start:end])))
            start, end = chunks[-1]
            reply = _lookup_reply(engine, op, ids[start:end])
        elif op == wire.Op.GET_ACCOUNT_TRANSFERS:
            reply = wire.pack_transfers(
                engine.get_account_transfers(wire.unpack_account_filter(body)))
        elif op == wire.Op.GET_ACCOUNT_BALANCES:
            reply = wire.pack_balances(
                engine.get_account_balances(wire.unpack_account_filter(body)))
        elif op == wire.Op.QUERY_ACCOUNTS:
            reply = wire.pack_accounts(engine.query_accounts(wire.unpack_query_filter(body)))
        else:
            assert op == wire.Op.QUERY_TRANSFERS
            reply = wire.pack_transfers(engine.query_transfers(wire.unpack_query_filter(body)))
        return _ok(request_id, op, reply)

    # --------------------------------------------------------------------------------------
    # Connections
    # --------------------------------------------------------------------------------------

    async def _handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self._connections) >= self.limits.connections_max:
            writer.write(_error(0, 0, wire.Status.BUSY, "too many connections"))
            await _close_writer(writer)
            return
        connection = _Connection(writer)
        self._connections[writer] = connection
        try:
            await self._serve_connection(reader, writer, connection)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # Peer went away; replies still owed are dropped with the transport.
        except WalError:
            pass  # _on_log_failure stops the server.
        except Exception:
            logger.exception("connection handler failed")
        finally:
            self._connections.pop(writer, None)
            self._inflight -= connection.inflight
            connection.inflight = 0
            self._inflight_released.set()
            await _close_writer(writer)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: _Connection
    ) -> None:
        limits = self.limits
        commit = self._commit
        assert commit is not None
        turn_started = time.monotonic()
        while self.fatal is None:
            header = await reader.readexactly(wire.HEADER_SIZE)
            body_size, request_id, op, status, version = wire.HEADER.unpack(header)
            if version != wire.VERSION or status != 0 or body_size > OVERSIZED_BODY_MAX:
                # The byte stream cannot be trusted any more: say why, then hang up.
                writer.write(_error(request_id, op, wire.Status.MALFORMED,
                                    f"bad frame header (version={version} status={status} "
                                    f"body_size={body_size})"))
                return
            oversized = body_size > wire.BODY_SIZE_MAX
            if oversized:  # More than 8189 events: skip it, the stream stays in sync.
                remaining = body_size
                while remaining:
                    chunk = min(1 << 16, remaining)
                    await reader.readexactly(chunk)
                    remaining -= chunk
                body = b""
            else:
                body = await reader.readexactly(body_size) if body_size else b""
            received = time.monotonic()
            if received - turn_started > TURN_MAX_S:
                await asyncio.sleep(0)  # Let other connections and the flusher run.
                received = turn_started = time.monotonic()
            if (connection.inflight >= limits.inflight_per_connection_max
                    or self._inflight >= limits.inflight_max):
                connection.blocked_since = received
                while (connection.inflight >= limits.inflight_per_connection_max
                       or self._inflight >= limits.inflight_max):
                    if writer.is_closing() or reader.at_eof():
                        # Peer gone (reset, or closed with nothing more to read: its replies
                        # would be dropped at the next read anyway): give up the wait and the
                        # connection slot now. Else, while the server is saturated, dead
                        # connections pile up to connections_max and new ones get BUSY.
                        return
                    self._inflight_released.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._inflight_released.wait(),
                                               SLOT_WAIT_POLL_S)
                connection.blocked_since = None
            if self.fatal is not None:
                return
            if oversized:
                reply, position = _error(request_id, op, wire.Status.TOO_MUCH_DATA,
                                         "more than 8189 events"), 0
            else:
                # Nothing owed to the log: a big lookup's chunks can go out as each is packed
                # (the client decodes one while the next is built). Else they wait with it.
                early: list[bytes] = []
                emit = (connection.send if commit.durable_now(commit.written)
                        else early.append)
                reply, position = self._execute(request_id, op, memoryview(body), emit)
                if early:
                    reply = b"".join([*early, reply])
            connection.inflight += 1
            self._inflight += 1
            if self._inflight > self._inflight_peak:
                self._inflight_peak = self._inflight
            commit.when_durable(
                position, functools.partial(self._reply, connection, reply, received))
            if writer.transport.get_write_buffer_size() > DRAIN_ABOVE_BYTES:
                connection.draining_since = time.monotonic()
                await writer.drain()
                connection.draining_since = None
                connection.slow_reader_warned = False

    def _reply(self, connection: _Connection, reply: bytes, received: float) -> None:
        if connection.inflight == 0:
            return  # Connection already torn down and its inflight count released.
        connection.inflight -= 1
        self._inflight -= 1
        self._inflight_released.set()
        self._window_requests += 1
        self._reply_latencies.append(time.monotonic() - received)
        if not connection.writer.is_closing():
            connection.writer.write(reply)

    async def _pack_rows_between_requests(self, pack_stale_rows: Callable[[int], int]) -> None:
        """Packs the lookup rows that writes left stale while the server is idle (no request
        since the last tick), a slice at a time (~0.3 ms), so a lookup after a burst of writes
        finds them ready; under load, lookups pack the stale rows they read. The rows are a
        cache: no state changes."""
        seen = self.requests
        while True:
            await asyncio.sleep(ROW_PACK_INTERVAL_S)
            if self.requests != seen:  # Busy: packing now would only slow the requests.
                seen = self.requests
                continue
            try:
                pack_stale_rows(ROW_PACK_SLICE)
            except Exception:
                logger.exception("packing lookup rows failed")  # Lookups pack their own.

    # --------------------------------------------------------------------------------------
    # Health: periodic summary, stall warnings, event loop watchdog
    # --------------------------------------------------------------------------------------

    async def _monitor(self) -> None:
        health = self.health
        while True:
            await asyncio.sleep(health.check_interval_s)
            now = time.monotonic()
            # How late this wake-up is: time the loop spent on other work before it.
            lag_s = now - self._heartbeat - health.check_interval_s
            self._loop_lag_max_s = max(self._loop_lag_max_s, lag_s)
            self._heartbeat = now
            try:
                self._check_stall(now)
                if now - self._window_started >= health.summary_interval_s:
                    self._summarize(now)
            except Exception:
                logger.exception("health check failed")

    def _check_stall(self, now: float) -> None:
        """WARNING while a request waits longer than stall_warning_s (for the log, or for an
        inflight slot), at most once per stall_warning_s; INFO when it is over."""
        commit = self._commit
        assert commit is not None
        log_wait_s = commit.oldest_wait_s(now)
        blocked = [now - c.blocked_since for c in self._connections.values()
                   if c.blocked_since is not None]
        slot_wait_s = max(blocked, default=0.0)
        wait_s = max(log_wait_s, slot_wait_s)
        threshold_s = self.health.stall_warning_s
        self._check_slow_readers(now, threshold_s)
        if wait_s <= threshold_s:
            if self._stall_since is not None:
                logger.info("stall over after %.1f s", now - self._stall_since)
                self._stall_since = None
            return
        if self._stall_since is None:
            self._stall_since = now - wait_s
        elif now - self._stall_warned < threshold_s:
            return
        self._stall_warned = now
        self.stall_warnings += 1
        sync_s = now - commit.sync_started if commit.sync_started is not None else 0.0
        if log_wait_s > threshold_s and commit.sync_started is None:
            resolved = commit.poke()  # Waiting for the log, yet no sync runs: lost wakeup?
            if resolved or commit.backlog_bytes:
                logger.error("group commit was idle with %d durable replies held and %d bytes "
                             "unwritten (lost wakeup): woken", resolved, commit.backlog_bytes)
        logger.warning(
            "STALL: a request has waited %.1f s for its reply: %d waiting for the log "
            "(oldest %.1f s, fsync running for %.1f s, %d bytes not yet written); "
            "%d connections blocked on inflight limits (oldest %.1f s, inflight %d/%d); "
            "%d connections", wait_s, commit.waiting, log_wait_s, sync_s,
            commit.backlog_bytes, len(blocked), slot_wait_s, self._inflight,
            self.limits.inflight_max, len(self._connections))

    def _check_slow_readers(self, now: float, threshold_s: float) -> None:
        """A peer that stops reading its replies only stalls itself (its handler stops
        reading its requests), but its operator wants to know: WARNING once per episode."""
        for connection in self._connections.values():
            since = connection.draining_since
            if since is None or now - since <= threshold_s or connection.slow_reader_warned:
                continue
            connection.slow_reader_warned = True
            transport = connection.writer.transport
            logger.warning(
                "peer %s has not read its replies for %.1f s (%d bytes buffered): "
                "its requests wait", transport.get_extra_info("peername"), now - since,
                transport.get_write_buffer_size())

    def _summarize(self, now: float) -> None:
        commit = self._commit
        assert commit is not None
        elapsed_s = now - self._window_started
        requests = self._window_requests
        if requests:
            syncs = sorted(commit.sync_durations)
            replies = sorted(self._reply_latencies)
            connections = self._connections.values()
            slow_readers = sum(c.draining_since is not None for c in connections)
            logger.info(
                "health: %d requests (%.1f/s) in %.0f s; connections=%d inflight=%d "
                "(peak %d, max %d) waiting_for_log=%d slow_readers=%d; fsyncs=%d "
                "p99=%.1f ms max=%.1f ms; reply p50=%.1f ms p99=%.1f ms max=%.1f ms; "
                "loop lag max=%.0f ms; log=%d bytes", requests, requests / elapsed_s, elapsed_s,
                len(connections), self._inflight, self._inflight_peak,
                self.limits.inflight_max, commit.waiting, slow_readers, len(syncs),
                _percentile_ms(syncs, 0.99), _percentile_ms(syncs, 1.0),
                _percentile_ms(replies, 0.5), _percentile_ms(replies, 0.99),
                _percentile_ms(replies, 1.0), 1000 * self._loop_lag_max_s,
                self._wal.size if self._wal is not None else 0)
        commit.sync_durations.clear()
        self._reply_latencies.clear()
        self._window_requests = 0
        self._inflight_peak = self._inflight
        self._loop_lag_max_s = 0.0
        self._window_started = now

    def _watch_loop(self) -> None:
        """Thread: if the monitor task stops ticking, the event loop is blocked (a long
        computation, or a blocking call such as a write to a full stderr pipe): say so, with
        every thread's stack, once per episode."""
        threshold_s = self.health.stall_warning_s
        reported = False
        while not self._watchdog_stop.wait(self.health.check_interval_s):
            lag_s = time.monotonic() - self._heartbeat
            if lag_s > threshold_s and not reported:
                reported = True
                logger.warning("STALL: event loop blocked for %.1f s; stacks follow", lag_s)
                with contextlib.suppress(Exception):
                    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            elif lag_s <= threshold_s and reported:
                reported = False
                logger.info("event loop running again")


class _Connection:
    __slots__ = ("blocked_since", "draining_since", "inflight", "slow_reader_warned", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.inflight = 0
        self.blocked_since: float | None = None  # Waiting for an inflight slot since.
        self.draining_since: float | None = None  # Waiting for the peer to read since.
        self.slow_reader_warned = False

    def send(self, frame: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(frame)


def _percentile_ms(sorted_s: Sequence[float], fraction: float) -> float:
    if not sorted_s:
        return 0.0
    return 1000 * sorted_s[min(len(sorted_s) - 1, int(fraction * len(sorted_s)))]


def _row_count(body: memoryview, event_size: int | None) -> int:
    assert event_size is not None
    count, rest = divmod(len(body), event_size)
    if rest:
        raise wire.WireError(f"body of {len(body)} bytes is not a multiple of {event_size}")
    return count


def _lookup_reply(engine: EngineLike, op: int, ids: list[int]) -> bytes:
    """One chunk of a lookup, through the engine's fast paths when it has them."""
    if op == wire.Op.LOOKUP_ACCOUNTS:
        lookup_rows = getattr(engine, "lookup_accounts_rows", None)
        if lookup_rows is None:
            found = engine.lookup_accounts(ids)
            return wire.pack_lookup_accounts(found, all_found=len(found) == len(ids))
        rows, count = lookup_rows(ids)
        return wire.pack_lookup_rows(rows, count, all_found=count == len(ids))
    lookup_raw = getattr(engine, "lookup_transfers_raw", None)
    if lookup_raw is None:
        return wire.pack_transfers(engine.lookup_transfers(ids))
    return wire.pack_transfer_rows(lookup_raw(ids))


def _ok(request_id: int, op: int, body: bytes) -> bytes:
    return wire.frame(request_id, op, wire.Status.OK, body)


def _error(request_id: int, op: int, status: wire.Status, message: str) -> bytes:
    return wire.frame(request_id, op, status, message.encode()[:4096])


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


# ------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------


async def serve_async(
    data_file: str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    engine_factory: Callable[[], EngineLike] | None = None,
    limits: ServerLimits | None = None,
    health: HealthSettings | None = None,
    on_ready: Callable[[EmulatorServer], None] | None = None,
    tune_gc: bool = False,
) -> int:
    """Runs until SIGTERM/SIGINT (or a log failure); returns a process exit code.
    `tune_gc` (for a dedicated process): each batch allocates ~10^4 short-lived objects, so
    the default gen-0 threshold (700) runs the collector dozens of times per request; raising
    it and freezing the recovered state measured 15-25 % more transfers per CPU second."""
    if tune_gc:
        gc.set_threshold(GC_THRESHOLD_GEN0, 20, 100)
    server = EmulatorServer(data_file, host, port, engine_factory=engine_factory, limits=limits,
                            health=health)
    await server.start()
    if tune_gc:
        gc.collect()
        gc.freeze()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, server.stop)
    print(server.ready_line(), flush=True)
    if on_ready is not None:
        on_ready(server)
    try:
        await server.serve_forever()
    finally:
        await server.close()
    return 1 if server.fatal is not None else 0


def serve(
    data_file: str,
    host: str = "127.0.0.1",
    port: int = 3000,
    *,
    engine_factory: Callable[[], EngineLike] | None = None,
    limits: ServerLimits | None = None,
    health: HealthSettings | None = None,
    tune_gc: bool = True,
) -> int:
    """Blocking: serves until SIGTERM/SIGINT (the process entry point; also for
    `walletmig dev tigerbeetle` when run in a dedicated process). In a dedicated process
    the event loop watchdog runs, and SIGUSR1 dumps every thread's stack to stderr."""
    with contextlib.suppress(AttributeError, ValueError, RuntimeError):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    health = health or HealthSettings(loop_watchdog=True)
    return asyncio.run(serve_async(data_file, host, port, engine_factory=engine_factory,
                                   limits=limits, health=health, tune_gc=tune_gc))


class EmulatorProcess:
    """An emulator in a child process (`python -m tb_emulator`), for tests, benchmarks and
    conformance. `start()` returns once the child printed its ready line."""

    def __init__(
        self,
        data_file: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        engine: str | None = None,
        log_file: str | None = None,
        startup_timeout_s: float = 60.0,
        limit_request: int | str | None = None,
        development: bool = False,
    ) -> None:
        """`limit_request` / `development`: the server's `--limit-request SIZE` (bytes or
        `32KiB`) and `--development` options."""
        self.data_file = data_file
        self.host = host
        self.port = port
        self.engine = engine
        self.log_file = log_file or data_file + ".log"
        self.startup_timeout_s = startup_timeout_s
        self.limit_request = limit_request
        self.development = development
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_line = ""
        self.request_limit_bytes = 0  # As the started server reports it.

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> EmulatorProcess:
        assert self.process is None or self.process.poll() is not None
        args = [sys.executable, "-m", "tb_emulator", "--host", self.host, "--port",
                str(self.port), "--data-file", self.data_file]
        if self.engine:
            args += ["--engine", self.engine]
        if self.development:
            args.append("--development")
        if self.limit_request is not None:
            args += ["--limit-request", str(self.limit_request)]
        with open(self.log_file, "ab") as log:
            start_offset = log.tell()
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            with open(self.log_file, "rb") as log:
                log.seek(start_offset)
                for raw in log.read().decode(errors="replace").splitlines():
                    if raw.startswith(READY_PREFIX):
                        self.ready_line = raw
                        fields = dict(p.split("=", 1) for p in raw.split() if "=" in p)
                        self.port = int(fields["port"])
                        self.request_limit_bytes = int(fields["request_limit_bytes"])
                        return self
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tb_emulator exited with {self.process.returncode}: {self.read_log()}")
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"tb_emulator not ready after {self.startup_timeout_s} s")

    def read_log(self) -> str:
        with open(self.log_file, "rb") as f:
            return f.read()[-4000:].decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL (crash) by PID."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM (graceful), SIGKILL if it does not exit in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def temp_data_file(prefix: str = "tbemu-") -> tuple[str, str]:
    """(temp dir, data file path inside it)."""
    directory = tempfile.mkdtemp(prefix=prefix)
    return directory, os.path.join(directory, "data.tbemu")
