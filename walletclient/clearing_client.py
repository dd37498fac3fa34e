"""ClearingClient: how an external system's adapter submits transactions to the credit terminal.

Intake is a batch: `submit_many` validates every transaction against the routing table (an
unknown kind, currency or inexact amount is refused, naming the field), records the batch in
the system of reference (ClearingStore.record_many: one insert; the same external id with the
same content is a replay, with other content a ConflictError) and starts the batch's workflow
(ClearingBatchWorkflow, by name, id `clearing-batch/<batch id>`), which drives the batch
through pending, checks, post/void and settlement. Recording before starting is what makes a
crash between the two safe: the records stay `received` and the next submit of any of them
(or `resume`) starts their batch's workflow.

Outcomes are read from the store and the ledger: `status`, `statuses`, and `wait` (bounded
polling until every id is settled or rejected). A transaction whose journal entry exists is
settled (the ledger is the truth) even before its record's final state is written.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from messages.clearing import (
    CLEARING_BATCH_WORKFLOW,
    INTAKE_BATCH_MAX,
    BatchOutcome,
    IntakeResult,
    RefusedItem,
    ReplayedItem,
    StepInput,
    TransactionOutcome,
)
from messages.clearing_pipeline import batch_workflow_id
from mongobase.mongo import mongodb_outage_as_unavailable
from stores.clearing_store import FIND_LIMIT_MAX, ClearingStore
from stores.general_ledger import GeneralLedger
from walletcore.clearing import (
    DEFAULT_CLEARING_TABLE,
    FINAL_STATES,
    ClearingRecord,
    ClearingState,
    ClearingTable,
    ExternalTransaction,
    parse_external,
    post_transfer_id,
)
from walletcore.errors import ERRORS_BY_NAME, InvalidInputError, WalletError
from walletcore.journal import entry_id_of

# A replay of a transaction another batch owns starts that batch's workflow only once the
# batch is this old: a younger one is still being started by its own submitter.
OWNER_GRACE_S = 60.0
OWNERS_RESUMED_MAX = 16  # batches one submit may resume
WAIT_TIMEOUT_S_MAX = 3600.0
POLL_S_MIN = 0.05
POLL_S_MAX = 0.5
RESUME_BATCHES_MAX = 1000
# A batch id whose workflow failed may run again (its transactions are still open); one that
# completed may not (a retried submit of a finished batch starts nothing).
_REUSE = WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY


class ClearingClient:
    """`ledger` (optional) lets outcomes see entries before the record's final state."""

    def __init__(
        self, temporal: Client, clearing: ClearingStore, task_queue: str, *,
        ledger: GeneralLedger | None = None, table: ClearingTable = DEFAULT_CLEARING_TABLE,
    ) -> None:
        assert task_queue
        self._temporal = temporal
        self._clearing = clearing
        self._ledger = ledger
        self._queue = task_queue
        self._table = table

    @property
    def table(self) -> ClearingTable:
        return self._table

    # ---- intake ------------------------------------------------------------------------------

    async def submit_many(
        self, txns: Sequence[ExternalTransaction | Mapping[str, Any]], *,
        batch_id: str | None = None,
    ) -> IntakeResult:
        """Record and start one batch (at most INTAKE_BATCH_MAX). `accepted`: recorded now and
        owned by this batch; `replayed`: recorded before with the same content (their batch
        drives them); `refused`: invalid or conflicting, not recorded."""
        if not 0 < len(txns) <= INTAKE_BATCH_MAX:
            raise InvalidInputError(f"1..{INTAKE_BATCH_MAX} transactions per batch, got "
                                    f"{len(txns)}", field="transactions")
        batch_id = batch_id or f"b-{uuid.uuid4().hex}"
        valid, refused = self._validated(txns)
        if not valid:
            return IntakeResult(batch_id=batch_id, refused=refused)
        with mongodb_outage_as_unavailable():
            return await self._record_and_start(valid, refused, batch_id)

    async def _record_and_start(
        self, valid: list[ExternalTransaction], refused: list[RefusedItem], batch_id: str,
    ) -> IntakeResult:
        recorded = await self._clearing.record_many(valid, batch_id)
        refused.extend(
            RefusedItem(external_id=x, error=err.type_name, field=err.field,
                        message=err.message[:1024])
            for x, err in recorded.conflicts.items())
        new = set(recorded.new)
        replayed = _replays(recorded.records, new)
        own = [r.external_id for r in recorded.records
               if r.external_id not in new and r.batch_id == batch_id
               and r.state not in FINAL_STATES]
        to_start = list(dict.fromkeys([*recorded.new, *own]))
        if to_start:
            await self._start(batch_id, to_start)
        await self._resume_owners(recorded.records, batch_id, new)
        return IntakeResult(batch_id=batch_id, accepted=recorded.new, replayed=replayed,
                            refused=refused)

    async def submit(
        self, txn: ExternalTransaction | Mapping[str, Any], *, wait_s: float = 0.0,
        batch_id: str | None = None,
    ) -> TransactionOutcome:
        """One transaction: its outcome after waiting up to `wait_s` (0: as recorded). A
        refusal raises its walletcore error (InvalidInputError, ConflictError, ...)."""
        result = await self.submit_many([txn], batch_id=batch_id)
        if result.refused:
            raise error_of(result.refused[0])
        external_id = (result.accepted or [r.external_id for r in result.replayed])[0]
        if wait_s > 0:
            return (await self.wait([external_id], wait_s))[external_id]
        outcome = await self.status(external_id)
        assert outcome is not None, "recorded a moment ago"
        return outcome

    def _validated(
        self, txns: Sequence[ExternalTransaction | Mapping[str, Any]]
    ) -> tuple[list[ExternalTransaction], list[RefusedItem]]:
        valid: list[ExternalTransaction] = []
        refused: list[RefusedItem] = []
        for index, item in enumerate(txns):
            try:
                txn = item if isinstance(item, ExternalTransaction) else parse_external(item)
                self._table.route_for(txn)
                self._table.limits(txn.kind, txn.currency)
                valid.append(txn)
            except WalletError as err:
                external_id = _external_id_of(item, index)
                refused.append(RefusedItem(external_id=external_id, error=err.type_name,
                                           field=err.field, message=err.message[:1024]))
        return valid, refused

    async def _start(
        self, batch_id: str, external_ids: list[str], *, reuse: WorkflowIDReusePolicy = _REUSE,
    ) -> bool:
        """Start the batch's workflow; False when it runs (or ran) already."""
        try:
            await self._temporal.start_workflow(
                CLEARING_BATCH_WORKFLOW, StepInput(batch_id=batch_id, external_ids=external_ids),
                id=batch_workflow_id(batch_id), task_queue=self._queue,
                id_reuse_policy=reuse, id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            )
        except WorkflowAlreadyStartedError:
            return False
        return True

    async def _resume_owners(
        self, records: Sequence[ClearingRecord], batch_id: str, new: set[str]
    ) -> None:
        """Replays of other batches that are old and still open: their submitter may have died
        between recording and starting; start their workflow (a running one is left alone)."""
        cutoff = datetime.now(UTC) - timedelta(seconds=OWNER_GRACE_S)
        owners = {
            r.batch_id for r in records
            if r.external_id not in new and r.batch_id != batch_id
            and r.state not in FINAL_STATES and r.received_at < cutoff
        }
        for owner in sorted(owners)[:OWNERS_RESUMED_MAX]:
            await self.resume_batch(owner)

    async def resume_batch(self, batch_id: str) -> bool:
        """Start the workflow of a batch whose transactions are still `received` (a crashed
        submitter's, or one whose workflow failed). False: nothing to do or it runs."""
        open_ids = [r.external_id for r in
                    await self._clearing.by_batch(batch_id, state=ClearingState.RECEIVED)]
        if not open_ids:
            return False
        return await self._start(batch_id, open_ids, reuse=WorkflowIDReusePolicy.ALLOW_DUPLICATE)

    async def resume(self, *, older_than_s: float = OWNER_GRACE_S,
                     limit: int = FIND_LIMIT_MAX,
                     batches_max: int = RESUME_BATCHES_MAX) -> list[str]:
        """Every batch (the oldest `batches_max`) with transactions `received` longer than
        `older_than_s`: started again where its workflow is not running. Returns the batches
        started."""
        assert 1 <= batches_max <= RESUME_BATCHES_MAX
        before = datetime.now(UTC) - timedelta(seconds=older_than_s)
        stuck = await self._clearing.find_by_state(ClearingState.RECEIVED, limit,
                                                   received_before=before)
        started: list[str] = []
        for batch_id in list(dict.fromkeys(r.batch_id for r in stuck))[:batches_max]:
            if await self.resume_batch(batch_id):
                started.append(batch_id)
        return started

    # ---- outcomes ----------------------------------------------------------------------------

    async def status(self, external_id: str) -> TransactionOutcome | None:
        return (await self.statuses([external_id])).get(external_id)

    async def statuses(self, external_ids: Sequence[str]) -> dict[str, TransactionOutcome]:
        """Outcomes of the recorded ids among `external_ids` (unknown ids are absent)."""
        with mongodb_outage_as_unavailable():
            return await self._statuses(external_ids)

    async def _statuses(self, external_ids: Sequence[str]) -> dict[str, TransactionOutcome]:
        records = await self._clearing.get_many(list(external_ids))
        open_ids = [x for x, r in records.items() if r.state not in FINAL_STATES]
        entries: set[str] = set()
        if open_ids and self._ledger is not None:
            wanted = {entry_id_of(post_transfer_id(x)): x for x in open_ids}
            entries = {wanted[e] for e in await self._ledger.existing_entry_ids(list(wanted))}
        return {x: _outcome(r, settled=x in entries) for x, r in records.items()}

    async def wait(
        self, external_ids: Sequence[str], timeout_s: float
    ) -> dict[str, TransactionOutcome]:
        """Poll until every id is settled or rejected, or `timeout_s` passed; returns the last
        outcomes (unknown ids absent; open ones in their current state)."""
        if not 0 <= timeout_s <= WAIT_TIMEOUT_S_MAX:
            raise InvalidInputError(f"0..{WAIT_TIMEOUT_S_MAX} s", field="timeout_s")
        ids = list(dict.fromkeys(external_ids))
        deadline = time.monotonic() + timeout_s
        done: dict[str, TransactionOutcome] = {}
        pause = POLL_S_MIN
        while True:
            open_ids = [x for x in ids if x not in done]
            found = await self.statuses(open_ids)
            for x, outcome in found.items():
                if outcome.state in {s.value for s in FINAL_STATES}:
                    done[x] = outcome
            remaining = deadline - time.monotonic()
            if len(done) == len(ids) or remaining <= 0:
                return {**found, **done}
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, POLL_S_MAX)

    async def batch_outcome(self, batch_id: str, timeout_s: float) -> BatchOutcome:
        """The batch workflow's result (waits up to `timeout_s`)."""
        handle = self._temporal.get_workflow_handle(batch_workflow_id(batch_id))
        result = await asyncio.wait_for(handle.result(), timeout_s)
        return BatchOutcome.model_validate(result)

    async def stage(self, batch_id: str) -> str:
        """Where the batch's workflow is: pending, checks, post_void, expiring, settle, done."""
        handle = self._temporal.get_workflow_handle(batch_workflow_id(batch_id))
        stage: str = await handle.query("stage")
        return stage


