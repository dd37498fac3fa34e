"""WalletReader: the direct, low-latency read path (no Temporal round trip).

Which store answers follows the migration state of the wallet's ledger pair:
legacy, dual_write, shadow_read -> MongoDB; tb_primary, complete -> TigerBeetle;
read_cutover -> TigerBeetle for `rollout_percent` % of clients (sticky hash of client_id),
MongoDB when TigerBeetle fails. Shadow comparisons and fallback metrics belong to the migration
work: `_route` is the one place to extend.
"""

from __future__ import annotations

import hashlib
import logging

from stores.migration_state import GLOBAL_SCOPE, MigrationStateStore
from walletcore.balances import WalletBalance
from walletcore.errors import WalletError
from walletcore.keys import WalletKey
from walletcore.operations import HistoryEntry
from walletcore.phases import MigrationState, Phase
from walletcore.ports import WalletStore

log = logging.getLogger(__name__)

PERCENT_BUCKETS = 100
TB_ANSWERS = frozenset({Phase.TB_PRIMARY, Phase.COMPLETE})


def rollout_bucket(client_id: str) -> int:
    """Sticky 0..99 bucket of a client: the same clients move first as the percentage grows."""
    digest = hashlib.sha256(f"rollout:{client_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % PERCENT_BUCKETS


class WalletReader:
    def __init__(
        self, legacy: WalletStore, tigerbeetle: WalletStore, migration: MigrationStateStore
    ) -> None:
        self._legacy = legacy
        self._tigerbeetle = tigerbeetle
        self._migration = migration

    def _route(self, state: MigrationState, client_id: str) -> tuple[WalletStore, bool]:
        """(store that answers, whether MongoDB is the fallback on a TigerBeetle failure)."""
        if state.phase in TB_ANSWERS:
            return self._tigerbeetle, False
        if state.phase is Phase.READ_CUTOVER and rollout_bucket(client_id) < state.rollout_percent:
            return self._tigerbeetle, True
        return self._legacy, False

    async def get_balance(self, wallet: WalletKey) -> WalletBalance:
        state = await self._migration.resolve(wallet.ledger_pair)
        store, fallback = self._route(state, wallet.client_id)
        try:
            return await store.get_balance(wallet)
        except WalletError as err:
            if not fallback or not err.retryable:
                raise
            log.warning("TigerBeetle read of %s failed (%s); MongoDB answers", wallet, err)
            return await self._legacy.get_balance(wallet)

    async def get_multi_balance(self, client_id: str) -> list[WalletBalance]:
        # A client's wallets span ledger pairs; the global scope decides (pair scopes are a
        # per-wallet refinement the migration work may add here).
        state = await self._migration.get(GLOBAL_SCOPE)
        store, fallback = self._route(state, client_id)
        try:
            return await store.get_multi_balance(client_id)
        except WalletError as err:
            if not fallback or not err.retryable:
                raise
            return await self._legacy.get_multi_balance(client_id)

    async def history(self, wallet: WalletKey, limit: int = 50) -> list[HistoryEntry]:
        state = await self._migration.resolve(wallet.ledger_pair)
        store, _ = self._route(state, wallet.client_id)
        return await store.history(wallet, limit)
