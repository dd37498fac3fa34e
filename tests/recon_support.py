"""Shared set-up for the backfill and reconciliation tests: real stores on the session's servers,
an isolated ledger table per test (fresh country code and ledger ids), and a worker."""

from __future__ import annotations

import random
import string
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from temporalio.client import Client

from activities.backfill import BackfillActivities, WalletImporter
from activities.history_import import ImportBooks
from activities.reconciliation import Books, ReconcileActivities, Reconciler
from activities.wallet import TigerBeetleBacklog
from messages.backfill import BackfillPageInput
from messages.reconciliation import ReconcileInput, ReconcileSummary
from messages.wallet import (
    BacklogItem,
    TigerBeetleItemOutcome,
    WalletCommand,
)
from registries.account_registry import AccountRegistry
from registries.transfer_registry import TransferRegistry
from stores.backfill_imports import ImportLedger
from stores.history_import import HistoryCheckpoints
from stores.legacy_store import LegacyStore
from stores.migration_state import MigrationStateStore
from stores.reports import ReportStore
from stores.tigerbeetle_client import TigerBeetleClient
from stores.tigerbeetle_store import TigerBeetleStore
from walletcore.keys import WalletKey
from walletcore.ledgers import DEFAULT_LEDGERS, LedgerTable
from walletcore.operations import AddCredit, SubtractCredit, Void, WalletOperation
from walletcore.phases import Phase
from workflows.reconciliation import ReconciliationWorkflow

CURRENCIES = ("USD", "JPY", "BHD", "USDC", "BTC")  # precisions 2, 0, 3, 6, 8
# Country codes handed out this session: every env of a session shares its MongoDB database,
# so two envs with one country would reconcile each other's wallets (a random pick of 26^3
# collided about once a run over the suite's ~100 envs).
_COUNTRIES_USED: set[str] = set()
COUNTRY_DRAWS_MAX = 1000


def fresh_country() -> str:
    """A three-letter country code no other env of this session has."""
    for _ in range(COUNTRY_DRAWS_MAX):
        country = "".join(random.choices(string.ascii_uppercase, k=3))
        if country not in _COUNTRIES_USED:
            _COUNTRIES_USED.add(country)
            return country
    raise AssertionError(f"no unused country code in {COUNTRY_DRAWS_MAX} draws")


@dataclass
class Env:
    db: AsyncDatabase[Any]
    ledgers: LedgerTable
    country: str
    pairs: list[str]
    legacy: LegacyStore
    accounts: AccountRegistry
    transfers: TransferRegistry
    tb_store: TigerBeetleStore
    tb_client: TigerBeetleClient
    imports: ImportLedger
    importer: WalletImporter
    migration: MigrationStateStore
    reports: ReportStore
    reconciler: Reconciler

    def key(self, client_id: str, currency: str = "USD") -> WalletKey:
        return WalletKey(client_id=client_id, country=self.country, currency=currency)

    def backfill_activities(self) -> BackfillActivities:
        return BackfillActivities(self.importer)

    def reconcile_activities(self) -> ReconcileActivities:
        return ReconcileActivities(self.reconciler)


async def make_env(db: AsyncDatabase[Any], redis: Any, tb_client: TigerBeetleClient) -> Env:
    country = fresh_country()
    base = random.randint(10_000, 2**31)
    mapping = dict(DEFAULT_LEDGERS)
    pairs = [f"{c}:{country}" for c in CURRENCIES]
    for offset, pair in enumerate(pairs):
        mapping[pair] = base + offset
    ledgers = LedgerTable(mapping)
    legacy = LegacyStore(db, ledgers=ledgers)
    accounts = AccountRegistry(db, redis, ledgers=ledgers)
    transfers = TransferRegistry(db)
    imports = ImportLedger(db)
    for store in (legacy, accounts, transfers, imports):
        await store.ensure_indexes()
    # Its own deployment tag: the session's cluster is shared by every test's "deployment".
    tb_store = TigerBeetleStore(tb_client, accounts, transfers, ledgers,
                                deployment_tag=random.randint(1, 2**63))
    migration = MigrationStateStore(db, cache_ttl_s=0)
    importer = WalletImporter(legacy, tb_store, ImportBooks(
        imports=imports, history=HistoryCheckpoints(db), migration=migration))
    reports = ReportStore(db)
    await reports.ensure_indexes()
    reconciler = Reconciler(legacy, tb_store, Books(imports=imports, migration=migration,
                                                    reports=reports))
    return Env(db=db, ledgers=ledgers, country=country, pairs=pairs, legacy=legacy,
               accounts=accounts, transfers=transfers, tb_store=tb_store, tb_client=tb_client,
               imports=imports, importer=importer, migration=migration, reports=reports,
               reconciler=reconciler)


