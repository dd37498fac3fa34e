"""Append-only, checksummed request log of the emulator (its only durable state).

File: 16-byte header (magic, version), then records:
    body_size u32 | crc32 u32 | clock_ns u64 | operation u32 | body
`crc32` covers body_size, clock_ns, operation and the body, so a torn or corrupt record (or a
garbage length) is detected. Recovery replays the longest valid prefix and truncates the rest:
a record is either replayed whole or not at all.

A v1 file (bodies were headless columnar batches with every block present) is upgraded to v2
on open: rewritten beside the original, fsynced, then renamed over it (atomic).

`GroupCommit` batches the records of concurrent requests into one write + fdatasync done in a
worker thread, so the event loop keeps executing requests while the disk syncs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from tb_emulator import wire

logger = logging.getLogger("tb_emulator.wal")

FILE_MAGIC: Final = b"TBEMUWAL"
FILE_VERSION: Final = 2  # Bumped with the wire format of the logged request bodies.
FILE_HEADER = struct.Struct("<8sII")  # magic, version, reserved
RECORD_HEADER = struct.Struct("<IIQI")  # body_size, crc32, clock_ns, operation
_CRC_FIELDS = struct.Struct("<IQI")  # body_size, clock_ns, operation (what the crc covers)
RECORD_BODY_SIZE_MAX: Final = 8 + 8189 * 128
FILE_VERSION_UPGRADABLE: Final = 1
SYNC_DURATIONS_KEPT: Final = 4096


class WalError(Exception):
    """The log cannot be opened or written; the server must not acknowledge anything."""


@dataclass(frozen=True, slots=True)
class Record:
    clock_ns: int
    operation: int
    body: bytes


def encode_record(clock_ns: int, operation: int, body: bytes | bytearray | memoryview) -> bytes:
    size = len(body)
    assert 0 <= size <= RECORD_BODY_SIZE_MAX
    crc = zlib.crc32(body, zlib.crc32(_CRC_FIELDS.pack(size, clock_ns, operation)))
    return RECORD_HEADER.pack(size, crc, clock_ns, operation) + body


class WriteAheadLog:
    """Owns the data file: an exclusive flock keeps a second server off it."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise WalError(f"data file {path} is in use by another process") from None
        self.size = 0  # Valid bytes; set by recover().
        self.truncated_bytes = 0
        self.upgraded_records = 0
        self._recovered = False

    def recover(self) -> Iterator[Record]:
        """Yields every valid record in order, then truncates a torn/corrupt tail."""
        assert not self._recovered
        file_size = os.fstat(self._fd).st_size
        if file_size < FILE_HEADER.size:
            self._init_header(file_size)
        else:
            head = os.pread(self._fd, FILE_HEADER.size, 0)
            magic, version, _ = FILE_HEADER.unpack(head)
            if magic == FILE_MAGIC and version == FILE_VERSION_UPGRADABLE:
                self._upgrade_v1()
            elif magic != FILE_MAGIC or version != FILE_VERSION:
                raise WalError(f"{self.path} is not a tb_emulator v{FILE_VERSION} data file")
        offset = FILE_HEADER.size
        with open(self._fd, "rb", buffering=1 << 20, closefd=False) as f:
            f.seek(offset)
            while True:
                record, size = self._read_record(f)
                if record is None:
                    break
                offset += size
                yield record
        self.size = offset
        end = os.fstat(self._fd).st_size
        if end > offset:
            self.truncated_bytes = end - offset
            logger.warning(
                "data file %s: torn or corrupt tail at offset %d, truncating %d bytes",
                self.path, offset, end - offset,
            )
            os.ftruncate(self._fd, offset)
            os.fsync(self._fd)
        os.lseek(self._fd, offset, os.SEEK_SET)
        self._recovered = True

    @staticmethod
    def _read_record(
        f: object, body_size_max: int = RECORD_BODY_SIZE_MAX
    ) -> tuple[Record | None, int]:
        read = f.read  # type: ignore[attr-defined]
        head = read(RECORD_HEADER.size)
        if len(head) < RECORD_HEADER.size:
            return None, 0
        size, crc, clock_ns, operation = RECORD_HEADER.unpack(head)
        if size > body_size_max:
            return None, 0
        body = read(size)
        if len(body) < size:
            return None, 0
        if zlib.crc32(body, zlib.crc32(_CRC_FIELDS.pack(size, clock_ns, operation))) != crc:
            return None, 0
        return Record(clock_ns, operation, body), RECORD_HEADER.size + size

    def _upgrade_v1(self) -> None:
        """Rewrites a v1 file as v2: a v1 body is exactly a v2 body with every block present
        minus its (count, mask) head. Records after a torn/corrupt one are dropped, as
        recovery would. The lock moves to the new file before it replaces the old one."""
        temp_path = self.path + ".upgrade"
        temp_fd = os.open(temp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            fcntl.flock(temp_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(temp_fd, FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, 0))
            count = 0
            with open(self._fd, "rb", buffering=1 << 20, closefd=False) as f, \
                    open(temp_fd, "wb", buffering=1 << 20, closefd=False) as out:
                f.seek(FILE_HEADER.size)
                while True:
                    record, _ = self._read_record(f, RECORD_BODY_SIZE_MAX)
                    if record is None:
                        break
                    out.write(encode_record(record.clock_ns, record.operation,
                                            _upgrade_v1_body(record.operation, record.body)))
                    count += 1
            os.fsync(temp_fd)
            os.rename(temp_path, self.path)
            _fsync_directory(self.path)
        except BaseException:
            os.close(temp_fd)
            with contextlib.suppress(OSError):
                os.unlink(temp_path)
            raise
        os.close(self._fd)
        self._fd = temp_fd
        self.upgraded_records = count
        logger.warning("data file %s: upgraded %d records from v1 to v%d",
                       self.path, count, FILE_VERSION)

    def _init_header(self, file_size: int) -> None:
        header = FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, 0)
        existing = os.pread(self._fd, file_size, 0)
        if not header.startswith(existing):
            raise WalError(f"{self.path} is not a tb_emulator data file")
        os.pwrite(self._fd, header, 0)
        os.fsync(self._fd)
        _fsync_directory(self.path)

    def append_sync(self, chunks: list[bytes]) -> float:
        """Writes and fdatasyncs; runs in a worker thread. Raises WalError on any failure.
        Returns how long the write + fdatasync took (s): the disk's share of the latency."""
        assert self._recovered
        data = memoryview(b"".join(chunks))
        started = time.monotonic()
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
            os.fdatasync(self._fd)
        except OSError as e:
            # After a failed fsync the page cache state is unknown: never acknowledge again.
            raise WalError(f"writing {self.path} failed: {e}") from e
        self.size += sum(map(len, chunks))
        return time.monotonic() - started

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _upgrade_v1_body(operation: int, body: bytes) -> bytes:
    codec = wire.CREATE_CODECS.get(operation)
    if codec is None:
        raise WalError(f"unexpected operation {operation} in a v1 log")
    count, rest = divmod(len(body), codec.event_size)
    if rest or count > wire.BATCH_EVENTS_MAX:
        raise WalError(f"v1 record of {len(body)} bytes is not a batch of {codec.event_size}")
    all_blocks = (1 << len(codec.block_sizes)) - 1
    return wire.COLUMNS_HEAD.pack(count, all_blocks) + body


