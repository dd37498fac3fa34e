"""tb_primary write path pieces: TigerBeetle answers, MongoDB follows as an ordered reverse
projection (Vitess MoveTables' reverse stream: rollback loses nothing).

To be wired into the wallet workflow (see the integration notes in the migration report):
- `answer_from_tigerbeetle` replaces `WalletActivities._apply_tigerbeetle_primary`;
- `ReverseProjectionActivities.apply_mongodb` drains `to_mongodb` backlog items in order;
- `must_drain_first` is the switch rule: an operation is never answered by one store while
  operations answered by the other are still travelling to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from temporalio import activity

from activities.errors import wallet_errors_as_application_errors
from stores.legacy_store import LegacyStore
from stores.tigerbeetle_store import TigerBeetleStore
from walletcore.errors import WalletError
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, OperationResult, SubtractCredit, WalletOperation
from walletcore.phases import MigrationState, Phase
from walletcore.ports import WalletStore
from workflows.wallet_models import (
    DRAIN_BATCH_MAX,
    ApplyTigerBeetleOutput,
    BacklogItem,
    TigerBeetleItemOutcome,
)

log = logging.getLogger(__name__)

ACTIVITY_APPLY_MONGODB = "apply_mongodb_projection"
Direction = Literal["to_tigerbeetle", "to_mongodb"]


class ApplyMongoInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    wallet: WalletKey
    items: list[BacklogItem] = Field(min_length=1, max_length=DRAIN_BATCH_MAX)


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


async def _apply(store: WalletStore, op: WalletOperation) -> OperationResult:
    if isinstance(op, SubtractCredit):
        return await store.subtract_credit(op)
    if isinstance(op, AddCredit):
        return await store.add_credit(op)
    return await store.void(op)


async def answer_from_tigerbeetle(tigerbeetle: TigerBeetleStore,
                                  op: WalletOperation) -> OperationResult:
    """tb_primary / complete: TigerBeetle decides (insufficient funds comes from it)."""
    with wallet_errors_as_application_errors():
        return await _apply(tigerbeetle, op)


class ReverseProjectionActivities:
    def __init__(self, legacy: LegacyStore) -> None:
        self._legacy = legacy

    @activity.defn(name=ACTIVITY_APPLY_MONGODB)
    async def apply_mongodb(self, inp: ApplyMongoInput) -> ApplyTigerBeetleOutput:
        """Apply TigerBeetle-answered operations to MongoDB in order (idempotent by
        transaction id). A domain error is a divergence (reported, the batch goes on);
        an outage raises and the batch is retried."""
        outcomes: list[TigerBeetleItemOutcome] = []
        for item in inp.items:
            assert item.command.wallet == inp.wallet, "backlog item of another wallet"
            try:
                result = await _apply(self._legacy, item.command.op)
            except WalletError as err:
                if err.retryable:
                    raise
                log.warning("reverse projection divergence on %s %s: %s", inp.wallet,
                            item.command.transaction_id, err)
                outcomes.append(TigerBeetleItemOutcome(
                    seq=item.seq, transaction_id=item.command.transaction_id,
                    error_type=err.type_name, error_message=str(err)))
                continue
            outcomes.append(TigerBeetleItemOutcome(
                seq=item.seq, transaction_id=item.command.transaction_id,
                replayed=result.replayed))
        return ApplyTigerBeetleOutput(outcomes=outcomes)

    def all(self) -> list[Callable[..., Any]]:
        return [self.apply_mongodb]
