"""Idempotency-Key for every money-moving POST (IETF draft-ietf-httpapi-idempotency-key-header,
with Stripe's semantics):

- no key -> 400 (gateway.problems.validation_problem);
- the same key and body again -> the first response replayed, status and body byte for byte
  (domain errors included), marked `Idempotent-Replayed: true`;
- the same key with another body (or operation) -> 422;
- the same key while the first request still runs -> 409 with Retry-After.

Keys belong to the API key's *owner* (an owner's rotated keys share them; two owners never
collide). Requests refused before they run (auth, validation, rate limit) record nothing; a
request whose dependency was down (503) releases its key, so the retry runs.

The operation's transaction id is the body's `transaction_id` when given, else derived from
(owner, key): a retry after the key record was lost (or taken over from a dead process) runs
under the same transaction id, and the stores' own idempotency answers it as a replay. Body
transaction ids may not use the derived ids' prefix, so nobody can aim at another owner's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Header, Request
from pydantic import BaseModel
from starlette.responses import Response

from gateway.auth import Caller
from gateway.operations import OperationSpec
from gateway.problems import IDEMPOTENCY_HEADER, ProblemError, domain_problem
from mongobase.mongo import now_ms
from stores.idempotency_keys import Claim, IdempotencyStore, KeyedRequest, StoredResponse
from walletcore.errors import WalletError

log = logging.getLogger(__name__)

REPLAY_HEADER = "Idempotent-Replayed"
KEY_MAX = 255
# Visible ASCII without '"', bare (Stripe style) or as the draft's structured-header string.
KEY_PATTERN = rf'^([!#-~]{{1,{KEY_MAX}}}|"[!#-~]{{1,{KEY_MAX}}}")$'
DERIVED_PREFIX = "idem-"
DERIVED_HEX_DIGITS = 40  # 160 bits of SHA-256: no two (owner, key) pairs ever meet

IdempotencyKeyHeader: Any = Header(  # use as Annotated[str, IdempotencyKeyHeader]
    alias=IDEMPOTENCY_HEADER,
    pattern=KEY_PATTERN,
    description=(
        "Unique per operation (a UUID is fine). Retrying with the same key and body replays the "
        "first answer; kept at least 24 h."
    ),
    examples=["8e03978e-40d5-43e8-bc93-6894a57f9324"],
)
# The header parameter every write route takes (one declaration for all routers).
IdempotencyKey = Annotated[str, IdempotencyKeyHeader]


def parse_key(raw: str) -> str:
    """The key itself: the draft's quoted form and the bare form name the same key."""
    key = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw
    assert 1 <= len(key) <= KEY_MAX
    return key


def derived_transaction_id(owner: str, key: str) -> str:
    digest = hashlib.sha256(f"{owner}\x00{key}".encode()).hexdigest()
    return DERIVED_PREFIX + digest[:DERIVED_HEX_DIGITS]


def transaction_id_for(
    caller: Caller, raw_key: str, given: str | None, *, field: str = "transaction_id"
) -> str:
    """The operation's transaction id: the body's own, or derived from (owner, key).
    `field`: the body field that carries it (the credit terminal's is `external_id`)."""
    if given is None:
        return derived_transaction_id(caller.owner, parse_key(raw_key))
    if given.startswith(DERIVED_PREFIX):
        raise ProblemError(
            422, "validation-error", "Invalid request",
            f"{field}: the prefix {DERIVED_PREFIX!r} is reserved for ids derived from "
            f"Idempotency-Key (leave {field.rsplit('.', 1)[-1]} out to get one)",
            field=field,
        )  # fmt: skip
    return given


def fingerprint(operation_id: str, body: BaseModel) -> str:
    """The request's identity: operation plus canonical JSON of the validated body (so key
    order, whitespace and omitted defaults do not make two equal requests differ)."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{operation_id}\n{canonical}".encode()).hexdigest()


async def run_idempotent(
    request: Request,
    store: IdempotencyStore,
    caller: Caller,
    spec: OperationSpec,
    raw_key: str,
    body: BaseModel,
    transaction_id: str,
    execute: Callable[[], Awaitable[BaseModel]],
) -> Response:
    """Claim the key, then replay, refuse, or run `execute` and record its answer."""
    assert spec.money_moving
    keyed = KeyedRequest(
        owner=caller.owner, key=parse_key(raw_key), operation=spec.operation_id,
        fingerprint=fingerprint(spec.operation_id, body), transaction_id=transaction_id,
    )  # fmt: skip
    claim = await store.claim(keyed)
    request.state.idempotency = claim.outcome
    if claim.outcome == "replay":
        assert claim.response is not None
        return Response(
            claim.response.body, status_code=claim.response.status,
            media_type=claim.response.media_type, headers={REPLAY_HEADER: "true"},
        )  # fmt: skip
    if claim.outcome == "mismatch":
        raise ProblemError(
            422, "idempotency-key-reused", "Idempotency-Key reused",
            f"this {IDEMPOTENCY_HEADER} was used for a different request; use a new key",
            field=IDEMPOTENCY_HEADER,
        )  # fmt: skip
    if claim.outcome == "in_progress":
        raise _in_progress(claim)
    assert claim.token is not None and claim.transaction_id == transaction_id
    return await _run(request, store, keyed, claim.token, execute)


def _in_progress(claim: Claim) -> ProblemError:
    wait_s = 1
    if claim.locked_until is not None:
        wait_s = max(1, math.ceil((claim.locked_until - now_ms()).total_seconds()))
    return ProblemError(
        409, "request-in-progress", "Request in progress",
        f"a request with this {IDEMPOTENCY_HEADER} is still running; retry later",
        headers={"Retry-After": str(wait_s)},
    )  # fmt: skip


async def _run(
    request: Request, store: IdempotencyStore, keyed: KeyedRequest, token: str,
    execute: Callable[[], Awaitable[BaseModel]],
) -> Response:  # fmt: skip
    try:
        result = await execute()
        response = Response(result.model_dump_json(), media_type="application/json")
    except WalletError as err:
        problem = domain_problem(err)
        if problem.problem.status >= 500:  # a store is down: no final answer yet
            await _release(store, keyed, token)
            raise problem from None
        response = problem.response(request.url.path)
    except BaseException:
        await _release(store, keyed, token)
        raise
    stored = StoredResponse(
        status=response.status_code, media_type=str(response.media_type),
        body=bytes(response.body).decode(),
    )  # fmt: skip
    try:
        await store.complete(keyed, token=token, response=stored)
    except Exception as exc:
        # The answer stands; the key stays leased until its lease ends, then a retry runs
        # again under the same transaction id and the stores replay it.
        log.warning("recording the answer of an Idempotency-Key failed: %r", exc)
    return response


async def _release(store: IdempotencyStore, keyed: KeyedRequest, token: str) -> None:
    # Shielded: a cancelled request still lets go of its key (else retries wait for the lease).
    with contextlib.suppress(Exception):
        await asyncio.shield(store.release(keyed, token=token))
