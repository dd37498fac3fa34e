"""WalletClient: how services call the wallet through Temporal.

Writes go to the wallet's entity workflow with Update-with-Start (the workflow is started when
it is not running). Input is validated here first, so a bad request fails fast with an error
naming the field. Temporal failures are turned back into walletcore errors
(InsufficientFundsError, ...).

Every call answers within `retry_window_s` (default 15 s), the caller's bound:
- a run closing or continuing-as-new under the update: re-sent at once (it lands on the next run);
- a store outage: the wallet workflow answers StoreUnavailableError naming the store within its
  own write bound (10 s); the update is re-sent while the window leaves room for another answer,
  else that error is the caller's answer;
- Temporal unreachable (connection refused, a dropped connection, a deadline): re-sent within the
  window with the same transaction id;
- no answer when the window ends: OutcomeUnknownError (a StoreUnavailableError): the operation
  may or may not have been applied and resending the same transaction id is safe.
The workflow's guard and the stores' idempotency by transaction id make every re-send safe, so
no accepted update is dropped and none is applied twice. Callers never see a temporalio RPCError
or transport exception: a request Temporal refuses for good (permission, unknown namespace) is a
ConfigurationError. Reads and the status query are bounded and typed the same way.

Workflow ids name no customer: the client is built with the deployment's id key and derives
every wallet workflow id (and read workflow id) from it (walletcore.wallet_ids, `workflow_id`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from temporalio.client import (
    Client,
    RPCTimeoutOrCancelledError,
    WithStartWorkflowOperation,
    WorkflowFailureError,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
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
    BacklogDirection,
    MultiBalance,
    WalletCommand,
    WalletStatus,
    WalletWorkflowInput,
)
from walletcore.balances import WalletBalance
from walletcore.errors import ConfigurationError, OutcomeUnknownError, StoreUnavailableError
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
from walletcore.wallet_ids import (
    check_id_key,
    client_ref,
    transaction_ref,
    wallet_ref,
    wallet_workflow_id,
)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# The caller's bound on one call: every call answers (a result or a typed error) within it.
# Longer than the wallet workflow's own bound on the answering write (10 s), so a store outage
# reaches the caller as StoreUnavailableError naming the store, not as "no answer". A caller that
# would rather ride out a longer stall (e.g. a crashed worker's MongoDB transaction holds the
# wallet for up to 60 s) passes a longer window, or resends with the same transaction id.
RETRY_WINDOW_S_DEFAULT = 15.0
RETRY_WINDOW_S_MAX = 3600.0
ATTEMPTS_MAX = 1000
BACKOFF_BASE_S = 0.01
BACKOFF_CAP_S = 1.0
# Temporal's failure type when an accepted update's workflow completed before it finished.
ACCEPTED_UPDATE_COMPLETED = "AcceptedUpdateCompletedWorkflow"
# RPC statuses that say Temporal could not be reached or did not answer in time: nothing is
# known about the request, and a resend with the same transaction id is safe.
TRANSIENT_RPC_STATUSES = frozenset({
    RPCStatusCode.UNAVAILABLE,
    RPCStatusCode.DEADLINE_EXCEEDED,
    RPCStatusCode.CANCELLED,
    RPCStatusCode.RESOURCE_EXHAUSTED,
    RPCStatusCode.ABORTED,
    RPCStatusCode.INTERNAL,
    RPCStatusCode.UNKNOWN,
})
TEMPORAL_CONNECT_FAILURE = "Failed client connect"  # a lazy temporalio Client's RuntimeError
# A read workflow nobody waits for any more must not linger: the caller gave up at its bound.
READ_WORKFLOW_TIMEOUT_MIN_S = 60.0
# The backlog report: bounded in wallets and in concurrent status queries.
BACKLOG_REPORT_WALLETS_DEFAULT = 200
BACKLOG_REPORT_WALLETS_MAX = 10_000
BACKLOG_REPORT_OLDEST_MAX = 10
BACKLOG_QUERY_CONCURRENCY = 16
BACKLOG_QUERY_TIMEOUT_S = 5.0


class WalletBacklog(BaseModel):
    """One wallet's backlog: operations answered by one store and not applied to the other yet."""

    model_config = ConfigDict(frozen=True)

    wallet: WalletKey
    length: int = Field(ge=0)
    direction: BacklogDirection | None
    oldest_at: datetime | None
    age_s: float = Field(ge=0)  # how long the oldest item has waited (0 when empty)


