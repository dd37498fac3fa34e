"""The OpenAPI 3.1 document at /openapi.json: FastAPI's, completed from the operation table.

Each guarded operation gets its error responses as application/problem+json (the Problem
schema; FastAPI's own 422 shape is replaced, since the handlers never answer it), the headers
clients rely on (Retry-After on 409/429/503, the RateLimit headers on 429,
Idempotent-Replayed on replays), `x-required-scope` and `x-rate-limit-class`, and links from
each write's answer to the reads of the same wallet (create, then read back).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gateway.auth import bearer
from gateway.idempotency import REPLAY_HEADER
from gateway.operations import MIGRATION_CONTROL, OPERATIONS, OperationSpec
from gateway.problems import PROBLEM_MEDIA_TYPE, Problem

SECURITY_SCHEME = "ApiKey"  # bearer.scheme_name
TITLE = "walletmig API"
VERSION = "1.0.0"
DESCRIPTION = (
    "Wallet operations, the credit terminal, and read-only views of the wallet migration "
    "and the general ledger. Authenticate with "
    "`Authorization: Bearer <API key>` (`walletmig api-key create`); each operation names the "
    "scope it needs in `x-required-scope`. Money-moving POSTs require an `Idempotency-Key`. "
    "Amounts are decimal strings. Errors are RFC 9457 problem details."
)
_STATUS_TEXT: dict[int, str] = {
    400: "malformed JSON or a missing/malformed Idempotency-Key",
    401: "no API key, or an unknown, expired or revoked one",
    403: "the API key lacks the operation's scope",
    404: "the wallet, transaction or migration does not exist",
    409: "the wallet's state refuses the operation, or the same Idempotency-Key is running",
    413: "the request body is too large",
    415: "the request body is not application/json",
    422: "a field is invalid (named in `field`), or the Idempotency-Key was used for another "
    "request",
    429: "over the API key's rate limit for this operation class",
    503: "a dependency is down (named in `dependency`); retry later",
}
_RETRY_AFTER = {"description": "seconds to wait", "schema": {"type": "string",
                                                             "pattern": "^[0-9]+$"}}
_INTEGER_HEADER = {"schema": {"type": "string", "pattern": "^[0-9]+$"}}
# A write whose answer is not a wallet links to its own read (create, then read back).
_LINKS: dict[str, dict[str, Any]] = {
    "submit_transaction": {"read_get_transaction": {
        "operationId": "get_transaction",
        "parameters": {"external_id": "$response.body#/external_id"},
    }},
    "submit_transactions": {},
    **{spec.operation_id: {"read_get_migration": {
        "operationId": "get_migration", "parameters": {"name": "$request.path.name"},
    }} for spec in MIGRATION_CONTROL},  # a migration Update links to the migration's status
}  # fmt: skip
_WRITE_READS = {
    "get_balance": ("client_id", "country", "currency"),
    "get_history": ("client_id", "country", "currency"),
    "get_balances": ("client_id",),
}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=TITLE, version=VERSION, openapi_version="3.1.0", description=DESCRIPTION,
        routes=app.routes,
    )  # fmt: skip
    components = schema.setdefault("components", {})
    # gateway.auth.guard reads the bearer token itself (no HTTPBearer dependency): its scheme
    # is declared here, on every guarded operation (_complete).
    components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = bearer.model.model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    schemas = components.setdefault("schemas", {})
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(problem.pop("$defs", {}))
    schemas["Problem"] = problem
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            spec = OPERATIONS.get(operation.get("operationId", ""))
            if spec is not None:
                _complete(operation, spec)
    app.openapi_schema = schema
    return schema


def _complete(operation: dict[str, Any], spec: OperationSpec) -> None:
    operation["security"] = [{SECURITY_SCHEME: []}]
    operation["x-required-scope"] = spec.scope.value
    operation["x-rate-limit-class"] = spec.op_class.value
    responses: dict[str, Any] = operation.setdefault("responses", {})
    statuses = [400, 401, 403, 404, 422, 429, 503]
    if spec.money_moving:
        statuses += [409, 413, 415]
        ok = responses.setdefault("200", {})
        ok.setdefault("headers", {})[REPLAY_HEADER] = {
            "description": "`true` when this is the stored answer of an earlier request with "
            "the same Idempotency-Key",
            "schema": {"type": "string", "enum": ["true"]},
        }
        links = _LINKS[spec.operation_id] if spec.operation_id in _LINKS else _links_to_reads()
        if links:
            ok["links"] = links
    for status in sorted(statuses):
        responses[str(status)] = _problem(status)


def _problem(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _STATUS_TEXT[status],
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    if status in (409, 429, 503):
        response["headers"] = {"Retry-After": _RETRY_AFTER}
    if status == 429:
        response["headers"] = {
            "Retry-After": {**_RETRY_AFTER, "required": True},
            "RateLimit-Limit": _INTEGER_HEADER,
            "RateLimit-Remaining": _INTEGER_HEADER,
            "RateLimit-Reset": _INTEGER_HEADER,
        }
    return response


def _links_to_reads() -> dict[str, Any]:
    """Read back the wallet a write answered (Schemathesis follows these statefully)."""
    return {
        f"read_{operation_id}": {
            "operationId": operation_id,
            "parameters": {name: f"$response.body#/wallet/{name}" for name in params},
        }
        for operation_id, params in _WRITE_READS.items()
    }
