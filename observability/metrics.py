"""Every metric the platform exports, in one place (issue 11).

Why one module: alert rules and dashboards name metrics by string; `DEFINED` (name -> label
names) is what tests/test_alert_rules.py checks every PromQL expression against, so a renamed
metric breaks a test instead of silently emptying a panel.

Labels are bounded sets only: store names, operation names, outcomes, error class names,
ledger-pair scopes, phases. Never a client id, a wallet or a transaction id.

Some metrics are set by the code that knows the values (credit terminal, backlog): their
builders import the objects below and call them. Gate and auto-rollback metrics are set by
activities.migration (observe_gates, count_auto_rollback): the workflow decides, its
activities see every decision's evidence and the audit entry of every automatic rollback.
"""

from __future__ import annotations

import contextvars
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics import MetricWrapperBase

__all__ = [
    "DEFINED",
    "PHASES",
    "TEMPORAL_SDK_METRICS",
    "Operation",
    "count_auto_rollback",
    "instrument_methods",
    "observe_gates",
    "observe_migration_state",
    "observe_reconciliation",
    "observe_store_batch",
    "set_enabled",
    "timed_tigerbeetle",
]

# Seconds; from a cached sub-millisecond read to a request stuck behind a timeout.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
ERROR_LABEL_MAX = 64  # an exception class name longer than this is cut (bounded label values)

# No `*_created` series: one more series per label set that no rule or panel reads.
disable_created_metrics()  # type: ignore[no-untyped-call]

# name -> label names, filled by _define: the set alert rules and dashboards may name.
DEFINED: dict[str, tuple[str, ...]] = {}

M = TypeVar("M", bound=MetricWrapperBase)


def _define(kind: type[M], name: str, doc: str, labels: tuple[str, ...] = (),
            **kwargs: Any) -> M:
    assert name.startswith("walletmig_"), name
    assert name not in DEFINED, f"metric {name} defined twice"
    metric = kind(name, doc, labels, registry=REGISTRY, **kwargs)
    # Counters are exposed with _total; the name a query uses is the exposed one.
    DEFINED[f"{name}_total" if kind is Counter and not name.endswith("_total") else name] = (
        labels)
    return metric


# ---- stores (MongoDB vs TigerBeetle: the wallet plan's comparison table) -------------------
STORE_OPERATION_SECONDS = _define(
    Histogram, "walletmig_store_operation_seconds",
    "Latency of a wallet store's public operation (balance, balances, credit, debit, void, ...)",
    ("store", "operation"), buckets=LATENCY_BUCKETS_S)
WALLET_OPERATIONS = _define(
    Counter, "walletmig_wallet_operations_total",
    "Wallet store operations by outcome: ok, replayed (answered before), refused (the "
    "caller's error: insufficient funds, duplicate, not found, ...), error (anything else)",
    ("store", "operation", "outcome"))
WALLET_ERRORS = _define(
    Counter, "walletmig_wallet_errors_total",
    "Wallet store operations that raised, by exception class",
    ("store", "operation", "error"))

# ---- TigerBeetle client (stores.tb_batches.BatchedClient: every request goes through it) ---
TB_REQUEST_SECONDS = _define(
    Histogram, "walletmig_tigerbeetle_request_seconds",
    "Latency of one TigerBeetle request (one chunk of a batch)", ("operation",),
    buckets=LATENCY_BUCKETS_S)
TB_REQUEST_ERRORS = _define(
    Counter, "walletmig_tigerbeetle_request_errors_total",
    "TigerBeetle requests that raised, by exception class", ("operation", "error"))
TB_IN_FLIGHT = _define(
    Gauge, "walletmig_tigerbeetle_requests_in_flight",
    "TigerBeetle requests sent and not answered yet", ("operation",))
TB_UP = _define(
    Gauge, "walletmig_tigerbeetle_up",
    "1 when this process's last TigerBeetle request was answered, 0 after a timeout or a "
    "connection error (the cluster is unreachable from here)")
# NaN until the first request: an idle process (no TigerBeetle traffic yet) must not look down
# (a comparison with NaN is false, so no alert fires on it).
TB_UP.set(float("nan"))

# ---- reads (stores.read_metrics: shadow comparisons, fallbacks, circuit breaker) ----------
READS = _define(
    Counter, "walletmig_reads_total",
    "Balance reads by mode (shadow, cutover, primary) and outcome (match, mismatch, in_flight, "
    "tb_error, tb_served, fallback_error, fallback_open = circuit open)",
    ("scope", "mode", "outcome"))
CIRCUIT_BREAKER_OPEN = _define(
    Gauge, "walletmig_circuit_breaker_open",
    "1 while the read path's TigerBeetle circuit breaker is open", ("scope",))

