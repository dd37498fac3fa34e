"""`walletmig audit verify [--json]`: walk every audit chain (stores/audit_chain.py) and name
the first broken link of each: an edited document (its hash no longer matches), a deleted one
(a gap in `chain_seq`, or a head beyond the last document), documents outside any chain.
Exit status 0 when every chain holds, 1 otherwise.

Also the CLI's own audit records: the money-moving commands (`wallet credit|debit|void`,
`terminal submit`) append one to the `cli` chain before they act (`cli_audit`), naming the
engineer (`--actor`, else the login name).
"""

from __future__ import annotations

import argparse
import getpass
import json
from typing import TYPE_CHECKING, Any

from walletconfig.settings import Settings

if TYPE_CHECKING:
    from stores.audit_chain import AuditVerification

# pymongo and the store are imported inside the handlers: `walletmig --help` and the other
# commands must not pay for them.
PAGE_DEFAULT = 1000
ACTOR_ENV = "WALLETMIG_ACTOR"


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "audit", help="verify the tamper-evident audit log",
        description="The audit log: money-moving requests (API, CLI) and migration changes, "
        "hash-chained (collections audit_records, migration_audit, audit_heads).",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    sub = commands.add_parser("verify", help="walk every chain; name the first broken link")
    sub.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.add_argument("--page", type=int, default=PAGE_DEFAULT,
                     help="documents per read (1..1000)")  # fmt: skip
    sub.set_defaults(handler=_verify)


def cli_actor(explicit: str | None = None) -> str:
    """Who runs this command: --actor, else $WALLETMIG_ACTOR, else the login name."""
    import os

    return explicit or os.environ.get(ACTOR_ENV) or getpass.getuser() or "cli"


async def cli_audit(settings: Settings, record: dict[str, Any]) -> int:
    """Append `record` to the `cli` chain (one transaction) before the command acts; returns
    its chain_seq. A MongoDB outage refuses the command (it does not run unaudited)."""
    from mongobase.mongo import database_of, make_mongo_client
    from stores.audit_chain import AUDIT_RECORDS, CHAIN_CLI, AuditChain

    client = make_mongo_client(settings.mongodb_uri)
    try:
        chain = AuditChain(database_of(client, settings.mongodb_database))
        linked = await chain.append(AUDIT_RECORDS, CHAIN_CLI, [record])
    finally:
        await client.close()
    return int(linked[0]["chain_seq"])


async def _verify(args: argparse.Namespace) -> int:
    from mongobase.mongo import database_of, make_mongo_client
    from stores.audit_chain import PAGE_MAX, AuditChain
    from walletmig.commands import UsageError

    if not 1 <= args.page <= PAGE_MAX:
        raise UsageError(f"--page must be within 1..{PAGE_MAX}")
    settings = Settings.from_env()
    client = make_mongo_client(settings.mongodb_uri)
    try:
        result = await AuditChain(database_of(client, settings.mongodb_database)).verify(
            page=args.page)
    finally:
        await client.close()
    if args.json:
        print(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        print(render(result))
    return 0 if result.ok else 1


def render(result: AuditVerification) -> str:
    lines = [f"audit log: {'OK' if result.ok else 'BROKEN'} ({len(result.chains)} chain(s))"]
    for report in result.chains:
        state = "ok" if report.ok else f"BROKEN at {report.bad_seq}: {report.reason}"
        if report.ok and report.beyond_head:  # a stopped writer's records, linked on
            more = " (and more, not checked)" if report.beyond_head_more else ""
            state += f"; beyond head: {report.beyond_head}{more}, linked"
        lines.append(f"  {report.chain} ({report.collection}): {report.checked} of "
                     f"{report.head_seq} checked, {state}")  # fmt: skip
    lines += [f"  {problem}" for problem in result.problems]
    return "\n".join(lines)
