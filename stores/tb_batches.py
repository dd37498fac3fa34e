"""TigerBeetle batches cut to the cluster's request limit: the one rule every call site sends by.

A cluster refuses (its client raises `TooMuchDataError` before sending) a create of more than
`create_batch_max` events or a lookup of more than `lookup_batch_max` ids under its request
limit (walletcore.tb_limits: 8189 / 8189 at 1 MiB, 253 / 2031 at 32 KiB, 29 / 239 at 4 KiB).
`BatchedClient` wraps the connected client with the `BatchLimits` of the limit it reports
(`request_limit_bytes()`: what the emulator announced, the configured TB_REQUEST_LIMIT_BYTES for
a real cluster) and sends every create and lookup in requests of at most that many, in order.
stores.bundle.make_stores hands out only this client, so no caller assumes 8189:

- creates: a linked chain (events flagged LINKED up to and including the first one without
  the flag) is never split across requests: TigerBeetle applies a chain all or nothing only
  inside one request. A chain longer than the create max can never be sent (asserted; the
  platform's chains are two transfers long).
- lookups: ids in chunks; the rows found come back in chunk order, as one request would.
- queries (`query_*`, `get_account_*`) pass through: their one filter always fits, and their
  `limit` is bound by the reply (tb_limits.QUERY_LIMIT_MAX), not by the request limit.

Every request is timed (observability.metrics: walletmig_tigerbeetle_request_seconds, errors,
in flight by operation, walletmig_tigerbeetle_up).

Chunks go one after the other: creates must keep their order (imported events' timestamps,
a credit before the debit it funds). Results are the concatenation of the chunks' results,
exactly what one request would answer.

A `TooMuchDataError` that still happens means the cluster's limit is smaller than the one the
batches were cut for (a real cluster with TB_REQUEST_LIMIT_BYTES set too high): it becomes
`ConfigurationError` naming the setting, non-retryable, instead of an activity retried forever.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import tigerbeetle as tb

from observability.metrics import timed_tigerbeetle
from stores.tb_errors import too_much_data_error
from stores.tigerbeetle_client import RequestTimeoutError, TigerBeetleClient
from walletcore.tb_limits import BatchLimits

E = TypeVar("E", tb.Account, tb.Transfer)
R = TypeVar("R")
T = TypeVar("T")

LINKED = 1  # AccountFlags.LINKED == TransferFlags.LINKED: bit 0 of both
assert int(tb.AccountFlags.LINKED) == int(tb.TransferFlags.LINKED) == LINKED

# A request that got no answer at all: the cluster is unreachable from this process.
UNREACHABLE: tuple[type[BaseException], ...] = (RequestTimeoutError, ConnectionError)

__all__ = ["BatchedClient", "batched", "chunks", "linked_chunks"]


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """`items` in order, in runs of at most `size` (none for no items)."""
    assert size >= 1
    return [items[start:start + size] for start in range(0, len(items), size)]


def linked_chunks(events: Sequence[E], size: int) -> list[Sequence[E]]:
    """`events` in order, in runs of at most `size` events, never splitting a linked chain.
    An open chain at the end (its last event LINKED) stays whole too: TigerBeetle answers
    LINKED_EVENT_CHAIN_OPEN for it, as for one request."""
    assert size >= 1
    if len(events) <= size:
        return [events] if events else []
    out: list[Sequence[E]] = []
    start = 0  # of the chunk being filled
    chain_start = 0  # of the chain being read
    for index, event in enumerate(events):
        if int(event.flags) & LINKED and index + 1 < len(events):
            continue  # the chain goes on
        chain_end = index + 1
        assert chain_end - chain_start <= size, (
            f"a linked chain of {chain_end - chain_start} events does not fit one request "
            f"of {size}")
        if chain_end - start > size:  # this chain starts the next chunk
            out.append(events[start:chain_start])
            start = chain_start
        chain_start = chain_end
    out.append(events[start:])
    assert sum(len(c) for c in out) == len(events) and all(0 < len(c) <= size for c in out)
    return out


class BatchedClient:
    """A TigerBeetleClient whose creates and lookups never exceed the cluster's request limit
    (see the module docstring). `limits`: the BatchLimits of the limit `client` reports."""

    def __init__(self, client: TigerBeetleClient, limits: BatchLimits) -> None:
        assert not isinstance(client, BatchedClient), "already batched"
        self.client = client
        self.limits = limits

    async def _send(self, operation: str, events: int, call: Awaitable[R]) -> R:
        try:  # every request is timed here: latency, errors, in flight by operation
            return await timed_tigerbeetle(operation, call, UNREACHABLE)
        except tb.TooMuchDataError as exc:
            raise too_much_data_error(
                self.limits.request_limit_bytes, operation, events) from exc

    async def _creates(
        self, operation: str, events: Sequence[E], create: Callable[[list[E]], Awaitable[list[R]]]
    ) -> list[R]:
        results: list[R] = []
        for chunk in linked_chunks(events, self.limits.create_batch_max):
            found = await self._send(operation, len(chunk), create(list(chunk)))
            assert len(found) == len(chunk)
            results.extend(found)
        return results

    async def _lookups(
        self, operation: str, ids: Sequence[int], lookup: Callable[[list[int]], Awaitable[list[R]]]
    ) -> list[R]:
        rows: list[R] = []
        for chunk in chunks(ids, self.limits.lookup_batch_max):
            rows.extend(await self._send(operation, len(chunk), lookup(list(chunk))))
        return rows

    async def create_accounts(self, accounts: list[tb.Account]) -> list[tb.CreateAccountResult]:
        return await self._creates("create_accounts", accounts, self.client.create_accounts)

    async def create_transfers(
        self, transfers: list[tb.Transfer]
    ) -> list[tb.CreateTransferResult]:
        return await self._creates("create_transfers", transfers, self.client.create_transfers)

    async def lookup_accounts(self, accounts: list[int]) -> list[tb.Account]:
        return await self._lookups("lookup_accounts", accounts, self.client.lookup_accounts)

    async def lookup_transfers(self, transfers: list[int]) -> list[tb.Transfer]:
        return await self._lookups("lookup_transfers", transfers, self.client.lookup_transfers)

    async def get_account_transfers(self, filter: tb.AccountFilter) -> list[tb.Transfer]:
        return await self._send(
            "get_account_transfers", 1, self.client.get_account_transfers(filter))

    async def get_account_balances(self, filter: tb.AccountFilter) -> list[tb.AccountBalance]:
        return await self._send(
            "get_account_balances", 1, self.client.get_account_balances(filter))

    async def query_accounts(self, query_filter: tb.QueryFilter) -> list[tb.Account]:
        return await self._send("query_accounts", 1, self.client.query_accounts(query_filter))

    async def query_transfers(self, query_filter: tb.QueryFilter) -> list[tb.Transfer]:
        return await self._send("query_transfers", 1, self.client.query_transfers(query_filter))

    async def request_limit_bytes(self) -> int:
        return self.limits.request_limit_bytes

    async def close(self) -> None:
        await self.client.close()


def batched(client: TigerBeetleClient, limits: BatchLimits | None = None) -> BatchedClient:
    """`client` cut to `limits` (default: the default 1 MiB limit's). A client batched already
    is returned as it is: it must have been cut to the same limits."""
    if isinstance(client, BatchedClient):
        assert limits is None or limits == client.limits, (limits, client.limits)
        return client
    return BatchedClient(client, limits or BatchLimits())