class BacklogReport(BaseModel):
    """The catch-up across running wallet workflows (at most `limit` of them), for operators:
    during a TigerBeetle outage in dual_write callers see nothing, this shows what is owed."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    task_queue: str
    running: int = Field(ge=0)  # running wallet workflows examined
    listed_all: bool  # False: more were running than the limit; the figures cover `running`
    answered: int = Field(ge=0)  # status queries answered (the rest timed out or failed)
    wallets_with_backlog: int = Field(ge=0)
    backlog_total: int = Field(ge=0)
    backlog_age_s: float = Field(ge=0)  # the oldest waiting item's age (0 when none waits)
    oldest: list[WalletBacklog]  # wallets with the oldest items first (a few)


def backlog_of(status: WalletStatus, now: datetime) -> WalletBacklog:
    """The backlog a wallet workflow's status query reports, with its age at `now`."""
    oldest = status.oldest_backlog_at
    age_s = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
    return WalletBacklog(
        wallet=status.wallet, length=status.backlog_length, direction=status.backlog_direction,
        oldest_at=oldest, age_s=age_s,
    )  # fmt: skip


@dataclass(frozen=True)
class _Retry:
    """An attempt that may be resent: why, and whether its update may still be applied."""

    reason: str  # names what failed first: "MongoDB: ...", "Temporal unreachable ..."
    unknown: bool  # no answer came back: the update may have been admitted and may still apply
    store: bool = False  # the wallet workflow answered that a store is unavailable


