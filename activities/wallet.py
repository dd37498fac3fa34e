"""Activities of the wallet workflows: MongoDB primary write, TigerBeetle backlog, reads.

Stores arrive in the constructor (opened once per worker process, see walletmig.runtime); each
activity takes one pydantic input model. Domain errors leave through activities.errors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from temporalio import activity

from activities.errors import wallet_errors_as_application_errors
from stores.legacy_store import LegacyStore
from stores.migration_state import MigrationStateStore
from stores.tigerbeetle_store import TigerBeetleStore
from walletcore.balances import WalletBalance
from walletcore.errors import ConflictError, WalletError
from walletcore.operations import AddCredit, OperationResult, SubtractCredit, WalletOperation
from walletcore.phases import MigrationState
from walletcore.ports import WalletStore
from walletmig.reads import WalletReader
from workflows.wallet_models import (
    ACTIVITY_APPLY_PRIMARY,
    ACTIVITY_APPLY_TIGERBEETLE,
    ACTIVITY_READ_BALANCE,
    ACTIVITY_READ_MULTI_BALANCE,
    ApplyPrimaryInput,
    ApplyTigerBeetleInput,
    ApplyTigerBeetleOutput,
    MultiBalance,
    PrimaryOutcome,
    ReadBalanceInput,
    ReadMultiBalanceInput,
    TigerBeetleItemOutcome,
)

log = logging.getLogger(__name__)


async def apply_to(store: WalletStore, op: WalletOperation) -> OperationResult:
    # SubtractCredit subclasses AddCredit: test it first.
    if isinstance(op, SubtractCredit):
        return await store.subtract_credit(op)
    if isinstance(op, AddCredit):
        return await store.add_credit(op)
    return await store.void(op)


class WalletActivities:
    def __init__(
        self,
        *,
        legacy: LegacyStore,
        tigerbeetle: TigerBeetleStore,
        migration: MigrationStateStore,
    ) -> None:
        self._legacy = legacy
        self._tigerbeetle = tigerbeetle
        self._migration = migration
        self._reader = WalletReader(legacy, tigerbeetle, migration)

    @activity.defn(name=ACTIVITY_APPLY_PRIMARY)
    async def apply_primary(self, inp: ApplyPrimaryInput) -> PrimaryOutcome:
        """The write that answers the caller, under the wallet pair's current migration phase."""
        op = inp.command.op
        with wallet_errors_as_application_errors():
            state = await self._migration.resolve(op.wallet.ledger_pair)
            if not state.mongo_answers_writes:
                return await self._apply_tigerbeetle_primary(state, op)
            result = await apply_to(self._legacy, op)
        return PrimaryOutcome(
            result=result,
            phase=state.phase,
            epoch=state.epoch,
            writes_tigerbeetle=state.writes_tigerbeetle,
        )

    async def _apply_tigerbeetle_primary(
        self, state: MigrationState, op: WalletOperation
    ) -> PrimaryOutcome:
        """Extension point (migration work): tb_primary answers from TigerBeetle and projects
        the operation to MongoDB in reverse; complete writes TigerBeetle only."""
        raise ConflictError(
            f"phase {state.phase.value} (epoch {state.epoch}) of {op.wallet.ledger_pair} "
            "writes TigerBeetle first; that write path is not implemented yet",
            field="phase",
        )

    @activity.defn(name=ACTIVITY_APPLY_TIGERBEETLE)
    async def apply_tigerbeetle(self, inp: ApplyTigerBeetleInput) -> ApplyTigerBeetleOutput:
        """Apply backlog items in order. A domain error retrying cannot fix is reported as a
        divergence and the batch goes on; anything else raises and the whole batch is retried
        (idempotent by transaction id)."""
        outcomes: list[TigerBeetleItemOutcome] = []
        for item in inp.items:
            assert item.command.wallet == inp.wallet, "backlog item of another wallet"
            try:
                result = await apply_to(self._tigerbeetle, item.command.op)
            except WalletError as err:
                if err.retryable:
                    raise  # outage: the activity retries the batch
                log.warning("divergence on %s %s: %s", inp.wallet, item.command.transaction_id, err)
                outcomes.append(
                    TigerBeetleItemOutcome(
                        seq=item.seq,
                        transaction_id=item.command.transaction_id,
                        error_type=err.type_name,
                        error_message=str(err),
                    )
                )
                continue
            outcomes.append(
                TigerBeetleItemOutcome(
                    seq=item.seq,
                    transaction_id=item.command.transaction_id,
                    replayed=result.replayed,
                )
            )
        return ApplyTigerBeetleOutput(outcomes=outcomes)

    @activity.defn(name=ACTIVITY_READ_BALANCE)
    async def read_balance(self, inp: ReadBalanceInput) -> WalletBalance:
        with wallet_errors_as_application_errors():
            return await self._reader.get_balance(inp.query.wallet)

    @activity.defn(name=ACTIVITY_READ_MULTI_BALANCE)
    async def read_multi_balance(self, inp: ReadMultiBalanceInput) -> MultiBalance:
        with wallet_errors_as_application_errors():
            return MultiBalance(balances=await self._reader.get_multi_balance(inp.query.client_id))

    def all(self) -> list[Callable[..., Any]]:
        """The activity callables, for Worker(activities=...)."""
        return [
            self.apply_primary,
            self.apply_tigerbeetle,
            self.read_balance,
            self.read_multi_balance,
        ]
