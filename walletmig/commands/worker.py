"""`walletmig worker [--task-queue Q ...]`: serve the wallet and migration task queues until
SIGTERM/SIGINT (see workers/process.py)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from walletconfig.settings import Settings
from walletmig.commands import UsageError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "worker",
        help="run the worker: wallet + migration task queues",
        description="Serve the wallet task queue (wallet and read workflows) and the migration "
        "task queue (migration, backfill and reconciliation workflows) until SIGTERM/SIGINT, "
        "then shut down gracefully. Queue names and server addresses come from the "
        "environment (WALLET_TASK_QUEUE, MIGRATION_TASK_QUEUE; see walletconfig/settings.py).",
    )
    parser.add_argument(
        "--task-queue",
        action="append",
        dest="task_queues",
        metavar="QUEUE",
        help="serve only this configured task queue (repeatable; default: all)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=None, metavar="PORT",
        help="serve Prometheus metrics on PORT (/metrics); default WALLETMIG_METRICS_PORT, "
        "0 = off")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"))
    parser.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    # Imported here: the CLI's other commands should not pay for the Temporal worker import.
    from workers.process import UnknownTaskQueueError, plan, run_worker

    overrides = {} if args.metrics_port is None else {"metrics_port": args.metrics_port}
    settings = Settings.from_env(**overrides)
    try:
        plan(settings, args.task_queues)
    except UnknownTaskQueueError as err:
        raise UsageError(str(err)) from None
    await run_worker(settings, args.task_queues)
    return 0
