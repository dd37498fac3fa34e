"""Wallet operations: writes through the wallet workflow (walletclient.WalletClient, Temporal),
reads through the phase-aware read path (walletclient.read_path.ReadRouter).

Writes need `wallets:write` and an Idempotency-Key; reads need `wallets:read`.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import QueryParams
from starlette.responses import Response
from starlette.types import Scope

from gateway.audit import SOURCE_API, audit, caller_fields, wallet_ref_of
from gateway.auth import Caller, authorize_scope, guard
from gateway.fastpath import LeanRoute
from gateway.idempotency import IdempotencyKey, run_idempotent, transaction_id_for
from gateway.models import (
    HISTORY_PAGE_MAX,
    BalanceOut,
    BalancesOut,
    CreditBody,
    HistoryEntryOut,
    HistoryOut,
    OperationOut,
    VoidBody,
    WalletOut,
)
from gateway.operations import (
    ADD_CREDIT,
    GET_BALANCE,
    GET_BALANCES,
    GET_HISTORY,
    SUBTRACT_CREDIT,
    VOID_TRANSACTION,
    OperationSpec,
)
from gateway.problems import dependency_unavailable
from gateway.state import GatewayState, state_in, state_of
from stores.audit_chain import wallet_operation_record
from walletcore.keys import WalletKey
from walletcore.operations import (
    AddCredit,
    SubtractCredit,
    Void,
    WalletOperation,
    parse_input,
    validate_operation,
)

router = APIRouter(prefix="/v1", tags=["wallets"])

HISTORY_LIMIT_DEFAULT = 50


def _key_constraints(field: str) -> dict[str, Any]:
    """The OpenAPI constraints of a WalletKey field, from WalletKey itself (one home)."""
    schema = WalletKey.model_json_schema()["properties"][field]
    schema = next((s for s in schema.get("anyOf", []) if s.get("type") == "string"), schema)
    names = {"pattern": "pattern", "maxLength": "max_length", "minLength": "min_length"}
    return {names[k]: v for k, v in schema.items() if k in names}


ClientId = Annotated[
    str, Path(description="client id", examples=["c-42"], **_key_constraints("client_id"))
]
Country = Annotated[
    str, Path(description="ISO 3166-1 alpha-3", examples=["USA"], **_key_constraints("country"))
]
Currency = Annotated[
    str, Path(description="ISO 4217 or token", examples=["USD"], **_key_constraints("currency"))
]
IssuerType = Annotated[
    str | None, Query(description="issuer type, when the wallet has one",
                      **_key_constraints("issuer_type")),
]  # fmt: skip


@router.post(
    "/wallets/credit", operation_id=ADD_CREDIT.operation_id, response_model=OperationOut,
    summary="Add credit to a wallet (creates it on first use)",
)  # fmt: skip
async def add_credit(
    request: Request,
    body: CreditBody,
    idempotency_key: IdempotencyKey,
    caller: Annotated[Caller, guard(ADD_CREDIT)],
) -> Response:
    return await _credit_or_debit(request, caller, ADD_CREDIT, idempotency_key, body, AddCredit)


@router.post(
    "/wallets/debit", operation_id=SUBTRACT_CREDIT.operation_id, response_model=OperationOut,
    summary="Subtract credit from a wallet",
)  # fmt: skip
async def subtract_credit(
    request: Request,
    body: CreditBody,
    idempotency_key: IdempotencyKey,
    caller: Annotated[Caller, guard(SUBTRACT_CREDIT)],
) -> Response:
    return await _credit_or_debit(
        request, caller, SUBTRACT_CREDIT, idempotency_key, body, SubtractCredit
    )


@router.post(
    "/wallets/void", operation_id=VOID_TRANSACTION.operation_id, response_model=OperationOut,
    summary="Void a credit or debit",
)  # fmt: skip
async def void_transaction(
    request: Request,
    body: VoidBody,
    idempotency_key: IdempotencyKey,
    caller: Annotated[Caller, guard(VOID_TRANSACTION)],
) -> Response:
    txn = transaction_id_for(caller, idempotency_key, body.transaction_id)
    op = parse_input(Void, {
        "wallet": _key_of(body.wallet), "transaction_id": txn,
        "original_transaction_id": body.original_transaction_id,
        "reference_id": body.reference_id,
    })  # fmt: skip
    return await _write(request, caller, VOID_TRANSACTION, idempotency_key, body, op)


async def _credit_or_debit(
    request: Request, caller: Caller, spec: OperationSpec, raw_key: str, body: CreditBody,
    model: type[AddCredit],
) -> Response:  # fmt: skip
    txn = transaction_id_for(caller, raw_key, body.transaction_id)
    op = parse_input(model, {
        "wallet": _key_of(body.wallet), "transaction_id": txn, "amount": body.amount,
        "reference_id": body.reference_id, "description": body.description,
        "allow_overdraft": body.allow_overdraft,
    })  # fmt: skip
    return await _write(request, caller, spec, raw_key, body, op)


async def _write(
    request: Request, caller: Caller, spec: OperationSpec, raw_key: str,
    body: CreditBody | VoidBody, op: WalletOperation,
) -> Response:  # fmt: skip
    # Input errors (amount precision, ...) are answered before the key is claimed: a request
    # that never ran records nothing (Stripe's rule).
    validate_operation(op)
    state = state_of(request)
    record = wallet_operation_record(
        op, wallet_ref=wallet_ref_of(request, op.wallet), source=SOURCE_API, actor=caller.name,
        operation=spec.operation_id, caller=caller_fields(caller),
    )  # fmt: skip

    async def execute() -> OperationOut:
        await audit(request, record)  # audited before it runs (never run unaudited)
        return await _apply(state, op)

    return await run_idempotent(
        request, state.idempotency, caller, spec, raw_key, body, op.transaction_id, execute,
    )  # fmt: skip


async def _apply(state: GatewayState, op: WalletOperation) -> OperationOut:
    timeout_s = state.settings.write_timeout_s
    try:
        result = await asyncio.wait_for(state.wallets.apply(op), timeout_s)
    except TimeoutError:
        raise dependency_unavailable(
            "temporal", f"the wallet workflow did not answer within {timeout_s:g} s; retry "
            "with the same Idempotency-Key",
        ) from None
    return OperationOut.of(result)


async def get_balance(
    request: Request, client_id: ClientId, country: Country, currency: Currency,
    caller: Annotated[Caller, guard(GET_BALANCE)], issuer_type: IssuerType = None,
) -> BalanceOut:  # fmt: skip
    # The OpenAPI signature of get_balance (no docstring: it would become the description);
    # BalanceRoute serves requests with answer_balance, which must stay equivalent.
    wallet = _wallet(client_id, country, currency, issuer_type)
    return BalanceOut.of(await state_of(request).reader.get_balance(wallet))


class _BalanceParams(BaseModel):
    """get_balance's path and query parameters with the constraints FastAPI's Path/Query
    declare above (no whitespace stripping, as FastAPI validates them)."""

    client_id: str = Field(**_key_constraints("client_id"))
    country: str = Field(**_key_constraints("country"))
    currency: str = Field(**_key_constraints("currency"))
    issuer_type: str | None = Field(default=None, **_key_constraints("issuer_type"))


_QUERY_PARAMS = frozenset({"issuer_type"})
# Wallets whose path and query parameters passed _BalanceParams, by those raw values: a
# validation is a pure function of them, so a repeat read skips _BalanceParams and the
# WalletKey construction (~20 us, ~8 % of the API's CPU per TigerBeetle-answered read,
# session 9). Bounded: cleared when full (refilled by the next reads).
_WalletParams = tuple[str, str, str, str | None]
_VALID_WALLETS: dict[_WalletParams, WalletKey] = {}
VALID_WALLETS_MAX = 10_000


async def answer_balance(scope: Scope) -> bytes:
    """get_balance without FastAPI's per-request dependency solving and response-model
    pass, on the ASGI scope (gateway.fastpath answers it as raw ASGI): the guard as a plain
    call first (401/403/429 before 422, as the dependency ran before parameter validation),
    the parameters validated by one pydantic model (422 with the same `path.`/`query.`
    fields; a wallet validated before is found in _VALID_WALLETS), the body serialised once
    (BalanceOut.json_of). Same status codes, body, problem+json errors and access log line."""
    await authorize_scope(scope, GET_BALANCE)
    # No query string (the usual read): no QueryParams parse (~3 % of the read's CPU).
    query = scope["query_string"]
    issuer_type = QueryParams(query).get("issuer_type") if query else None
    path = scope["path_params"]
    raw = (path["client_id"], path["country"], path["currency"], issuer_type)
    wallet = _VALID_WALLETS.get(raw)
    if wallet is None:
        wallet = _valid_wallet(raw)
    return BalanceOut.json_of(await state_in(scope).reader.get_balance(wallet))


def _valid_wallet(raw: _WalletParams) -> WalletKey:
    """The wallet named by get_balance's parameters, validated (422), then remembered."""
    client_id, country, currency, issuer_type = raw
    params = {"client_id": client_id, "country": country, "currency": currency,
              "issuer_type": issuer_type}  # fmt: skip
    try:
        checked = _BalanceParams.model_validate(params)
    except ValidationError as exc:
        raise RequestValidationError([
            {**error, "loc": ("query" if error["loc"][0] in _QUERY_PARAMS else "path",
                              *error["loc"])}
            for error in exc.errors()
        ]) from None  # fmt: skip
    # WalletKey's own constraints were just checked (_BalanceParams) and its patterns admit no
    # whitespace, so its validation (stripping included) could not change a value: built
    # without a second validation.
    wallet = WalletKey.model_construct(
        client_id=checked.client_id, country=checked.country, currency=checked.currency,
        issuer_type=checked.issuer_type,
    )  # fmt: skip
    if len(_VALID_WALLETS) >= VALID_WALLETS_MAX:
        _VALID_WALLETS.clear()
    _VALID_WALLETS[raw] = wallet
    return wallet


