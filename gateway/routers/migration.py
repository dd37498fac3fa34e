"""A migration over HTTP: its status (the migration workflow's `status` Query, the same the CLI
and the Web UI show, and the states it published per scope; `migration:read`) and its control:
the workflow's Updates sent by name (never importing the workflow), `migration:operate` for
advance, force-advance, rollback, rollout, pause and resume, `migration:approve` for the
four-eyes `approve`.

The actor the workflow records (its audit, the four-eyes check) is the API key's name: a body
cannot name another. Each control request needs an Idempotency-Key: a retry replays the first
answer, and the Temporal Update id is derived from (owner, key), so even a retry after the key
record was lost is deduplicated by the server instead of moving the migration twice. A refused
Update answers 409 (`update-refused`) with the workflow's one-line reason and next step; a
misfit input 422 naming the field.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.types import DecoratedCallable
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response
from temporalio.client import (
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.service import RPCError, RPCStatusCode

from gateway.auth import Caller, guard
from gateway.idempotency import IdempotencyKey, derived_transaction_id, parse_key, run_idempotent
from gateway.models import PublishedState
from gateway.operations import (
    ADVANCE_MIGRATION,
    APPROVE_MIGRATION,
    FORCE_ADVANCE_MIGRATION,
    GET_MIGRATION,
    PAUSE_MIGRATION,
    RESUME_MIGRATION,
    ROLLBACK_MIGRATION,
    SET_MIGRATION_ROLLOUT,
    OperationSpec,
)
from gateway.problems import ProblemError, dependency_unavailable
from gateway.state import state_of
from messages.migration import (
    QUERY_STATUS,
    REASON_MAX,
    ROLLBACK_TARGETS,
    SCOPES_MAX,
    UPDATE_ADVANCE,
    UPDATE_APPROVE,
    UPDATE_FORCE_ADVANCE,
    UPDATE_PAUSE,
    UPDATE_RESUME,
    UPDATE_ROLLBACK,
    UPDATE_SET_ROLLOUT,
    AdvanceRequest,
    ApproveRequest,
    ForceAdvanceRequest,
    MigrationStatus,
    PauseRequest,
    RollbackRequest,
    SetRolloutRequest,
    UpdateInputError,
    UpdateRequest,
    migration_workflow_id,
    parse_update_input,
)
from walletcore.keys import FREE_TEXT_PATTERN, ID_PATTERN

router = APIRouter(prefix="/v1", tags=["migration"])

MigrationName = Annotated[
    str, Path(min_length=1, max_length=128, pattern=ID_PATTERN, description="e.g. `main`")
]


class MigrationOut(BaseModel):
    name: str
    status: MigrationStatus = Field(description="the migration workflow's `status` Query")
    published: list[PublishedState] = Field(
        description="the state published for each of the migration's scopes"
    )


@router.get(
    "/migrations/{name}", operation_id=GET_MIGRATION.operation_id, response_model=MigrationOut,
    summary="A migration's phase, evidence, gates and published states",
)  # fmt: skip
async def get_migration(
    request: Request, name: MigrationName, caller: Annotated[Caller, guard(GET_MIGRATION)]
) -> MigrationOut:
    state = state_of(request)
    handle = state.temporal.get_workflow_handle(migration_workflow_id(name))
    timeout = timedelta(seconds=state.settings.dependency_timeout_s)
    try:
        status = await handle.query(QUERY_STATUS, result_type=MigrationStatus, rpc_timeout=timeout)
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise ProblemError(
                404, "not-found", "Not found", f"no migration {name!r}", field="name"
            ) from None
        raise dependency_unavailable("temporal", f"the migration status query failed: "
                                     f"{err.message}") from None  # fmt: skip
    except (WorkflowQueryFailedError, WorkflowQueryRejectedError) as err:
        raise dependency_unavailable("temporal", f"the migration workflow did not answer its "
                                     f"status query: {err}") from None  # fmt: skip
    published = [
        PublishedState.of(await state.stores.migration.get(scope))
        for scope in status.scopes[:SCOPES_MAX]
    ]
    return MigrationOut(name=name, status=status, published=published)


# ---- control: the migration workflow's Updates ---------------------------------------------

Reason = Annotated[str, Field(max_length=REASON_MAX, pattern=FREE_TEXT_PATTERN,
                              description="why (recorded in the migration audit)")]  # fmt: skip


class ControlBody(BaseModel):
    """An Update's input without `actor`: the workflow records the API key's name."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    reason: Reason = ""


