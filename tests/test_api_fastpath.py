"""The balance read answered as raw ASGI (gateway.fastpath) behaves exactly as FastAPI's routed
answer: two real `walletmig api` processes on one database, one with the raw path (the
default) and one with `WALLETMIG_API_RAW_READS=false` (FastAPI's routing and middleware
layers), asked the same requests; their statuses, headers, problem bodies, access-log lines
and request metrics must be the same (the date, the key ids and the clock-dependent seconds
of a 429 aside)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from api_support import ALL_SCOPES, ApiProcess, bearer, make_key, running_api, wait_log
from pymongo.asynchronous.database import AsyncDatabase
from wallet_support import isolated_settings

from walletconfig.settings import Settings

READ_LIMIT = 3  # per key and hour: the fourth read of a key is a 429 (unit by unit: < 200)
BALANCE = "/v1/wallets/{}/USA/USD/balance"
RESET_S_MAX = 3600  # the read window
ACCESS = " INFO gateway.access: "


@pytest.fixture(scope="module")
def api_settings(settings: Settings) -> Settings:
    return isolated_settings(settings, "api_fastpath")


@pytest.fixture(scope="module")
def servers(
    api_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ApiProcess]]:
    """name -> process: "raw" (with a worker for the seeding credit) and "routed"."""
    work_dir = tmp_path_factory.mktemp("api_fastpath")
    limits = {"WALLETMIG_API_RATE_LIMIT_READ": f"{READ_LIMIT}/hour"}
    routed_env = {**limits, "WALLETMIG_API_RAW_READS": "false"}
    with (
        running_api(api_settings, work_dir, name="raw", extra=limits) as raw,
        running_api(api_settings, work_dir, name="routed", with_worker=False,
                    extra=routed_env) as routed,
    ):  # fmt: skip
        yield {"raw": raw, "routed": routed}


@pytest.fixture(scope="module")
def db(mongo_client: Any, api_settings: Settings) -> AsyncDatabase[Any]:
    return mongo_client[api_settings.mongodb_database]  # type: ignore[no-any-return]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def seeded(servers: dict[str, ApiProcess], db: AsyncDatabase[Any]) -> str:
    """A wallet with a balance (credited through the raw server; both read the same store)."""
    client_id = f"fp-{uuid.uuid4().hex[:12]}"
    key = await make_key(db, "seeder", ALL_SCOPES)
    async with httpx.AsyncClient(base_url=servers["raw"].url, timeout=60) as http:
        credited = await http.post(
            "/v1/wallets/credit", headers={**bearer(key), "Idempotency-Key": str(uuid.uuid4())},
            json={"wallet": {"client_id": client_id, "country": "USA", "currency": "USD"},
                  "amount": "12.50"},
        )  # fmt: skip
    assert credited.status_code == 200, credited.text
    return client_id


async def _exchanges(
    process: ApiProcess, db: AsyncDatabase[Any], client_id: str
) -> list[tuple[str, httpx.Response]]:
    """The same requests to one server, each key fresh (its own read budget)."""
    reader, writer = (await make_key(db, "reader", ["wallets:read"]),
                      await make_key(db, "writer", ["wallets:write"]))  # fmt: skip
    limited = await make_key(db, "limited", ["wallets:read"])
    missing = f"{client_id}-none"  # never credited
    cases: list[tuple[str, str, str, dict[str, str], bytes | None]] = [
        ("200", "GET", BALANCE.format(client_id), bearer(reader), None),
        ("lower-case scheme", "GET", BALANCE.format(client_id),
         {"Authorization": f"bearer {limited}"}, None),
        ("404 issuer", "GET", BALANCE.format(client_id) + "?issuer_type=bank",
         bearer(await make_key(db, "reader", ["wallets:read"])), None),
        ("401 none", "GET", BALANCE.format(client_id), {}, None),
        ("401 unknown", "GET", BALANCE.format(client_id), bearer("wmk_nokey_nosecret"), None),
        ("403", "GET", BALANCE.format(client_id), bearer(writer), None),
        ("404", "GET", BALANCE.format(missing), bearer(reader), None),
        ("422 path", "GET", "/v1/wallets/fp-x/usa/USD/balance",
         bearer(await make_key(db, "reader", ["wallets:read"])), None),
        ("422 query", "GET", BALANCE.format(client_id) + "?issuer_type=%20x",
         bearer(await make_key(db, "reader", ["wallets:read"])), None),
        ("413", "GET", BALANCE.format(client_id), bearer(writer), b"x" * 70_000),
        ("HEAD", "HEAD", BALANCE.format(client_id), bearer(writer), None),
        ("POST", "POST", BALANCE.format(client_id), bearer(writer), b"{}"),
    ]  # fmt: skip
    cases += [(f"limited {n}", "GET", BALANCE.format(client_id), bearer(limited), None)
              for n in range(READ_LIMIT)]  # the lower-case scheme's read was the first  # fmt: skip
    answers = []
    async with httpx.AsyncClient(base_url=process.url, timeout=60) as http:
        for name, method, path, headers, content in cases:
            answers.append((name, await http.request(method, path, headers=headers,
                                                     content=content)))  # fmt: skip
    return answers


def _comparable(response: httpx.Response) -> tuple[int, list[tuple[str, str]], Any]:
    """Status, headers in order (the date aside), body; a 429's seconds checked then masked."""
    headers = [(k, v) for k, v in response.headers.multi_items() if k != "date"]
    text = response.text
    if response.status_code == 429:
        reset = dict(headers)["ratelimit-reset"]
        assert dict(headers)["retry-after"] == reset and 1 <= int(reset) <= RESET_S_MAX
        headers = [(k, "<s>" if k in ("retry-after", "ratelimit-reset") else v)
                   for k, v in headers]  # fmt: skip
        text = re.sub(r"retry in \d+ s", "retry in <s> s", text)
        headers = [(k, str(len(text.encode())) if k == "content-length" else v)
                   for k, v in headers]  # fmt: skip
    body = json.loads(text) if text else None
    return response.status_code, headers, body