def _fsync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupCommit:
    """Position-ordered durability: `append` returns a log position, `when_durable` runs a
    callback once every byte up to that position is fsynced. Callbacks run in append order."""

    def __init__(self, wal: WriteAheadLog) -> None:
        self._wal = wal
        self.written = 0  # Bytes appended (logical position, relative to start of session).
        self.synced = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        # (position, callback, enqueue time): the oldest one's age is the stall signal.
        self._waiters: collections.deque[tuple[int, Callable[[], None], float]] = \
            collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None
        self.syncs = 0
        self.sync_started: float | None = None  # time.monotonic() of the running write+sync.
        # Recent write+fdatasync durations (s) measured in the thread, for the health summary:
        # the disk's share, apart from the time the event loop took to notice completion.
        self.sync_durations: collections.deque[float] = collections.deque(
            maxlen=SYNC_DURATIONS_KEPT)

    def start(self, on_failure: Callable[[BaseException], None]) -> None:
        self._on_failure = on_failure
        self._task = asyncio.get_running_loop().create_task(self._flusher())
        self._task.add_done_callback(self._flusher_done)

    def _flusher_done(self, task: asyncio.Task[None]) -> None:
        # The flusher only ends when stopped; any other end would leave every later request
        # waiting forever: fail loudly instead (the server stops, a supervisor restarts it).
        if task.cancelled() or self.failure is not None:
            return
        error = task.exception() or WalError("log flusher ended unexpectedly")
        self.failure = error
        logger.critical("log flusher died, stopping: %r", error)
        self._on_failure(error)

    def append(self, record: bytes) -> int:
        if self.failure is not None:
            raise WalError("log is failed") from self.failure
        self._pending.append(record)
        self._pending_bytes += len(record)
        self.written += len(record)
        self._wakeup.set()
        return self.written

    @property
    def backlog_bytes(self) -> int:
        return self._pending_bytes

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def oldest_wait_s(self, now: float) -> float:
        """How long the oldest request not yet durable has been waiting (0: none)."""
        return now - self._waiters[0][2] if self._waiters else 0.0

    def durable_now(self, position: int) -> bool:
        """True when `when_durable(position, ...)` would call back at once."""
        return position <= self.synced and not self._waiters

    def when_durable(self, position: int, callback: Callable[[], None]) -> None:
        if self.durable_now(position):
            callback()
        else:
            self._waiters.append((position, callback, time.monotonic()))

    async def _flusher(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._pending:
                continue
            chunks = self._pending
            self._pending = []
            self._pending_bytes = 0
            position = self.written
            self.sync_started = time.monotonic()
            try:
                sync_s = await asyncio.to_thread(self._wal.append_sync, chunks)
            except asyncio.CancelledError:
                raise  # stop(): not a log failure.
            except BaseException as e:
                self.failure = e
                logger.critical("log write failed, stopping: %s", e)
                self._on_failure(e)
                raise
            finally:
                self.sync_started = None
            self.sync_durations.append(sync_s)
            self.syncs += 1
            self.synced = position
            waiters = self._waiters
            while waiters and waiters[0][0] <= position:
                callback = waiters.popleft()[1]
                try:
                    callback()
                except Exception:
                    # One bad callback must not kill the flusher: every later request
                    # would then wait forever (the server would hang, idle).
                    logger.exception("reply callback failed")

    def poke(self) -> int:
        """Self-check for the health monitor, when a request has waited long while no sync
        runs: resolves waiters already durable and wakes the flusher (it must never be
        needed: returns how many waiters it resolved, which the caller reports)."""
        if self.sync_started is not None or self._task is None or self._task.done():
            return 0
        resolved = 0
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.synced:
            callback = waiters.popleft()[1]
            resolved += 1
            try:
                callback()
            except Exception:
                logger.exception("reply callback failed")
        if self._pending or waiters:
            self._wakeup.set()
        return resolved

    async def drain(self) -> None:
        """Waits until everything appended so far is durable."""
        if self.written <= self.synced:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not done.done():
                done.set_result(None)

        self.when_durable(self.written, wake)
        await done

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # A failed flusher's error was reported (and stopped the server) when it died.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
