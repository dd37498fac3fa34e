"""The credit terminal's metrics, fed by its activities (activities.clearing, terminal_sync,
terminal_reconcile): transactions by kind and outcome with their submit-to-answer latency,
pending holds, the ledger's sync lag and the trial balance check.

Kinds are the clearing table's (a bounded set); outcomes are settled, rejected, expired and
error. Children are resolved once per (kind, outcome) (see metrics._StoreChildren)."""

from __future__ import annotations

from collections.abc import Iterable

from observability.metrics import (
    LEDGER_SYNC_LAG_SECONDS,
    TERMINAL_PENDING_HOLDS,
    TERMINAL_TRANSACTION_SECONDS,
    TERMINAL_TRANSACTIONS,
    TRIAL_BALANCE_OK,
)

__all__ = [
    "TERMINAL_OUTCOMES",
    "holds_created",
    "holds_resolved",
    "observe_sync_lag",
    "observe_terminal_transactions",
    "observe_trial_balance",
]

TERMINAL_OUTCOMES = ("settled", "rejected", "expired", "error")
KIND_LABEL_MAX = 64  # kinds are the table's names; the bound keeps a label bounded anyway

_CHILDREN: dict[tuple[str, str], tuple[object, object]] = {}


def observe_terminal_transactions(answered: Iterable[tuple[str, str, float]]) -> int:
    """(kind, outcome, seconds from receipt to the final state) per transaction the pipeline
    answered. Returns how many were counted."""
    counted = 0
    for kind, outcome, seconds in answered:
        assert outcome in TERMINAL_OUTCOMES, outcome
        key = (kind[:KIND_LABEL_MAX], outcome)
        children = _CHILDREN.get(key)
        if children is None:
            children = _CHILDREN[key] = (TERMINAL_TRANSACTIONS.labels(*key),
                                         TERMINAL_TRANSACTION_SECONDS.labels(key[0]))
        total, latency = children
        total.inc()  # type: ignore[attr-defined]
        latency.observe(max(0.0, seconds))  # type: ignore[attr-defined]
        counted += 1
    return counted


def holds_created(count: int) -> None:
    """Holds TigerBeetle created now (a retry's EXISTS is not counted twice)."""
    assert count >= 0
    if count:
        TERMINAL_PENDING_HOLDS.inc(count)


def holds_resolved(count: int) -> None:
    """Holds posted, voided or found expired. The gauge is the fleet's when summed: the hold
    of one process may be resolved by another."""
    assert count >= 0
    if count:
        TERMINAL_PENDING_HOLDS.dec(count)


def observe_sync_lag(lag_s: float) -> None:
    assert lag_s >= 0, lag_s
    LEDGER_SYNC_LAG_SECONDS.set(lag_s)


def observe_trial_balance(balanced: bool) -> None:
    TRIAL_BALANCE_OK.set(1 if balanced else 0)
