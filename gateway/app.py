"""`create_app(settings)`: the FastAPI application of the HTTP gateway.

Middleware, outermost first: the request log, the metrics, the body size limit; then
FastAPI's routing with the problem+json handlers. `/metrics` serves the process's Prometheus
metrics (request counts and latency by operationId among them). The lifespan opens the
process's clients (gateway.state). The hot reads (gateway.fastpath.LeanRoute) skip the
routing and the middleware layers (their middleware are called inline), not their work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
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

NO_NATIVE_TELEMETRY: TelemetryConfig = {
    "tracing": False, "metrics": False, "logs": False, "operation_spans": False,
}  # fmt: skip


def create_app(settings: ApiSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_state(settings) as state:
            app.state.gateway = state
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


def configure_logging(level: str) -> None:
    """The API process's logging: basicConfig's stderr handler, LOG_FORMAT second-cached.
    LOG_FORMAT names no thread or process, so LogRecord skips looking them up (a call to
    threading and multiprocessing per access-log line), nor where it was called from (the
    logging HOWTO's documented `_srcfile = None`: no stack walk per line)."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.setFormatter(SecondCachedFormatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])


def app_from_env() -> FastAPI:
    """uvicorn's app factory in each worker process of `walletmig api --workers N` (spawned:
    they inherit the environment, not the parent's logging or objects)."""
    configure_logging(os.environ.get(LOG_LEVEL_ENV, "INFO"))
    return create_app(ApiSettings.from_env())
