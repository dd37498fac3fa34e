"""`walletmig` command line: one argparse parser, command groups plugged in from
walletmig/commands/<group>.py (each exposes `register(subparsers) -> None`).

A group whose module does not exist yet is simply absent, so groups can be added without
editing this file. `run()` returns the exit status (use it in-process); `main()` is the console
entry point and ends the process with os._exit (see there why).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import pydantic

from walletconfig.settings import IdKeyConfigError
from walletmig.commands import CommandError
from walletmig.devstack import StackError, load_stack_env

PROG = "walletmig"
GROUPS: tuple[str, ...] = (
    "dev",
    "worker",
    "wallet",
    "bench",
    "backfill",
    "reconcile",
    "migration",
    "watch",  # `migration watch`: adds itself to the migration group
    "demo",
    "api",
    "api_key",
    "terminal",
    "ledger",
    "codec_server",
    "audit",
)
# Exceptions that mean "a server is unreachable", recognised by class name so this module does
# not import every client library.
_CONNECTION_ERRORS = frozenset(
    {
        "ConnectionError",
        "ConnectionRefusedError",
        "ServerSelectionTimeoutError",
        "AutoReconnect",
        "RPCError",
        "TimeoutError",
    }
)
# Temporal client errors that report a failed workflow/update rather than a bug here.
_TEMPORAL_FAILURES = frozenset({"WorkflowUpdateFailedError", "WorkflowFailureError"})
_CAUSE_DEPTH_MAX = 8
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Migrate wallets from MongoDB to TigerBeetle.")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="embedded stack state directory (env WALLETMIG_STATE_DIR, default .walletmig)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for group in GROUPS:
        module_name = f"walletmig.commands.{group}"
        if importlib.util.find_spec(module_name) is None:
            continue  # not written yet
        try:
            module = importlib.import_module(module_name)
            module.register(subparsers)
        except Exception as exc:  # one broken group must not take the whole CLI down
            print(
                f"{PROG}: warning: command group {group!r} failed to load: {exc}", file=sys.stderr
            )
    return parser


def _describe_validation_error(exc: pydantic.ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or exc.title
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"invalid setting {where}: {first['msg']}{more}"


def _temporal_failure(exc: BaseException) -> str | None:
    """One line for a workflow or update that failed (e.g. a validator rejecting a phase
    change): the innermost cause's message is what the operator needs."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if not names & _TEMPORAL_FAILURES:
        return None
    cause: BaseException = exc
    for _ in range(_CAUSE_DEPTH_MAX):
        if cause.__cause__ is None:
            break
        cause = cause.__cause__
    return f"{type(exc).__name__}: {cause}"


def _is_connection_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & _CONNECTION_ERRORS) or str(exc).startswith("Failed client connect")


def run(argv: Sequence[str] | None = None) -> int:
    """Parse and run one command; returns its exit status. Expected errors print one line."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help or a usage error
        code = exit_request.code
        return code if isinstance(code, int) else EXIT_USAGE
    if args.state_dir is not None:
        os.environ["WALLETMIG_STATE_DIR"] = str(args.state_dir)
    load_stack_env()
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        outcome = handler(args)
        if inspect.iscoroutine(outcome):
            outcome = asyncio.run(outcome)
        return EXIT_OK if outcome is None else int(outcome)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    # IdKeyConfigError: no wallet id key (WALLETMIG_ID_HASH_KEY_FILE), one line at start.
    except (CommandError, StackError, pydantic.ValidationError, OSError, IdKeyConfigError) as exc:
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, CommandError):
            status = exc.exit_status
        elif isinstance(exc, pydantic.ValidationError):
            status = EXIT_USAGE
        else:
            status = EXIT_FAILURE
        message = (
            _describe_validation_error(exc)
            if isinstance(exc, pydantic.ValidationError)
            else str(exc)
        )
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return status
    except Exception as exc:
        failure = _temporal_failure(exc)
        if failure is not None and not args.debug:
            print(f"{PROG}: error: {failure}", file=sys.stderr)
            return EXIT_FAILURE
        if not _is_connection_error(exc) or args.debug:
            raise
        print(
            f"{PROG}: error: cannot reach a server: {exc}\n"
            f"(is the stack running? `{PROG} dev status`)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point: run the command and end the process with its exit status.

    os._exit after flushing: the Temporal SDK's native runtime can crash during interpreter
    shutdown in short-lived processes, which would replace our real exit status.
    """
    try:
        status = run(argv)
    except BaseException:
        traceback.print_exc()
        status = EXIT_FAILURE
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)