def _access_lines(log_path: Path) -> list[str]:
    """The balance path's access-log lines, timestamp, duration and key ids masked, sorted."""
    lines = [line.split(ACCESS, 1)[1] for line in log_path.read_text().splitlines()
             if ACCESS in line and ("/balance " in line or " status=413 " in line)]  # fmt: skip
    lines = [re.sub(r" ms=\d+\.\d", " ms=<ms>", line) for line in lines]
    return sorted(re.sub(r"key=(\w+)\(\w+\)", r"key=\1(<id>)", line) for line in lines)


def _balance_metrics(text: str) -> dict[str, float]:
    """get_balance's request counts by status, and its latency histogram's count."""
    wanted = re.compile(
        r'^(walletmig_http_requests_total\{operation="get_balance",status="\d+"\}'
        r'|walletmig_http_request_seconds_count\{operation="get_balance"\}) (\S+)$'
    )
    return {m[1]: float(m[2]) for m in map(wanted.match, text.splitlines()) if m is not None}


async def test_raw_balance_read_answers_as_fastapi_routing_does(
    servers: dict[str, ApiProcess], db: AsyncDatabase[Any], seeded: str
) -> None:
    answers = {name: await _exchanges(process, db, seeded) for name, process in servers.items()}
    raw, routed = answers["raw"], answers["routed"]
    statuses = {name: response.status_code for name, response in raw}
    assert statuses == {
        "200": 200, "lower-case scheme": 200, "404 issuer": 404, "401 none": 401,
        "401 unknown": 401, "403": 403, "404": 404, "422 path": 422, "422 query": 422,
        "413": 413, "HEAD": 405, "POST": 405, "limited 0": 200, "limited 1": 200,
        "limited 2": 429,
    }, statuses  # fmt: skip
    assert raw[0][1].json()["credit"] == "12.50"
    for (name, mine), (_, theirs) in zip(raw, routed, strict=True):
        assert _comparable(mine) == _comparable(theirs), name
    # The access log (masked ids, key names) and the metrics, once every line is written
    # (a line follows its answer).
    count = len(raw)
    logs = {}
    for name, process in servers.items():
        path = process.log_path
        await wait_log(path, lambda text: text.count(ACCESS) > 0 and
                       len(_access_lines(path)) >= count, f"{count} balance lines")  # noqa: B023
        logs[name] = _access_lines(path)
    # One known difference, kept from the layered fast path before: a body refused (413)
    # before FastAPI's routing has no route there ("<unmatched>"), while the raw path matched
    # the route first, so its line and metrics name it. Everything else is the same.
    masked = f"/v1/wallets/fp***{seeded[-2:]}/USA/USD/balance"
    refused = f"GET {masked} op=- status=413 ms=<ms> key=-"
    assert refused in logs["raw"] and "GET <unmatched> op=- status=413 ms=<ms> key=-" in (
        logs["routed"]
    ), (logs["raw"], logs["routed"])
    assert [x for x in logs["raw"] if " status=413 " not in x] == [
        x for x in logs["routed"] if " status=413 " not in x
    ]
    assert f"GET {masked} op=get_balance status=200 ms=<ms> key=reader(<id>)" in logs["raw"]
    metrics = {}
    for name, process in servers.items():
        async with httpx.AsyncClient(base_url=process.url, timeout=60) as http:
            metrics[name] = _balance_metrics((await http.get("/metrics")).text)
    refused_count = 'walletmig_http_requests_total{operation="get_balance",status="413"}'
    assert metrics["raw"].pop(refused_count) == 1 and refused_count not in metrics["routed"]
    seconds_count = 'walletmig_http_request_seconds_count{operation="get_balance"}'
    assert metrics["raw"][seconds_count] == count
    metrics["raw"][seconds_count] -= 1
    assert metrics["raw"] == metrics["routed"]


def test_raw_path_is_on_by_default_and_off_when_asked(api_settings: Settings) -> None:
    """Which routes are answered in front of FastAPI (no server: the app is only built)."""
    from gateway.app import create_app
    from gateway.routers.wallets import BalanceRoute
    from gateway.settings import ApiSettings

    base = ApiSettings.from_env({}, platform=api_settings)
    on = create_app(base)
    assert [type(route) for _, route in on._fast or []] == [BalanceRoute]  # type: ignore[attr-defined]
    off = create_app(base.model_copy(update={"raw_reads": False}))
    assert not off._fast  # type: ignore[attr-defined]
    assert on.openapi() == off.openapi()


def test_json_headers_are_starlettes() -> None:
    from starlette.responses import Response

    from gateway.fastpath import JSON_MEDIA_TYPE, json_headers

    for body in (b"", b"{}", b'{"a":"\xc3\xa9"}' * 100):
        assert json_headers(body) == Response(body, media_type=JSON_MEDIA_TYPE).raw_headers
