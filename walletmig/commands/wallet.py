"""`walletmig wallet credit|debit|void|balance|balances|history|backlog|workflow-id`: operate one
wallet.

`workflow-id` prints a wallet's workflow id (`wallet/<keyed hash>`: Temporal never shows a client
id) for engineers looking a wallet up in the Web UI or `temporal workflow describe`; it needs the
deployment's id key (WALLETMIG_ID_HASH_KEY_FILE / WALLETMIG_ID_HASH_KEY), not Temporal.

`backlog` shows the catch-up across running wallet workflows (operations one store answered and
the other does not hold yet: size and the oldest item's age), e.g. after a TigerBeetle outage.

Writes go through Temporal (the wallet workflow); `balance --direct` and `history` read the
stores directly (walletclient.read_path.ReadRouter). `--json` prints the result as JSON.
Errors print one line: exit 1 for a refused operation or an unreachable server, 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from walletconfig.settings import IdKeyConfigError, Settings
from walletcore.balances import WalletBalance
from walletcore.errors import InvalidInputError, WalletError
from walletcore.keys import WalletKey
from walletcore.operations import (
    AddCredit,
    HistoryEntry,
    OperationResult,
    SubtractCredit,
    Void,
    parse_input,
)
from walletmig.commands import CommandError, UsageError

ACTOR_HELP = "who runs this, for the audit log (default: $WALLETMIG_ACTOR, else the login name)"

T = TypeVar("T")

HISTORY_LIMIT_DEFAULT = 20


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "wallet", help="credit, debit, void and read wallets",
        description="Operate wallets through the wallet workflow (Temporal).",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="wallet_command", metavar="COMMAND", required=True)

    for name, help_text in (("credit", "add credit"), ("debit", "subtract credit")):
        sub = commands.add_parser(name, help=help_text)
        _wallet_args(sub)
        sub.add_argument("--amount", required=True, help="decimal amount, e.g. 10.50")
        sub.add_argument("--txn", required=True, help="transaction id (idempotency key)")
        sub.add_argument("--reference", help="reference id")
        sub.add_argument("--description")
        sub.add_argument(
            "--allow-overdraft", action="store_true", help="wallet policy when this creates it"
        )
        sub.add_argument("--actor", help=ACTOR_HELP)
        sub.set_defaults(handler=_write, kind=name)

    sub = commands.add_parser("void", help="void a credit or debit")
    _wallet_args(sub)
    sub.add_argument("--txn", required=True, help="transaction id of this void")
    sub.add_argument("--original-txn", required=True, help="transaction id to void")
    sub.add_argument("--reference", help="reference id")
    sub.add_argument("--actor", help=ACTOR_HELP)
    sub.set_defaults(handler=_write, kind="void")

    sub = commands.add_parser("balance", help="one wallet's balance")
    _wallet_args(sub)
    sub.add_argument(
        "--direct", action="store_true", help="read the stores directly, not via Temporal"
    )
    sub.set_defaults(handler=_balance)

    sub = commands.add_parser("balances", help="every wallet of a client")
    sub.add_argument("--client", required=True, help="client id")
    sub.add_argument("--direct", action="store_true", help="read the stores directly")
    _common_args(sub)
    sub.set_defaults(handler=_balances)

    sub = commands.add_parser("history", help="a wallet's latest transactions")
    _wallet_args(sub)
    sub.add_argument("--limit", type=int, default=HISTORY_LIMIT_DEFAULT)
    sub.set_defaults(handler=_history)

    sub = commands.add_parser(
        "workflow-id", help="a wallet's workflow id (keyed hash) for the Web UI / temporal CLI")
    _wallet_args(sub)
    sub.set_defaults(handler=_workflow_id)

    sub = commands.add_parser(
        "backlog", help="operations waiting for the other store: size and oldest age")
    sub.add_argument("--limit", type=int,
                     help="running wallet workflows to examine at most (default 200)")
    _common_args(sub)
    sub.set_defaults(handler=_backlog)


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--task-queue", help="wallet task queue (default: WALLET_TASK_QUEUE)")


def _wallet_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--client", "--client-id", required=True, help="client id")
    parser.add_argument("--country", required=True, help="ISO 3166-1 alpha-3, e.g. USA")
    parser.add_argument("--currency", required=True, help="e.g. USD")
    parser.add_argument("--issuer", "--issuer-type", help="issuer type (optional)")
    _common_args(parser)


def _wallet(args: argparse.Namespace) -> WalletKey:
    return _checked(
        lambda: parse_input(
            WalletKey,
            {
                "client_id": args.client,
                "country": args.country,
                "currency": args.currency,
                "issuer_type": args.issuer,
            },
        )
    )


def _checked(build: Callable[[], T]) -> T:
    try:
        return build()
    except WalletError as err:
        raise _command_error(err) from None


def _command_error(err: WalletError) -> CommandError:
    text = f"{err.type_name}: {err}"
    return UsageError(text) if isinstance(err, InvalidInputError) else CommandError(text)


async def _wallet_client(args: argparse.Namespace) -> Any:
    from walletclient.wallet_client import WalletClient
    from workers.wallet_worker import connect_temporal

    settings = Settings.from_env()
    id_key = _id_key(settings)  # before connecting: a missing key is the clearer error
    temporal = await connect_temporal(settings)
    return WalletClient(temporal, args.task_queue or settings.wallet_task_queue, id_key=id_key)


def _id_key(settings: Settings) -> bytes:
    try:
        return settings.id_key()
    except IdKeyConfigError as err:
        raise CommandError(str(err)) from None


def _workflow_id(args: argparse.Namespace) -> int:
    """The wallet's workflow id, and its Web UI page when the settings point at the dev stack."""
    from walletcore.wallet_ids import wallet_workflow_id
    from walletmig.commands.migration import ui_link

    wallet = _wallet(args)
    settings = Settings.from_env()
    workflow_id = wallet_workflow_id(_id_key(settings), wallet)
    link = ui_link(settings, workflow_id)
    if args.json:
        print(json.dumps({"workflow_id": workflow_id, "web_ui": link}))
    else:
        print(workflow_id if link is None else f"{workflow_id}\nWeb UI: {link}")
    return 0