class BalanceRoute(LeanRoute):
    """get_balance's route: FastAPI's schema from the signature above, answer_balance per
    request (the hottest route: balance reads), answered in front of FastAPI as raw ASGI
    (gateway.fastpath)."""

    answer = staticmethod(answer_balance)


router.add_api_route(
    "/wallets/{client_id}/{country}/{currency}/balance", get_balance, methods=["GET"],
    operation_id=GET_BALANCE.operation_id, response_model=BalanceOut,
    summary="A wallet's balance", route_class_override=BalanceRoute,
)  # fmt: skip


@router.get(
    "/clients/{client_id}/balances", operation_id=GET_BALANCES.operation_id,
    response_model=BalancesOut, summary="Every wallet of a client",
)  # fmt: skip
async def get_balances(
    request: Request, client_id: ClientId, caller: Annotated[Caller, guard(GET_BALANCES)]
) -> BalancesOut:
    balances = await state_of(request).reader.get_multi_balance(client_id)
    return BalancesOut(client_id=client_id, balances=[BalanceOut.of(b) for b in balances])


@router.get(
    "/wallets/{client_id}/{country}/{currency}/history", operation_id=GET_HISTORY.operation_id,
    response_model=HistoryOut, summary="A wallet's latest transactions, newest first",
)  # fmt: skip
async def get_history(
    request: Request, client_id: ClientId, country: Country, currency: Currency,
    caller: Annotated[Caller, guard(GET_HISTORY)], issuer_type: IssuerType = None,
    limit: Annotated[int, Query(ge=1, le=HISTORY_PAGE_MAX)] = HISTORY_LIMIT_DEFAULT,
) -> HistoryOut:  # fmt: skip
    wallet = _wallet(client_id, country, currency, issuer_type)
    entries = await state_of(request).reader.history(wallet, limit)
    return HistoryOut(wallet=WalletOut.of(wallet),
                      entries=[HistoryEntryOut.of(e) for e in entries])  # fmt: skip


def _wallet(client_id: str, country: str, currency: str, issuer_type: str | None) -> WalletKey:
    return parse_input(WalletKey, {
        "client_id": client_id, "country": country, "currency": currency,
        "issuer_type": issuer_type,
    })  # fmt: skip


def _key_of(wallet: WalletKey) -> WalletKey:
    """The exact domain class (a WalletRef is one, but ids are built from WalletKey)."""
    return WalletKey(**wallet.model_dump())
