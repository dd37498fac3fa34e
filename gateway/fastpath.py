"""The hot read routes answered in front of FastAPI as raw ASGI (no Request/Response objects,
no middleware layers).

A balance read through FastAPI paid, before its own work, Starlette's error middleware, the
exception middleware, FastAPI's AsyncExitStack middleware and router (every route's regex
tried, scope bookkeeping per candidate) and the route's wrappers; then, answered in front of
the routing, still a Request and a Response object and one ASGI layer (a coroutine and a
wrapped `send`) per user middleware: ~30 % of the API's CPU per read (py-spy, session 9).
`GatewayApp` (the FastAPI application itself) answers the requests of a `LeanRoute` straight
from `__call__`:

- matched by the route's own compiled path regex (the same one Starlette would use), GET only
  and only when no other route could answer the path (checked at start,
  `_no_other_route_matches`); anything else (HEAD, other methods, a root_path) goes through
  FastAPI as before;
- the application's own user middleware are called inline, not as layers: each one's
  `inline_check(scope)` first (outermost first; an answer, e.g. BodySizeLimit's 413, is sent
  instead of the route's) and `inline_done(scope, status, elapsed_s)` after (innermost
  first, as the layers' `finally` blocks run: metrics, then the access log). Instances built
  from `user_middleware` with their options; when any middleware lacks these two methods
  (`InlineMiddleware`), no route is answered here (FastAPI serves them all, layered);
- served by the route's `answer(scope)`: the 200 answer's JSON bytes (auth, scope, rate
  limit, parameters inside), sent as one `http.response.start` with the headers Starlette's
  `Response(body, media_type="application/json")` would send (`json_headers`, tested) and one
  body message;
- errors answered by the application's own exception handlers (problem+json, same statuses)
  through a Request built for the error only.

The OpenAPI document is unchanged: a LeanRoute is an APIRoute, declared as usual; when FastAPI
routes a LeanRoute's request (not GET, ...), its handler wraps the same `answer`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, runtime_checkable

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from observability.exposition import ResponseStatus

FAST_ROUTES_MAX = 8  # a handful of hot reads; each request tries at most this many regexes
JSON_MEDIA_TYPE = "application/json"

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
Answer = Callable[[Scope], Coroutine[Any, Any, bytes]]


@runtime_checkable
class InlineMiddleware(Protocol):
    """A user middleware the raw path can call in place of its ASGI layer."""

    def inline_check(self, scope: Scope) -> ASGIApp | None:
        """An answer that replaces the route's (sent as is), or None to go on."""

    def inline_done(self, scope: Scope, status: int, elapsed_s: float) -> None:
        """What the layer does once the request was answered `status`."""


class LeanRoute(APIRoute):
    """An APIRoute whose requests are answered by `answer` (FastAPI's schema from the declared
    endpoint; no dependency solving or response-model pass per request). Subclasses set
    `answer` to a function that must stay equivalent to the declared endpoint: it returns the
    200 answer's JSON body and raises for any other answer. It reads no request body."""

    answer: Answer

    def get_route_handler(self) -> Handler:
        answer = type(self).answer

        async def serve(request: Request) -> Response:  # when FastAPI routes the request
            return Response(await answer(request.scope), media_type=JSON_MEDIA_TYPE)

        return serve


def json_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    """`Response(body, media_type=JSON_MEDIA_TYPE).raw_headers`, in its order (tested)."""
    return [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]


async def _no_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("an inline middleware instance is never called as a layer")


class GatewayApp(FastAPI):
    """FastAPI, with the LeanRoutes answered before the middleware stack and router."""

    _fast: list[tuple[re.Pattern[str], LeanRoute]] | None = None
    _inline: list[InlineMiddleware] | None = None  # outermost first

    def enable_fast_routes(self) -> None:
        """Call once, after every route, exception handler and middleware is installed."""
        routes = _flat_routes(self.routes)
        # The application's own user middleware with its own options, in Starlette's order
        # (user_middleware is outermost first): one home for their order.
        inline = [cls(_no_app, *args, **kwargs) for cls, args, kwargs in self.user_middleware]
        layered = not all(isinstance(middleware, InlineMiddleware) for middleware in inline)
        fast = [] if routes is None or layered else [
            (route.path_regex, route) for route in routes
            if isinstance(route, LeanRoute) and _no_other_route_matches(routes, route)
        ]  # fmt: skip
        assert len(fast) <= FAST_ROUTES_MAX
        self._fast = fast
        self._inline = inline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self._fast and scope["type"] == "http" and scope["method"] == "GET"
                and not scope.get("root_path")):  # fmt: skip
            path = scope["path"]
            for regex, route in self._fast:
                match = regex.match(path)
                if match is not None:
                    scope["app"] = self
                    scope["route"] = route
                    scope["endpoint"] = route.endpoint
                    scope["path_params"] = match.groupdict()  # str parameters only
                    await self._serve_raw(route, scope, receive, send)
                    return
        await super().__call__(scope, receive, send)

    async def _serve_raw(
        self, route: LeanRoute, scope: Scope, receive: Receive, send: Send
    ) -> None:
        inline = self._inline
        assert inline is not None
        started = time.perf_counter()
        status = ResponseStatus(send)  # 500 unless an answer starts (as the layers saw it)
        try:
            for middleware in inline:
                refusal = middleware.inline_check(scope)
                if refusal is not None:
                    await refusal(scope, receive, status.send)
                    return
            try:
                body = await route.answer(scope)
            except Exception as exc:
                response = await self._handle_error(Request(scope, receive), exc)
                await response(scope, receive, status.send)
                return
            status.code = 200
            start = {"type": "http.response.start", "status": 200, "headers": json_headers(body)}
            await send(start)
            await send({"type": "http.response.body", "body": body})
        finally:
            elapsed_s = time.perf_counter() - started
            for middleware in reversed(inline):
                middleware.inline_done(scope, status.code, elapsed_s)

    async def _handle_error(self, request: Request, exc: Exception) -> Response:
        """The application's handler for `exc` (most specific class first), as Starlette's
        exception middleware picks it; `Exception` has one (gateway.problems)."""
        for cls in type(exc).__mro__:
            handler = self.exception_handlers.get(cls)
            if handler is not None:
                answered = handler(request, exc)
                if isinstance(answered, Awaitable):
                    answered = await answered
                assert isinstance(answered, Response)
                return answered
        raise exc


def _flat_routes(routes: list[BaseRoute]) -> list[BaseRoute] | None:
    """Every route, the included routers' too (FastAPI keeps an included router as one
    entry); None when a router was included with a prefix or dependencies of its own (its
    routes' paths and guards would not be what they say: no fast path then)."""
    flat: list[BaseRoute] = []
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is None:
            flat.append(route)
            continue
        context = getattr(route, "include_context", None)
        if context is None or context.prefix or context.dependencies:
            return None
        inner = _flat_routes(included.routes)
        if inner is None:
            return None
        flat.extend(inner)
    return flat


def _no_other_route_matches(routes: list[BaseRoute], route: APIRoute) -> bool:
    """True when no other route matches a path of `route`'s shape, whatever their order
    (else the router might pick the other one: leave such a route to the router)."""
    sample = route.path_format.format(**{name: "x" for name in route.param_convertors})
    for other in routes:
        if other is route:
            continue
        regex = getattr(other, "path_regex", None)
        if regex is None or regex.match(sample) is not None:
            return False  # a mount, or an overlapping route
    return True
