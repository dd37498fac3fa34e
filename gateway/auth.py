"""Authentication (API keys as `Authorization: Bearer <key>`), scopes, and the per-route guard.

`guard(spec)` is the one dependency every protected route declares: it authenticates the key
(401 when missing, unknown, expired or revoked), checks the operation's scope (403), for a
money-moving one that MongoDB is recent enough (503: gateway.state.MongoServerCheck), and takes
one unit of the key's rate-limit budget for the operation's class (429). It records the caller
on the request for the request log.

Verified keys are cached in-process for `key_cache_ttl_s` (a MongoDB read per request would
cap the read path's throughput), with the Caller built once per fill; expiry is re-checked on
every use, so only a revocation can lag, by at most that TTL (plus the one refill read in
flight). Concurrent requests that miss share one refill read.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict
from starlette.types import Scope

from gateway.operations import OperationSpec
from gateway.problems import ProblemError
from mongobase.mongo import now_ms
from stores.api_keys import ApiKeyRecord, ApiKeyStore, key_hash

CACHE_ENTRIES_MAX = 10_000
REALM = 'Bearer realm="walletmig"'

bearer = HTTPBearer(  # the OpenAPI security scheme (gateway.openapi); bearer_token reads it
    auto_error=False,
    scheme_name="ApiKey",
    bearerFormat="wmk_<key_id>_<secret>",
    description="An API key from `walletmig api-key create`, sent as `Authorization: Bearer`.",
)


class Caller(BaseModel):
    """The authenticated API key behind a request (never its secret)."""

    model_config = ConfigDict(frozen=True)

    key_id: str
    name: str
    owner: str
    scopes: frozenset[str]


_Entry = tuple[ApiKeyRecord, Caller]


class Authenticator:
    def __init__(self, store: ApiKeyStore, *, cache_ttl_s: float) -> None:
        assert 0 <= cache_ttl_s <= 300
        self._store = store
        self._cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, _Entry]] = {}
        self._loading: dict[str, asyncio.Future[_Entry | None]] = {}

    async def authenticate(self, presented: str | None) -> Caller:
        if not presented:
            raise _unauthorized("send an API key as `Authorization: Bearer <key>`", token=False)
        entry = await self._entry(presented)
        if entry is None:
            raise _unauthorized("unknown API key")
        record, caller = entry
        if record.revoked_at is not None:
            raise _unauthorized("the API key was revoked")
        if record.expires_at is not None and not record.usable(now_ms()):
            raise _unauthorized("the API key expired")
        return caller

    async def _entry(self, presented: str) -> _Entry | None:
        """The key's record and its Caller (built once per cache fill, not per request)."""
        digest = key_hash(presented)
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        # One MongoDB read per key and expiry, however many requests missed together (a
        # refill under load used to send one read per concurrent request). Shielded: a
        # cancelled request does not cancel the read the others wait for.
        loading = self._loading.get(digest)
        if loading is None:
            loading = asyncio.ensure_future(self._load(presented, digest))
            self._loading[digest] = loading
            loading.add_done_callback(lambda done: self._loaded(digest, done))
        return await asyncio.shield(loading)

    async def _load(self, presented: str, digest: str) -> _Entry | None:
        record = await self._store.verify(presented)
        if record is None:
            return None
        caller = Caller(
            key_id=record.key_id, name=record.name, owner=record.owner,
            scopes=frozenset(record.scopes),
        )  # fmt: skip
        if self._cache_ttl_s > 0:
            if len(self._cache) >= CACHE_ENTRIES_MAX:
                self._cache.clear()  # bounded; refilled by the next requests
            self._cache[digest] = (time.monotonic() + self._cache_ttl_s, (record, caller))
        return record, caller

    def _loaded(self, digest: str, done: asyncio.Future[_Entry | None]) -> None:
        self._loading.pop(digest, None)
        if not done.cancelled():
            done.exception()  # retrieved here too: every waiter may have been cancelled


def _unauthorized(detail: str, *, token: bool = True) -> ProblemError:
    challenge = f'{REALM}, error="invalid_token"' if token else REALM
    return ProblemError(
        401, "unauthorized", "Unauthorized", detail, headers={"WWW-Authenticate": challenge}
    )


def bearer_token(scope: Scope) -> str | None:
    """The `Authorization: Bearer` credential, as fastapi.security.HTTPBearer reads it. Read
    here rather than through HTTPBearer as a sub-dependency (a dependency level per request,
    measurable on the read path); gateway.openapi declares the `bearer` scheme on every
    guarded operation instead."""
    raw = b""
    for name, value in scope["headers"]:  # the first one, as Headers.get answers
        if name == b"authorization":  # ASGI servers lower-case header names (Headers relies
            raw = value  # on it too); no Headers object per request
            break
    scheme, _, credential = bytes(raw).decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not credential:
        return None
    return credential


async def authorize(request: Request, spec: OperationSpec) -> Caller:
    """`authorize_scope` for a Request: `guard` wraps it as a dependency."""
    return await authorize_scope(request.scope, spec)


async def authorize_scope(scope: Scope, spec: OperationSpec) -> Caller:
    """Authenticate the request's key (401), check `spec`'s scope (403), for a money-moving
    one a MongoDB recent enough (503), take a rate-limit unit (429); record the caller and
    operation in the scope's state for the request log and metrics (where Starlette's
    `request.state` keeps them). A plain call on the ASGI scope:
    the raw read path (gateway.fastpath) calls it without a Request object."""
    from gateway.state import state_in  # the state module imports this one

    state = state_in(scope)
    caller = await state.authenticator.authenticate(bearer_token(scope))
    recorded = scope.setdefault("state", {})
    recorded["caller"] = caller
    recorded["operation_id"] = spec.operation_id
    if spec.scope.value not in caller.scopes:
        raise ProblemError(
            403, "forbidden", "Forbidden",
            f"the API key lacks the scope {spec.scope.value!r} that "
            f"{spec.operation_id} needs",
        )  # fmt: skip
    if spec.money_moving and not state.mongo_server.passed:  # asked until it passes
        await state.mongo_server.require_for_request()  # a server too old: 503 naming MongoDB
    await state.limiter.enforce(caller.key_id, spec.op_class)
    return caller


def guard(spec: OperationSpec) -> Any:
    """The dependency of a route serving `spec`: returns the Caller."""

    async def check(request: Request) -> Caller:
        return await authorize(request, spec)

    return Depends(check)
