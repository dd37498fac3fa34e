"""Read-only view of a migration: the migration workflow's status (its `status` Query, the
same the CLI and the Web UI show) and the states it published per scope (what the wallet
workers act on, from the migration state store). Needs `migration:read`."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field
from temporalio.client import WorkflowQueryFailedError, WorkflowQueryRejectedError
from temporalio.service import RPCError, RPCStatusCode

from gateway.auth import Caller, guard
from gateway.models import PublishedState
from gateway.operations import GET_MIGRATION
from gateway.problems import ProblemError, dependency_unavailable
from gateway.state import state_of
from messages.migration import QUERY_STATUS, SCOPES_MAX, MigrationStatus, migration_workflow_id
from walletcore.keys import ID_PATTERN

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
