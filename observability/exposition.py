"""Where the metrics are scraped: a process's own HTTP port (workers), or `/metrics` of an
ASGI app (the gateway), plus the gateway's request timer."""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest, start_http_server

from observability.metrics import HTTP_REQUEST_SECONDS, HTTP_REQUESTS

__all__ = [
    "MetricsServer", "RequestMetrics", "ResponseStatus", "metrics_payload", "serve_metrics",
]  # fmt: skip

PORT_MAX = 65_535
OPERATION_LABEL_MAX = 64  # operationIds are the OpenAPI's; a bound keeps labels bounded anyway
CHILDREN_MAX = 1024  # (operation, status) pairs whose labelled metrics RequestMetrics keeps


class MetricsServer:
    """The scrape endpoint of a process (a daemon thread); `close` stops it."""

    def __init__(self, port: int, addr: str) -> None:
        assert 0 <= port <= PORT_MAX
        self._httpd, self._thread = start_http_server(port, addr=addr, registry=REGISTRY)
        self.port = int(self._httpd.server_address[1])
        self.addr = addr

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.addr in ("0.0.0.0", "") else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve_metrics(port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve this process's metrics on `port` (0: a free port, see `.port`)."""
    return MetricsServer(port, addr)


def metrics_payload() -> tuple[bytes, str]:
    """This process's metrics in the text format, and its content type (a `/metrics` route)."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


Scope = dict[str, Any]
Callable_ = Any


class ResponseStatus:
    """The status an ASGI app answers, read off the messages it sends (pass `.send` to the app
    in place of the server's). One home for the access log's and the request metrics' status."""

    def __init__(self, send: Callable_) -> None:
        self._send = send
        self.code = 500  # what the server answers if the app raises before responding

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.code = int(message["status"])
        await self._send(message)


class RequestMetrics:
    """ASGI middleware: requests by operationId and status, latency by operationId. The
    operationId is what the auth guard put in `scope["state"]`, else the matched route's own
    (unauthenticated routes: healthz, readyz); unmatched paths count as "unmatched", never by
    path (ids would become labels)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        # The labelled children by (operation, status): prometheus_client's labels() per
        # request (label checks, a lock, a lookup) was ~2 % of a balance read's CPU in the API.
        # Bounded: operations are route ids or "unmatched", statuses a few dozen.
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Callable_, send: Callable_) -> None:
        if scope["type"] != "http" or scope.get("path") == "/metrics":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = ResponseStatus(send)
        try:
            await self.app(scope, receive, status.send)
        finally:
            self.inline_done(scope, status.code, time.perf_counter() - started)

    def inline_check(self, scope: Scope) -> None:
        """Nothing to refuse (the gateway's raw read path asks every middleware first)."""
        return None

    def inline_done(self, scope: Scope, status: int, elapsed_s: float) -> None:
        """Count a request answered `status` after `elapsed_s`: what `__call__` does once the
        app answered (the gateway's raw read path calls it in place of the ASGI layer; neither
        path brings `/metrics` here: `__call__` passes it through uncounted)."""
        state: dict[str, Any] = scope.get("state") or {}
        found = state.get("operation_id") or getattr(scope.get("route"), "operation_id", None)
        operation = str(found or "unmatched")[:OPERATION_LABEL_MAX]
        children = self._children.get((operation, status))
        if children is None:
            if len(self._children) >= CHILDREN_MAX:
                self._children.clear()
            children = (HTTP_REQUESTS.labels(operation, str(status)),
                        HTTP_REQUEST_SECONDS.labels(operation))  # fmt: skip
            self._children[operation, status] = children
        children[0].inc()
        children[1].observe(elapsed_s)
