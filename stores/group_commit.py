"""Group commit: writes that arrive while a commit is in flight share the next transaction.

Why (issue 18): one legacy write is one MongoDB transaction, and SecantusDB (one Python
process, --sync-on-commit) spends 1.9-2.5 ms of CPU per transaction (its begin, its commit and
the commit's fsync) on top of each statement's own cost. Under concurrency those per-
transaction costs are most of what the server does. Here the first write goes at once, alone
(zero added latency at one caller); while it is in flight, the writes that arrive are queued,
and when it is done they go together in ONE transaction (the owner's `commit_group`: one
bulkWrite, one commit), while the next arrivals queue behind that one, and so on.

All-or-nothing: `commit_group` commits every entry or none. When it does not (a compare-and-
swap that no longer matches, a duplicate transaction id, any error), each waiter is told so
and writes its entry alone, exactly as it would without the committer, so every caller gets
the result or the exception it gets today.

Order: at most one entry per key (wallet) in a group. The owner serializes each wallet's
writes before they reach the committer (LegacyStore's per-wallet locks, the wallet workflow),
so two entries of one key never meet there in production; if they do (a store built with
serialize_local=False), the later one waits for a later group, in arrival order.

Bounded: at most `ops_max` entries and about `bytes_max` bytes a group; one group in flight
per committer; the queue holds at most one entry per concurrent caller (the callers are the
worker's bounded activity slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

GROUP_OPS_MAX = 64  # entries one group transaction carries
# Bytes of the documents one group writes: far below MongoDB's 48 MB bulkWrite message and
# 16 MB oplog entry, and it bounds how long one transaction holds the server.
GROUP_BYTES_MAX = 1 << 20

E = TypeVar("E")


@dataclass
class _Waiter(Generic[E]):
    entry: E
    key: str
    size: int
    # True: committed in a group; False: the group did not commit, write it alone.
    done: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommitter(Generic[E]):
    """One in-flight commit at a time; arrivals meanwhile go together in the next one."""

    def __init__(
        self,
        commit_group: Callable[[list[E]], Awaitable[bool]],
        *,
        size_of: Callable[[E], int] | None = None,
        ops_max: int = GROUP_OPS_MAX,
        bytes_max: int = GROUP_BYTES_MAX,
    ) -> None:
        """`commit_group(entries)`: write them all in one transaction; True iff committed
        (False or an exception: nothing was written, as far as the caller can tell).
        `size_of(entry)`: its bytes, asked only of an entry that queues (a write that goes
        alone at once, the usual one at low concurrency, never pays for it)."""
        assert 1 < ops_max <= 10_000
        assert 0 < bytes_max <= 16 << 20
        self._commit_group = commit_group
        self._size_of = size_of
        self._ops_max = ops_max
        self._bytes_max = bytes_max
        self._busy = False  # a commit (alone or a group) is in flight
        self._queue: deque[_Waiter[E]] = deque()
        self._task: asyncio.Task[None] | None = None  # the group in flight (kept referenced)
        self.enabled = True  # False: every entry goes alone at once (WALLETMIG_..._GROUP_COMMIT)
        # Observability (and the tests' counts): entries that went alone, groups committed and
        # the entries they carried, groups that failed (their entries then went alone).
        self.alone = 0
        self.groups = 0
        self.grouped = 0
        self.groups_failed = 0

    @property
    def queued(self) -> int:
        """Entries waiting for the next group."""
        return len(self._queue)

    @contextlib.asynccontextmanager
    async def turn(self, entry: E, *, key: str, size: int | None = None
                   ) -> AsyncIterator[bool]:
        """Yields True: `entry` was committed in a group (nothing left to do). False: write it
        alone now, inside the block (the committer counts it as the commit in flight when it
        took the free lane: arrivals queue behind it). `size`: its bytes (default: size_of)."""
        assert size is None or size >= 0
        if not self.enabled:
            yield False
            return
        if not self._busy:
            assert not self._queue, "a queue without a commit in flight"
            self._busy = True
            self.alone += 1
            try:
                yield False
            finally:
                self._release()
            return
        if size is None:
            assert self._size_of is not None, "a size, or size_of to ask"
            size = self._size_of(entry)
        waiter = _Waiter(entry, key, size)
        self._queue.append(waiter)
        try:
            committed = await waiter.done
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._queue.remove(waiter)  # not taken by a group yet: gone from the queue
            raise
        yield committed

    def _release(self) -> None:
        """The commit in flight is done: the queued entries' group goes next (lane kept)."""
        assert self._busy
        if not self._queue:
            self._busy = False
            return
        group = self._take()
        assert group, "the queue's head always fits an empty group"
        self._task = asyncio.create_task(self._run(group))

    def _take(self) -> list[_Waiter[E]]:
        """The next group in arrival order: bounded, one entry per key (a later entry of a key
        stays queued, in order, for a later group)."""
        taken: list[_Waiter[E]] = []
        keys: set[str] = set()
        size = 0
        kept: deque[_Waiter[E]] = deque()
        for waiter in self._queue:
            fits = not taken or (len(taken) < self._ops_max
                                 and size + waiter.size <= self._bytes_max)
            if fits and waiter.key not in keys:
                taken.append(waiter)
                keys.add(waiter.key)
                size += waiter.size
            else:
                kept.append(waiter)
        self._queue = kept
        return taken

    async def _run(self, group: list[_Waiter[E]]) -> None:
        committed = False
        try:
            committed = await self._commit_group([w.entry for w in group])
        except Exception:  # the waiters write alone and meet the error themselves
            log.debug("group of %d not committed", len(group), exc_info=True)
        except BaseException:  # cancelled (shutdown): every waiter is cancelled too
            for w in (*group, *self._queue):
                w.done.cancel()
            self._queue.clear()
            self._busy = False
            raise
        if committed:
            self.groups += 1
            self.grouped += len(group)
        else:
            self.groups_failed += 1
        for w in group:
            if not w.done.done():  # a waiter cancelled meanwhile has no one to tell
                w.done.set_result(committed)
        self._release()