def error_of(item: RefusedItem) -> WalletError:
    """The walletcore error a refused item stands for."""
    cls = ERRORS_BY_NAME.get(item.error, WalletError)
    return cls(item.message, field=item.field)


def _replays(records: Sequence[ClearingRecord], new: set[str]) -> list[ReplayedItem]:
    seen: dict[str, ReplayedItem] = {}
    for r in records:
        if r.external_id not in new:
            seen.setdefault(r.external_id, ReplayedItem(
                external_id=r.external_id, batch_id=r.batch_id, state=r.state.value))
    return list(seen.values())


def _outcome(record: ClearingRecord, *, settled: bool) -> TransactionOutcome:
    external_id = record.external_id
    if settled:
        return TransactionOutcome(
            external_id=external_id, state=ClearingState.SETTLED.value,
            entry_id=entry_id_of(post_transfer_id(external_id)), batch_id=record.batch_id)
    return TransactionOutcome(external_id=external_id, state=record.state.value,
                              entry_id=record.entry_id, reason=record.reason,
                              batch_id=record.batch_id)


def _external_id_of(item: ExternalTransaction | Mapping[str, Any], index: int) -> str:
    if isinstance(item, ExternalTransaction):
        return item.external_id
    value = item.get("external_id") if isinstance(item, Mapping) else None
    return str(value)[:128] if value else f"#{index}"
