"""The credit terminal's clearing activities: one intake batch through TigerBeetle's two phases
into the general ledger (workflows/clearing.py runs them in order).

    pending    mirrors ensured (once per process), one pending transfer per transaction with
               its route's timeout (a funds reservation: balance limits count pending amounts)
    checks     the batch's check context read in bulk (velocity, references, blocked parties,
               account statuses), walletcore.clearing_checks.run_checks
    post_void  post the passed, void the failed (a refused post is voided instead)
    settle     posted -> journal entries in one ledger transaction; then the final states:
               rejected (with reasons) per id, then the posted listed as settled on the batch
               document (one write: ClearingStore.settle_batch)

Idempotent by construction: every transfer id derives from the external id
(walletcore.clearing), so a retried activity or a resumed workflow lands on the same transfers
(TigerBeetle answers EXISTS only for identical content: anything else is a per-transaction
refusal with its status as the reason) and on the same journal entries (the entry id is the
post transfer's id). A settled transaction's document is written once (the intake insert): the
states between live in the workflow's history and `settled` on its batch's document (~1.1 ms
per document update on the embedded MongoDB, twice an insert); only rejections move per id.

Every create goes through the client cut to the cluster's request limit (BatchLimits:
8189 events at 1 MiB, 253 at 32 KiB), so a batch of any size is chunked, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import tigerbeetle as tb
from temporalio import activity

from messages.clearing import (
    ACTIVITY_CHECKS,
    ACTIVITY_PENDING,
    ACTIVITY_POST_VOID,
    ACTIVITY_SETTLE,
    CheckResults,
    PostedItem,
    PostVoidBatch,
    PostVoidResult,
    StepInput,
    VoidItem,
)
from messages.clearing_pipeline import FinalizeBatch, FinalizeResult, HoldsResult, PipelineReason
from messages.errors import wallet_errors_as_application_errors
from observability.terminal import (
    holds_created,
    holds_resolved,
    observe_terminal_transactions,
)
from stores.clearing_blocklist import BlockedParties
from stores.clearing_store import ClearingStore, StateChange
from stores.clearing_tb import ensure_mirrors, transfer_of
from stores.general_ledger import GeneralLedger
from stores.tb_batches import batched
from stores.tigerbeetle_client import TigerBeetleClient
from walletcore.clearing import (
    DEFAULT_CLEARING_TABLE,
    ClearingRecord,
    ClearingState,
    ClearingTable,
    ExternalTransaction,
    RejectReason,
    TransferSpec,
    pending_spec,
    post_spec,
    post_transfer_id,
    settlement_entry,
    void_spec,
)
from walletcore.clearing_checks import CheckContext, VelocityWindow, needs_of, run_checks
from walletcore.errors import ConflictError, InvalidInputError
from walletcore.gl_chart import AccountStatus
from walletcore.journal import NS_PER_S
from walletcore.tb_limits import BatchLimits

log = logging.getLogger(__name__)

CACHE_MAX = 50_000  # transactions kept per process (content is immutable: never stale)
HEARTBEAT_EVERY_S = 2.0  # the workflow's heartbeat timeout is a few of these

_TS = tb.CreateTransferStatus
_DONE = frozenset({_TS.CREATED, _TS.EXISTS})


def reason_of(prefix: str, status: tb.CreateTransferStatus) -> str:
    """`pending_refused:exceeds_credits`, `post_refused:...`: a refusal and TigerBeetle's word."""
    return f"{prefix}:{status.name.lower()}"


