"""`walletmig terminal submit|status|block|unblock|resume|demo`: the credit terminal's intake.

    submit   one transaction through the whole flow (waits up to --wait-s for the outcome)
    status   the outcome of an external id (settled with its entry, rejected with its reason)
    block / unblock   the blocked-counterparty list the checks read
    resume   start the workflows of batches left `received` (a submitter died mid-way) now;
             the catch-up sync Schedule (`walletmig ledger sync`) does it every 5 minutes
    demo     a realistic mix end to end, per kind counts and latencies, then the final checks

The workflows run on the migration task queue (`walletmig worker` serves it; `walletmig dev up`
runs one). Exit status: 0 settled (or still clearing), 1 rejected or refused (a conflict),
2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from walletconfig.settings import Settings
from walletmig.commands import CommandError, UsageError

# Temporal, pymongo and the client load inside the handlers (fast `walletmig --help`).
if TYPE_CHECKING:
    from messages.clearing import TransactionOutcome
    from stores.clearing_blocklist import BlockedParties
    from walletclient.clearing_client import ClearingClient

WAIT_S_DEFAULT = 30.0
DEMO_TRANSACTIONS_DEFAULT = 1000


@dataclass
class Terminal:
    client: ClearingClient
    blocked: BlockedParties


@contextlib.asynccontextmanager
async def open_terminal(settings: Settings) -> AsyncIterator[Terminal]:
    """The clearing client over the settings' database and migration task queue."""
    from mongobase.mongo import database_of, make_mongo_client
    from stores.clearing_blocklist import BlockedParties
    from stores.clearing_store import ClearingStore
    from stores.general_ledger import GeneralLedger
    from walletclient.clearing_client import ClearingClient
    from workers.wallet_worker import connect_temporal

    mongo = make_mongo_client(settings.mongodb_uri)
    try:
        db = database_of(mongo, settings.mongodb_database)
        temporal = await connect_temporal(settings)
        client = ClearingClient(temporal, ClearingStore(db), settings.migration_task_queue,
                                ledger=GeneralLedger(db))
        yield Terminal(client=client, blocked=BlockedParties(db))
    finally:
        await mongo.close()


def outcome_line(outcome: TransactionOutcome) -> str:
    if outcome.state == "settled":
        return f"{outcome.external_id} settled: journal entry {outcome.entry_id}"
    if outcome.state == "rejected":
        return f"{outcome.external_id} rejected: {outcome.reason}"
    return (f"{outcome.external_id} {outcome.state}: still clearing "
            f"(`walletmig terminal status {outcome.external_id}`)")


def _exit_status(outcome: TransactionOutcome) -> int:
    return 1 if outcome.state == "rejected" else 0


def _print_outcome(outcome: TransactionOutcome, as_json: bool) -> int:
    print(outcome.model_dump_json(indent=2) if as_json else outcome_line(outcome))
    return _exit_status(outcome)


async def _submit(args: argparse.Namespace) -> int:
    from walletcore.errors import InvalidInputError, WalletError

    if not 0 <= args.wait_s <= 3600:
        raise UsageError("--wait-s must be within 0..3600")
    body: dict[str, Any] = {
        "external_id": args.external_id, "kind": args.kind, "amount": args.amount,
        "currency": args.currency, "counterparty": args.counterparty,
        "reference": args.reference, "memo": args.memo,
    }
    await _audited(args, body)
    async with open_terminal(Settings.from_env()) as terminal:
        try:
            outcome = await terminal.client.submit(body, wait_s=args.wait_s)
        except InvalidInputError as err:
            raise UsageError(str(err)) from None
        except WalletError as err:
            raise CommandError(f"{type(err).__name__}: {err}") from None
    return _print_outcome(outcome, args.json)


async def _audited(args: argparse.Namespace, body: dict[str, Any]) -> None:
    """The audit record (stores/audit_chain.py, chain `cli`) before the submit runs."""
    from stores.audit_chain import terminal_record
    from walletcore.clearing import parse_external
    from walletcore.errors import InvalidInputError
    from walletmig.commands.audit import cli_actor, cli_audit

    try:
        txn = parse_external({k: v for k, v in body.items() if v is not None})
    except InvalidInputError as err:
        raise UsageError(str(err)) from None
    record = terminal_record([txn], source="cli", actor=cli_actor(args.actor),
                             operation="terminal submit", batch_id=None)  # fmt: skip
    await cli_audit(Settings.from_env(), record)


async def _status(args: argparse.Namespace) -> int:
    async with open_terminal(Settings.from_env()) as terminal:
        outcome = await terminal.client.status(args.external_id)
    if outcome is None:
        raise CommandError(f"no transaction {args.external_id!r}")
    return _print_outcome(outcome, args.json)


