"""`/healthz`: the process answers. `/readyz`: every dependency, with its state; 200 when all
are up, else 503 with the same report (the down ones named). No authentication: load
balancers and orchestrators call them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import JSONResponse

from gateway.state import GatewayState, state_of
from walletcore.errors import WalletError

router = APIRouter(tags=["health"])

DETAIL_MAX = 200
TB_PROBE_ACCOUNT_ID = 1  # any valid id: an absent account is an empty answer, still an answer


class Health(BaseModel):
    status: Literal["ok"]


class DependencyState(BaseModel):
    state: Literal["up", "down"]
    latency_ms: float
    detail: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    dependencies: dict[str, DependencyState]


@router.get("/healthz", operation_id="healthz", response_model=Health,
            summary="The process is alive")  # fmt: skip
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz", operation_id="readyz", response_model=Readiness,
    summary="Every dependency with its state (503 when one is down)",
    responses={503: {"model": Readiness, "description": "a dependency is down"}},
)  # fmt: skip
async def readyz(request: Request) -> JSONResponse:
    state = state_of(request)
    probes = _probes(state)
    timeout_s = state.settings.dependency_timeout_s
    results = await asyncio.gather(*(_probe(probe, timeout_s) for probe in probes.values()))
    report = Readiness(
        status="ready" if all(r.state == "up" for r in results) else "not_ready",
        dependencies=dict(zip(probes, results, strict=True)),
    )
    return JSONResponse(report.model_dump(mode="json"),
                        status_code=200 if report.status == "ready" else 503)  # fmt: skip


def _probes(state: GatewayState) -> dict[str, Callable[[], Awaitable[Any]]]:
    stores = state.stores
    return {
        "temporal": lambda: state.temporal.service_client.check_health(),
        "mongodb": lambda: _mongodb(state),
        "redis": lambda: stores.redis.ping(),
        "rate_limiter": state.limiter.ping,
        "tigerbeetle": lambda: stores.tb_client.lookup_accounts([TB_PROBE_ACCOUNT_ID]),
    }


async def _mongodb(state: GatewayState) -> None:
    """Reachable and recent enough: the release is asked until it passes (MongoServerCheck);
    a server found failing is asked again when it answers (it may be another release)."""
    await state.mongo_server.require()
    try:
        await state.stores.db.command("ping")
    except BaseException:  # unreachable, failing, or cancelled at the probe's bound (no answer)
        state.mongo_server.forget()
        raise


async def _probe(probe: Callable[[], Awaitable[Any]], timeout_s: float) -> DependencyState:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(probe(), timeout_s)
    except WalletError as exc:  # the platform's own verdict (an unsupported server): its line
        detail = exc.message[:DETAIL_MAX]
        return DependencyState(state="down", latency_ms=_ms(started), detail=detail)
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"[:DETAIL_MAX]
        return DependencyState(state="down", latency_ms=_ms(started), detail=detail)
    return DependencyState(state="up", latency_ms=_ms(started))


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
