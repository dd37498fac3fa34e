"""WalletClient: how services call the wallet through Temporal.

Writes go to the wallet's entity workflow with Update-with-Start (the workflow is started when
it is not running). Input is validated here first, so a bad request fails fast with an error
naming the field. Temporal failures are turned back into walletcore errors
(InsufficientFundsError, ...). When the workflow closes or continues-as-new at the moment an
update arrives, or a store is briefly unavailable, the update is re-sent within a bounded window
(default 120 s, capped backoff): it lands on the next run, and the workflow's guard plus the
stores' idempotency by transaction id make a repeat safe, so no accepted update is dropped and
none is applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowFailureError,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from messages.errors import application_errors, wallet_error_from_failure
from messages.wallet import (
    BACKLOG_MAX_DEFAULT,
    GET_BALANCE_WORKFLOW,
    GET_MULTI_BALANCE_WORKFLOW,
    IDLE_TIMEOUT_S_DEFAULT,
    MAX_OPS_PER_RUN_DEFAULT,
    ROTATING_ERROR_TYPE,
    WALLET_QUERY_STATUS,
    WALLET_UPDATE_APPLY,
    WALLET_WORKFLOW,
    MultiBalance,
    WalletCommand,
    WalletStatus,
    WalletWorkflowInput,
)
from walletcore.balances import WalletBalance
from walletcore.errors import StoreUnavailableError
from walletcore.keys import WalletKey
from walletcore.operations import (
    AddCredit,
    GetBalance,
    GetMultiBalance,
    OperationResult,
    SubtractCredit,
    Void,
    WalletOperation,
    parse_input,
    validate_operation,
)

M = TypeVar("M", bound=BaseModel)

# Re-sends when a run closes/rotates under an update or a store is briefly unavailable (e.g.
# a crashed worker's MongoDB transaction holds the wallet until its 60 s lifetime ends).
RETRY_WINDOW_S_DEFAULT = 120.0
ATTEMPTS_MAX = 1000
BACKOFF_BASE_S = 0.01
BACKOFF_CAP_S = 1.0
# Temporal's failure type when an accepted update's workflow completed before it finished.
ACCEPTED_UPDATE_COMPLETED = "AcceptedUpdateCompletedWorkflow"


class WalletClient:
    def __init__(
        self,
        client: Client,
        task_queue: str,
        *,
        idle_timeout_s: float = IDLE_TIMEOUT_S_DEFAULT,
        max_ops_per_run: int = MAX_OPS_PER_RUN_DEFAULT,
        backlog_max: int = BACKLOG_MAX_DEFAULT,
        retry_window_s: float = RETRY_WINDOW_S_DEFAULT,
    ) -> None:
        assert task_queue, "task_queue is required"
        assert 0 <= retry_window_s <= 3600
        self._client = client
        self._task_queue = task_queue
        self._retry_window_s = retry_window_s
        # Validated once: a bad configuration fails at construction, not on the first call.
        self._template = WalletWorkflowInput(
            wallet=WalletKey(client_id="x", country="USA", currency="USD"),
            idle_timeout_s=idle_timeout_s,
            max_ops_per_run=max_ops_per_run,
            backlog_max=backlog_max,
        )
        self.retries = 0  # observability: updates re-sent because a run closed under them

    @property
    def temporal(self) -> Client:
        return self._client

    # ---- writes --------------------------------------------------------------------------

    async def add_credit(self, op: AddCredit | Mapping[str, Any]) -> OperationResult:
        return await self.apply(_parse(AddCredit, op))

    async def subtract_credit(self, op: SubtractCredit | Mapping[str, Any]) -> OperationResult:
        return await self.apply(_parse(SubtractCredit, op))

    async def void(self, op: Void | Mapping[str, Any]) -> OperationResult:
        return await self.apply(_parse(Void, op))

    async def apply(self, op: WalletOperation) -> OperationResult:
        validate_operation(op)  # InvalidInputError / InvalidAmountError naming the field
        command = WalletCommand.of(op)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_window_s
        last_reason = ""
        for attempt in range(ATTEMPTS_MAX):
            start: WithStartWorkflowOperation[Any, Any] = WithStartWorkflowOperation(
                WALLET_WORKFLOW,
                self._template.model_copy(update={"wallet": op.wallet}),
                id=op.wallet.workflow_id,
                task_queue=self._task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            )
            try:
                result: OperationResult = await self._client.execute_update_with_start_workflow(
                    WALLET_UPDATE_APPLY,
                    command,
                    start_workflow_operation=start,
                    result_type=OperationResult,
                    # A fresh id per attempt: a repeat is answered by the workflow's guard.
                    id=f"{command.kind.value}:{command.transaction_id}:{uuid.uuid4().hex[:12]}",
                )
                return result
            except WorkflowUpdateFailedError as err:
                await _settle(start)
                domain = wallet_error_from_failure(err.cause)
                if _run_closed_under_us(err.cause):
                    last_reason = "the workflow run was closing"
                elif domain is not None and domain.retryable:
                    last_reason = str(domain)  # e.g. MongoDB still locked after a crash
                elif domain is not None:
                    raise domain from None
                else:
                    raise
            except RPCError as err:
                await _settle(start)
                if not _workflow_gone(err):
                    raise
                last_reason = err.message
            self.retries += 1
            pause_s = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 10))
            if loop.time() + pause_s > deadline:
                break
            await asyncio.sleep(pause_s)
        raise StoreUnavailableError(
            f"{command.kind.value} {command.transaction_id} on {op.wallet.workflow_id} not "
            f"applied within {self._retry_window_s:g} s ({last_reason}); retry with the same "
            "transaction_id (idempotent)"
        )

    # ---- reads ---------------------------------------------------------------------------

    async def get_balance(self, wallet: WalletKey | Mapping[str, Any]) -> WalletBalance:
        query = _parse(GetBalance, {"wallet": wallet})
        try:
            balance: WalletBalance = await self._client.execute_workflow(
                GET_BALANCE_WORKFLOW,
                query,
                result_type=WalletBalance,
                id=f"balance/{query.wallet.canonical}/{uuid.uuid4().hex}",
                task_queue=self._task_queue,
            )
        except WorkflowFailureError as err:
            raise _domain_or(err) from None
        return balance

    async def get_multi_balance(self, client_id: str) -> list[WalletBalance]:
        query = _parse(GetMultiBalance, {"client_id": client_id})
        try:
            result: MultiBalance = await self._client.execute_workflow(
                GET_MULTI_BALANCE_WORKFLOW,
                query,
                result_type=MultiBalance,
                id=f"balances/{query.client_id}/{uuid.uuid4().hex}",
                task_queue=self._task_queue,
            )
        except WorkflowFailureError as err:
            raise _domain_or(err) from None
        return result.balances

    async def status(self, wallet: WalletKey) -> WalletStatus | None:
        """The wallet workflow's status query (latest run), or None if it never ran."""
        handle = self._client.get_workflow_handle(wallet.workflow_id)
        try:
            status: WalletStatus = await handle.query(WALLET_QUERY_STATUS, result_type=WalletStatus)
            return status
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return None
            raise