async def _block(args: argparse.Namespace) -> int:
    from walletcore.errors import InvalidInputError

    async with open_terminal(Settings.from_env()) as terminal:
        try:
            if args.unblock:
                changed = await terminal.blocked.unblock(args.counterparty)
            else:
                changed = await terminal.blocked.block(args.counterparty, args.reason)
        except InvalidInputError as err:
            raise UsageError(str(err)) from None
    verb = "unblocked" if args.unblock else "blocked"
    print(f"{args.counterparty} {verb}" if changed else f"{args.counterparty} was {verb} already")
    return 0


async def _resume(args: argparse.Namespace) -> int:
    if args.older_than_s < 0:
        raise UsageError("--older-than-s must not be negative")
    async with open_terminal(Settings.from_env()) as terminal:
        started = await terminal.client.resume(older_than_s=args.older_than_s)
    print(f"resumed {len(started)} batches" + (f": {', '.join(started)}" if started else ""))
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from walletmig.terminal_demo import (
        TRANSACTIONS_MAX,
        TRANSACTIONS_MIN,
        check_lines,
        render,
        run_terminal_demo,
    )

    if not TRANSACTIONS_MIN <= args.transactions <= TRANSACTIONS_MAX:
        raise UsageError(f"--transactions must be within {TRANSACTIONS_MIN}..{TRANSACTIONS_MAX}")
    # --json keeps stdout for the report; a report piped to a file keeps its full width.
    console = Console(stderr=args.json, width=None if sys.stdout.isatty() else 140)
    report = await run_terminal_demo(Settings.from_env(), args.transactions, console=console,
                                     seed=args.seed)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        console.print(render(report))
        for line in check_lines(report):
            console.print(line, highlight=False)
    return 0 if report.ok else 1


def _amount(text: str) -> str:
    try:
        Decimal(text)
    except ArithmeticError:
        raise argparse.ArgumentTypeError(f"not a decimal amount: {text!r}") from None
    return text


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "terminal", help="the credit terminal: submit, status, block, resume, demo",
        description="External transactions cleared by TigerBeetle two-phase transfers and "
        "settled into the general ledger (the migration task queue's worker runs them).")
    commands = parser.add_subparsers(dest="terminal_command", metavar="COMMAND", required=True)

    submit = commands.add_parser("submit", help="submit one transaction and wait for it")
    submit.add_argument("--kind", required=True, help="e.g. ach_credit_in, payroll_run")
    submit.add_argument("--amount", required=True, type=_amount, help="e.g. 125.50")
    submit.add_argument("--currency", required=True, help="USD or USDC")
    submit.add_argument("--counterparty", required=True)
    submit.add_argument("--external-id", required=True, help="your id: idempotent")
    submit.add_argument("--reference", default=None, help="e.g. an ACH trace number")
    submit.add_argument("--memo", default=None)
    submit.add_argument("--wait-s", type=float, default=WAIT_S_DEFAULT,
                        help=f"wait this long for the outcome ({WAIT_S_DEFAULT:.0f}; 0: don't)")
    submit.add_argument("--json", action="store_true")
    submit.add_argument("--actor", help="who submits, for the audit log (default: "
                        "$WALLETMIG_ACTOR, else the login name)")  # fmt: skip
    submit.set_defaults(handler=_submit)

    status = commands.add_parser("status", help="the outcome of an external id")
    status.add_argument("external_id")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_status)

    for name, text in (("block", "block a counterparty (case-insensitive)"),
                       ("unblock", "lift a counterparty's block")):
        p = commands.add_parser(name, help=text)
        p.add_argument("counterparty")
        if name == "block":
            p.add_argument("--reason", default=None)
        p.set_defaults(handler=_block, unblock=name == "unblock", reason=None)

    resume = commands.add_parser(
        "resume", help="start workflows of batches left received now (the catch-up sync "
                       "Schedule of `walletmig ledger sync` does it every 5 min)")
    resume.add_argument("--older-than-s", type=float, default=60.0)
    resume.set_defaults(handler=_resume)

    demo = commands.add_parser(
        "demo", help="a realistic mix end to end, then the final checks",
        description="Runs a clearing worker in this process on a database of its own and "
        "pushes three waves of batches (fraud-rule hits, blocked parties, expiries, duplicates, "
        "conflicts, a frozen account); prints per kind counts and latencies and the checks.")
    demo.add_argument("--transactions", type=int, default=DEMO_TRANSACTIONS_DEFAULT,
                      help=f"about this many ({DEMO_TRANSACTIONS_DEFAULT})")
    demo.add_argument("--seed", type=int, default=None, help="random seed")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.set_defaults(handler=_demo)

    from walletmig.commands.terminal_watch import add_watch  # `terminal watch` (live view)

    add_watch(commands)
