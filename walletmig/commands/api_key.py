"""`walletmig api-key create|list|revoke`: the HTTP API's keys (stores/api_keys.py).

`create` prints the key once (`key` in --json); only its hash is stored, so a lost key cannot
be shown again: revoke it and create another.
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from walletconfig.settings import Settings
from walletcore.keys import ID_PATTERN
from walletmig.commands import CommandError, UsageError

if TYPE_CHECKING:
    from stores.api_keys import ApiKeyRecord, ApiKeyStore

# pymongo and the store are imported inside the handlers: `walletmig --help` and the other
# commands must not pay for them.
EXPIRES_IN_DAYS_MAX = 3650
NAME_MAX = 128


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "api-key", help="create, list and revoke HTTP API keys",
        description="Manage the HTTP API's keys (stored hashed in MongoDB, collection api_keys).",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="api_key_command", metavar="COMMAND", required=True)

    sub = commands.add_parser("create", help="create a key (printed once)")
    sub.add_argument("--name", required=True, help="who or what uses it (shown in logs)")
    sub.add_argument("--scopes", required=True, help=f"comma-separated: {', '.join(_scopes())}")
    sub.add_argument("--owner", help="idempotency keys are scoped per owner (default: --name)")
    sub.add_argument("--expires-in-days", type=float, help="default: never expires")
    sub.add_argument("--json", action="store_true", help="print JSON (the key in field `key`)")
    sub.set_defaults(handler=_create)

    sub = commands.add_parser("list", help="every key (never the secrets)")
    sub.add_argument("--json", action="store_true")
    sub.set_defaults(handler=_list)

    sub = commands.add_parser("revoke", help="revoke a key by id (see `list`)")
    sub.add_argument("key_id")
    sub.add_argument("--json", action="store_true")
    sub.set_defaults(handler=_revoke)


def _scopes() -> list[str]:
    from gateway.operations import Scope

    return [scope.value for scope in Scope]


def _store() -> tuple[ApiKeyStore, Any]:
    from mongobase.mongo import database_of, make_mongo_client
    from stores.api_keys import ApiKeyStore

    settings = Settings.from_env()
    client = make_mongo_client(settings.mongodb_uri)
    return ApiKeyStore(database_of(client, settings.mongodb_database)), client


def _checked_create_args(args: argparse.Namespace) -> tuple[str, list[str], Any]:
    scopes = sorted({s.strip() for s in args.scopes.split(",") if s.strip()})
    unknown = sorted(set(scopes) - set(_scopes()))
    if not scopes or unknown:
        raise UsageError(f"unknown scopes {unknown or '(none given)'}; known: "
                         f"{', '.join(_scopes())}")  # fmt: skip
    owner = args.owner or args.name
    if not 0 < len(args.name) <= NAME_MAX:
        raise UsageError(f"--name must have 1..{NAME_MAX} characters")
    if re.match(ID_PATTERN, owner) is None or len(owner) > 128:
        raise UsageError(f"owner {owner!r} must match {ID_PATTERN} (set --owner)")
    expires_at = None
    if args.expires_in_days is not None:
        if not 0 < args.expires_in_days <= EXPIRES_IN_DAYS_MAX:
            raise UsageError(f"--expires-in-days must be within (0, {EXPIRES_IN_DAYS_MAX}]")
        expires_at = datetime.now(UTC) + timedelta(days=args.expires_in_days)
    return owner, scopes, expires_at


async def _create(args: argparse.Namespace) -> int:
    owner, scopes, expires_at = _checked_create_args(args)
    store, client = _store()
    try:
        await store.ensure_indexes()
        issued = await store.create(
            name=args.name, owner=owner, scopes=scopes, expires_at=expires_at
        )
    finally:
        await client.close()
    if args.json:
        print(json.dumps({"key": issued.key, **issued.record.model_dump(mode="json")}, indent=2))
    else:
        print(f"key (shown once, store it now): {issued.key}\n{_describe(issued.record)}")
    return 0


async def _list(args: argparse.Namespace) -> int:
    store, client = _store()
    try:
        records = await store.list()
    finally:
        await client.close()
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
    else:
        print("\n".join(_describe(r) for r in records) or "(no keys)")
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    store, client = _store()
    try:
        record = await store.revoke(args.key_id)
    finally:
        await client.close()
    if record is None:
        raise CommandError(f"no API key {args.key_id!r} (see `walletmig api-key list`)")
    print(record.model_dump_json(indent=2) if args.json else f"revoked {_describe(record)}")
    return 0


def _describe(r: ApiKeyRecord) -> str:
    now = datetime.now(UTC)
    status = ("revoked" if r.revoked_at is not None
              else "expired" if not r.usable(now) else "active")  # fmt: skip
    expires = "never" if r.expires_at is None else r.expires_at.isoformat(timespec="seconds")
    return (f"{r.key_id}  {r.name}  owner {r.owner}  scopes {','.join(r.scopes)}  "
            f"expires {expires}  {status}")  # fmt: skip