def _parse(model: type[M], data: object) -> M:
    """A model instance passes as is; anything else is validated into one (errors name the
    field)."""
    if type(data) is model:  # exact: a SubtractCredit must not pass as an AddCredit
        return data
    if isinstance(data, BaseModel):
        data = data.model_dump()
    return parse_input(model, data)


async def _settle(start: WithStartWorkflowOperation[Any, Any]) -> None:
    """Consume the start operation's outcome after a failed call, so its future does not
    report 'exception was never retrieved'."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(start.workflow_handle(), timeout=0.01)


def _run_closed_under_us(cause: BaseException) -> bool:
    """The update never ran to completion because its run was closing: safe to resend."""
    return any(
        failure.type in (ROTATING_ERROR_TYPE, ACCEPTED_UPDATE_COMPLETED)
        for failure in application_errors(cause)
    )


def _workflow_gone(err: RPCError) -> bool:
    """The update never reached a durable stage because its run was closing: safe to resend.

    - NOT_FOUND "workflow execution already completed": the run completed between admission
      and delivery of the update.
    - WorkflowNotReady "unexpected workflow task failure": the workflow task carrying the update
      failed (e.g. UnhandledCommand when the run continued-as-new while an event arrived);
      nothing of that task was recorded.
    """
    text = f"{err.message} {err.raw_grpc_status.decode(errors='replace')}"
    return any(marker in text for marker in _RESENDABLE_MARKERS)


_RESENDABLE_MARKERS = (
    "already completed",
    "WorkflowNotReady",
    "unexpected workflow task failure",
    "workflow is closing",
)


def _domain_or(err: WorkflowFailureError) -> Exception:
    domain = wallet_error_from_failure(err.cause)
    return domain if domain is not None else err
