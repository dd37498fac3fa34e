"""One router per area. The credit terminal (`terminal.py`: submit_transaction,
submit_transactions, get_transaction) and the general ledger (`ledger.py`: get_trial_balance,
get_statement) are added here the same way: declare their OperationSpecs in
gateway.operations, guard each route with `gateway.auth.guard(spec)`, run money-moving POSTs
through `gateway.idempotency.run_idempotent`, and append the router to ROUTERS."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.routers import health, ledger, migration, terminal, wallets

ROUTERS: tuple[APIRouter, ...] = (
    health.router, wallets.router, terminal.router, migration.router, ledger.router,
)  # fmt: skip
