"""Command groups of the `walletmig` CLI.

Each module here exposes `register(subparsers) -> None`, adding one sub-parser per command
and setting `handler` on it with `parser.set_defaults(handler=...)`. A handler takes the
parsed `argparse.Namespace` and returns an exit status, either directly or as a coroutine
(the CLI runs coroutines with asyncio.run). Raise the errors below for expected failures: the
CLI prints one line, no traceback.
"""

from __future__ import annotations


class CommandError(Exception):
    """An expected failure (a server is down, a precondition does not hold): exit status 1."""

    exit_status = 1


class UsageError(CommandError):
    """The user asked for something invalid (bad argument or value): exit status 2."""

    exit_status = 2
