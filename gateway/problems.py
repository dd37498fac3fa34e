"""RFC 9457 problem details: the one shape of every error the gateway answers.

`type` is a URN per problem kind (`urn:walletmig:problem:insufficient-funds`), `status` the
HTTP status, `detail` one human line; validation errors name the `field` at fault (and list
`errors`), domain errors carry their class name in `error_type`, a dependency that is down is
named in `dependency` (503). Nothing ever carries a stack trace: an unexpected exception is
logged here and answered with a bare 500 problem.

Statuses: malformed JSON, a missing or malformed Idempotency-Key -> 400; no/unknown/expired/
revoked key -> 401; missing scope -> 403; NotFoundError -> 404; the wallet's state refuses the
request (insufficient funds, duplicate transaction id, already voided, conflict) or the same
Idempotency-Key is still running -> 409; body too large -> 413; validation (request models and
the domain's input errors: amount, currency, ledger, not voidable) or an Idempotency-Key reused
with another body -> 422; a POST body that is not JSON -> 415; over the rate limit -> 429; a
dependency down -> 503.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from walletcore.errors import (
    AlreadyVoidedError,
    ConflictError,
    DuplicateTransactionError,
    InsufficientFundsError,
    InvalidAmountError,
    InvalidInputError,
    NotFoundError,
    NotVoidableError,
    StoreUnavailableError,
    UnknownCurrencyError,
    UnknownLedgerError,
    WalletError,
)

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:walletmig:problem:"
FIELD_ERRORS_MAX = 20  # a problem lists at most this many field errors
DETAIL_MAX = 500
IDEMPOTENCY_HEADER = "Idempotency-Key"
TEMPORAL_CONNECT_FAILURE = "Failed client connect"  # temporalio's RuntimeError text


class FieldError(BaseModel):
    field: str = Field(description="dotted path of the field at fault, e.g. `wallet.currency`")
    location: str = Field(description="`body`, `path`, `query` or `header`")
    detail: str


class Problem(BaseModel):
    """RFC 9457 problem details (application/problem+json)."""

    type: str = Field(description="URN of the problem kind")
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    instance: str | None = Field(default=None, description="the request path")
    field: str | None = Field(default=None, description="the field at fault, when one is")
    errors: list[FieldError] | None = None
    error_type: str | None = Field(default=None, description="the domain error's class name")
    dependency: str | None = Field(default=None, description="the dependency that is down")


class ProblemError(Exception):
    """Raise anywhere in a request: the handler answers it as problem+json."""

    def __init__(
        self, status: int, slug: str, title: str, detail: str, *,
        field: str | None = None, errors: Sequence[FieldError] | None = None,
        error_type: str | None = None, dependency: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        assert 400 <= status <= 599
        super().__init__(detail)
        self.problem = Problem(
            type=TYPE_PREFIX + slug, title=title, status=status, detail=detail[:DETAIL_MAX],
            field=field, errors=list(errors) if errors else None, error_type=error_type,
            dependency=dependency,
        )  # fmt: skip
        self.headers = dict(headers or {})

    def response(self, instance: str | None = None) -> Response:
        problem = self.problem.model_copy(update={"instance": instance})
        return problem_response(problem, self.headers)


def problem_response(problem: Problem, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        problem.model_dump_json(exclude_none=True),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=dict(headers or {}),
    )


def dependency_unavailable(dependency: str, detail: str) -> ProblemError:
    return ProblemError(
        503, "dependency-unavailable", "Dependency unavailable", f"{dependency}: {detail}",
        dependency=dependency, headers={"Retry-After": "1"},
    )  # fmt: skip


# Most specific first: the first class the error is an instance of decides.
_DOMAIN: tuple[tuple[type[WalletError], int, str, str], ...] = (
    (InvalidAmountError, 422, "invalid-amount", "Invalid amount"),
    (UnknownCurrencyError, 422, "unknown-currency", "Unknown currency"),
    (UnknownLedgerError, 422, "unknown-ledger", "Unknown ledger"),
    (InvalidInputError, 422, "validation-error", "Invalid request"),
    (NotVoidableError, 422, "not-voidable", "Transaction cannot be voided"),
    (InsufficientFundsError, 409, "insufficient-funds", "Insufficient funds"),
    (DuplicateTransactionError, 409, "duplicate-transaction", "Duplicate transaction id"),
    (AlreadyVoidedError, 409, "already-voided", "Transaction already voided"),
    (ConflictError, 409, "conflict", "Conflict"),
    (NotFoundError, 404, "not-found", "Not found"),
    (WalletError, 422, "wallet-error", "Request refused"),
)


def domain_problem(err: WalletError) -> ProblemError:
    """The problem a walletcore error answers (StoreUnavailableError: the store it names)."""
    if isinstance(err, StoreUnavailableError):
        return dependency_unavailable(store_named_in(err.message), err.message)
    for cls, status, slug, title in _DOMAIN:
        if isinstance(err, cls):
            return ProblemError(
                status, slug, title, err.message, field=err.field, error_type=err.type_name
            )
    raise AssertionError("WalletError is the last entry")  # pragma: no cover


def store_named_in(message: str) -> str:
    """StoreUnavailableError's message starts with the store (stores/): else the write path
    timed out in Temporal."""
    if message.startswith("TigerBeetle"):
        return "tigerbeetle"
    if message.startswith("MongoDB"):
        return "mongodb"
    return "temporal"


def dependency_of(exc: BaseException) -> str | None:
    """The dependency an exception says is down, or None for anything else (a bug)."""
    if isinstance(exc, RuntimeError) and str(exc).startswith(TEMPORAL_CONNECT_FAILURE):
        return "temporal"  # a lazy Temporal client's first call could not connect
    module = type(exc).__module__.split(".")[0]
    if module == "pymongo":
        from pymongo.errors import ConnectionFailure, PyMongoError

        timed_out = isinstance(exc, PyMongoError) and exc.timeout
        return "mongodb" if isinstance(exc, ConnectionFailure) or timed_out else None
    if module in ("redis", "limits"):
        return "redis"
    if module == "temporalio":
        return "temporal"
    if module in ("tigerbeetle", "tb_emulator"):
        return "tigerbeetle"
    return None


def install_problem_handlers(app: FastAPI, dependency_errors: Sequence[type[Exception]]) -> None:
    """Every error becomes problem+json. `dependency_errors`: exception classes of the
    clients (pymongo, redis, temporalio, ...) that can mean a dependency is down."""

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProblemError)
        return exc.response(request.url.path)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        media_type = request.headers.get("content-type")
        if request.method == "POST" and media_type is not None and not is_json(media_type):
            return ProblemError(
                415, "unsupported-media-type", "Unsupported media type",
                f"send the body as application/json, not {media_type[:100]}",
            ).response(request.url.path)  # fmt: skip
        return validation_problem(exc.errors()).response(request.url.path)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return http_problem(exc).response(request.url.path)

    async def on_wallet(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, WalletError)
        return domain_problem(exc).response(request.url.path)

    async def on_dependency(request: Request, exc: Exception) -> Response:
        name = dependency_of(exc)
        if name is None:
            return await on_unexpected(request, exc)
        log.warning("%s %s: %s unavailable: %r", request.method, _route_of(request), name, exc)
        return dependency_unavailable(name, type(exc).__name__).response(request.url.path)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, _route_of(request), exc_info=exc)
        return ProblemError(
            500, "internal-error", "Internal error", "the request failed unexpectedly"
        ).response(request.url.path)

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(WalletError, on_wallet)
    for cls in dependency_errors:
        app.add_exception_handler(cls, on_dependency)
    app.add_exception_handler(Exception, on_unexpected)


def is_json(media_type: str) -> bool:
    essence = media_type.split(";", 1)[0].strip().lower()
    return essence == "application/json" or (
        essence.startswith("application/") and essence.endswith("+json")
    )


def validation_problem(errors: Sequence[Any]) -> ProblemError:
    """422 naming the fields at fault; malformed JSON and a missing Idempotency-Key are 400."""
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            return ProblemError(400, "malformed-json", "Malformed JSON", f"body: {reason}")
    for error in errors:
        loc = tuple(str(part) for part in error.get("loc", ()))
        at_key = loc[:1] == ("header",) and loc[-1].lower() == IDEMPOTENCY_HEADER.lower()
        if at_key and error.get("type") == "missing":
            return ProblemError(
                400, "missing-idempotency-key", "Idempotency-Key required",
                f"this operation moves money: send an {IDEMPOTENCY_HEADER} header",
                field=IDEMPOTENCY_HEADER,
            )  # fmt: skip
    fields = [_field_error(error) for error in errors[:FIELD_ERRORS_MAX]]
    first = fields[0] if fields else FieldError(field="body", location="body", detail="invalid")
    return ProblemError(
        422, "validation-error", "Invalid request", f"{first.field}: {first.detail}",
        field=first.field, errors=fields,
    )  # fmt: skip


def _field_error(error: Mapping[str, Any]) -> FieldError:
    loc = [str(part) for part in error.get("loc", ())]
    location = loc[0] if loc else "body"
    field = ".".join(loc[1:]) or location
    return FieldError(field=field, location=location, detail=str(error.get("msg", "invalid")))


_HTTP_SLUGS: dict[int, tuple[str, str]] = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
}


def http_problem(exc: StarletteHTTPException) -> ProblemError:
    slug, title = _HTTP_SLUGS.get(exc.status_code, ("http-error", "HTTP error"))
    detail = exc.detail if isinstance(exc.detail, str) else title
    return ProblemError(exc.status_code, slug, title, detail, headers=exc.headers)


def _route_of(request: Request) -> str:
    """The route template for log lines: a path's values can hold client ids (issue 12); the
    access log masks them (middleware.masked_path), these lines name the route only."""
    template = getattr(request.scope.get("route"), "path_format", None)
    return str(template) if template is not None else "<unmatched route>"
