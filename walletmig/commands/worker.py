"""`walletmig worker [--task-queue Q ...]`: run the wallet worker until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from walletmig.config import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "worker",
        help="run the wallet worker (workflows + activities)",
        description="Poll the wallet task queue(s) until SIGTERM/SIGINT, then shut down "
        "gracefully. Addresses come from the environment (see walletmig/config.py).",
    )
    parser.add_argument(
        "--task-queue",
        action="append",
        dest="task_queues",
        metavar="QUEUE",
        help="task queue to poll (repeatable; default: WALLET_TASK_QUEUE)",
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"))
    parser.set_defaults(handler=_run)


async def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    # Imported here: the CLI's other commands should not pay for the Temporal worker import.
    from workers.wallet_worker import run_worker

    settings = Settings.from_env()
    await run_worker(settings, args.task_queues)
    return 0
