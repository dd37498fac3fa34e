"""`create_app(settings)`: the FastAPI application of the HTTP gateway.

Middleware, outermost first: the request log, the metrics, the body size limit; then
FastAPI's routing with the problem+json handlers. `/metrics` serves the process's Prometheus
metrics (request counts and latency by operationId among them). The lifespan opens the
process's clients (gateway.state) and tunes the garbage collector while serving (serving_gc).
`walletmig api` logs through configure_logging (stderr, written once per event-loop pass:
PassBufferedStreamHandler). The hot reads (gateway.fastpath.LeanRoute) skip the
routing and the middleware layers (their middleware are called inline), not their work.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Response
from fastapi.telemetry import TelemetryConfig
from pymongo.errors import PyMongoError
from redis.exceptions import RedisError
from temporalio.exceptions import TemporalError

from gateway.fastpath import GatewayApp
from gateway.middleware import BodySizeLimit, RequestLog
from gateway.openapi import DESCRIPTION, TITLE, VERSION, build_openapi
from gateway.problems import install_problem_handlers
from gateway.routers import ROUTERS
from gateway.settings import ApiSettings
from gateway.state import open_state
from observability.exposition import RequestMetrics, metrics_payload

# Client exceptions that may mean "a dependency is down" (gateway.problems.dependency_of
# decides; anything else they raise is a 500 like any bug).
DEPENDENCY_ERRORS: tuple[type[Exception], ...] = (
    PyMongoError, RedisError, TemporalError, RuntimeError,
)  # fmt: skip


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVEL_ENV = "WALLETMIG_API_LOG_LEVEL"  # set by `walletmig api` for its worker processes

# The collector's first threshold while serving (CPython's default: 700). See serving_gc.
GC_GEN0_THRESHOLD = 7000

NO_NATIVE_TELEMETRY: TelemetryConfig = {
    "tracing": False, "metrics": False, "logs": False, "operation_spans": False,
}  # fmt: skip


def create_app(settings: ApiSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_state(settings) as state:
            app.state.gateway = state
            with serving_gc():
                yield

    app = GatewayApp(
        title=TITLE, version=VERSION, description=DESCRIPTION, lifespan=lifespan,
        openapi_url="/openapi.json", docs_url=None, redoc_url=None,
        # FastAPI's native OpenTelemetry wrapper ran on every request (a span, a histogram,
        # ~1.5 % of a balance read's CPU) though nothing here exports OpenTelemetry: the
        # gateway's own Prometheus metrics (RequestMetrics) and access log are its telemetry.
        telemetry=NO_NATIVE_TELEMETRY,
    )  # fmt: skip
    for router in ROUTERS:
        app.include_router(router)
    install_problem_handlers(app, DEPENDENCY_ERRORS)
    app.add_middleware(BodySizeLimit, max_bytes=settings.body_max_bytes)
    app.add_middleware(RequestMetrics)  # requests by operationId (observability)
    app.add_middleware(RequestLog)  # added last: outermost, so it sees every answer

    @app.get("/metrics", include_in_schema=False)  # Prometheus scrape (not in the OpenAPI)
    def metrics() -> Response:
        body, content_type = metrics_payload()
        return Response(body, media_type=content_type)

    def openapi() -> dict[str, Any]:
        return build_openapi(app)

    app.openapi = openapi  # type: ignore[method-assign]
    # Last: the hot reads (LeanRoutes) are answered in front of the routing as raw ASGI, with
    # the same middleware (inline) and handlers as above (gateway.fastpath).
    if settings.raw_reads:
        app.enable_fast_routes()
    return app


@contextlib.contextmanager
def serving_gc() -> Iterator[None]:
    """The garbage collector tuned for serving, restored after (an in-process app too).

    Measured in the API process under `walletmig bench api`'s TigerBeetle reads (gc.callbacks
    timing, session 11): ~11 us of collection per read, ~5 % of its CPU. Two causes:
    - full collections traversed every object built at start-up (FastAPI's routes, pydantic's
      schemas, the clients: ~120,000 objects, ~60-80 ms per collection, a few per 10,000
      reads): `gc.freeze()` once started moves them to the permanent generation;
    - the youngest generation was collected every 700 net allocations (each request's
      in-flight objects, a TigerBeetle batch's rows, the read observations buffered for
      their flush), ~650 collections per 30,000 reads at ~0.16 ms each; with 7000, 9
      collections of ~2 ms. What survives is the same; cyclic garbage is found a little
      later (at most GC_GEN0_THRESHOLD allocations more: bounded memory).
    Together: ~0.6 us of collection per read."""
    gc.collect()  # start-up's own garbage is not frozen with the rest
    gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


class SecondCachedFormatter(logging.Formatter):
    """logging.Formatter with `asctime` formatted once per second, not once per line: the
    access log writes a line per request, and time.localtime + strftime per line (glibc's
    localtime re-checks the time zone file each call) was ~5 % of a balance read's CPU in
    the API process (py-spy, session 7). Same text as the default formatTime (tested)."""

    _second: int = -1
    _text: str = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:  # a race between threads only formats the second twice
            self._text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        assert self.default_msec_format is not None
        return self.default_msec_format % (self._text, record.msecs)


class PassBufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """logging.StreamHandler writing its lines once per event-loop pass, not once per record.

    A StreamHandler writes and flushes each record (a `write` system call per access-log
    line, with its lock taken twice and the stream's flush). Here each record is formatted
    at once (the same text, the same order) and kept; the lines kept are written in one
    `write` + `flush` at the end of the event-loop pass that logged them (`call_soon`), or at
    once when LINES_MAX are kept, or when emitted outside a running loop (another thread, a
    CLI), or at `flush` (logging.shutdown calls it, then `close`, at exit, uvicorn's SIGTERM
    included; `close` alone writes nothing). So a line is never later than one loop pass, and
    a process killed outright (SIGKILL, a segfault) loses at most the lines of the pass it was
    in: <= LINES_MAX."""

    LINES_MAX = 256

    def __init__(self) -> None:
        super().__init__()
        self._lines: list[str] = []
        self._last: logging.LogRecord | None = None  # for handleError when a write fails
        self._scheduled: asyncio.AbstractEventLoop | None = None  # the loop its flush waits on

    def emit(self, record: logging.LogRecord) -> None:
        """Called with the handler's lock held (Handler.handle)."""
        try:
            self._lines.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        self._last = record
        if len(self._lines) >= self.LINES_MAX:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: no pass to wait for
            self.flush()
            return
        if self._scheduled is not loop:  # (a flush scheduled on a loop since stopped: ignored)
            loop.call_soon(self.flush)
            self._scheduled = loop

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # an RLock: emit may hold it already
            self._scheduled = None
            if not self._lines:
                super().flush()
                return
            text = self.terminator.join(self._lines) + self.terminator
            self._lines.clear()
            try:
                self.stream.write(text)
                super().flush()
            except Exception:
                if self._last is not None:
                    self.handleError(self._last)

    def close(self) -> None:
        """The held lines first: StreamHandler.close writes nothing (logging.shutdown and
        dictConfig flush before they close, a direct close would lose up to LINES_MAX)."""
        self.flush()
        super().close()


def configure_logging(level: str) -> None:
    """The API process's logging: basicConfig's stderr handler (PassBufferedStreamHandler),
    LOG_FORMAT second-cached.
    LOG_FORMAT names no thread or process, so LogRecord skips looking them up (a call to
    threading and multiprocessing per access-log line), nor where it was called from (the
    logging HOWTO's documented `_srcfile = None`: no stack walk per line)."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = PassBufferedStreamHandler()
    handler.setFormatter(SecondCachedFormatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])


def app_from_env() -> FastAPI:
    """uvicorn's app factory in each worker process of `walletmig api --workers N` (spawned:
    they inherit the environment, not the parent's logging or objects)."""
    configure_logging(os.environ.get(LOG_LEVEL_ENV, "INFO"))
    return create_app(ApiSettings.from_env())