async def backfill_all(env: Env, pairs: list[str] | None = None) -> None:
    """Import every legacy wallet of `pairs` (default: the env's) with the real importer."""
    for pair in pairs or env.pairs:
        after = None
        while True:
            page = await env.importer.page(BackfillPageInput(
                run_id="test-backfill", pair=pair, after=after, limit=100))
            assert page.failed == {}
            after = page.last_key
            if page.exhausted:
                break


async def run_reconciliation(
    worker: tuple[Client, str], pairs: list[str], **kw: Any
) -> ReconcileSummary:
    """One run of the real ReconciliationWorkflow over `pairs`, on `worker` (client, queue)."""
    client, queue = worker
    run_id = f"rc-{uuid.uuid4().hex[:8]}"
    kw.setdefault("recheck_delay_s", 0.5)
    summary: ReconcileSummary = await client.execute_workflow(
        ReconciliationWorkflow.run, ReconcileInput(run_id=run_id, pairs=pairs, **kw),
        id=f"reconcile-test/{run_id}", task_queue=queue, execution_timeout=timedelta(minutes=5))
    return summary


async def credit(env: Env, key: WalletKey, txn: str, amount: str, *, overdraft: bool = False,
                 store: Any = None) -> None:
    target = store or env.legacy
    await target.add_credit(AddCredit(wallet=key, transaction_id=txn, amount=Decimal(amount),
                                      allow_overdraft=overdraft))


async def debit(env: Env, key: WalletKey, txn: str, amount: str, *, overdraft: bool = False,
                store: Any = None) -> None:
    target = store or env.legacy
    await target.subtract_credit(SubtractCredit(wallet=key, transaction_id=txn,
                                                amount=Decimal(amount), allow_overdraft=overdraft))


async def void(env: Env, key: WalletKey, txn: str, original: str, *, store: Any = None) -> None:
    target = store or env.legacy
    await target.void(Void(wallet=key, transaction_id=txn, original_transaction_id=original))


class BacklogApplier:
    """The wallet workflow's TigerBeetle backlog (activities.wallet.TigerBeetleBacklog, the
    one implementation) driven item by item: per wallet, serialized by the caller; ensure the
    wallet is imported, skip operations whose legacy version the opening holds, apply the rest.
    """

    def __init__(self, env: Env) -> None:
        self.env = env
        self.backlog = TigerBeetleBacklog(env.legacy, env.tb_store, env.importer)
        self.skipped = 0
        self.applied = 0
        self._seq = 0

    async def apply(self, key: WalletKey, op: WalletOperation) -> TigerBeetleItemOutcome:
        """`op` was applied to MongoDB already; its facts are read back from there."""
        self._seq += 1
        item = BacklogItem(seq=self._seq, command=WalletCommand.of(op), phase=Phase.DUAL_WRITE,
                           epoch=0, accepted_at=datetime.now(UTC),
                           legacy=await self.env.legacy.facts_of(op.transaction_id))
        [outcome] = (await self.backlog.apply(key, [item])).outcomes
        assert outcome.error_type is None, outcome
        if outcome.in_opening:
            self.skipped += 1
        else:
            self.applied += 1
        return outcome
