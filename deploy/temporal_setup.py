"""One-shot Temporal setup for docker-compose.yml: register the search attributes the migration
workflow upserts, in the workers' namespace, idempotently.

    python /app/deploy/temporal_setup.py [--wait-s 300]

Runs in the walletmig image with the workers' environment (TEMPORAL_ADDRESS,
TEMPORAL_NAMESPACE). The server answering `cluster health` is not enough: auto-setup creates the
namespace after the frontend starts and the frontend serves it only once its namespace cache
has refreshed, so this waits (bounded) until `describe namespace` and the namespace's
search-attribute list both succeed. The attribute list is walletmig.devstack.SEARCH_ATTRIBUTES,
the one the embedded dev server registers: both stacks run the same workflow.

Exit 0: every attribute is registered with its type. Exit 1: not ready within --wait-s, or an
attribute exists with another type (fix by hand; a type is never changed silently).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import NoReturn

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from walletclient.temporal_connect import TemporalTls, connect_temporal, tls_from_settings
from walletconfig.settings import SettingFileError, Settings
from walletmig.devstack import SEARCH_ATTRIBUTES

WAIT_S_DEFAULT = 300.0
WAIT_S_MAX = 3600.0
POLL_INTERVAL_S = 2.0
RPC_TIMEOUT = timedelta(seconds=5)
ATTRIBUTES_MAX = 32  # far above what the workflows use: a typo'd table fails loudly


class SetupError(Exception):
    pass


def value_type_of(kind: str) -> int:
    """`Keyword` -> INDEXED_VALUE_TYPE_KEYWORD (the names the temporal CLI accepts)."""
    try:
        return int(IndexedValueType.Value(f"INDEXED_VALUE_TYPE_{kind.upper()}"))
    except ValueError:
        raise SetupError(f"unknown search attribute type {kind!r}") from None


async def custom_attributes(client: Client, namespace: str) -> dict[str, int]:
    reply = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace), timeout=RPC_TIMEOUT)
    return {name: int(kind) for name, kind in reply.custom_attributes.items()}


async def wait_for_namespace(address: str, namespace: str, wait_s: float,
                             tls: TemporalTls | bool = False) -> Client:
    """A client once the namespace is described and its search attributes listed."""
    assert 0 < wait_s <= WAIT_S_MAX, wait_s
    deadline = time.monotonic() + wait_s
    client: Client | None = None
    last_error = "no attempt"
    while True:
        try:
            if client is None:
                client = await connect_temporal(address, namespace, tls=tls)
            await client.workflow_service.describe_namespace(
                DescribeNamespaceRequest(namespace=namespace), timeout=RPC_TIMEOUT)
            await custom_attributes(client, namespace)
            return client
        except (RPCError, RuntimeError) as err:  # RuntimeError: the connect itself failed
            last_error = str(err)
        if time.monotonic() + POLL_INTERVAL_S > deadline:
            raise SetupError(f"namespace {namespace!r} on {address} not ready after "
                             f"{wait_s:.0f} s: {last_error}")
        await asyncio.sleep(POLL_INTERVAL_S)


async def ensure_search_attributes(client: Client, namespace: str,
                                   wanted: Mapping[str, str], wait_s: float) -> list[str]:
    """Register the missing attributes of `wanted` (name -> type); return the ones added."""
    assert 0 < len(wanted) <= ATTRIBUTES_MAX, len(wanted)
    types = {name: value_type_of(kind) for name, kind in wanted.items()}
    existing = await custom_attributes(client, namespace)
    for name, value_type in types.items():
        if name in existing and existing[name] != value_type:
            raise SetupError(
                f"search attribute {name!r} exists in {namespace!r} as "
                f"{IndexedValueType.Name(existing[name])}, expected "  # type: ignore[arg-type]
                f"{IndexedValueType.Name(value_type)}")  # type: ignore[arg-type]
    missing = {name: value_type for name, value_type in types.items() if name not in existing}
    if missing:
        try:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(
                    namespace=namespace,
                    search_attributes=missing,  # type: ignore[arg-type]
                ),
                timeout=RPC_TIMEOUT)
        except RPCError as err:
            if err.status != RPCStatusCode.ALREADY_EXISTS:  # a concurrent run added them
                raise
    # Added attributes show once the namespace cache refreshes: wait until all are listed.
    deadline = time.monotonic() + wait_s
    while not all(existing.get(name) == kind for name, kind in types.items()):
        if time.monotonic() + POLL_INTERVAL_S > deadline:
            raise SetupError(f"search attributes of {namespace!r} not listed after "
                             f"{wait_s:.0f} s: have {sorted(existing)}")
        await asyncio.sleep(POLL_INTERVAL_S)
        existing = await custom_attributes(client, namespace)
    return sorted(missing)


async def run(settings: Settings, wait_s: float) -> None:
    namespace = settings.temporal_namespace
    client = await wait_for_namespace(settings.temporal_address, namespace, wait_s,
                                      tls_from_settings(settings))
    added = await ensure_search_attributes(client, namespace, SEARCH_ATTRIBUTES, wait_s)
    listed = ", ".join(f"{name}={kind}" for name, kind in SEARCH_ATTRIBUTES.items())
    verb = f"added {', '.join(added)}" if added else "nothing to add"
    print(f"temporal-setup: namespace {namespace!r} ready, search attributes {listed} ({verb})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--wait-s", type=float, default=WAIT_S_DEFAULT,
                        help=f"how long to wait for the namespace (max {WAIT_S_MAX:.0f})")
    args = parser.parse_args(argv)
    if not 0 < args.wait_s <= WAIT_S_MAX:
        parser.error(f"--wait-s must be in (0, {WAIT_S_MAX:.0f}]")
    try:
        asyncio.run(run(Settings.from_env(), args.wait_s))
    except (SetupError, RPCError, SettingFileError) as err:  # SettingFileError: a secret file
        print(f"temporal-setup: {err}", file=sys.stderr)
        return 1
    return 0


def exit_now(status: int) -> NoReturn:
    """Flush, then os._exit: the Temporal SDK's native runtime can crash during interpreter
    shutdown of a short-lived process and replace the real status (as walletmig/cli.py)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_now(main())
