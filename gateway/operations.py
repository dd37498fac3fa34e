"""Every operation the gateway serves: its operationId, the scope it needs, its rate-limit
class and whether it moves money (then it needs an Idempotency-Key).

One table, so the OpenAPI document, the auth guard and the limiter agree. A router for a new
area (the credit terminal's `submit_transaction`..., the general ledger's `get_trial_balance`
...) adds its OperationSpecs here and guards its routes with `gateway.auth.guard(spec)`:
authentication, scopes, rate limits, idempotency (`gateway.idempotency.run_idempotent`) and
the problem+json errors then work for it exactly as for the wallets.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Scope(StrEnum):
    WALLETS_READ = "wallets:read"
    WALLETS_WRITE = "wallets:write"
    TERMINAL_SUBMIT = "terminal:submit"
    TERMINAL_READ = "terminal:read"
    MIGRATION_READ = "migration:read"
    MIGRATION_OPERATE = "migration:operate"  # the migration workflow's Updates but `approve`
    MIGRATION_APPROVE = "migration:approve"  # four eyes: `approve` (another key's request)
    LEDGER_READ = "ledger:read"


class OperationClass(StrEnum):
    """Rate-limit classes: each API key has one budget per class."""

    MONEY = "money"  # moves money: limited tightly, the limiter fails closed by default
    READ = "read"  # reads: generous, the limiter fails open by default


@dataclass(frozen=True)
class OperationSpec:
    operation_id: str
    scope: Scope
    op_class: OperationClass

    @property
    def money_moving(self) -> bool:
        """Money-moving operations require an Idempotency-Key."""
        return self.op_class is OperationClass.MONEY


ADD_CREDIT = OperationSpec("add_credit", Scope.WALLETS_WRITE, OperationClass.MONEY)
SUBTRACT_CREDIT = OperationSpec("subtract_credit", Scope.WALLETS_WRITE, OperationClass.MONEY)
VOID_TRANSACTION = OperationSpec("void_transaction", Scope.WALLETS_WRITE, OperationClass.MONEY)
GET_BALANCE = OperationSpec("get_balance", Scope.WALLETS_READ, OperationClass.READ)
GET_BALANCES = OperationSpec("get_balances", Scope.WALLETS_READ, OperationClass.READ)
GET_HISTORY = OperationSpec("get_history", Scope.WALLETS_READ, OperationClass.READ)
GET_MIGRATION = OperationSpec("get_migration", Scope.MIGRATION_READ, OperationClass.READ)
SUBMIT_TRANSACTION = OperationSpec(
    "submit_transaction", Scope.TERMINAL_SUBMIT, OperationClass.MONEY
)
SUBMIT_TRANSACTIONS = OperationSpec(
    "submit_transactions", Scope.TERMINAL_SUBMIT, OperationClass.MONEY
)
GET_TRANSACTION = OperationSpec("get_transaction", Scope.TERMINAL_READ, OperationClass.READ)
# Migration control: Updates of the migration workflow. The MONEY class on purpose: limited
# tightly, failing closed, and an Idempotency-Key (a retried `advance` must not move twice;
# the key also derives the Temporal Update id, which the server deduplicates).
ADVANCE_MIGRATION = OperationSpec(
    "advance_migration", Scope.MIGRATION_OPERATE, OperationClass.MONEY
)
FORCE_ADVANCE_MIGRATION = OperationSpec(
    "force_advance_migration", Scope.MIGRATION_OPERATE, OperationClass.MONEY
)
ROLLBACK_MIGRATION = OperationSpec(
    "rollback_migration", Scope.MIGRATION_OPERATE, OperationClass.MONEY
)
SET_MIGRATION_ROLLOUT = OperationSpec(
    "set_migration_rollout", Scope.MIGRATION_OPERATE, OperationClass.MONEY
)
PAUSE_MIGRATION = OperationSpec("pause_migration", Scope.MIGRATION_OPERATE, OperationClass.MONEY)
RESUME_MIGRATION = OperationSpec("resume_migration", Scope.MIGRATION_OPERATE, OperationClass.MONEY)
APPROVE_MIGRATION = OperationSpec(
    "approve_migration", Scope.MIGRATION_APPROVE, OperationClass.MONEY
)
MIGRATION_CONTROL = (
    ADVANCE_MIGRATION, FORCE_ADVANCE_MIGRATION, ROLLBACK_MIGRATION, SET_MIGRATION_ROLLOUT,
    PAUSE_MIGRATION, RESUME_MIGRATION, APPROVE_MIGRATION,
)  # fmt: skip
GET_TRIAL_BALANCE = OperationSpec("get_trial_balance", Scope.LEDGER_READ, OperationClass.READ)
GET_STATEMENT = OperationSpec("get_statement", Scope.LEDGER_READ, OperationClass.READ)

OPERATIONS: dict[str, OperationSpec] = {
    spec.operation_id: spec
    for spec in (
        ADD_CREDIT, SUBTRACT_CREDIT, VOID_TRANSACTION, GET_BALANCE, GET_BALANCES, GET_HISTORY,
        GET_MIGRATION, SUBMIT_TRANSACTION, SUBMIT_TRANSACTIONS, GET_TRANSACTION,
        GET_TRIAL_BALANCE, GET_STATEMENT, *MIGRATION_CONTROL,
    )
}  # fmt: skip