# ---- migration ----------------------------------------------------------------------------
PHASES = ("legacy", "dual_write", "shadow_read", "read_cutover", "tb_primary", "complete")
MIGRATION_PHASE = _define(
    Gauge, "walletmig_migration_phase",
    "1 for the phase a migration scope is in, 0 for the others (as this process last read it)",
    ("migration", "phase"))
MIGRATION_ROLLOUT_PERCENT = _define(
    Gauge, "walletmig_migration_rollout_percent",
    "Percent of clients whose reads TigerBeetle answers", ("migration",))
MIGRATION_EPOCH = _define(
    Gauge, "walletmig_migration_epoch", "Epoch of the migration state last read", ("migration",))
MIGRATION_GATE_OK = _define(
    Gauge, "walletmig_migration_gate_ok",
    "1 when a gate of the next phase change is met, 0 when not", ("migration", "gate"))
MIGRATION_AUTO_ROLLBACKS = _define(
    Counter, "walletmig_migration_auto_rollbacks_total",
    "Automatic rollbacks the migration workflow fired", ("migration",))
BACKLOG_ITEMS = _define(
    Gauge, "walletmig_backlog_items",
    "Items waiting in the dual-write backlog (to_tigerbeetle) or the reverse projection "
    "(to_mongodb)", ("direction",))
BACKLOG_OLDEST_AGE_SECONDS = _define(
    Gauge, "walletmig_backlog_oldest_age_seconds",
    "Age of the oldest backlog item", ("direction",))

# ---- reconciliation -----------------------------------------------------------------------
RECON_LAST_RUN = _define(
    Gauge, "walletmig_reconciliation_last_run_timestamp_seconds",
    "Unix time the last reconciliation run of a scope finished", ("scope",))
RECON_WALLETS = _define(
    Gauge, "walletmig_reconciliation_wallets_checked",
    "Wallets the last run compared", ("scope",))
RECON_MATCH_RATIO = _define(
    Gauge, "walletmig_reconciliation_match_ratio",
    "Wallets without a real difference / wallets compared, of the last run that compared any",
    ("scope",))
RECON_FINDINGS = _define(
    Gauge, "walletmig_reconciliation_findings",
    "Findings of the last run by class", ("scope", "kind"))
RECON_CONSERVATION_OK = _define(
    Gauge, "walletmig_reconciliation_conservation_ok",
    "1 when money was conserved on every ledger of the last run", ("scope",))

# ---- credit terminal (names for the terminal's builders) ----------------------------------
TERMINAL_TRANSACTIONS = _define(
    Counter, "walletmig_terminal_transactions_total",
    "Terminal transactions by kind (hold, capture, release, ...) and outcome",
    ("kind", "outcome"))
TERMINAL_TRANSACTION_SECONDS = _define(
    Histogram, "walletmig_terminal_transaction_seconds",
    "Submit-to-answer latency of a terminal transaction", ("kind",), buckets=LATENCY_BUCKETS_S)
TERMINAL_PENDING_HOLDS = _define(
    Gauge, "walletmig_terminal_pending_holds", "Holds pending (not captured or released)")
LEDGER_SYNC_LAG_SECONDS = _define(
    Gauge, "walletmig_ledger_sync_lag_seconds",
    "Age of the oldest TigerBeetle transfer not yet synced to the general ledger")
TRIAL_BALANCE_OK = _define(
    Gauge, "walletmig_trial_balance_ok", "1 when the last trial balance check balanced")

# ---- HTTP gateway -------------------------------------------------------------------------
HTTP_REQUESTS = _define(
    Counter, "walletmig_http_requests_total",
    "HTTP requests by OpenAPI operationId and status code", ("operation", "status"))
HTTP_REQUEST_SECONDS = _define(
    Histogram, "walletmig_http_request_seconds",
    "HTTP request latency by OpenAPI operationId", ("operation",), buckets=LATENCY_BUCKETS_S)

# The Temporal SDK's own metrics (workers.process exports them through temporalio's
# PrometheusConfig on WALLETMIG_TEMPORAL_METRICS_PORT), the ones the dashboards use.
# Histograms in milliseconds (the SDK's default).
TEMPORAL_SDK_METRICS: dict[str, tuple[str, ...]] = {
    "temporal_workflow_task_schedule_to_start_latency": ("task_queue",),
    "temporal_activity_schedule_to_start_latency": ("task_queue",),
    "temporal_activity_execution_latency": ("task_queue", "activity_type"),
    "temporal_worker_task_slots_available": ("task_queue", "worker_type"),
    "temporal_worker_task_slots_used": ("task_queue", "worker_type"),
    "temporal_workflow_task_execution_failed": ("task_queue",),
    "temporal_activity_execution_failed": ("task_queue", "activity_type"),
    "temporal_workflow_completed": ("task_queue", "workflow_type"),
    "temporal_workflow_failed": ("task_queue", "workflow_type"),
    "temporal_request_failure": ("operation",),
}


