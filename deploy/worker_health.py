"""Healthcheck of a walletmig worker container (docker-compose.yml `healthcheck`).

    python /app/deploy/worker_health.py

Exit 0 when the servers the worker needs accept connections, read from the worker's own
environment (walletconfig.settings): the Temporal frontend and Redis, a majority of the MongoDB
members listed in MONGODB_URI and a majority of the TigerBeetle replicas (the cluster answers
with a majority up, so one replica down keeps the worker healthy). Exit 1 and one line per
problem on stderr otherwise. All connects run concurrently, each bounded by
CONNECT_TIMEOUT_S, so a check takes about that long at worst: below compose's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from pymongo.uri_parser import parse_uri

from walletconfig.settings import SettingFileError, Settings

CONNECT_TIMEOUT_S = 2.0
ENDPOINTS_MAX = 16
REDIS_PORT_DEFAULT = 6379
LOCALHOST = "127.0.0.1"

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class Group:
    """Servers of one component and how many of them must accept a connection."""

    name: str
    endpoints: tuple[Endpoint, ...]
    needed: int


def host_port(address: str, default_port: int | None = None) -> Endpoint:
    """`host:port`, `[v6]:port` or a bare `port` (TigerBeetle's short form, on localhost)."""
    address = address.strip()
    if address.isdigit():
        return LOCALHOST, int(address)
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        if default_port is None:
            raise ValueError(f"no port in address {address!r}")
        return address.strip("[]"), default_port
    return host.strip("[]"), int(port)


def majority(count: int) -> int:
    return count // 2 + 1


def groups_of(settings: Settings) -> list[Group]:
    tb_list = settings.tb_addresses.split("://", 1)[-1]  # tbemu:// and tigerbeetle:// forms
    tb = tuple(host_port(address) for address in tb_list.split(","))
    nodes = parse_uri(settings.mongodb_uri)["nodelist"]
    mongo = tuple((str(host), int(port)) for host, port in nodes)
    redis = urlsplit(settings.redis_url)
    out = [
        Group("temporal", (host_port(settings.temporal_address),), 1),
        Group("redis", ((redis.hostname or LOCALHOST, redis.port or REDIS_PORT_DEFAULT),), 1),
        Group("mongodb", mongo, majority(len(mongo))),
        Group("tigerbeetle", tb, majority(len(tb))),
    ]
    assert sum(len(group.endpoints) for group in out) <= ENDPOINTS_MAX
    return out


async def accepts(endpoint: Endpoint) -> bool:
    host, port = endpoint
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def problems_of(groups: Sequence[Group]) -> list[str]:
    endpoints = [endpoint for group in groups for endpoint in group.endpoints]
    answers = dict(zip(endpoints, await asyncio.gather(*map(accepts, endpoints)), strict=True))
    problems = []
    for group in groups:
        up = [endpoint for endpoint in group.endpoints if answers[endpoint]]
        if len(up) < group.needed:
            down = ", ".join(f"{h}:{p}" for h, p in group.endpoints if not answers[(h, p)])
            problems.append(f"{group.name}: {len(up)} of {len(group.endpoints)} accept "
                            f"connections, {group.needed} needed (down: {down})")
    return problems


def main() -> int:
    try:
        settings = Settings.from_env()
    except SettingFileError as err:  # a missing or empty secret file: one line naming it
        print(f"worker-health: {err}", file=sys.stderr)
        return 1
    problems = asyncio.run(problems_of(groups_of(settings)))
    for problem in problems:
        print(f"worker-health: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
