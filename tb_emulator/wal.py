"""Append-only, checksummed request log of the emulator (its only durable state).

File: 16-byte header (magic, version), then records:
    body_size u32 | crc32 u32 | clock_ns u64 | operation u32 | body
`crc32` covers body_size, clock_ns, operation and the body, so a torn or corrupt record (or a
garbage length) is detected. Recovery replays the longest valid prefix and truncates the rest:
a record is either replayed whole or not at all.

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
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

logger = logging.getLogger("tb_emulator.wal")

FILE_MAGIC: Final = b"TBEMUWAL"
FILE_VERSION: Final = 2  # Bumped with the wire format of the logged request bodies.
FILE_HEADER = struct.Struct("<8sII")  # magic, version, reserved
RECORD_HEADER = struct.Struct("<IIQI")  # body_size, crc32, clock_ns, operation
_CRC_FIELDS = struct.Struct("<IQI")  # body_size, clock_ns, operation (what the crc covers)
RECORD_BODY_SIZE_MAX: Final = 8 + 8189 * 128


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
            if magic != FILE_MAGIC or version != FILE_VERSION:
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
    def _read_record(f: object) -> tuple[Record | None, int]:
        read = f.read  # type: ignore[attr-defined]
        head = read(RECORD_HEADER.size)
        if len(head) < RECORD_HEADER.size:
            return None, 0
        size, crc, clock_ns, operation = RECORD_HEADER.unpack(head)
        if size > RECORD_BODY_SIZE_MAX:
            return None, 0
        body = read(size)
        if len(body) < size:
            return None, 0
        if zlib.crc32(body, zlib.crc32(_CRC_FIELDS.pack(size, clock_ns, operation))) != crc:
            return None, 0
        return Record(clock_ns, operation, body), RECORD_HEADER.size + size

    def _init_header(self, file_size: int) -> None:
        header = FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, 0)
        existing = os.pread(self._fd, file_size, 0)
        if not header.startswith(existing):
            raise WalError(f"{self.path} is not a tb_emulator data file")
        os.pwrite(self._fd, header, 0)
        os.fsync(self._fd)
        _fsync_directory(self.path)

    def append_sync(self, chunks: list[bytes]) -> None:
        """Writes and fdatasyncs; runs in a worker thread. Raises WalError on any failure."""
        assert self._recovered
        data = memoryview(b"".join(chunks))
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
            os.fdatasync(self._fd)
        except OSError as e:
            # After a failed fsync the page cache state is unknown: never acknowledge again.
            raise WalError(f"writing {self.path} failed: {e}") from e
        self.size += sum(map(len, chunks))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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
        self._waiters: collections.deque[tuple[int, Callable[[], None]]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None
        self.syncs = 0

    def start(self, on_failure: Callable[[BaseException], None]) -> None:
        self._on_failure = on_failure
        self._task = asyncio.get_running_loop().create_task(self._flusher())

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

    def when_durable(self, position: int, callback: Callable[[], None]) -> None:
        if position <= self.synced and not self._waiters:
            callback()
        else:
            self._waiters.append((position, callback))

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
            try:
                await asyncio.to_thread(self._wal.append_sync, chunks)
            except BaseException as e:
                self.failure = e
                logger.critical("log write failed, stopping: %s", e)
                self._on_failure(e)
                raise
            self.syncs += 1
            self.synced = position
            waiters = self._waiters
            while waiters and waiters[0][0] <= position:
                waiters.popleft()[1]()

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
            with contextlib.suppress(asyncio.CancelledError, WalError):
                await self._task
            self._task = None
