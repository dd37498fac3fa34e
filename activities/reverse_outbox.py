"""tb_primary's reverse projection through the outbox (stores.outbox, `wallet_outbox_to_mongodb`).

Intent first: the tb_primary write records the operation's MongoDB-bound record (pending),
THEN writes TigerBeetle (activities.wallet). A crash anywhere leaves either no TigerBeetle
transfer (nothing owed: the record is abandoned once no write can still be in flight) or a
transfer with its pending record (owed: applied here). No crash gap, and no activity on the
Temporal server per operation: the shard drainers (activities.outbox_drain, the same ones that
move dual-writes to TigerBeetle) run one pass of this after theirs.

A pass: the shard's pending records (one page), one TigerBeetle lookup of their derived
transfer ids. A record whose transfer exists is owed to MongoDB: each wallet's are applied in
TigerBeetle's order (the transfers' timestamps: TigerBeetle answered them, MongoDB follows in
the same order). Batched (the default; WALLETMIG_REVERSE_OUTBOX_BATCHED=off turns it off per
process): the credits and debits of MANY wallets go in one MongoDB transaction together with
their marks (LegacyStore.apply_reverse_batch, up to its BATCH_OPERATIONS_MAX), so a record is
marked iff its write committed. A wallet's records from the first one the batch does not decide
(a void, a replay, an uncovered debit, an unknown wallet; or all of them when the transaction
did not commit) go one by one after it, as before: each in its own transaction, many wallets
at once, then marked in one update. A record whose transfer does
not exist is being written (left pending) or was never written: abandoned after
stores.outbox.ABANDON_AFTER_S since its write path last armed it (a retry re-arms it; a write
landing later than that is what reconciliation then reports: `lost_legacy_write`). Applying is
idempotent (MongoDB by transaction id): a drainer killed before its mark re-applies as replays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime

from activities.store_ops import apply_to
from observability.backlog import backlog_gauges
from observability.metrics import observe_store_batch
from stores.legacy_store import BATCH_OPERATIONS_MAX, SOURCE, LegacyStore
from stores.outbox import ABANDON_AFTER_S, Outbox, ReverseRecord
from stores.tigerbeetle_store import TigerBeetleStore
from walletcore.errors import WalletError
from walletcore.ids import transfer_id, void_transfer_id
from walletcore.operations import AddCredit, SubtractCredit, Void, WalletOperation

log = logging.getLogger(__name__)

WALLETS_IN_FLIGHT = 16  # wallets of one pass applied to MongoDB at once (each in its order)
BATCHED_DEFAULT = os.environ.get("WALLETMIG_REVERSE_OUTBOX_BATCHED", "on").lower() != "off"
Chain = list[ReverseRecord]  # one wallet's owed records, in TigerBeetle's order


def derived_transfer_id(op: WalletOperation) -> int:
    """The TigerBeetle transfer an operation makes (a void's derives from its original)."""
    if isinstance(op, Void):
        return void_transfer_id(op.original_transaction_id)
    return transfer_id(op.transaction_id)


def _batchable_head(chain: Chain) -> list[AddCredit]:
    """The chain's credits and debits before its first void, at most a batch's worth."""
    head: list[AddCredit] = []
    for record in chain[:BATCH_OPERATIONS_MAX]:
        op = record.command.op
        if isinstance(op, Void):
            break
        head.append(op)
    return head


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class ReverseOutboxDrainer:
    """One pass over a shard's pending reverse records (see the module docstring)."""

    def __init__(
        self, outbox: Outbox, legacy: LegacyStore, tigerbeetle: TigerBeetleStore, *,
        abandon_after_s: float = ABANDON_AFTER_S, batched: bool | None = None,
    ) -> None:
        """`batched`: None = BATCHED_DEFAULT (read when built)."""
        assert abandon_after_s > 0
        self._batched = BATCHED_DEFAULT if batched is None else batched
        self._outbox = outbox
        self._legacy = legacy
        self._tigerbeetle = tigerbeetle
        self._abandon_after_s = abandon_after_s

    async def drain_pass(self, shard: int, beat: Callable[[], None] = lambda: None) -> int:
        """Records applied (or abandoned) by this pass."""
        records = await self._outbox.reverse_page(shard)
        if not records:
            return 0
        derived = {r.transaction_id: derived_transfer_id(r.command.op) for r in records}
        at = await self._tigerbeetle.transfer_timestamps(sorted(set(derived.values())))
        now = datetime.now(UTC)
        owed: dict[str, list[tuple[int, ReverseRecord]]] = {}
        abandoned = 0
        for record in records:
            timestamp = at.get(derived[record.transaction_id])
            age_s = (now - _as_utc(record.armed_at)).total_seconds()
            if timestamp is not None:
                owed.setdefault(record.wallet.canonical, []).append((timestamp, record))
            elif age_s >= self._abandon_after_s and await self._outbox.abandon_reverse(record):
                abandoned += 1
                log.warning("reverse outbox: %s has no TigerBeetle transfer %.0f s after its "
                            "intent: abandoned", record.transaction_id, age_s)
        beat()
        chains = [[r for _, r in sorted(rs, key=lambda pair: (pair[0], pair[1].created_at))]
                  for rs in owed.values()]
        batched = 0
        if self._batched:
            batched, chains = await self._batch(chains, beat)
        applied: list[str] = []
        refused: dict[str, tuple[str, str]] = {}
        gate = asyncio.Semaphore(WALLETS_IN_FLIGHT)

        async def one(chain: Chain) -> None:
            async with gate:
                await self._wallet(chain, applied, refused)

        done = await asyncio.gather(*(one(c) for c in chains if c), return_exceptions=True)
        await self._outbox.mark_reverse(applied, refused)  # the others' marks are kept
        beat()
        failures = [d for d in done if isinstance(d, BaseException)]
        if failures:
            raise failures[0]  # that wallet's rest stays pending, in order
        return batched + len(applied) + abandoned

    async def _batch(
        self, chains: list[Chain], beat: Callable[[], None]
    ) -> tuple[int, list[Chain]]:
        """Each chain's credits and debits up to its first void, many wallets per MongoDB
        transaction (with their marks). Returns the records applied and marked, and each
        chain's rest for the one-by-one path (in order, after what was committed)."""
        heads = [_batchable_head(chain) for chain in chains]
        rests: list[Chain] = [chain[len(head):] for chain, head in zip(chains, heads, strict=True)]
        order = [i for i, head in enumerate(heads) if head]
        done = 0
        while order:
            chunk: list[int] = []
            size = 0
            while order and size + len(heads[order[0]]) <= BATCH_OPERATIONS_MAX:
                size += len(heads[order[0]])
                chunk.append(order.pop(0))
            done += await self._one_batch([chains[i] for i in chunk],
                                          [heads[i] for i in chunk], rests, chunk)
            beat()
        return done, rests

    async def _one_batch(self, chains: list[Chain], heads: list[list[AddCredit]],
                         rests: list[Chain], at: list[int]) -> int:
        gauges = backlog_gauges()
        for chain in chains:
            gauges.started("to_mongodb", chain[0].wallet.canonical, [r.created_at for r in chain])
        started = time.perf_counter()
        counts = await self._legacy.apply_reverse_batch(heads)
        elapsed_s = time.perf_counter() - started
        if counts is None:  # nothing committed: every record one by one
            counts = [0] * len(chains)
        written = {"credit": 0, "debit": 0}
        for index, chain, head, count in zip(at, chains, heads, counts, strict=True):
            assert 0 <= count <= len(head)
            rests[index] = chain[count:]
            for op in head[:count]:
                written["debit" if isinstance(op, SubtractCredit) else "credit"] += 1
            if not rests[index]:
                gauges.applied("to_mongodb", chain[0].wallet.canonical)
        for kind, count in written.items():
            observe_store_batch(SOURCE, kind, ok=count, replayed=0, seconds=elapsed_s)
        return sum(counts)

    async def _wallet(
        self, records: list[ReverseRecord], applied: list[str],
        refused: dict[str, tuple[str, str]],
    ) -> None:
        """One wallet's owed records in TigerBeetle's order; stops at an outage (the later
        ones must not overtake it). A refusal is a divergence: recorded, the wallet goes on."""
        wallet = records[0].wallet.canonical
        gauges = backlog_gauges()
        gauges.started("to_mongodb", wallet, [r.created_at for r in records])
        for record in records:
            command = record.command
            try:
                await apply_to(self._legacy, command.op)
            except WalletError as err:
                if err.retryable:
                    raise
                # No wallet key in logs (issue 12): the transaction id and pair are enough.
                log.warning("MongoDB refused %s %s (pair %s) that TigerBeetle accepted: %s; "
                            "left for reconciliation", command.kind.value,
                            command.transaction_id, command.wallet.ledger_pair, err)
                refused[record.transaction_id] = (err.type_name, str(err))
            applied.append(record.transaction_id)
        gauges.applied("to_mongodb", wallet)