class AdvanceBody(ControlBody):
    confirm: bool = Field(default=False, description="required to enter `complete`")


class ForceAdvanceBody(ControlBody):
    reason: Annotated[str, Field(min_length=1, max_length=REASON_MAX, pattern=FREE_TEXT_PATTERN,
                                 description="why the failed gates may be skipped")]  # fmt: skip
    confirm: bool = False


class RollbackBody(ControlBody):
    to: str = Field(description="an earlier phase", json_schema_extra={"enum":
                    list(ROLLBACK_TARGETS)})  # fmt: skip
    rollout_percent: int | None = Field(default=None, ge=0, le=100,
                                        description="for read_cutover")  # fmt: skip


class RolloutBody(ControlBody):
    percent: int = Field(ge=0, le=100, description="read-cutover percentage (raising is gated)")


# operationId -> (the Update's name, its input model in messages.migration)
_UPDATES: dict[str, tuple[str, type[UpdateRequest]]] = {
    ADVANCE_MIGRATION.operation_id: (UPDATE_ADVANCE, AdvanceRequest),
    FORCE_ADVANCE_MIGRATION.operation_id: (UPDATE_FORCE_ADVANCE, ForceAdvanceRequest),
    ROLLBACK_MIGRATION.operation_id: (UPDATE_ROLLBACK, RollbackRequest),
    SET_MIGRATION_ROLLOUT.operation_id: (UPDATE_SET_ROLLOUT, SetRolloutRequest),
    PAUSE_MIGRATION.operation_id: (UPDATE_PAUSE, PauseRequest),
    RESUME_MIGRATION.operation_id: (UPDATE_RESUME, PauseRequest),
    APPROVE_MIGRATION.operation_id: (UPDATE_APPROVE, ApproveRequest),
}


async def _control(
    request: Request, caller: Caller, spec: OperationSpec, name: str, raw_key: str,
    body: ControlBody,
) -> Response:  # fmt: skip
    update, model = _UPDATES[spec.operation_id]
    payload: dict[str, Any] = {**body.model_dump(exclude_unset=True), "actor": caller.name}
    try:  # the workflow's own input rules, answered before the key is claimed
        parse_update_input(update, model, payload)
    except UpdateInputError as err:
        raise ProblemError(422, "validation-error", "Invalid request", str(err)) from None
    update_id = derived_transaction_id(caller.owner, parse_key(raw_key))
    state = state_of(request)

    async def execute() -> MigrationStatus:
        return await _send_update(request, name, update, payload, update_id)

    return await run_idempotent(request, state.idempotency, caller, spec, raw_key, body,
                                update_id, execute)  # fmt: skip


async def _send_update(
    request: Request, name: str, update: str, payload: dict[str, Any], update_id: str
) -> MigrationStatus:
    state = state_of(request)
    handle = state.temporal.get_workflow_handle(migration_workflow_id(name))
    timeout_s = state.settings.write_timeout_s
    try:
        return await asyncio.wait_for(handle.execute_update(
            update, payload, id=update_id, result_type=MigrationStatus,
            rpc_timeout=timedelta(seconds=timeout_s)), timeout_s)  # fmt: skip
    except WorkflowUpdateFailedError as err:
        # The workflow's answer: one line naming the rule or gates and the next step.
        raise ProblemError(409, "update-refused", "Update refused",
                           str(err.cause or err)) from None  # fmt: skip
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise ProblemError(404, "not-found", "Not found", f"no migration {name!r}",
                               field="name") from None  # fmt: skip
        raise dependency_unavailable("temporal", f"the {update} Update failed: "
                                     f"{err.message}") from None  # fmt: skip
    except TimeoutError:
        raise dependency_unavailable("temporal", f"the migration workflow did not answer "
                                     f"{update} within {timeout_s:g} s; retry with the same "
                                     "Idempotency-Key") from None  # fmt: skip


