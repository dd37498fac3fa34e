"""The clearing pipeline's own messages, beside the batch models of messages/clearing.py.

One ClearingBatchWorkflow per intake batch (workflow id `clearing-batch/<batch id>`), input a
messages.clearing.StepInput (the batch and the external ids it recorded), result a
messages.clearing.BatchOutcome. Its activities, in order:

    terminal_pending    StepInput      -> HoldsResult   (mirrors ensured, pending transfers)
    terminal_checks     StepInput      -> CheckResults  (bounded by the holds' expiry)
    terminal_post_void  PostVoidBatch  -> PostVoidResult
    terminal_settle     FinalizeBatch  -> FinalizeResult (journal entries, then final states)

The store keeps `received` until the final write (settled or rejected with its reason): the
states between live in the workflow's history, which saves one document update per step.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from messages.clearing import IDS_MAX, BatchId, PendingResult, PostedItem, VoidItem
from walletcore.journal import INT64_MAX

BATCH_WORKFLOW_ID_PREFIX = "clearing-batch/"


def batch_workflow_id(batch_id: str) -> str:
    """The workflow of an intake batch: starting it twice is one workflow (idempotent start)."""
    assert batch_id
    return f"{BATCH_WORKFLOW_ID_PREFIX}{batch_id}"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PipelineReason(StrEnum):
    """Rejection reasons the pipeline gives besides the checks' (CheckReason) and the
    domain's (RejectReason: `expired`, `pending_refused:<status>`)."""

    # The checks could not finish before the hold's timeout and TigerBeetle had not released
    # it yet when the pipeline voided it (normally it has: the reason is then `expired`).
    CHECKS_UNFINISHED = "checks_unfinished"
    # TigerBeetle refused the post (suffix: its status); the hold was voided instead.
    POST_REFUSED = "post_refused"
    # The pending step failed for good (a configuration error): nothing was posted.
    PENDING_FAILED = "pending_failed"
    # The hold was voided earlier (a resumed run found it so).
    ALREADY_VOIDED = "already_voided"


class HoldsResult(PendingResult):
    """PendingResult with each hold's expiry (TigerBeetle time of the pending transfer plus
    its route's timeout, ns), parallel to `pending`: the workflow gives the checks only the
    time that is left."""

    expires_at_ns: list[int] = Field(default_factory=list, max_length=IDS_MAX)

    @model_validator(mode="after")
    def _parallel(self) -> HoldsResult:
        if len(self.expires_at_ns) != len(self.pending):
            raise ValueError("expires_at_ns must have one entry per pending transaction")
        if any(not 0 < ns <= INT64_MAX for ns in self.expires_at_ns):
            raise ValueError("expires_at_ns out of range")
        return self


class FinalizeBatch(_Model):
    """The batch's last step: the posted transactions become journal entries (one ledger
    transaction), then every transaction gets its final state (rejected with its reason first,
    then the rest of the batch settled in one update)."""

    batch_id: BatchId
    posted: list[PostedItem] = Field(default_factory=list, max_length=IDS_MAX)
    rejected: list[VoidItem] = Field(default_factory=list, max_length=IDS_MAX)


class FinalizeResult(_Model):
    batch_id: BatchId
    settled: int = Field(ge=0)
    new_entries: int = Field(ge=0)
    rejected: int = Field(ge=0)
    chain_seq: int = Field(ge=0)
