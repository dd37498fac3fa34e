"""The platform needs MongoDB 8.0 or later (the client-level bulkWrite command): a process
that writes checks the server's wire version at start-up and says so, instead of failing
every write later."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from api_support import ALL_SCOPES, bearer, make_key
from pymongo import AsyncMongoClient
from wallet_support import isolated_settings

from gateway.app import create_app
from gateway.settings import ApiSettings
from gateway.state import open_state
from mongobase.mongo import (
    SERVER_WIRE_VERSION_MIN,
    require_supported_server,
    require_wire_version,
    server_hello,
)
from walletconfig.settings import Settings
from walletcore.errors import ConfigurationError


@pytest.mark.parametrize("wire_version", [0, 17, 21, SERVER_WIRE_VERSION_MIN - 1])
def test_a_server_older_than_8_0_is_refused_naming_the_setting(wire_version: int) -> None:
    with pytest.raises(ConfigurationError) as refused:
        require_wire_version({"maxWireVersion": wire_version})
    assert refused.value.field == "mongodb_uri" and not refused.value.retryable
    assert "MongoDB 8.0" in refused.value.message and "\n" not in str(refused.value)


def test_8_0_and_later_pass() -> None:
    for wire_version in (SERVER_WIRE_VERSION_MIN, SERVER_WIRE_VERSION_MIN + 2):
        require_wire_version({"maxWireVersion": wire_version})


async def test_the_test_server_is_supported(mongo_client: AsyncMongoClient[Any]) -> None:
    await require_supported_server(mongo_client)  # SecantusDB answers as MongoDB 8.x


async def test_the_release_is_named_with_the_wire_version(
    mongo_client: AsyncMongoClient[Any],
) -> None:
    hello = await server_hello(mongo_client)
    assert hello["maxWireVersion"] >= SERVER_WIRE_VERSION_MIN and hello["version"].startswith("8.")
    with pytest.raises(ConfigurationError) as refused:
        require_wire_version({**hello, "maxWireVersion": 21, "version": "7.0.14"})
    assert "server 7.0.14 (wire version 21) is older than MongoDB 8.0" in refused.value.message


# ---- the API: /readyz and money-moving requests ---------------------------------------------

# What a MongoDB 7.0 server answers to `hello` (+ buildInfo's release): the test servers answer
# as 8.2, so the API's check is handed this answer through the one method its probes call.
MONGODB_7_HELLO = {"isWritablePrimary": True, "maxWireVersion": 21, "version": "7.0.14"}


@pytest_asyncio.fixture
async def api_in_process(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The API's application over the test servers, in this process (its state at hand),
    with an API key that may move money."""
    api_settings = ApiSettings.from_env({}, platform=isolated_settings(settings, "mongover"))
    app = create_app(api_settings)
    async with open_state(api_settings) as state:
        app.state.gateway = state
        key = await make_key(state.stores.db, "mongover", ALL_SCOPES)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://api", headers=bearer(key), timeout=60.0
        ) as http:
            yield http, state
        await state.stores.db.client.drop_database(api_settings.platform.mongodb_database)


async def test_the_api_reports_a_server_too_old_and_refuses_money_naming_mongodb(
    api_in_process: tuple[httpx.AsyncClient, Any],
) -> None:
    http, state = api_in_process
    ready = (await http.get("/readyz")).json()
    assert ready["dependencies"]["mongodb"]["state"] == "up", ready  # the real server: 8.2
    assert state.mongo_server.passed  # asked once, remembered

    state.mongo_server.refusal_recheck_s = 3600.0  # not asked again within this test
    state.mongo_server.judge(MONGODB_7_HELLO)  # the server answered as MongoDB 7.0
    for _ in range(2):  # remembered: not asked again per probe (the real server would pass)
        answer = await http.get("/readyz")
        mongodb = answer.json()["dependencies"]["mongodb"]
        assert answer.status_code == 503 and mongodb["state"] == "down", answer.text
        assert mongodb["detail"].startswith("MongoDB server 7.0.14 (wire version 21) is older "
                                            "than MongoDB 8.0"), mongodb  # fmt: skip
        assert "\n" not in mongodb["detail"]

    credit = await http.post(
        "/v1/wallets/credit", headers={"Idempotency-Key": "mongover-1"},
        json={"wallet": {"client_id": "c-mongover", "country": "USA", "currency": "USD"},
              "amount": "1.00"},
    )  # fmt: skip
    assert credit.status_code == 503, credit.text
    problem = credit.json()
    assert credit.headers["content-type"] == "application/problem+json"
    assert problem["dependency"] == "mongodb" and "7.0.14" in problem["detail"], problem
    assert problem["detail"].startswith("mongodb: MongoDB server 7.0.14"), problem

    state.mongo_server.forget()  # the connection dropped: the next need asks the server again
    ready = (await http.get("/readyz")).json()
    assert ready["dependencies"]["mongodb"]["state"] == "up", ready

    # A refusal is asked again after refusal_recheck_s (an upgrade in place, never seen down).
    state.mongo_server.judge(MONGODB_7_HELLO)
    state.mongo_server.refusal_recheck_s = 0.0
    ready = (await http.get("/readyz")).json()
    assert ready["dependencies"]["mongodb"]["state"] == "up", ready
    assert state.mongo_server.passed and state.mongo_server.refusal is None
