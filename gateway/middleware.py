"""Plain ASGI middleware (no per-request task or body copy): the request body limit and the
request log.

- `BodySizeLimit`: a declared Content-Length above the limit is answered 413 before the body
  is read; a body streamed without one is counted as it arrives and cut at the limit (413).
- `RequestLog`: one line per request with the operation, status, duration, the API key's name
  and id (never the secret) and the path with identifiers masked (client ids, migration
  names); the Idempotency-Key is masked too, with its outcome (acquired, replay, ...).
  Each line is one `gateway.access` record at INFO, passed to the handlers a user configured
  (`access_record`: the record `access_log.info("%s", line)` makes, built cheaper).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.problems import IDEMPOTENCY_HEADER, ProblemError
from observability.exposition import ResponseStatus

access_log = logging.getLogger("gateway.access")

PLAIN_PATH_PARAMS = frozenset({"country", "currency"})  # not identifiers of anyone
UNMATCHED_PATH_MAX = 64
MASKED_PATHS_MAX = 10_000  # cached masked paths (by route and parameters); cleared when full


def mask(value: str) -> str:
    """Enough to correlate log lines, too little to identify: `c-***42` (length kept hidden
    for short values)."""
    if len(value) <= 6:
        return "***"
    return f"{value[:2]}***{value[-2:]}"


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        assert max_bytes > 0
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.inline_check(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises an HTTPException from reading the body: the problem
                    # handlers answer it.
                    raise HTTPException(413, self._too_large().problem.detail)
            return message

        await self.app(scope, limited, send)

    def inline_check(self, scope: Scope) -> Response | None:
        """The 413 for a declared Content-Length above the limit (before the body is read),
        else None. gateway.fastpath's raw path calls it in place of the ASGI layer: its lean
        routes read no body, so the streamed count above has nothing to count there."""
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return self._too_large().response(scope.get("path"))
        return None

    def inline_done(self, scope: Scope, status: int, elapsed_s: float) -> None:
        return None

    def _too_large(self) -> ProblemError:
        return ProblemError(
            413, "payload-too-large", "Payload too large",
            f"the request body exceeds {self.max_bytes} bytes",
        )  # fmt: skip


class RequestLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = ResponseStatus(send)
        try:
            await self.app(scope, receive, status.send)
        finally:
            self.inline_done(scope, status.code, time.perf_counter() - started)

    def inline_check(self, scope: Scope) -> None:
        return None

    def inline_done(self, scope: Scope, status: int, elapsed_s: float) -> None:
        """The request's line (gateway.fastpath's raw path calls it in place of the layer)."""
        if access_log.isEnabledFor(logging.INFO):  # no line built for a quieter logger
            access_record(_line(scope, status, elapsed_s * 1000))


# What LogRecord.__init__ sets (CPython 3.11). A record factory that sets other fields (a later
# Python's, a user's) gets `access_log.info` itself: access_record copies what it knows only.
_RECORD_FIELDS = frozenset({
    "name", "msg", "args", "levelname", "levelno", "pathname", "filename", "module",
    "exc_info", "exc_text", "stack_info", "lineno", "funcName", "created", "msecs",
    "relativeCreated", "thread", "threadName", "processName", "process",
})  # fmt: skip


def access_record(line: str) -> None:
    """`access_log.info("%s", line)` (the logger's level already checked): the same record to
    the same handlers (Logger.handle: the logger's filters, then its and its parents'
    handlers), built as a copy of one made by Logger.makeRecord with its clock fields
    computed as LogRecord.__init__ does. Logger.info's path (_log, findCaller's settings,
    makeRecord, LogRecord.__init__: ~25 attribute sets, a Mapping isinstance, basename and
    splitext of "(unknown file)") was ~2.5 us of the ~7 us a line cost (session 11). Taken
    only when the record's other fields cannot vary: no caller lookup (logging._srcfile None),
    no thread or process fields, the default record factory; else Logger.info itself."""
    if (logging._srcfile is not None or logging.logThreads or logging.logProcesses
            or logging.logMultiprocessing
            or logging.getLogRecordFactory() is not logging.LogRecord):  # fmt: skip
        access_log.info("%s", line)
        return
    template = _record_template()
    if template is None:
        access_log.info("%s", line)
        return
    fields = template.copy()
    created = time.time()  # LogRecord.__init__'s clock fields, as it computes them
    fields["created"] = created
    fields["msecs"] = int((created - int(created)) * 1000) + 0.0
    fields["relativeCreated"] = (created - logging._startTime) * 1000  # type: ignore[attr-defined]
    fields["args"] = (line,)
    record = logging.LogRecord.__new__(logging.LogRecord)
    record.__dict__ = fields
    access_log.handle(record)


@functools.cache
def _record_template() -> dict[str, Any] | None:
    """The fields of gateway.access's INFO record as Logger.makeRecord makes them (made once);
    None when they are not the _RECORD_FIELDS access_record knows how to fill in."""
    made = access_log.makeRecord(access_log.name, logging.INFO, "(unknown file)", 0, "%s",
                                 ("",), None, "(unknown function)")  # fmt: skip
    return dict(vars(made)) if set(vars(made)) == _RECORD_FIELDS else None


def _line(scope: Scope, status: int, elapsed_ms: float) -> str:
    # One f-string, no list to join (a line per request: its build was ~2 % of the API's CPU
    # per balance read, py-spy session 10).
    state: dict[str, Any] = scope.get("state") or {}
    caller = state.get("caller")
    key = "-" if caller is None else f"{caller.name}({caller.key_id})"
    line = (
        f"{scope.get('method')} {masked_path(scope)} op={state.get('operation_id', '-')} "
        f"status={status} ms={elapsed_ms:.1f} key={key}"
    )
    idem = _header(scope, _IDEMPOTENCY_HEADER_NAME)
    if idem is None:
        return line
    return f"{line} idempotency_key={mask(idem)}:{state.get('idempotency', '-')}"


_IDEMPOTENCY_HEADER_NAME = IDEMPOTENCY_HEADER.lower().encode()  # as ASGI servers send names


_masked_paths: dict[tuple[str, tuple[tuple[str, Any], ...]], str] = {}


def masked_path(scope: Scope) -> str:
    """The matched route's path with its identifiers masked: a pure function of the route's
    template and its parameters, cached (~1 % of a balance read's CPU, session 11)."""
    template = getattr(scope.get("route"), "path_format", None)
    if template is None:
        path = str(scope.get("path", ""))
        return f"<unmatched {len(path)} chars>" if len(path) > UNMATCHED_PATH_MAX else "<unmatched>"
    params = scope.get("path_params") or {}
    cache_key = (str(template), tuple(params.items()))
    found = _masked_paths.get(cache_key)
    if found is None:
        found = _masked_path(str(template), params)
        if len(_masked_paths) >= MASKED_PATHS_MAX:
            _masked_paths.clear()
        _masked_paths[cache_key] = found
    return found


def _masked_path(template: str, params: dict[str, Any]) -> str:
    masked = {
        name: value if name in PLAIN_PATH_PARAMS else mask(str(value))
        for name, value in params.items()
    }
    try:
        return str(template.format(**masked))
    except (KeyError, IndexError, ValueError):
        return str(template)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None