@contextlib.asynccontextmanager
async def heartbeating() -> AsyncIterator[None]:
    """Heartbeat in the background while the body runs: a killed worker's activity is then
    retried after the heartbeat timeout, not after the whole start-to-close timeout."""

    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class ClearingActivities:
    """The pipeline's activities over the system of reference (ClearingStore), the ledger, the
    blocked list and TigerBeetle. `table` must be over the ledger's chart."""

    def __init__(
        self, clearing: ClearingStore, ledger: GeneralLedger, tb_client: TigerBeetleClient,
        limits: BatchLimits, *, blocked: BlockedParties,
        table: ClearingTable = DEFAULT_CLEARING_TABLE, cache_max: int = CACHE_MAX,
    ) -> None:
        assert table.chart == ledger.chart, "the routes and the ledger need the same chart"
        assert 0 < cache_max <= 10 * CACHE_MAX
        self._clearing = clearing
        self._ledger = ledger
        self._client = batched(tb_client, limits)
        self._blocked = blocked
        self._table = table
        # external id -> (content, received time in unix seconds: the latency's start)
        self._cache: OrderedDict[str, tuple[ExternalTransaction, float]] = OrderedDict()
        self._cache_max = cache_max
        self._mirrors_ready = False
        self._mirrors_lock = asyncio.Lock()
        # One ledger transaction at a time per process: concurrent batches would only conflict
        # on the chain head and retry (the head's compare-and-swap keeps other processes safe).
        self._ledger_lock = asyncio.Lock()

    @property
    def table(self) -> ClearingTable:
        return self._table

    def all(self) -> list[Callable[..., Any]]:
        return [self.pending, self.checks, self.post_void, self.settle]

    async def ensure_ready(self, *, mirrors: bool = False) -> None:
        """Indexes and the chart's accounts in the ledger; with `mirrors`, their TigerBeetle
        mirrors now (otherwise the first pending step creates them: a worker starts without
        TigerBeetle)."""
        await self._clearing.ensure_indexes()
        await self._ledger.ensure_indexes()
        await self._ledger.ensure_chart()
        if mirrors:
            await self._ensure_mirrors()

    # ---- activities ------------------------------------------------------------------------

    @activity.defn(name=ACTIVITY_PENDING)
    async def pending(self, inp: StepInput) -> HoldsResult:
        with wallet_errors_as_application_errors():
            async with heartbeating():
                return await self.reserve(inp)

    @activity.defn(name=ACTIVITY_CHECKS)
    async def checks(self, inp: StepInput) -> CheckResults:
        with wallet_errors_as_application_errors():
            async with heartbeating():
                return await self.check(inp)

    @activity.defn(name=ACTIVITY_POST_VOID)
    async def post_void(self, inp: PostVoidBatch) -> PostVoidResult:
        with wallet_errors_as_application_errors():
            async with heartbeating():
                return await self.decide(inp)

    @activity.defn(name=ACTIVITY_SETTLE)
    async def settle(self, inp: FinalizeBatch) -> FinalizeResult:
        with wallet_errors_as_application_errors():
            async with heartbeating():
                return await self.finalize(inp)

    # ---- pending -----------------------------------------------------------------------------

    async def reserve(self, inp: StepInput) -> HoldsResult:
        """A pending transfer per transaction. CREATED and EXISTS (a retry: identical content)
        are holds; any other status refuses that transaction (`pending_refused:<status>`)."""
        await self._ensure_mirrors()
        txns = await self._transactions(inp.batch_id, inp.external_ids)
        rejected: list[VoidItem] = []
        specs: list[tuple[str, TransferSpec]] = []
        for txn in txns:
            try:
                specs.append((txn.external_id, pending_spec(txn, self._table)))
            except InvalidInputError as err:  # the table changed since intake
                rejected.append(VoidItem(external_id=txn.external_id,
                                         reason=f"invalid:{err.field or 'transaction'}"))
        results = await self._client.create_transfers([transfer_of(s) for _, s in specs])
        assert len(results) == len(specs)
        held: list[str] = []
        expires_at_ns: list[int] = []
        for (external_id, spec), result in zip(specs, results, strict=True):
            if result.status in _DONE:
                holds_created(1 if result.status is _TS.CREATED else 0)
                held.append(external_id)
                expires_at_ns.append(result.timestamp + spec.timeout_s * NS_PER_S)
            else:
                reason = reason_of(RejectReason.PENDING_REFUSED, result.status)
                rejected.append(VoidItem(external_id=external_id, reason=reason))
        return HoldsResult(batch_id=inp.batch_id, pending=held, rejected=rejected,
                           expires_at_ns=expires_at_ns)

    # ---- checks ------------------------------------------------------------------------------

    async def check(self, inp: StepInput) -> CheckResults:
        """The batch's checks over one bulk read of their context."""
        txns = await self._transactions(inp.batch_id, inp.external_ids)
        needs = needs_of(txns, self._table)
        now = datetime.now(UTC)
        velocity, holders, blocked, statuses = await asyncio.gather(
            self._velocity(needs.velocity, now, inp.batch_id),
            self._holders(needs.references),
            self._blocked.blocked_among(needs.counterparties),
            self._statuses(bool(needs.accounts)),
        )
        context = CheckContext(blocked_counterparties=blocked, account_statuses=statuses,
                               velocity=velocity, reference_holders=holders)
        outcomes = run_checks(txns, context, self._table)
        return CheckResults(batch_id=inp.batch_id, outcomes=outcomes)

    async def _velocity(
        self, queries: Sequence[Any], now: datetime, batch_id: str
    ) -> dict[str, VelocityWindow]:
        if not queries:
            return {}
        return await self._clearing.velocity(queries, now=now, exclude_batch=batch_id)

    async def _holders(self, references: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
        return await self._clearing.reference_holders(references) if references else {}

    async def _statuses(self, wanted: bool) -> dict[int, AccountStatus]:
        return await self._ledger.account_statuses() if wanted else {}

    # ---- post / void -------------------------------------------------------------------------

    async def decide(self, inp: PostVoidBatch) -> PostVoidResult:
        """Post the passed, void the failed. A post TigerBeetle refuses (other than an expired
        or already resolved hold) is voided in a second request, with the refusal as reason."""
        ids = [*inp.post, *(v.external_id for v in inp.void)]
        txns = {t.external_id: t for t in await self._transactions(inp.batch_id, ids)}
        outcome = _Decisions()
        refused_posts = await self._apply(
            [post_spec(txns[x], self._table) for x in inp.post], inp.post,
            [None] * len(inp.post), outcome)
        voids = [*inp.void, *refused_posts]
        await self._apply([void_spec(txns[v.external_id], self._table) for v in voids],
                          [v.external_id for v in voids], [v.reason for v in voids], outcome)
        if outcome.lookup:  # resolved by a post whose result we did not see: read its time
            await self._read_posted(inp.batch_id, outcome)
        return PostVoidResult(batch_id=inp.batch_id, posted=outcome.posted,
                              voided=outcome.voided, expired=outcome.expired)

    async def _apply(
        self, specs: list[TransferSpec], ids: list[str], reasons: list[str | None],
        outcome: _Decisions,
    ) -> list[VoidItem]:
        """Create post (reason None) or void transfers; sort each answer into `outcome`.
        Returns the posts to void instead."""
        if not specs:
            return []
        results = await self._client.create_transfers([transfer_of(s) for s in specs])
        refused: list[VoidItem] = []
        for external_id, reason, result in zip(ids, reasons, results, strict=True):
            status = result.status
            # A hold leaves pending once: CREATED here (EXISTS is a retry of this answer),
            # or expired (TigerBeetle released it by itself).
            holds_resolved(1 if status in (_TS.CREATED, _TS.PENDING_TRANSFER_EXPIRED) else 0)
            if status in _DONE:
                if reason is None:
                    outcome.posted.append(PostedItem(external_id=external_id,
                                                     tb_timestamp=result.timestamp))
                else:
                    outcome.voided.append(VoidItem(external_id=external_id, reason=reason))
            elif status is _TS.PENDING_TRANSFER_EXPIRED:
                outcome.expired.append(external_id)
            elif status is _TS.PENDING_TRANSFER_ALREADY_POSTED:
                outcome.lookup.append(external_id)
            elif status is _TS.PENDING_TRANSFER_ALREADY_VOIDED:
                outcome.voided.append(VoidItem(external_id=external_id,
                                               reason=reason or PipelineReason.ALREADY_VOIDED))
            elif status.name.startswith("EXISTS_WITH_DIFFERENT"):
                # Our derived id holds other content (the system of reference was lost and the
                # id reused): posting or voiding on top could book what TigerBeetle did not.
                raise ConflictError(
                    f"TigerBeetle holds {external_id!r}'s transfer with other content: "
                    f"{status.name}", field="external_id")
            elif reason is None:
                refused.append(VoidItem(external_id=external_id,
                                        reason=reason_of(PipelineReason.POST_REFUSED, status)))
            else:
                raise ConflictError(
                    f"TigerBeetle refused the void of {external_id!r}: {status.name}",
                    field="external_id")
        return refused

    async def _read_posted(self, batch_id: str, outcome: _Decisions) -> None:
        """Holds posted already (a resumed run decided otherwise): posted, with the time of
        the post transfer, which only this pipeline creates."""
        wanted = {post_transfer_id(x): x for x in outcome.lookup}
        found = {t.id: t for t in await self._client.lookup_transfers(list(wanted))}
        txns = {t.external_id: t for t in await self._transactions(batch_id, outcome.lookup)}
        for transfer_id, external_id in wanted.items():
            post = found.get(transfer_id)
            if post is None or post.amount != txns[external_id].amount_minor:
                raise ConflictError(
                    f"the hold of {external_id!r} was posted by another transfer or amount",
                    field="external_id")
            outcome.posted.append(PostedItem(external_id=external_id,
                                             tb_timestamp=post.timestamp))

    # ---- settle ------------------------------------------------------------------------------

    async def finalize(self, inp: FinalizeBatch) -> FinalizeResult:
        """Entries first (the ledger is the truth callers are told), then the final states:
        rejected ones per id, then every transaction of the batch still `received` -> settled
        in one update (they are exactly the posted ones: the rejected moved first)."""
        new_entries, chain_seq = 0, 0
        if inp.posted:
            ids = [p.external_id for p in inp.posted]
            txns = {t.external_id: t for t in await self._transactions(inp.batch_id, ids)}
            entries = sorted(
                (settlement_entry(txns[p.external_id], self._table, p.tb_timestamp)
                 for p in inp.posted),
                key=lambda e: e.tb_timestamp)
            async with self._ledger_lock:
                posted = await self._ledger.post_entries(entries)
            new_entries, chain_seq = len(posted.new), posted.head.seq
        if inp.rejected:
            moved = await self._clearing.transition_many(
                ClearingState.REJECTED,
                [StateChange(external_id=v.external_id, reason=v.reason) for v in inp.rejected])
            if moved.refused:
                sample = dict(list(moved.refused.items())[:5])
                raise ConflictError(f"cannot reject {len(moved.refused)} transactions: {sample}",
                                    field="external_id")
        # Settled: listed on the batch document (one write; the transaction documents stay
        # as recorded), which also closes the batch when nothing of it is open any more.
        settled = await self._clearing.settle_batch(
            inp.batch_id, [p.external_id for p in inp.posted])
        if settled.refused:  # the entries are written: report, do not retry forever
            log.error("batch %s: %d posted transactions could not settle: %s", inp.batch_id,
                      len(settled.refused), dict(list(settled.refused.items())[:5]))
        await self._observe_answered(inp)
        return FinalizeResult(batch_id=inp.batch_id, settled=settled.changed,
                              new_entries=new_entries,
                              rejected=len(inp.rejected), chain_seq=chain_seq)

    async def _observe_answered(self, inp: FinalizeBatch) -> None:
        """The batch's transactions reached their final state: count them by kind and
        outcome, with their receipt-to-answer latency (the content is cached: no read)."""
        outcome_of = {p.external_id: "settled" for p in inp.posted}
        outcome_of.update((v.external_id, terminal_outcome(v.reason)) for v in inp.rejected)
        ids = list(outcome_of)
        await self._transactions(inp.batch_id, ids)  # fills the cache for any not in it
        now_s = time.time()
        answered: list[tuple[str, str, float]] = []
        for external_id in ids:
            cached = self._cache.get(external_id)
            if cached is not None:
                txn, received_s = cached
                answered.append((str(txn.kind), outcome_of[external_id], now_s - received_s))
        observe_terminal_transactions(answered)

    # ---- helpers -----------------------------------------------------------------------------

    async def _ensure_mirrors(self) -> None:
        if self._mirrors_ready:
            return
        async with self._mirrors_lock:
            if not self._mirrors_ready:
                created = await ensure_mirrors(self._client, self._table.chart)
                if created:
                    log.info("created %d GL mirror accounts in TigerBeetle", created)
                self._mirrors_ready = True

    async def _transactions(
        self, batch_id: str, external_ids: Sequence[str]
    ) -> list[ExternalTransaction]:
        """The recorded content of `external_ids`, in that order: from the process's cache, or
        one indexed read of the batch (a few ids: by id)."""
        missing = [x for x in external_ids if x not in self._cache]
        if missing:
            if len(missing) > len(external_ids) // 4:
                records = await self._clearing.by_batch(batch_id)
            else:
                records = list((await self._clearing.get_many(missing)).values())
            for record in records:
                self._remember(record)
        out: list[ExternalTransaction] = []
        for external_id in external_ids:
            cached = self._cache.get(external_id)
            out.append(cached[0] if cached is not None else await self._one(external_id))
        return out

    async def _one(self, external_id: str) -> ExternalTransaction:
        record = await self._clearing.get(external_id)
        if record is None:
            raise ConflictError(f"{external_id!r} is not recorded", field="external_id")
        self._remember(record)
        return record.transaction

    def _remember(self, record: ClearingRecord) -> None:
        txn = record.transaction
        self._cache[txn.external_id] = (txn, record.received_at.timestamp())
        self._cache.move_to_end(txn.external_id)
        while len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)


def terminal_outcome(reason: str) -> str:
    """The outcome label of a rejection: `error` when the pipeline failed (nothing the
    transaction did), `expired` when its hold ran out, `rejected` otherwise (a check or
    TigerBeetle refused it)."""
    if reason.startswith(PipelineReason.PENDING_FAILED):
        return "error"
    if reason in (RejectReason.EXPIRED, PipelineReason.CHECKS_UNFINISHED):
        return "expired"
    return "rejected"


class _Decisions:
    """What TigerBeetle answered to a batch of posts and voids."""

    def __init__(self) -> None:
        self.posted: list[PostedItem] = []
        self.voided: list[VoidItem] = []
        self.expired: list[str] = []
        self.lookup: list[str] = []  # holds posted already: their post transfer's time


async def build_clearing_activities(
    db: Any, tb_client: TigerBeetleClient, limits: BatchLimits, *,
    table: ClearingTable = DEFAULT_CLEARING_TABLE,
) -> ClearingActivities:
    """The activities over a database, its indexes and chart ensured: what a worker wires."""
    activities = ClearingActivities(
        ClearingStore(db), GeneralLedger(db, chart=table.chart), tb_client, limits,
        blocked=BlockedParties(db), table=table)
    await activities.ensure_ready()
    return activities