class WalletClient:
    def __init__(
        self,
        client: Client,
        task_queue: str,
        *,
        id_key: bytes,
        idle_timeout_s: float = IDLE_TIMEOUT_S_DEFAULT,
        max_ops_per_run: int = MAX_OPS_PER_RUN_DEFAULT,
        backlog_max: int = BACKLOG_MAX_DEFAULT,
        retry_window_s: float = RETRY_WINDOW_S_DEFAULT,
    ) -> None:
        assert task_queue, "task_queue is required"
        assert 0 < retry_window_s <= RETRY_WINDOW_S_MAX
        self._client = client
        self._task_queue = task_queue
        # The deployment's id key (walletconfig: WALLETMIG_ID_HASH_KEY_FILE): every process of
        # one deployment must hold the same one, or they address different workflows.
        self._id_key = check_id_key(id_key)
        self._retry_window_s = retry_window_s
        # Validated once: a bad configuration fails at construction, not on the first call.
        self._template = WalletWorkflowInput(
            wallet=WalletKey(client_id="x", country="USA", currency="USD"),
            idle_timeout_s=idle_timeout_s,
            max_ops_per_run=max_ops_per_run,
            backlog_max=backlog_max,
        )
        self.retries = 0  # observability: attempts re-sent (run closing, outage)

    @property
    def temporal(self) -> Client:
        return self._client

    @property
    def retry_window_s(self) -> float:
        return self._retry_window_s

    def workflow_id(self, wallet: WalletKey) -> str:
        """The wallet's entity workflow id: a keyed hash, no client id in it."""
        return wallet_workflow_id(self._id_key, wallet)

    def _transaction_ref(self, command: WalletCommand) -> str:
        return transaction_ref(self._id_key, command.transaction_id)

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
        what = f"{command.kind.value} {command.transaction_id} on {self.workflow_id(op.wallet)}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_window_s
        reason = "no attempt was made"
        store_reason: str | None = None  # the workflow's last word on a store outage
        unknown = False  # some attempt got no answer: its update may still be applied
        for attempt in range(ATTEMPTS_MAX):
            began = loop.time()
            outcome = await self._send(op, command, deadline - began)
            if isinstance(outcome, OperationResult):
                return outcome
            reason, unknown = outcome.reason, unknown or outcome.unknown
            took_s = loop.time() - began
            if outcome.store:
                store_reason = outcome.reason
            pause_s = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 10))
            # A store outage the workflow took `took_s` to report will likely take as long
            # again: answer now rather than resend into a window too short for an answer.
            needed_s = pause_s + (took_s if outcome.store else 0.0)
            if loop.time() + needed_s >= deadline:
                break
            self.retries += 1
            await asyncio.sleep(pause_s)
        # A store the workflow named explains more than the re-send the bound cut short.
        why = store_reason or reason
        window = f"{self._retry_window_s:g} s"
        if unknown:
            raise OutcomeUnknownError(
                f"{why}; {what}: no answer within {window}, the outcome is unknown; "
                "resend the same transaction_id (safe: idempotent)"
            )
        raise StoreUnavailableError(
            f"{why}; {what} failed within {window}; retry with the same transaction_id "
            "(idempotent)"
        )

    async def _send(
        self, op: WalletOperation, command: WalletCommand, remaining_s: float
    ) -> OperationResult | _Retry:
        """One Update-with-Start, cut at `remaining_s`: the result, a resendable failure, or a
        final error (raised)."""
        if remaining_s <= 0:
            return _Retry("the wallet workflow did not answer in time", unknown=True)
        start: WithStartWorkflowOperation[Any, Any] = WithStartWorkflowOperation(
            WALLET_WORKFLOW,
            self._template.model_copy(update={"wallet": op.wallet}),
            id=self.workflow_id(op.wallet),
            task_queue=self._task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        )
        try:
            async with asyncio.timeout(remaining_s):
                result: OperationResult = await self._client.execute_update_with_start_workflow(
                    WALLET_UPDATE_APPLY,
                    command,
                    start_workflow_operation=start,
                    result_type=OperationResult,
                    # A fresh id per attempt: a repeat is answered by the workflow's guard.
                    # The transaction id is hashed: Update ids are stored in the clear.
                    id=f"{command.kind.value}:{self._transaction_ref(command)}:{uuid.uuid4().hex[:12]}",
                    rpc_timeout=timedelta(seconds=remaining_s),
                )
            return result
        except WorkflowUpdateFailedError as err:
            await _settle(start)
            domain = wallet_error_from_failure(err.cause)
            if _run_closed_under_us(err.cause):
                return _Retry("the workflow run was closing", unknown=False)
            if domain is not None and domain.retryable:
                return _Retry(str(domain), unknown=False, store=True)  # "MongoDB: ..."
            if domain is not None:
                raise domain from None
            raise
        except (RPCError, RPCTimeoutOrCancelledError, TimeoutError, RuntimeError) as err:
            await _settle(start)
            _raise_if_cancelled()
            if isinstance(err, RPCError) and _workflow_gone(err):
                return _Retry(err.message, unknown=False)
            why = _unreachable(err)
            if why is None and isinstance(err, RPCError):
                raise _refused(err) from err
            if why is None:
                raise  # not a transport failure: a bug, shown as it is
            return _Retry(why, unknown=True)

    # ---- reads ---------------------------------------------------------------------------

    async def get_balance(self, wallet: WalletKey | Mapping[str, Any]) -> WalletBalance:
        query = _parse(GetBalance, {"wallet": wallet})

        async def read(remaining_s: float) -> WalletBalance:
            balance: WalletBalance = await self._client.execute_workflow(
                GET_BALANCE_WORKFLOW,
                query,
                result_type=WalletBalance,
                id=f"balance/{wallet_ref(self._id_key, query.wallet)}/{uuid.uuid4().hex}",
                task_queue=self._task_queue,
                execution_timeout=self._read_workflow_timeout(),
                rpc_timeout=timedelta(seconds=remaining_s),
            )
            return balance

        return await self._read(f"balance of {self.workflow_id(query.wallet)}", read)

    async def get_multi_balance(self, client_id: str) -> list[WalletBalance]:
        query = _parse(GetMultiBalance, {"client_id": client_id})

        async def read(remaining_s: float) -> list[WalletBalance]:
            result: MultiBalance = await self._client.execute_workflow(
                GET_MULTI_BALANCE_WORKFLOW,
                query,
                result_type=MultiBalance,
                id=f"balances/{client_ref(self._id_key, query.client_id)}/{uuid.uuid4().hex}",
                task_queue=self._task_queue,
                execution_timeout=self._read_workflow_timeout(),
                rpc_timeout=timedelta(seconds=remaining_s),
            )
            return result.balances

        who = client_ref(self._id_key, query.client_id)
        return await self._read(f"balances of client {who}", read)

    async def status(self, wallet: WalletKey) -> WalletStatus | None:
        """The wallet workflow's status query (latest run), or None if it never ran."""
        workflow_id = self.workflow_id(wallet)
        handle = self._client.get_workflow_handle(workflow_id)

        async def ask(remaining_s: float) -> WalletStatus | None:
            try:
                status: WalletStatus = await handle.query(
                    WALLET_QUERY_STATUS, result_type=WalletStatus,
                    rpc_timeout=timedelta(seconds=remaining_s),
                )  # fmt: skip
                return status
            except RPCError as err:
                if err.status == RPCStatusCode.NOT_FOUND:
                    return None
                raise

        return await self._read(f"status of {workflow_id}", ask)

    async def backlog_report(
        self, *, limit: int = BACKLOG_REPORT_WALLETS_DEFAULT
    ) -> BacklogReport:
        """The backlogs of the running wallet workflows of this task queue (at most `limit`,
        listed from Temporal's visibility store, each asked its status query)."""
        assert 1 <= limit <= BACKLOG_REPORT_WALLETS_MAX
        ids = await self._read("running wallet workflows", lambda _: self._running(limit + 1))
        listed_all = len(ids) <= limit
        gate = asyncio.Semaphore(BACKLOG_QUERY_CONCURRENCY)

        async def ask(workflow_id: str) -> WalletStatus | None:
            async with gate:
                try:
                    async with asyncio.timeout(BACKLOG_QUERY_TIMEOUT_S):
                        handle = self._client.get_workflow_handle(workflow_id)
                        status: WalletStatus = await handle.query(
                            WALLET_QUERY_STATUS, result_type=WalletStatus)
                        return status
                except (RPCError, RPCTimeoutOrCancelledError, TimeoutError,
                        WorkflowQueryFailedError, WorkflowQueryRejectedError):
                    _raise_if_cancelled()
                    return None  # counted as unanswered: one wallet never fails the report

        statuses = [s for s in await asyncio.gather(*(ask(i) for i in ids[:limit])) if s]
        now = datetime.now(UTC)
        waiting = sorted((backlog_of(s, now) for s in statuses if s.backlog_length > 0),
                         key=lambda b: b.age_s, reverse=True)  # fmt: skip
        return BacklogReport(
            at=now, task_queue=self._task_queue, running=len(ids[:limit]),
            listed_all=listed_all, answered=len(statuses), wallets_with_backlog=len(waiting),
            backlog_total=sum(b.length for b in waiting),
            backlog_age_s=waiting[0].age_s if waiting else 0.0,
            oldest=waiting[:BACKLOG_REPORT_OLDEST_MAX],
        )  # fmt: skip

    async def _running(self, limit: int) -> list[str]:
        query = (
            f"WorkflowType = '{WALLET_WORKFLOW}' AND ExecutionStatus = 'Running' "
            f"AND TaskQueue = '{self._task_queue}'"
        )
        return [w.id async for w in self._client.list_workflows(query, limit=limit)]

    def _read_workflow_timeout(self) -> timedelta:
        return timedelta(seconds=max(READ_WORKFLOW_TIMEOUT_MIN_S, 2 * self._retry_window_s))

    async def _read(self, what: str, call: Callable[[float], Awaitable[T]]) -> T:
        """A read through Temporal, answered within the window: repeating a read is always
        safe, so Temporal being unreachable is retried; then StoreUnavailableError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_window_s
        reason = "no attempt was made"
        for attempt in range(ATTEMPTS_MAX):
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                break
            try:
                async with asyncio.timeout(remaining_s):
                    return await call(remaining_s)
            except WorkflowFailureError as err:
                raise _domain_or(err) from None
            except (RPCError, RPCTimeoutOrCancelledError, TimeoutError, RuntimeError) as err:
                _raise_if_cancelled()
                why = _unreachable(err)
                if why is None and isinstance(err, RPCError):
                    raise _refused(err) from err
                if why is None:
                    raise  # not a transport failure: a bug, shown as it is
                reason = why
            self.retries += 1
            pause_s = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 10))
            if loop.time() + pause_s >= deadline:
                break
            await asyncio.sleep(pause_s)
        raise StoreUnavailableError(
            f"{reason}; {what}: no answer within {self._retry_window_s:g} s; retry later"
        )


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
    report 'exception was never retrieved'. A call cut by our bound leaves CancelledError
    there: consumed too, unless the caller is cancelling us."""
    try:
        await asyncio.wait_for(start.workflow_handle(), timeout=0.01)
    except asyncio.CancelledError:
        _raise_if_cancelled()
    except Exception:  # the call's failure was handled from the update side
        return


def _raise_if_cancelled() -> None:
    """temporalio turns a cancelled RPC into RPCTimeoutOrCancelledError: when the caller
    cancelled us (not our own bound), cancellation must propagate, never become a retry."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _unreachable(err: BaseException) -> str | None:
    """Why Temporal gave no answer, when `err` says it could not be reached or did not answer
    in time (a resend is safe); None for anything else."""
    if isinstance(err, RPCError):
        if err.status in TRANSIENT_RPC_STATUSES:
            return f"Temporal unreachable ({err.status.name}: {err.message})"
        return None
    if isinstance(err, RPCTimeoutOrCancelledError | TimeoutError):
        return "Temporal or the wallet workflow did not answer in time"
    if isinstance(err, RuntimeError) and str(err).startswith(TEMPORAL_CONNECT_FAILURE):
        return f"Temporal unreachable ({err})"
    return None


def _refused(err: RPCError) -> ConfigurationError:
    """A request Temporal refused for good (permission, unknown namespace, bad argument): an
    operator must act, retrying cannot help."""
    return ConfigurationError(f"Temporal refused the request ({err.status.name}: {err.message})")


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
