"""The hot read routes answered in front of FastAPI's routing (a thin ASGI path).

A balance read through FastAPI paid, before its own work, Starlette's error middleware, the
exception middleware, FastAPI's AsyncExitStack middleware and router (every route's regex
tried, scope bookkeeping per candidate) and the route's wrappers: ~40 % of the API process's
CPU per read after the lean route (gateway.routers.wallets.BalanceRoute) had already dropped
dependency solving. `GatewayApp` (the FastAPI application itself) answers the requests of a
`LeanRoute` straight from `__call__`:

- matched by the route's own compiled path regex (the same one Starlette would use), GET only
  and only when no other route could answer the path (checked at start,
  `_no_other_route_matches`); anything else goes through FastAPI as before;
- served by the route's own handler (`LeanRoute.serve`: auth, scope, rate limit, parameters),
  wrapped in the application's own user middleware, built from `user_middleware` in its
  order with its options (same log line with masked ids, same metrics, same 413);
- errors answered by the application's own exception handlers (problem+json, same statuses).

The OpenAPI document is unchanged: a LeanRoute is an APIRoute, declared as usual.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

FAST_ROUTES_MAX = 8  # a handful of hot reads; each request tries at most this many regexes

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class LeanRoute(APIRoute):
    """An APIRoute whose requests are served by `serve` (FastAPI's schema from the declared
    endpoint; no dependency solving or response-model pass per request). Subclasses set
    `serve` to a function that must stay equivalent to the declared endpoint."""

    serve: Handler

    def get_route_handler(self) -> Handler:
        return type(self).serve


class GatewayApp(FastAPI):
    """FastAPI, with the LeanRoutes answered before the middleware stack and router."""

    _fast: list[tuple[re.Pattern[str], LeanRoute]] | None = None
    _fast_app: ASGIApp | None = None

    def enable_fast_routes(self) -> None:
        """Call once, after every route, exception handler and middleware is installed."""
        routes = _flat_routes(self.routes)
        fast = [] if routes is None else [
            (route.path_regex, route) for route in routes
            if isinstance(route, LeanRoute) and _no_other_route_matches(routes, route)
        ]  # fmt: skip
        assert len(fast) <= FAST_ROUTES_MAX
        self._fast = fast
        # The application's own user middleware with its own options, wrapped as Starlette
        # wraps them (user_middleware is outermost first): one home for their order.
        app: Any = self._serve_fast
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        self._fast_app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._fast and scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"]
            for regex, route in self._fast:
                match = regex.match(path)
                if match is not None and not scope.get("root_path"):
                    assert self._fast_app is not None
                    scope["app"] = self
                    scope["route"] = route
                    scope["endpoint"] = route.endpoint
                    scope["path_params"] = match.groupdict()  # str parameters only
                    await self._fast_app(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)

    async def _serve_fast(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        route = scope["route"]
        assert isinstance(route, LeanRoute)
        try:
            response = await route.serve(request)
        except Exception as exc:
            response = await self._handle_error(request, exc)
        await response(scope, receive, send)

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
