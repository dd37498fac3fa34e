"""One way to get a TigerBeetle client: the emulator adapter or the real client, same surface.

`connect_tigerbeetle("tbemu://host:port")` -> emulator adapter; anything else (`3000`,
`a:b,c:d`, `tigerbeetle://a:b,c:d`) -> the real `tigerbeetle.ClientAsync`, wrapped so every call
has a timeout. Application code types against `TigerBeetleClient` and never knows which it has.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

import tigerbeetle as tb

from tb_emulator.client import SCHEME as EMULATOR_SCHEME
from tb_emulator.client import EmulatorClientAsync, RequestTimeoutError
from walletcore import tb_limits

REAL_SCHEME: Final = "tigerbeetle://"
TIMEOUT_S_MAX: Final = 300.0
ABANDONED_MAX: Final = 10_000

R = TypeVar("R")

__all__ = [
    "RequestTimeoutError",
    "TigerBeetleClient",
    "TimeoutClientAsync",
    "connect_tigerbeetle",
    "is_emulator_address",
]


@runtime_checkable
class TigerBeetleClient(Protocol):
    """The async surface of `tigerbeetle.ClientAsync` that application code may use."""

    async def create_accounts(self, accounts: list[tb.Account]) -> list[tb.CreateAccountResult]:
        ...

    async def create_transfers(
        self, transfers: list[tb.Transfer]
    ) -> list[tb.CreateTransferResult]: ...

    async def lookup_accounts(self, accounts: list[int]) -> list[tb.Account]: ...

    async def lookup_transfers(self, transfers: list[int]) -> list[tb.Transfer]: ...

    async def get_account_transfers(self, filter: tb.AccountFilter) -> list[tb.Transfer]: ...

    async def get_account_balances(self, filter: tb.AccountFilter) -> list[tb.AccountBalance]: ...

    async def query_accounts(self, query_filter: tb.QueryFilter) -> list[tb.Account]: ...

    async def query_transfers(self, query_filter: tb.QueryFilter) -> list[tb.Transfer]: ...

    async def request_limit_bytes(self) -> int:
        """The cluster's request limit: what it announced if the client exposes that (the
        emulator's adapter), else the configured TB_REQUEST_LIMIT_BYTES (the real Python client
        keeps the announced one to itself). Size batches with walletcore.tb_limits."""
        ...

    async def close(self) -> None: ...


class TimeoutClientAsync:
    """The real `tigerbeetle.ClientAsync` with a per-call timeout: the real client retries
    forever while the cluster is unreachable, which would hang a workflow activity."""

    def __init__(
        self, client: tb.ClientAsync, addresses: str, timeout_s: float,
        request_limit_bytes: int = tb_limits.REQUEST_LIMIT_BYTES_DEFAULT,
    ) -> None:
        assert (tb_limits.REQUEST_LIMIT_BYTES_MIN <= request_limit_bytes
                <= tb_limits.REQUEST_LIMIT_BYTES_MAX)
        self._client = client
        self._addresses = addresses
        self.timeout_s = timeout_s
        # Configured: tigerbeetle 0.17.9's Python client does not expose the limit the cluster
        # announced at register (nor does libtb_client export it).
        self._request_limit_bytes = request_limit_bytes
        # Timed-out requests keep running: cancelling one inside the real client leaves its
        # packet registered and makes close() fail its own assertion. close() completes them.
        self._abandoned: set[asyncio.Future[Any]] = set()

    async def _call(self, name: str, awaitable: Awaitable[R]) -> R:
        request = asyncio.ensure_future(awaitable)
        try:
            return await asyncio.wait_for(asyncio.shield(request), self.timeout_s)
        except TimeoutError:
            self._abandon(request)
            raise RequestTimeoutError(
                f"tigerbeetle {name} got no reply within {self.timeout_s} s "
                f"from {self._addresses}") from None
        except asyncio.CancelledError:
            self._abandon(request)
            raise

    def _abandon(self, request: asyncio.Future[Any]) -> None:
        if len(self._abandoned) >= ABANDONED_MAX:
            raise RuntimeError("too many timed-out TigerBeetle requests still outstanding")
        self._abandoned.add(request)
        request.add_done_callback(self._forget)

    def _forget(self, request: asyncio.Future[Any]) -> None:
        self._abandoned.discard(request)
        if not request.cancelled():
            request.exception()  # Retrieved: a late failure is expected, not worth a warning.

    async def create_accounts(self, accounts: list[tb.Account]) -> list[tb.CreateAccountResult]:
        return await self._call("create_accounts", self._client.create_accounts(accounts))

    async def create_transfers(
        self, transfers: list[tb.Transfer]
    ) -> list[tb.CreateTransferResult]:
        return await self._call("create_transfers", self._client.create_transfers(transfers))

    async def lookup_accounts(self, accounts: list[int]) -> list[tb.Account]:
        return await self._call("lookup_accounts", self._client.lookup_accounts(accounts))

    async def lookup_transfers(self, transfers: list[int]) -> list[tb.Transfer]:
        return await self._call("lookup_transfers", self._client.lookup_transfers(transfers))

    async def get_account_transfers(self, filter: tb.AccountFilter) -> list[tb.Transfer]:
        return await self._call(
            "get_account_transfers", self._client.get_account_transfers(filter))

    async def get_account_balances(self, filter: tb.AccountFilter) -> list[tb.AccountBalance]:
        return await self._call(
            "get_account_balances", self._client.get_account_balances(filter))

    async def query_accounts(self, query_filter: tb.QueryFilter) -> list[tb.Account]:
        return await self._call("query_accounts", self._client.query_accounts(query_filter))

    async def query_transfers(self, query_filter: tb.QueryFilter) -> list[tb.Transfer]:
        return await self._call("query_transfers", self._client.query_transfers(query_filter))

    async def request_limit_bytes(self) -> int:
        return self._request_limit_bytes

    async def close(self) -> None:
        abandoned = list(self._abandoned)
        try:
            await self._client.close()  # Completes every outstanding packet.
        except AssertionError:
            if not abandoned:
                raise
        await asyncio.gather(*abandoned, return_exceptions=True)

    async def __aenter__(self) -> TimeoutClientAsync:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def is_emulator_address(addresses: str) -> bool:
    return addresses.strip().startswith(EMULATOR_SCHEME)


def connect_tigerbeetle(
    addresses: str, cluster_id: int = 0, timeout_s: float = 10,
    request_limit_bytes: int = tb_limits.REQUEST_LIMIT_BYTES_DEFAULT,
) -> TigerBeetleClient:
    """Creates the client (both kinds connect lazily, on the first request).
    `request_limit_bytes` (TB_REQUEST_LIMIT_BYTES) is what a real cluster's client reports;
    the emulator's adapter reports what the emulator announces instead."""
    if not 0 < timeout_s <= TIMEOUT_S_MAX:
        raise ValueError(f"timeout_s must be in (0, {TIMEOUT_S_MAX}], got {timeout_s}")
    if not (tb_limits.REQUEST_LIMIT_BYTES_MIN <= request_limit_bytes
            <= tb_limits.REQUEST_LIMIT_BYTES_MAX):
        raise ValueError(
            f"{tb_limits.REQUEST_LIMIT_SETTING} must be in {tb_limits.REQUEST_LIMIT_BYTES_MIN}.."
            f"{tb_limits.REQUEST_LIMIT_BYTES_MAX}, got {request_limit_bytes}")
    text = addresses.strip()
    if is_emulator_address(text):
        return EmulatorClientAsync(cluster_id, text, timeout_s=timeout_s)
    if text.startswith(REAL_SCHEME):
        text = text[len(REAL_SCHEME):]
    if not text:
        raise ValueError("TigerBeetle addresses are empty")
    return TimeoutClientAsync(tb.ClientAsync(cluster_id, text), text, timeout_s,
                              request_limit_bytes)
