"""The HTTP load generator of `walletmig bench api`, run as a process of its own.

Why its own process and a raw client: an httpx client costs more CPU per request than the API
it measures, and in the benchmark's own process it competed for the same core as the direct
path's client and starved the API. Here the requests are pre-built bytes written over a few
HTTP/1.1 keep-alive connections (one request in flight per connection), the answers parsed
just enough (status line, Content-Length), so the CPU per request it costs is small and is
measured apart (`cpu_s` of this process) from the API's.

Protocol: `python -m walletmig.bench_http_load PLAN.json`: it reads the `LoadPlan`, opens its
connections, prints `ready`, waits for a line on stdin (the caller samples the servers' CPU
then), sends the plan's requests and prints the `LoadResult` as one JSON line. Caller c of
`concurrency` sends request i when it is the next one unsent, so the plan's order is the order
requests start.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

REQUESTS_MAX = 1_000_000
CONCURRENCY_MAX = 1000
HEADER_BYTES_MAX = 16 * 1024  # a status line and headers longer than this are refused
BODY_BYTES_MAX = 1024 * 1024
TIMEOUT_S = 60.0
FAILURES_KEPT_MAX = 5


class LoadRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    method: str = Field(pattern=r"^(GET|POST)$")
    path: str = Field(min_length=1, max_length=2048)
    body: str | None = None  # JSON text
    headers: dict[str, str] = {}


class LoadPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    base_url: str
    concurrency: int = Field(ge=1, le=CONCURRENCY_MAX)
    headers: dict[str, str] = {}  # on every request (Authorization)
    requests: list[LoadRequest] = Field(min_length=1, max_length=REQUESTS_MAX)
    verify_tls: bool = True


class LoadResult(BaseModel):
    requests: int
    seconds: float
    latencies_s: list[float]  # sorted
    cpu_s: float  # this process's CPU (user + system) over the timed window
    statuses: dict[str, int]  # status code -> count
    failures: list[str]  # the first few non-200 answers (status and body head)


class _Connection:
    """One keep-alive HTTP/1.1 connection: one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert len(head) <= HEADER_BYTES_MAX, "response headers too long"
        status = int(head[9:12])
        length = -1
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
                break
        # FastAPI answers every response with a Content-Length (no chunked bodies here).
        assert 0 <= length <= BODY_BYTES_MAX, "a response without a usable Content-Length"
        body = await self.reader.readexactly(length) if length else b""
        return status, body


def _encode(plan: LoadPlan, request: LoadRequest, host: str) -> bytes:
    lines = [f"{request.method} {request.path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in {**plan.headers, **request.headers}.items()]
    body = b"" if request.body is None else request.body.encode()
    if request.body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _connect(plan: LoadPlan) -> list[_Connection]:
    url = urlsplit(plan.base_url)
    context: ssl.SSLContext | None = None
    if url.scheme == "https":
        context = ssl.create_default_context()
        if not plan.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    port = url.port or (443 if context else 80)
    assert url.hostname is not None
    opened = [
        await asyncio.open_connection(url.hostname, port, ssl=context)
        for _ in range(plan.concurrency)
    ]
    return [_Connection(r, w) for r, w in opened]


async def run_plan(plan: LoadPlan) -> LoadResult:
    url = urlsplit(plan.base_url)
    prefix = url.path.rstrip("/")
    host = url.netloc
    encoded = [
        _encode(plan, r.model_copy(update={"path": prefix + r.path}), host) for r in plan.requests
    ]
    connections = await _connect(plan)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    failures: list[str] = []
    next_request = 0

    async def caller(connection: _Connection) -> None:
        nonlocal next_request
        while next_request < len(encoded):
            request = encoded[next_request]
            next_request += 1
            started = time.perf_counter()
            async with asyncio.timeout(TIMEOUT_S):  # a timer handle, not a task per request
                status, body = await connection.exchange(request)
            latencies.append(time.perf_counter() - started)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status != 200 and len(failures) < FAILURES_KEPT_MAX:
                failures.append(f"{status} {body[:300].decode(errors='replace')}")

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(*(caller(c) for c in connections))
    finally:
        seconds = time.perf_counter() - wall0
        cpu_s = time.process_time() - cpu0
        for connection in connections:
            connection.writer.close()
    latencies.sort()
    return LoadResult(
        requests=len(latencies), seconds=seconds, latencies_s=latencies, cpu_s=cpu_s,
        statuses=statuses, failures=failures,
    )  # fmt: skip


def main() -> int:
    assert len(sys.argv) == 2, "usage: python -m walletmig.bench_http_load PLAN.json"
    with open(sys.argv[1], "rb") as plan_file:
        plan = LoadPlan.model_validate_json(plan_file.read())
    try:
        import uvloop
    except ImportError:  # the plain loop works too, at a little more CPU per request
        result = asyncio.run(run_plan(plan))
    else:
        result = uvloop.run(run_plan(plan))
    sys.stdout.write(result.model_dump_json() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
