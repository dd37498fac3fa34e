"""Wiring for the migration task queue's worker: the backfill and reconciliation workflows and
their activities, built from the process's stores (stores.bundle.Stores). Lives with the workers:
it names workflows and activities together, which only a worker may."""

from __future__ import annotations

from typing import Any

from activities.backfill import BackfillActivities, WalletImporter
from activities.history_import import ImportBooks
from activities.reconciliation import Books, ReconcileActivities, Reconciler
from stores.backfill_imports import ImportLedger
from stores.bundle import Stores
from stores.reports import ReportStore
from workflows.backfill import BackfillWorkflow
from workflows.reconciliation import ReconciliationWorkflow

OPS_WORKFLOWS: tuple[type, ...] = (BackfillWorkflow, ReconciliationWorkflow)


def make_importer(stores: Stores) -> WalletImporter:
    books = ImportBooks(imports=stores.imports, history=stores.history, migration=stores.migration)
    return WalletImporter(stores.legacy, stores.tigerbeetle, books)


def make_reconciler(stores: Stores) -> Reconciler:
    books = Books(imports=stores.imports, migration=stores.migration,
                  reports=ReportStore(stores.db))
    return Reconciler(stores.legacy, stores.tigerbeetle, books)


async def ensure_ops_indexes(stores: Stores) -> None:
    await ImportLedger(stores.db).ensure_indexes()
    await ReportStore(stores.db).ensure_indexes()


def ops_activities(stores: Stores) -> list[Any]:
    """Every activity BackfillWorkflow and ReconciliationWorkflow call."""
    return [*BackfillActivities(make_importer(stores)).all(),
            *ReconcileActivities(make_reconciler(stores)).all()]
