"""ClearingBatchWorkflow: one intake batch through pending, checks, post/void and settlement.

One workflow per batch (id `clearing-batch/<batch id>`, messages.clearing_pipeline), started by
the client right after it recorded the batch (walletclient/clearing_client.py). Every step is
an activity over the whole batch (activities/clearing.py), retried until it succeeds: a crash
of the worker anywhere resumes at the step that did not finish, and the activities are
idempotent by the derived ids. Decisions (the check outcomes) are taken once and kept in the
history, so a resumed run posts or voids exactly what was decided.

Time: each hold expires at its TigerBeetle timestamp plus its route's timeout. The checks get
only the time that is left before the earliest expiry (minus a margin for the post); when it
is too short or runs out, the holds are left to TigerBeetle: the workflow sleeps past their
expiry and voids them, which TigerBeetle answers `pending_transfer_expired` (reported as
`expired`; a hold not yet released is voided with `checks_unfinished`). Nothing is posted
without its checks.

Re-checks (patch PATCH_RECHECK): when a checks attempt ran out of time (MongoDB down, say),
the holds are split again by the time they have left; those with CHECK_BUDGET_MIN or more are
checked again, bounded by their own earliest expiry, and only the others are left to expire.
Why: one short hold in a batch bounds the first attempt, and without this an outage longer
than the short hold expired every hold of the batch, also those with time to spare. Each
failed round leaves the earliest hold with less than POST_MARGIN (< CHECK_BUDGET_MIN), so it
drops out: the rounds are bounded by the batch's distinct expiries (and RECHECK_ROUNDS_MAX).
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, RetryState, TimeoutError

with workflow.unsafe.imports_passed_through():
    from messages.clearing import (
        ACTIVITY_CHECKS,
        ACTIVITY_PENDING,
        ACTIVITY_POST_VOID,
        ACTIVITY_SETTLE,
        CLEARING_BATCH_WORKFLOW,
        BatchOutcome,
        CheckResults,
        PostedItem,
        PostVoidBatch,
        PostVoidResult,
        StepInput,
        VoidItem,
    )
    from messages.clearing_pipeline import (
        FinalizeBatch,
        FinalizeResult,
        HoldsResult,
        PipelineReason,
    )
    from walletcore.clearing import RejectReason
    from walletcore.errors import NON_RETRYABLE_ERROR_TYPES
    from walletcore.journal import NS_PER_MS

STEP_START_TO_CLOSE = timedelta(minutes=2)
STEP_HEARTBEAT = timedelta(seconds=10)  # activities beat every 2 s (activities.clearing)
CHECKS_ATTEMPT_MAX = timedelta(seconds=60)
# The checks start only with at least this much time before the earliest expiry (they read
# ~1-2 s per 2000 transactions on the embedded MongoDB), and must end this long before it.
CHECK_BUDGET_MIN = timedelta(seconds=5)
POST_MARGIN = timedelta(seconds=2)
EXPIRY_MARGIN = timedelta(seconds=1)  # after the last expiry, before voiding what is left
# Histories recorded before it leave every hold of a batch to expire after a failed checks
# attempt; with it, the holds with time left are checked again (module docstring).
PATCH_RECHECK = "clearing-recheck-holds-with-time-left"
RECHECK_ROUNDS_MAX = 16  # checks attempts per batch (each failed one drops >= 1 hold)

T = TypeVar("T")

RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    non_retryable_error_types=list(NON_RETRYABLE_ERROR_TYPES),
)


def _ns(delta: timedelta) -> int:
    return (delta // timedelta(milliseconds=1)) * NS_PER_MS


@workflow.defn(name=CLEARING_BATCH_WORKFLOW)
class ClearingBatchWorkflow:
    def __init__(self) -> None:
        self._stage = "received"

    @workflow.query
    def stage(self) -> str:
        """received, pending, checks, post_void, expiring, settle or done."""
        return self._stage

    @workflow.run
    async def run(self, inp: StepInput) -> BatchOutcome:
        self._stage = "pending"
        try:
            holds = await self._step(ACTIVITY_PENDING, inp, HoldsResult)
        except ActivityError as err:
            # Refused for good (e.g. configuration): nothing was posted; any hold created
            # expires by itself. Every transaction is rejected with the cause.
            reason = f"{PipelineReason.PENDING_FAILED}:{_cause_type(err)}"
            refused = [VoidItem(external_id=x, reason=reason) for x in inp.external_ids]
            return await self._finish(inp.batch_id, [], refused)
        rejected: list[VoidItem] = list(holds.rejected)
        posted: list[PostedItem] = []
        expiry = dict(zip(holds.pending, holds.expires_at_ns, strict=True))
        in_time, late = _split(holds.pending, expiry)
        for _ in range(RECHECK_ROUNDS_MAX):
            if not in_time:
                break
            self._stage = "checks"
            decided = await self._check_and_decide(inp.batch_id, in_time, expiry)
            if isinstance(decided, PostVoidResult):
                posted.extend(decided.posted)
                rejected.extend(_rejections(decided))
                in_time = []
            elif _out_of_time(decided) and workflow.patched(PATCH_RECHECK):
                in_time, short = _split(in_time, expiry)  # re-check those with time left
                late.extend(short)
            else:
                late.extend(in_time)
                in_time = []
        late.extend(in_time)  # out of rounds: left to expire
        if late:
            self._stage = "expiring"
            expired = await self._let_expire(inp.batch_id, late, holds)
            posted.extend(expired.posted)  # only if a resumed run finds them posted
            rejected.extend(_rejections(expired))
        return await self._finish(inp.batch_id, posted, rejected)

    async def _check_and_decide(
        self, batch_id: str, ids: list[str], expiry: dict[str, int]
    ) -> PostVoidResult | ActivityError:
        """Checks bounded by the earliest expiry among `ids`, then post/void. The checks'
        error when they could not finish (in time, or at all): nothing was decided."""
        left_ns = min(expiry[x] for x in ids) - _now_ns() - _ns(POST_MARGIN)
        budget = timedelta(milliseconds=max(left_ns // NS_PER_MS, 1))
        try:
            checked = await workflow.execute_activity(
                ACTIVITY_CHECKS, StepInput(batch_id=batch_id, external_ids=ids),
                result_type=CheckResults, schedule_to_close_timeout=budget,
                start_to_close_timeout=min(budget, CHECKS_ATTEMPT_MAX),
                heartbeat_timeout=STEP_HEARTBEAT, retry_policy=RETRY,
            )
        except ActivityError as err:
            workflow.logger.warning("batch %s: checks of %d holds did not finish before the "
                                    "earliest one's timeout (%s)", batch_id, len(ids),
                                    _cause_type(err))
            return err
        self._stage = "post_void"
        batch = PostVoidBatch(batch_id=batch_id, post=checked.passed, void=checked.failed)
        return await self._step(ACTIVITY_POST_VOID, batch, PostVoidResult)

    async def _let_expire(
        self, batch_id: str, ids: list[str], holds: HoldsResult
    ) -> PostVoidResult:
        """Sleep past the holds' expiry, then void them: TigerBeetle answers expired."""
        expiry = dict(zip(holds.pending, holds.expires_at_ns, strict=True))
        wait_ns = max(expiry[x] for x in ids) - _now_ns()
        if wait_ns > 0:
            await workflow.sleep(timedelta(milliseconds=wait_ns // NS_PER_MS) + EXPIRY_MARGIN)
        voids = [VoidItem(external_id=x, reason=PipelineReason.CHECKS_UNFINISHED) for x in ids]
        batch = PostVoidBatch(batch_id=batch_id, void=voids)
        return await self._step(ACTIVITY_POST_VOID, batch, PostVoidResult)

    async def _finish(
        self, batch_id: str, posted: list[PostedItem], rejected: list[VoidItem]
    ) -> BatchOutcome:
        self._stage = "settle"
        if posted or rejected:
            final = FinalizeBatch(batch_id=batch_id, posted=posted, rejected=rejected)
            await self._step(ACTIVITY_SETTLE, final, FinalizeResult)
        self._stage = "done"
        reasons = Counter(v.reason for v in rejected)
        return BatchOutcome(batch_id=batch_id, settled=len(posted), rejected=len(rejected),
                            reasons=dict(reasons))

    async def _step(self, name: str, arg: object, result_type: type[T]) -> T:
        result: T = await workflow.execute_activity(
            name, arg, result_type=result_type, start_to_close_timeout=STEP_START_TO_CLOSE,
            heartbeat_timeout=STEP_HEARTBEAT, retry_policy=RETRY,
        )
        return result


def _split(ids: list[str], expiry: dict[str, int]) -> tuple[list[str], list[str]]:
    """`ids` with enough time left for the checks (CHECK_BUDGET_MIN), and the others."""
    now_ns = _now_ns()
    budget_ns = _ns(CHECK_BUDGET_MIN)
    in_time: list[str] = []
    late: list[str] = []
    for external_id in ids:
        (in_time if expiry[external_id] - now_ns >= budget_ns else late).append(external_id)
    return in_time, late


def _out_of_time(err: ActivityError) -> bool:
    """The checks ran out of their budget (retrying, e.g. MongoDB down): worth another round
    for the holds with time left. A non-retryable failure would only fail again."""
    return err.retry_state is RetryState.TIMEOUT or isinstance(err.cause, TimeoutError)


def _rejections(result: PostVoidResult) -> list[VoidItem]:
    expired = [VoidItem(external_id=x, reason=RejectReason.EXPIRED) for x in result.expired]
    return [*result.voided, *expired]


def _now_ns() -> int:
    return int(workflow.now().timestamp() * 1000) * NS_PER_MS


def _cause_type(err: ActivityError) -> str:
    cause = err.cause
    name = getattr(cause, "type", None) or type(cause).__name__
    return str(name)