def error_label(exc: BaseException) -> str:
    return type(exc).__name__[:ERROR_LABEL_MAX]


# ---- timers -------------------------------------------------------------------------------

# False: the timers call straight through (`walletmig bench wallet-ops --metrics off|both`
# measures what they cost). One global read per call when on.
_ENABLED = True


def set_enabled(enabled: bool) -> None:
    """Switch the store and TigerBeetle timers on or off for this process (benchmarks)."""
    global _ENABLED
    _ENABLED = enabled


# Set while a timed store operation runs: a public operation calling another (LegacyStore
# add_credit -> apply, TigerBeetleStore replicate -> void) is counted once, as the outer one.
_IN_OPERATION: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "walletmig_in_store_operation", default=False)

Operation = str | Callable[[Any], str]  # a fixed name, or one derived from the first argument
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


_NO_REPLAYED: set[type] = set()  # result types without a `replayed` attribute
_NO_REPLAYED_MAX = 256  # a few dozen store result types; cleared when full
_ABSENT = object()


def _outcome(result: Any) -> str:
    """`replayed` when the store answered an operation it had already applied. A type seen
    without the attribute is remembered: getattr's miss on a pydantic model (a balance read's
    result) raises and catches an AttributeError inside pydantic, ~2 % of the API's CPU per
    read (py-spy, session 11)."""
    first = result[0] if isinstance(result, tuple) and result else result
    kind = type(first)
    if kind in _NO_REPLAYED:
        return "ok"
    replayed = getattr(first, "replayed", _ABSENT)
    if replayed is _ABSENT:
        if len(_NO_REPLAYED) >= _NO_REPLAYED_MAX:
            _NO_REPLAYED.clear()
        _NO_REPLAYED.add(kind)
        return "ok"
    return "replayed" if replayed else "ok"


class _StoreChildren:
    """The labelled children of one (store, operation): `labels()` takes a lock and builds a
    key on every call, several microseconds each; resolved once, the hot path only observes."""

    def __init__(self, store: str, operation: str) -> None:
        self.seconds = STORE_OPERATION_SECONDS.labels(store, operation)
        self.ok = WALLET_OPERATIONS.labels(store, operation, "ok")
        self.replayed = WALLET_OPERATIONS.labels(store, operation, "replayed")


_CHILDREN: dict[tuple[str, str], _StoreChildren] = {}


def _children(store: str, operation: str) -> _StoreChildren:
    found = _CHILDREN.get((store, operation))
    if found is None:
        found = _CHILDREN[(store, operation)] = _StoreChildren(store, operation)
    return found


def _timed(method: F, store: str, operation: Operation,
           is_refusal: Callable[[BaseException], bool]) -> F:
    @functools.wraps(method)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _ENABLED or _IN_OPERATION.get():
            return await method(self, *args, **kwargs)
        name = operation if isinstance(operation, str) else operation(args[0])
        children = _children(store, name)
        token = _IN_OPERATION.set(True)
        started = time.perf_counter()
        try:
            result = await method(self, *args, **kwargs)
        except Exception as exc:
            WALLET_ERRORS.labels(store, name, error_label(exc)).inc()
            outcome = "refused" if is_refusal(exc) else "error"
            WALLET_OPERATIONS.labels(store, name, outcome).inc()
            raise
        finally:
            _IN_OPERATION.reset(token)
            children.seconds.observe(time.perf_counter() - started)
        (children.replayed if _outcome(result) == "replayed" else children.ok).inc()
        return result

    setattr(wrapper, "__walletmig_timed__", True)  # noqa: B010 (a marker, not an attribute)
    return wrapper  # type: ignore[return-value]


def instrument_methods(cls: type, store: str, operations: Mapping[str, Operation],
                       is_refusal: Callable[[BaseException], bool]) -> None:
    """Wrap `cls`'s async methods named in `operations` (method -> operation label, or a
    function of the first argument giving it) with the store timers. Once per class.
    `is_refusal`: an exception that is the caller's error, not the store's (the error-rate
    alert leaves those out)."""
    assert operations and store
    for method_name, operation in operations.items():
        method = getattr(cls, method_name)
        assert not getattr(method, "__walletmig_timed__", False), f"{method_name} wrapped twice"
        setattr(cls, method_name, _timed(method, store, operation, is_refusal))


BATCH_OPERATIONS_MAX = 1_000_000  # one call's operations (bounds the per-operation observe loop)


