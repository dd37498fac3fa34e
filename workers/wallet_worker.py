"""The wallet task queue's worker: WalletWorkflow, the read workflows and their activities
(MongoDB primary write, TigerBeetle backlog, reads, and the tb_primary reverse projection).

`build_worker` wires one task queue from ready activity callables; `wallet_activities` builds
those callables from the process's stores. The process that runs it (every task queue,
graceful SIGTERM) is workers/process.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.wallet import WalletActivities
from stores.bundle import Stores
from walletclient.temporal_connect import connect_from_settings
from walletconfig.settings import Settings
from workers.wiring import make_importer
from workflows.outbox import OutboxDrainWorkflow
from workflows.reads import GetBalanceWorkflow, GetMultiBalanceWorkflow
from workflows.wallet import WalletWorkflow

SHUTDOWN_GRACE_S = 10.0
# Concurrency bounds: the machine is small, the work is I/O bound (async activities).
MAX_CONCURRENT_WORKFLOW_TASKS = 100
MAX_CONCURRENT_ACTIVITIES = 200
MAX_CONCURRENT_LOCAL_ACTIVITIES = 200

# Every module is passed through the sandbox (loaded once per process, not re-executed for
# each workflow run): profiling showed per-run re-imports costing ~100 ms of CPU per run. The
# sandbox's runtime restrictions (no I/O, no threads, no wall clock) still apply, and
# workflows/ imports only pure modules (models, walletcore, messages.errors).
#
# The serving worker runs workflows outside the sandbox: its per-activation cost (code strings
# exec'd for every activation and payload conversion) measured ~2 ms of worker CPU per bare
# update and ~3.5 ms per wallet update (two activations: the update, then its local activity's
# result), a quarter of the whole worker cost on this machine. The sandbox stays the checker:
# the replay test replays recorded histories through `workflow_runner()` (sandboxed), so a
# non-deterministic call added to a workflow still fails there.
SERVE_SANDBOXED = False
# The serving worker runs each workflow activation inline on its event loop (temporalio's
# `debug_mode`, the SDK's one inline path) instead of handing it to a thread pool and back:
# two thread hand-offs per activation, each a wake-up that waits for a CPU on a busy host (a
# wallet write has two activations, the update and its local activity's result). Measured
# with two workers side by side in one process (400 ops at one caller, alternating blocks,
# load ~20): CPU per op legacy 8.85 -> 8.32 ms, bare 3.30 -> 2.94 ms; p50 legacy 44.9 -> 41.7,
# bare 11.3 -> 9.2 ms. What it gives up: the SDK's 2 s deadlock detector, which only reports
# (never preempts) a workflow that blocks its thread; ours do no I/O and take no locks, and
# the replay test still runs them sandboxed. Sandboxed serving keeps the thread pool.
# Off: the gain is inside this host's noise (bare's p50 moved 18.1 -> 20.4 and 12.6 -> 10.7 ms
# in two runs) and `debug_mode` is a debugging switch: it drops the deadlock detector and
# installs a breakpoint hook in a production process. A workflow that blocked would then stall
# every activity of the worker's loop instead of being reported.
SERVE_INLINE = False

# OutboxDrainWorkflow: the dual-write outbox's shard drainers run beside the wallets they drain
# for (the write path starts them: activities.outbox_drain).
WORKFLOWS: tuple[type, ...] = (
    WalletWorkflow, GetBalanceWorkflow, GetMultiBalanceWorkflow, OutboxDrainWorkflow)


def workflow_runner() -> SandboxedWorkflowRunner:
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_all_modules()
    )


def activity_name(fn: Callable[..., Any]) -> str:
    definition = getattr(fn, "__temporal_activity_definition", None)
    assert definition is not None, f"{fn!r} is not an activity"
    return str(definition.name)


def unique_activities(activities: Iterable[Callable[..., Any]]) -> list[Callable[..., Any]]:
    """First callable per activity name: a Worker refuses duplicates, and a class may start
    exporting an activity another list also carries."""
    seen: set[str] = set()
    out: list[Callable[..., Any]] = []
    for fn in activities:
        name = activity_name(fn)
        if name not in seen:
            seen.add(name)
            out.append(fn)
    return out


def wallet_activities(stores: Stores) -> list[Callable[..., Any]]:
    """Every activity the wallet and read workflows call (writes, TigerBeetle backlog, reverse
    projection, reads), bound to the process's stores; the backlog's backfill-import check
    shares them too."""
    wallet = WalletActivities(
        legacy=stores.legacy,
        tigerbeetle=stores.tigerbeetle,
        migration=stores.migration,
        importer=make_importer(stores),
    )
    return unique_activities(wallet.all())


def build_worker(
    client: Client,
    settings: Settings,
    activities: WalletActivities | Sequence[Callable[..., Any]],
    *,
    task_queue: str | None = None,
    extra_workflows: Sequence[type] = (),
    extra_activities: Sequence[Callable[..., Any]] = (),
    sandboxed: bool = SERVE_SANDBOXED,
) -> Worker:
    """A worker for the wallet workflows on `task_queue` (default: settings.wallet_task_queue),
    plus `extra_workflows`/`extra_activities` (one process serving several roles on one queue).
    `sandboxed`: see SERVE_SANDBOXED (and SERVE_INLINE).
    """
    runner: WorkflowRunner = workflow_runner() if sandboxed else UnsandboxedWorkflowRunner()
    callables = activities.all() if isinstance(activities, WalletActivities) else activities
    return Worker(
        client,
        task_queue=task_queue or settings.wallet_task_queue,
        workflows=[*WORKFLOWS, *extra_workflows],
        activities=unique_activities([*callables, *extra_activities]),
        workflow_runner=runner,
        max_concurrent_workflow_tasks=MAX_CONCURRENT_WORKFLOW_TASKS,
        max_concurrent_activities=MAX_CONCURRENT_ACTIVITIES,
        max_concurrent_local_activities=MAX_CONCURRENT_LOCAL_ACTIVITIES,
        graceful_shutdown_timeout=timedelta(seconds=SHUTDOWN_GRACE_S),
        debug_mode=SERVE_INLINE and not sandboxed,
    )


async def connect_temporal(settings: Settings) -> Client:
    """Every process's client goes through the one connect function (TLS, payload codec)."""
    return await connect_from_settings(settings)