async def _write(args: argparse.Namespace) -> int:
    wallet = _wallet(args)
    op: AddCredit | SubtractCredit | Void
    if args.kind == "void":
        op = _checked(
            lambda: parse_input(
                Void,
                {
                    "wallet": wallet,
                    "transaction_id": args.txn,
                    "original_transaction_id": args.original_txn,
                    "reference_id": args.reference,
                },
            )
        )
    else:
        model = AddCredit if args.kind == "credit" else SubtractCredit
        op = _checked(
            lambda: parse_input(
                model,
                {
                    "wallet": wallet,
                    "transaction_id": args.txn,
                    "amount": args.amount,
                    "reference_id": args.reference,
                    "description": args.description,
                    "allow_overdraft": args.allow_overdraft,
                },
            )
        )
    await _audited(args, op)
    client = await _wallet_client(args)
    try:
        result: OperationResult = await client.apply(op)
    except WalletError as err:
        raise _command_error(err) from None
    _print(args, result, _describe_result(result))
    return 0


async def _audited(args: argparse.Namespace, op: AddCredit | SubtractCredit | Void) -> None:
    """The audit record (stores/audit_chain.py, chain `cli`) before the write runs (after the
    input checks: a refused input records nothing)."""
    from stores.audit_chain import wallet_operation_record
    from walletcore.operations import validate_operation
    from walletcore.wallet_ids import wallet_ref
    from walletmig.commands.audit import cli_actor, cli_audit

    _checked(lambda: validate_operation(op))
    settings = Settings.from_env()
    record = wallet_operation_record(
        op, wallet_ref=wallet_ref(_id_key(settings), op.wallet), source="cli",
        actor=cli_actor(args.actor), operation=f"wallet {args.kind}",
    )  # fmt: skip
    await cli_audit(settings, record)


async def _balance(args: argparse.Namespace) -> int:
    wallet = _wallet(args)
    try:
        if args.direct:
            balance = await _direct(lambda reader: reader.get_balance(wallet))
        else:
            balance = await (await _wallet_client(args)).get_balance(wallet)
    except WalletError as err:
        raise _command_error(err) from None
    _print(args, balance, _describe_balance(balance))
    return 0


