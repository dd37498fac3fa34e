"""kill -9 of the API process during a stream of idempotent credits that the clients retry
(connection errors, 409 while a dead process's key lease runs, 503): every operation is applied
exactly once. Checked in MongoDB (one transaction document per operation, under the id derived
from the client's Idempotency-Key) and in the balances.

On the short-transaction MongoDB (conftest.short_txn_mongodb_uri): a kill inside the API's audit
transaction leaves the `api` chain's head locked until the server reaps it, which on the
session's server (60 s) stalled every money-moving request for a minute per kill."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
import pytest_asyncio
from api_support import ALL_SCOPES, ApiProcess, bearer, make_key, running_api
from wallet_support import isolated_settings

from gateway.idempotency import derived_transaction_id
from stores.audit_chain import AUDIT_RECORDS, CHAIN_API, AuditChain
from stores.legacy_store import WALLET_TRANSACTIONS
from walletconfig.settings import Settings

OPERATIONS = 120
WALLETS = 3
CLIENTS = 6  # concurrent client tasks, each retrying its operation until it is answered
KILL_AFTER = (30, 75)  # kill -9 once this many operations were answered
OPERATION_DEADLINE_S = 120.0
RETRY_PAUSE_S = 0.2
OWNER = "crash-owner"


@pytest.fixture(scope="module")
def api_settings(short_txn_settings: Settings) -> Settings:
    return isolated_settings(short_txn_settings, "api_crash")


@pytest.fixture(scope="module")
def api(api_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    # A short lease: the dead process's in-flight keys are taken over after 10 s.
    extra = {"WALLETMIG_API_WRITE_TIMEOUT_S": "5", "WALLETMIG_API_IDEMPOTENCY_LEASE_S": "10"}
    with running_api(api_settings, tmp_path_factory.mktemp("api-crash"), extra=extra) as process:
        yield process


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def db(short_txn_mongo_client: Any, api_settings: Settings) -> Any:
    return short_txn_mongo_client[api_settings.mongodb_database]


class Stream:
    def __init__(self, api: ApiProcess, key: str, client_id: str) -> None:
        self.api = api
        self.key = key
        self.client_id = client_id
        self.answered: dict[int, dict[str, Any]] = {}
        self.transport_errors = 0
        self.in_progress_409 = 0

    def request(self, i: int) -> tuple[dict[str, str], dict[str, Any]]:
        wallet = {"client_id": f"{self.client_id}-{i % WALLETS}", "country": "USA",
                  "currency": "USD"}  # fmt: skip
        headers = {**bearer(self.key), "Idempotency-Key": f"op-{i}"}
        return headers, {"wallet": wallet, "amount": f"{i % 9 + 1}.25"}

    async def deliver(self, http: httpx.AsyncClient, i: int) -> None:
        """Send operation i until it has an answer (as a client with retries would)."""
        headers, body = self.request(i)
        deadline = time.monotonic() + OPERATION_DEADLINE_S
        while time.monotonic() < deadline:
            try:
                response = await http.post("/v1/wallets/credit", headers=headers, json=body)
            except httpx.TransportError:
                self.transport_errors += 1
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            if response.status_code == 200:
                self.answered[i] = response.json()
                return
            assert response.status_code in (409, 503), response.text
            self.in_progress_409 += response.status_code == 409
            await asyncio.sleep(RETRY_PAUSE_S)
        raise AssertionError(f"operation {i} not answered in {OPERATION_DEADLINE_S} s")

    async def run(self, queue: asyncio.Queue[int]) -> None:
        async with httpx.AsyncClient(base_url=self.api.url, timeout=30) as http:
            while not queue.empty():
                await self.deliver(http, queue.get_nowait())

    async def killer(self) -> int:
        kills = 0
        for threshold in KILL_AFTER:
            while len(self.answered) < threshold:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(self.api.kill)
            kills += 1
            await asyncio.sleep(0.3)
            await asyncio.to_thread(self.api.start)
        return kills


@pytest.mark.slow
async def test_kill_9_during_idempotent_credits_applies_each_exactly_once(
    api: ApiProcess, db: Any
) -> None:
    key = await make_key(db, "crash", ALL_SCOPES, owner=OWNER)
    stream = Stream(api, key, f"c-{uuid.uuid4().hex[:8]}")
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(OPERATIONS):
        queue.put_nowait(i)
    killer = asyncio.create_task(stream.killer())
    await asyncio.gather(*(stream.run(queue) for _ in range(CLIENTS)))
    assert await killer == len(KILL_AFTER)
    assert sorted(stream.answered) == list(range(OPERATIONS))
    assert stream.transport_errors >= 1, "no request was in flight at a kill"

    expected = {derived_transaction_id(OWNER, f"op-{i}"): i for i in range(OPERATIONS)}
    assert {a["transaction_id"] for a in stream.answered.values()} == set(expected)
    docs = [d async for d in db[WALLET_TRANSACTIONS].find(
        {"wallet": {"$regex": f"^{stream.client_id}-"}}, {"_id": 1})]  # fmt: skip
    ids = [d["_id"] for d in docs]
    assert len(ids) == len(set(ids)) == OPERATIONS, "an operation was lost or applied twice"
    assert set(ids) == set(expected)
    # Every applied operation was audited first, and the kills left the `api` chain whole.
    audited = await db[AUDIT_RECORDS].distinct("transaction_id", {"chain": CHAIN_API})
    assert set(expected) <= set(audited)
    assert (await AuditChain(db).verify()).ok
    await _balances_are_the_sums(api, key, stream.client_id)


async def _balances_are_the_sums(api: ApiProcess, key: str, client_id: str) -> None:
    sums = [Decimal(0)] * WALLETS
    for i in range(OPERATIONS):
        sums[i % WALLETS] += Decimal(f"{i % 9 + 1}.25")
    async with httpx.AsyncClient(base_url=api.url, headers=bearer(key), timeout=30) as http:
        for w in range(WALLETS):
            path = f"/v1/wallets/{client_id}-{w}/USA/USD/balance"
            balance = (await http.get(path)).json()
            assert Decimal(balance["credit"]) == sums[w], (w, balance)
            assert Decimal(balance["historical_credit"]) == sums[w]

