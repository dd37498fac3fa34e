"""Account lookups of concurrent balance reads sent to TigerBeetle as one request.

The gateway serves many callers at once; each balance read TigerBeetle answers used to send a
`lookup_accounts` of one id: the client's encode, send, reply and decode, a timed request,
and a request the cluster (the emulator: a process of its own) parses, per read. A process
that answers many readers pays that per batch instead: `CoalescedLookups` is the bundle's
BatchedClient whose `lookup_accounts` calls made in one pass of the event loop (the requests
uvicorn read in that pass reach their TigerBeetle read together) go as one request of every
id they asked, cut to the cluster's request limit as before; each caller gets the rows of its
own ids, in its order, as its own request would have answered (an id not found: no row).

What it changes: a read waits at most one more loop pass (the batch leaves from a task
scheduled by the first lookup of the pass); a failed request fails every lookup of its batch
with the same error (each would have failed alike: one cluster, one connection); a caller
that is cancelled (its read's timeout) leaves the others' request running. A lone read pays
a future and a task more (~20 us) than before. Only lookups are coalesced: creates keep their
order and their own requests (stores.tb_batches).
"""

from __future__ import annotations

import asyncio

import tigerbeetle as tb

from stores.tb_batches import BatchedClient, batched
from stores.tigerbeetle_client import TigerBeetleClient
from walletcore.tb_limits import BatchLimits

PENDING_MAX = 4096  # lookups waiting for one batch; past it a lookup goes alone (bounded)


class CoalescedLookups(BatchedClient):
    """`client` cut to `limits` (stores.tb_batches.batched), lookup_accounts coalesced per
    loop pass."""

    def __init__(self, client: TigerBeetleClient, limits: BatchLimits | None = None) -> None:
        cut = batched(client, limits)
        super().__init__(cut.client, cut.limits)
        self._pending: list[tuple[list[int], asyncio.Future[list[tb.Account]]]] = []
        self._sending: set[asyncio.Task[None]] = set()  # referenced until done
        self.requests = 0  # observability and tests: batches sent
        self.lookups = 0  # lookups answered through a batch

    async def lookup_accounts(self, accounts: list[int]) -> list[tb.Account]:
        if not accounts or len(self._pending) >= PENDING_MAX:
            return await super().lookup_accounts(accounts)
        future: asyncio.Future[list[tb.Account]] = asyncio.get_running_loop().create_future()
        if not self._pending:  # the first of this pass: its task sends the batch next pass
            task = asyncio.ensure_future(self._send_pending())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        self._pending.append((list(accounts), future))
        # A cancelled caller cancels its own future only; _send_pending skips it.
        return await future

    async def _send_pending(self) -> None:
        batch, self._pending = self._pending, []
        assert 0 < len(batch) <= PENDING_MAX
        ids = list(dict.fromkeys(i for asked, _ in batch for i in asked))  # once, in order
        try:
            rows = await super().lookup_accounts(ids)
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise  # cancellation (shutdown): the callers got it too
            return
        self.requests += 1
        self.lookups += len(batch)
        by_id = {row.id: row for row in rows}
        for asked, future in batch:
            if not future.done():
                future.set_result([by_id[i] for i in asked if i in by_id])
