"""uvicorn's httptools protocol with each response's head and body sent as one write.

uvicorn writes a response in two `transport.write` calls: the status line and headers when the
application sends `http.response.start`, the body when it sends `http.response.body`. On an
idle socket each write is a `send` system call and a TCP segment of its own, and the client
wakes for each: the second write was ~10 % of the API process's CPU per balance read (py-spy:
uvicorn's `RequestResponseCycle.send` and the loop's socket work) and costs the load generator
a second read. `HeadHoldingTransport` keeps the head back until the next write of the same
connection (uvicorn always sends one for the body, an empty one too) and sends both as one.
Nothing is held longer than one pass of the event loop (a `call_soon` flush), nor past
`close()`: a streamed body's head, a `100 Continue` or an error answer still leaves at once.
Only the writes' grouping changes: same bytes, same order, same flow control (everything else
is the real transport's).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HELD_BYTES_MAX = 64 * 1024  # a head larger than this is written at once (uvicorn's are ~200 B)


class HeadHoldingTransport:
    """A transport proxy: a write that ends a response head ("\\r\\n\\r\\n") is held and sent
    with the next write, or at the next loop pass, or before close, whichever comes first."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + bytes(data))
            return
        if (isinstance(data, bytes) and data.endswith(b"\r\n\r\n")
                and len(data) <= HELD_BYTES_MAX):  # fmt: skip
            self._held = data
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else: the real transport's
        return getattr(self._transport, name)


class HeadHoldingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a HeadHoldingTransport (`uvicorn.Config(http=...)`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        held: Any = HeadHoldingTransport(transport, self.loop)
        super().connection_made(held)