def _route(
    spec: OperationSpec, path: str, summary: str
) -> Callable[[DecoratedCallable], DecoratedCallable]:
    return router.post(f"/migrations/{{name}}/{path}", operation_id=spec.operation_id,
                       response_model=MigrationStatus, summary=summary)  # fmt: skip


@_route(ADVANCE_MIGRATION, "advance", "Next phase or rollout step if every gate passes")
async def advance_migration(
    request: Request, name: MigrationName, body: AdvanceBody, idempotency_key: IdempotencyKey,
    caller: Annotated[Caller, guard(ADVANCE_MIGRATION)],
) -> Response:  # fmt: skip
    return await _control(request, caller, ADVANCE_MIGRATION, name, idempotency_key, body)


@_route(FORCE_ADVANCE_MIGRATION, "force-advance", "Next step past failed gates (reason "
        "required; four eyes when the migration asks for approvals)")
async def force_advance_migration(
    request: Request, name: MigrationName, body: ForceAdvanceBody,
    idempotency_key: IdempotencyKey, caller: Annotated[Caller, guard(FORCE_ADVANCE_MIGRATION)],
) -> Response:  # fmt: skip
    return await _control(request, caller, FORCE_ADVANCE_MIGRATION, name, idempotency_key, body)


@_route(ROLLBACK_MIGRATION, "rollback", "Back to an earlier phase")
async def rollback_migration(
    request: Request, name: MigrationName, body: RollbackBody, idempotency_key: IdempotencyKey,
    caller: Annotated[Caller, guard(ROLLBACK_MIGRATION)],
) -> Response:  # fmt: skip
    return await _control(request, caller, ROLLBACK_MIGRATION, name, idempotency_key, body)


@_route(SET_MIGRATION_ROLLOUT, "rollout", "Set the read-cutover percentage")
async def set_migration_rollout(
    request: Request, name: MigrationName, body: RolloutBody, idempotency_key: IdempotencyKey,
    caller: Annotated[Caller, guard(SET_MIGRATION_ROLLOUT)],
) -> Response:  # fmt: skip
    return await _control(request, caller, SET_MIGRATION_ROLLOUT, name, idempotency_key, body)


@_route(PAUSE_MIGRATION, "pause", "Stop advancing and automatic rollback")
async def pause_migration(
    request: Request, name: MigrationName, body: ControlBody, idempotency_key: IdempotencyKey,
    caller: Annotated[Caller, guard(PAUSE_MIGRATION)],
) -> Response:  # fmt: skip
    return await _control(request, caller, PAUSE_MIGRATION, name, idempotency_key, body)


@_route(RESUME_MIGRATION, "resume", "Undo pause")
async def resume_migration(
    request: Request, name: MigrationName, body: ControlBody, idempotency_key: IdempotencyKey,
    caller: Annotated[Caller, guard(RESUME_MIGRATION)],
) -> Response:  # fmt: skip
    return await _control(request, caller, RESUME_MIGRATION, name, idempotency_key, body)


@_route(APPROVE_MIGRATION, "approve", "Run the pending force_advance or complete (four eyes: "
        "a key with another name than the requester's)")
async def approve_migration(
    request: Request, name: MigrationName, body: ControlBody, idempotency_key: IdempotencyKey,
    caller: Annotated[Caller, guard(APPROVE_MIGRATION)],
) -> Response:  # fmt: skip
    return await _control(request, caller, APPROVE_MIGRATION, name, idempotency_key, body)
