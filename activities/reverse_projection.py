"""tb_primary's reverse projection: TigerBeetle answers, MongoDB follows in the same order
(Vitess MoveTables' reverse stream: rollback loses nothing).

The wallet workflow keeps ONE ordered backlog; each item says where it goes. `to_mongodb`
batches come here. `must_drain_first` is the switch rule: an operation is never answered by
one store while operations answered by the other are still travelling to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from temporalio import activity

from activities.store_ops import apply_to, refused_outcome
from messages.wallet import (
    ACTIVITY_APPLY_MONGODB,
    ApplyTigerBeetleInput,
    ApplyTigerBeetleOutput,
    BacklogDirection,
    TigerBeetleItemOutcome,
)
from observability.backlog import backlog_gauges
from stores.legacy_store import LegacyStore
from walletcore.errors import WalletError
from walletcore.phases import MigrationState, Phase

log = logging.getLogger(__name__)

Direction = BacklogDirection
ApplyMongoInput = ApplyTigerBeetleInput  # the same shape: a wallet and a batch of items

__all__ = [
    "ACTIVITY_APPLY_MONGODB",
    "ApplyMongoInput",
    "Direction",
    "ReverseProjectionActivities",
    "answering_direction",
    "must_drain_first",
]


def answering_direction(state: MigrationState) -> Direction | None:
    """Where the backlog of an operation answered under `state` must go (None: nowhere)."""
    if state.phase == Phase.TB_PRIMARY:
        return "to_mongodb"
    if state.phase == Phase.COMPLETE:
        return None
    return "to_tigerbeetle" if state.writes_tigerbeetle else None


def must_drain_first(state: MigrationState, pending: Direction | None) -> bool:
    """True when the backlog still holds operations bound for the store that would answer now:
    the new operation must wait until they are applied, or the stores would see it in
    different orders."""
    if pending is None:
        return False
    answers_tb = state.phase in (Phase.TB_PRIMARY, Phase.COMPLETE)
    return (pending == "to_tigerbeetle") == answers_tb


class ReverseProjectionActivities:
    def __init__(self, legacy: LegacyStore) -> None:
        self._legacy = legacy

    @activity.defn(name=ACTIVITY_APPLY_MONGODB)
    async def apply_mongodb(self, inp: ApplyMongoInput) -> ApplyTigerBeetleOutput:
        """Apply TigerBeetle-answered operations to MongoDB in order (idempotent by
        transaction id). A domain error is a divergence (reported, the batch goes on);
        an outage raises and the batch is retried."""
        gauges = backlog_gauges()  # counted until an attempt succeeds (see observability)
        gauges.started("to_mongodb", inp.wallet.canonical,
                       [item.accepted_at for item in inp.items])
        outcomes: list[TigerBeetleItemOutcome] = []
        for item in inp.items:
            assert item.command.wallet == inp.wallet, "backlog item of another wallet"
            assert item.direction == "to_mongodb", "dual-write item in a projection batch"
            txn = item.command.transaction_id
            try:
                result = await apply_to(self._legacy, item.command.op)
            except WalletError as err:
                if err.retryable:
                    raise
                outcomes.append(refused_outcome(item, err, "MongoDB"))
                continue
            outcomes.append(
                TigerBeetleItemOutcome(seq=item.seq, transaction_id=txn, replayed=result.replayed)
            )
        gauges.applied("to_mongodb", inp.wallet.canonical)
        return ApplyTigerBeetleOutput(outcomes=outcomes)

    def all(self) -> list[Callable[..., Any]]:
        return [self.apply_mongodb]