async def _balances(args: argparse.Namespace) -> int:
    try:
        if args.direct:
            balances = await _direct(lambda reader: reader.get_multi_balance(args.client))
        else:
            balances = await (await _wallet_client(args)).get_multi_balance(args.client)
    except WalletError as err:
        raise _command_error(err) from None
    _print_many(args, balances, [_describe_balance(b) for b in balances] or ["(no wallets)"])
    return 0


async def _history(args: argparse.Namespace) -> int:
    wallet = _wallet(args)
    if not 0 < args.limit <= 1000:
        raise UsageError("--limit must be within 1..1000")
    try:
        entries = await _direct(lambda reader: reader.history(wallet, args.limit))
    except WalletError as err:
        raise _command_error(err) from None
    _print_many(args, entries, [_describe_entry(e) for e in entries] or ["(no transactions)"])
    return 0


async def _backlog(args: argparse.Namespace) -> int:
    from walletclient.wallet_client import (
        BACKLOG_REPORT_WALLETS_DEFAULT,
        BACKLOG_REPORT_WALLETS_MAX,
    )

    limit = BACKLOG_REPORT_WALLETS_DEFAULT if args.limit is None else args.limit
    if not 0 < limit <= BACKLOG_REPORT_WALLETS_MAX:
        raise UsageError(f"--limit must be within 1..{BACKLOG_REPORT_WALLETS_MAX}")
    try:
        report = await (await _wallet_client(args)).backlog_report(limit=limit)
    except WalletError as err:
        raise _command_error(err) from None
    scope = "all" if report.listed_all else f"the first {report.running}"
    lines = [
        f"wallet workflows running on {report.task_queue}: {report.running} ({scope} "
        f"examined, {report.answered} answered)",
        f"backlog: {report.backlog_total} operations in {report.wallets_with_backlog} wallets, "
        f"oldest {report.backlog_age_s:.1f} s",
    ]
    lines += [f"  {b.wallet}  {b.length} {b.direction or '-'}  oldest {b.age_s:.1f} s"
              for b in report.oldest]
    if not args.json:  # dual-write's TigerBeetle side waits in the outbox, not in workflows (H7)
        lines.append(await _outbox_line())
    _print(args, report, "\n".join(lines))
    return 0


async def _outbox_line() -> str:
    from stores.bundle import open_stores

    async with open_stores(Settings.from_env(), ensure_indexes=False) as stores:
        total, wallets, oldest = await stores.legacy.outbox.pending_summary()
    since = f", oldest written {oldest:%Y-%m-%d %H:%M:%S} UTC" if oldest else ""
    return f"outbox (dual-write, to TigerBeetle): {total} operations in {wallets} wallets{since}"


async def _direct(read: Any) -> Any:
    from stores.bundle import open_stores
    from walletclient.read_path import ReadRouter

    async with open_stores(Settings.from_env(), ensure_indexes=False) as stores:
        reader = ReadRouter(stores.legacy, stores.tigerbeetle, stores.migration)
        return await read(reader)


def _print(args: argparse.Namespace, model: BaseModel, text: str) -> None:
    print(model.model_dump_json(indent=2) if args.json else text)


def _print_many(args: argparse.Namespace, models: Sequence[BaseModel], lines: list[str]) -> None:
    if args.json:
        print(json.dumps([m.model_dump(mode="json") for m in models], indent=2))
    else:
        print("\n".join(lines))


def _describe_result(r: OperationResult) -> str:
    currency = r.wallet.currency
    replayed = "  (replayed: already applied)" if r.replayed else ""
    return (
        f"{r.type.value} {r.amount} {currency}  txn {r.transaction_id}  wallet {r.wallet}\n"
        f"balance: credit {r.credit}  debit {r.debit}  historical credit "
        f"{r.historical_credit}{replayed}"
    )


def _describe_balance(b: WalletBalance) -> str:
    return (
        f"{b.wallet}  credit {b.credit}  debit {b.debit}  "
        f"historical credit {b.historical_credit}  ({b.source})"
    )


def _describe_entry(e: HistoryEntry) -> str:
    when = e.created_at.isoformat(timespec="seconds") if e.created_at else "-"
    voided = "  VOIDED" if e.voided else ""
    reference = f"  ref {e.reference_id}" if e.reference_id else ""
    return f"{when}  {e.type:<6} {e.amount:>14}  {e.transaction_id}{reference}{voided}"
