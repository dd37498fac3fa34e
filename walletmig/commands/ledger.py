"""`walletmig ledger trial-balance|statement|verify-chain|accounts|set-status`: the terminal's
general ledger (MongoDB), read directly from the settings' database.

    trial-balance  debits and credits per currency over every account; must be zero
    statement      an account's entries in one currency, chain order, with its balance
    verify-chain   walk the hash chain from the first entry, recomputing every hash
    accounts       the chart with balances and statuses
    set-status     freeze, reopen or close an account (the account_status check reads it)

Amounts print in major units of the currency (exact: walletcore.money.from_minor). Exit status:
1 when the trial balance is not zero or the chain is broken, 2 for bad input.

The sync, terminal reconciliation and rebuild commands live in walletmig/commands/ledger_ops.py
and join this group when that module is installed (its `register_ledger(commands)`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from walletconfig.settings import Settings
from walletmig.commands import CommandError, UsageError

if TYPE_CHECKING:
    from stores.general_ledger import GeneralLedger

CHAIN_PAGE = 8189
CHAIN_PAGES_MAX = 1_000_000
STATEMENT_LIMIT_DEFAULT = 50


@contextlib.asynccontextmanager
async def open_ledger(settings: Settings) -> AsyncIterator[GeneralLedger]:
    from mongobase.mongo import database_of, make_mongo_client
    from stores.general_ledger import GeneralLedger

    mongo = make_mongo_client(settings.mongodb_uri)
    try:
        yield GeneralLedger(database_of(mongo, settings.mongodb_database))
    finally:
        await mongo.close()


def major(minor: int, currency: str) -> str:
    from walletcore.money import from_minor

    return f"{from_minor(minor, currency):,}"


async def _trial_balance(args: argparse.Namespace) -> int:
    async with open_ledger(Settings.from_env()) as ledger:
        trial = await ledger.trial_balance()
    if args.json:
        rows = [{"currency": t.currency, "debits_minor": t.debits_minor,
                 "credits_minor": t.credits_minor, "difference_minor": t.difference_minor}
                for t in trial.currencies]
        print(json.dumps({"zero": trial.zero, "accounts": trial.accounts, "currencies": rows},
                         indent=2))
    else:
        print(f"trial balance over {trial.accounts} account balances: "
              f"{'zero' if trial.zero else 'NOT ZERO'}")
        for t in trial.currencies:
            print(f"  {t.currency:5} debits {major(t.debits_minor, t.currency):>24}  "
                  f"credits {major(t.credits_minor, t.currency):>24}  "
                  f"difference {major(t.difference_minor, t.currency)}")
    return 0 if trial.zero else 1


async def _statement(args: argparse.Namespace) -> int:
    from walletcore.errors import InvalidInputError

    async with open_ledger(Settings.from_env()) as ledger:
        try:
            statement = await ledger.statement(args.account, args.currency,
                                               after_seq=args.after_seq, limit=args.limit)
        except InvalidInputError as err:
            raise UsageError(str(err)) from None
    if args.json:
        print(statement.model_dump_json(indent=2))
        return 0
    cur = args.currency
    account = ledger.chart.account(args.account)
    net = statement.balance_debits_minor - statement.balance_credits_minor
    print(f"{account.number} {account.name} ({account.type}, {account.normal_balance}-normal) "
          f"{cur}: debits {major(statement.balance_debits_minor, cur)}, credits "
          f"{major(statement.balance_credits_minor, cur)}, net debit {major(net, cur)}")
    for line in statement.lines:
        amount = (f"Dr {major(line.debit_minor, cur)}" if line.debit_minor
                  else f"Cr {major(line.credit_minor, cur)}")
        print(f"  #{line.seq:<8} {line.posted_at:%Y-%m-%d %H:%M:%S}  {amount:>22}  "
              f"{line.kind or '-':24} {line.external_id or '-'}")
    if statement.next_after_seq is not None:
        print(f"  more: --after-seq {statement.next_after_seq}")
    return 0


async def _verify_chain(args: argparse.Namespace) -> int:
    from walletcore.journal import ChainVerification

    checked = 0
    async with open_ledger(Settings.from_env()) as ledger:
        result: ChainVerification | None = None
        after = 0
        for _ in range(CHAIN_PAGES_MAX):
            result = await ledger.verify_chain(limit=CHAIN_PAGE, after_seq=after)
            checked += result.checked
            if not result.ok or result.checked < CHAIN_PAGE:
                break
            after = result.last.seq
    assert result is not None
    if args.json:
        print(json.dumps({**result.model_dump(mode="json"), "checked": checked}, indent=2))
    elif result.ok:
        print(f"chain intact: {checked} entries, head #{result.last.seq} {result.last.hash}")
    else:
        print(f"chain BROKEN at #{result.first_bad_seq}: {result.reason} "
              f"({checked} entries verified before)")
    return 0 if result.ok else 1


async def _accounts(args: argparse.Namespace) -> int:
    async with open_ledger(Settings.from_env()) as ledger:
        accounts = await ledger.accounts()
        balances = {(b.account, b.currency): b for b in await ledger.balances()}
    rows: list[dict[str, Any]] = []
    for account in accounts:
        for cur in account.currencies:
            b = balances.get((account.number, cur))
            rows.append({"account": account.number, "name": account.name,
                         "type": account.type.value, "status": account.status.value,
                         "currency": cur, "debits_minor": b.debits_minor if b else 0,
                         "credits_minor": b.credits_minor if b else 0})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['account']:>5} {r['name']:28} {r['type']:9} {r['status']:7} {r['currency']:5} "
              f"Dr {major(r['debits_minor'], r['currency']):>22}  "
              f"Cr {major(r['credits_minor'], r['currency']):>22}")
    return 0


async def _set_status(args: argparse.Namespace) -> int:
    from walletcore.errors import ConflictError, InvalidInputError
    from walletcore.gl_chart import AccountStatus

    async with open_ledger(Settings.from_env()) as ledger:
        try:
            await ledger.ensure_chart()
            await ledger.set_status(args.account, AccountStatus(args.status))
        except InvalidInputError as err:
            raise UsageError(str(err)) from None
        except ConflictError as err:
            raise CommandError(str(err)) from None
    print(f"account {args.account} is {args.status}")
    return 0


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "ledger", help="the credit terminal's general ledger",
        description="The general ledger on MongoDB: trial balance, statements, the hash chain.")
    commands = parser.add_subparsers(dest="ledger_command", metavar="COMMAND", required=True)

    trial = commands.add_parser("trial-balance", help="debits vs credits per currency")
    trial.add_argument("--json", action="store_true")
    trial.set_defaults(handler=_trial_balance)

    statement = commands.add_parser("statement", help="an account's entries in one currency")
    statement.add_argument("--account", type=int, required=True, help="GL number, e.g. 1000")
    statement.add_argument("--currency", required=True, help="e.g. USD")
    statement.add_argument("--after-seq", type=int, default=0, help="continue after this entry")
    statement.add_argument("--limit", type=int, default=STATEMENT_LIMIT_DEFAULT)
    statement.add_argument("--json", action="store_true")
    statement.set_defaults(handler=_statement)

    verify = commands.add_parser("verify-chain", help="recompute every entry's hash")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(handler=_verify_chain)

    accounts = commands.add_parser("accounts", help="the chart with balances and statuses")
    accounts.add_argument("--json", action="store_true")
    accounts.set_defaults(handler=_accounts)

    status = commands.add_parser("set-status", help="freeze, reopen or close an account")
    status.add_argument("account", type=int)
    status.add_argument("status", choices=("open", "frozen", "closed"))
    status.set_defaults(handler=_set_status)

    _plug_ledger_ops(commands)


def _plug_ledger_ops(commands: Any) -> None:
    """The sync/reconcile/rebuild commands, when walletmig/commands/ledger_ops.py exists."""
    name = "walletmig.commands.ledger_ops"
    if importlib.util.find_spec(name) is None:
        return
    plug = getattr(importlib.import_module(name), "register_ledger", None)
    if callable(plug):
        plug(commands)