def observe_store_batch(store: str, operation: str, *, ok: int, replayed: int,
                        seconds: float) -> None:
    """Operations a store applied in ONE call for many (the outbox drainer's batch): counted as
    the timed public operations count theirs, one by one, each observed at the call's time
    (each of them waited that long), so the series read the same whichever path applied them."""
    assert ok >= 0 and replayed >= 0 and ok + replayed <= BATCH_OPERATIONS_MAX
    if not _ENABLED or ok + replayed == 0:
        return
    children = _children(store, operation)
    for _ in range(ok + replayed):
        children.seconds.observe(seconds)
    children.ok.inc(ok)
    children.replayed.inc(replayed)


R = TypeVar("R")
_TB_CHILDREN: dict[str, tuple[Any, Any]] = {}  # operation -> (in flight, seconds)


async def timed_tigerbeetle(operation: str, call: Awaitable[R],
                            unreachable: tuple[type[BaseException], ...]) -> R:
    """Await one TigerBeetle request with its latency, errors and in-flight count; `unreachable`:
    the exception classes that mean the cluster did not answer (TB_UP goes to 0)."""
    if not _ENABLED:
        return await call
    children = _TB_CHILDREN.get(operation)
    if children is None:  # resolved once per operation (see _StoreChildren)
        children = _TB_CHILDREN[operation] = (
            TB_IN_FLIGHT.labels(operation), TB_REQUEST_SECONDS.labels(operation))
    in_flight, seconds = children
    in_flight.inc()
    started = time.perf_counter()
    try:
        result = await call
    except Exception as exc:
        TB_REQUEST_ERRORS.labels(operation, error_label(exc)).inc()
        if isinstance(exc, unreachable):
            TB_UP.set(0)
        raise
    finally:
        in_flight.dec()
        seconds.observe(time.perf_counter() - started)
    TB_UP.set(1)
    return result


# ---- state gauges -------------------------------------------------------------------------

_LAST_STATE: dict[str, tuple[str, int, int]] = {}
MIGRATION_SCOPES_MAX = 1024  # scopes are ledger pairs and "*": a bound keeps a typo loop harmless


def observe_migration_state(scope: str, phase: str, rollout_percent: int, epoch: int) -> None:
    """Publish the migration state this process acts on (cheap when unchanged: called on
    every wallet write)."""
    state = (phase, rollout_percent, epoch)
    if _LAST_STATE.get(scope) == state:
        return
    assert phase in PHASES, phase
    if len(_LAST_STATE) >= MIGRATION_SCOPES_MAX:
        _LAST_STATE.clear()
    _LAST_STATE[scope] = state
    for name in PHASES:
        MIGRATION_PHASE.labels(scope, name).set(1 if name == phase else 0)
    MIGRATION_ROLLOUT_PERCENT.labels(scope).set(rollout_percent)
    MIGRATION_EPOCH.labels(scope).set(epoch)


# migration id -> gate names its gauges hold now (the gates of its next step).
_GATES: dict[str, frozenset[str]] = {}
MIGRATIONS_MAX = 256  # migrations this process reports gates of; the oldest is dropped past it


def observe_gates(migration: str, passed: Mapping[str, bool]) -> None:
    """The gates of a migration's next step as last judged (1 met, 0 not). A gate of an
    earlier step is removed, not left at its last value: the panel shows what blocks now.
    Also exports the migration's auto-rollback counter at 0 (an alert's `increase()` needs
    the series before its first increment)."""
    assert migration
    previous = _GATES.pop(migration, frozenset())
    for gate in previous - passed.keys():
        MIGRATION_GATE_OK.remove(migration, gate)
    if len(_GATES) >= MIGRATIONS_MAX:  # a migration finished long ago: its gauges go
        oldest = next(iter(_GATES))
        for gate in _GATES.pop(oldest):
            MIGRATION_GATE_OK.remove(oldest, gate)
    _GATES[migration] = frozenset(passed)
    for gate, ok in passed.items():
        MIGRATION_GATE_OK.labels(migration, gate).set(1 if ok else 0)
    MIGRATION_AUTO_ROLLBACKS.labels(migration)


def count_auto_rollback(migration: str) -> None:
    assert migration
    MIGRATION_AUTO_ROLLBACKS.labels(migration).inc()


def observe_reconciliation(scope: str, *, wallets: int, match_ratio: float | None,
                           findings: Mapping[str, int], conservation_ok: bool,
                           finished_at_s: float | None = None) -> None:
    """The gauges of a finished run (its report is the evidence; these are for alerting)."""
    assert wallets >= 0
    RECON_LAST_RUN.labels(scope).set(finished_at_s if finished_at_s is not None else time.time())
    RECON_WALLETS.labels(scope).set(wallets)
    if match_ratio is not None:  # None is "no data", never 100 %: the last ratio stays
        RECON_MATCH_RATIO.labels(scope).set(match_ratio)
    for kind, count in findings.items():
        RECON_FINDINGS.labels(scope, str(kind)).set(count)
    RECON_CONSERVATION_OK.labels(scope).set(1 if conservation_ok else 0)
