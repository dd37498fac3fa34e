"""The platform needs MongoDB 8.0 or later (the client-level bulkWrite command): a process
that writes checks the server's wire version at start-up and says so, instead of failing
every write later."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo import AsyncMongoClient

from mongobase.mongo import (
    SERVER_WIRE_VERSION_MIN,
    require_supported_server,
    require_wire_version,
)
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
