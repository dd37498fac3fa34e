"""The credit terminal and the general ledger through the HTTP API: a real `walletmig api`
process in front of a real worker process (it serves the ClearingBatchWorkflow on the migration
task queue) and the session's servers. Auth per operation, submit -> settled with its journal
entry, a batch, the Idempotency-Key rules (replay, reuse, conflict), field-naming 422s, the
trial balance and a statement page."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from api_support import ALL_SCOPES, ApiProcess, api_module_fixtures, bearer, make_key, running_api
from pymongo.asynchronous.database import AsyncDatabase

from walletconfig.settings import Settings
from walletmig.processes import free_port

PROBLEM = "application/problem+json"
WAIT_S = 15  # below the test server's write timeout (20 s): the wait is not clipped
KIND = "ach_credit_in"  # debits 1050 ACH-Settlement-Account, credits 2180 Direct-Deposit
DEBIT_ACCOUNT = 1050


api_settings, api, db = api_module_fixtures("api_term")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def keys(db: AsyncDatabase[Any]) -> dict[str, str]:
    return {
        "full": await make_key(db, "t-full", ALL_SCOPES, owner="t-owner-a"),
        "full_b": await make_key(db, "t-full-b", ALL_SCOPES, owner="t-owner-b"),
        "wallets": await make_key(db, "t-wallets", ["wallets:read", "wallets:write"]),
    }


@pytest_asyncio.fixture(loop_scope="session")
async def client(api: ApiProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        yield http


def txn(external_id: str | None = None, amount: str = "12.34", **extra: str) -> dict[str, str]:
    body = {"kind": KIND, "amount": amount, "currency": "USD",
            "counterparty": f"cp-{uuid.uuid4().hex[:8]}", **extra}  # fmt: skip
    if external_id is not None:
        body["external_id"] = external_id
    return body


def xid() -> str:
    return f"x-{uuid.uuid4().hex[:12]}"


def headers(key: str, idem: str | None = None) -> dict[str, str]:
    return {**bearer(key), "Idempotency-Key": idem or str(uuid.uuid4())}


def assert_problem(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["type"] == f"urn:walletmig:problem:{kind}", body
    assert "Traceback" not in response.text
    return body


# (operationId, method, path, body, scope): one request per new operation.
OPERATIONS: list[tuple[str, str, str, Any, str]] = [
    ("submit_transaction", "POST", "/v1/terminal/transactions", txn(), "terminal:submit"),
    ("submit_transactions", "POST", "/v1/terminal/batches",
     {"transactions": [txn("x-auth-1")]}, "terminal:submit"),
    ("get_transaction", "GET", "/v1/terminal/transactions/x-none", None, "terminal:read"),
    ("get_trial_balance", "GET", "/v1/ledger/trial-balance", None, "ledger:read"),
    ("get_statement", "GET", f"/v1/ledger/accounts/{DEBIT_ACCOUNT}/USD/statement", None,
     "ledger:read"),
]  # fmt: skip


async def test_the_schema_names_every_new_operation(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    by_id = {op["operationId"]: op for ops in schema["paths"].values() for op in ops.values()}
    for operation_id, _, _, _, scope in OPERATIONS:
        assert by_id[operation_id]["x-required-scope"] == scope


@pytest.mark.parametrize("operation", OPERATIONS, ids=[op[0] for op in OPERATIONS])
async def test_auth_401_and_403_per_operation(
    client: httpx.AsyncClient, keys: dict[str, str], operation: tuple[str, str, str, Any, str]
) -> None:
    _, method, path, body, scope = operation
    idem = {"Idempotency-Key": str(uuid.uuid4())}
    anonymous = await client.request(method, path, json=body, headers=idem)
    assert_problem(anonymous, 401, "unauthorized")
    unknown = await client.request(method, path, json=body,
                                   headers={**idem, **bearer("wm_nope_nope")})  # fmt: skip
    assert_problem(unknown, 401, "unauthorized")
    forbidden = await client.request(method, path, json=body,
                                     headers={**idem, **bearer(keys["wallets"])})  # fmt: skip
    assert scope in assert_problem(forbidden, 403, "forbidden")["detail"]


async def test_submit_settles_with_its_entry(
    client: httpx.AsyncClient, keys: dict[str, str]
) -> None:
    external_id = xid()
    answer = await client.post(
        "/v1/terminal/transactions", json=txn(external_id), params={"wait_s": WAIT_S},
        headers=headers(keys["full"]),
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["external_id"] == external_id and body["state"] == "settled", body
    assert body["entry_id"]
    read = await client.get(f"/v1/terminal/transactions/{external_id}",
                            headers=bearer(keys["full"]))  # fmt: skip
    assert read.status_code == 200, read.text
    assert read.json()["state"] == "settled" and read.json()["entry_id"] == body["entry_id"]


async def test_batch_submit(client: httpx.AsyncClient, keys: dict[str, str]) -> None:
    ids = [xid() for _ in range(3)]
    batch = {"transactions": [txn(x, amount=f"{i + 1}.00") for i, x in enumerate(ids)]}
    answer = await client.post("/v1/terminal/batches", json=batch, params={"wait_s": WAIT_S},
                               headers=headers(keys["full"]))  # fmt: skip
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["accepted"] == ids and body["replayed"] == [] and body["refused"] == []
    assert body["batch_id"].startswith("idem-")
    states = {t["external_id"]: t for t in body["transactions"]}
    assert set(states) == set(ids)
    assert all(t["state"] == "settled" and t["entry_id"] for t in states.values()), states


async def test_idempotent_replay_and_reuse(
    client: httpx.AsyncClient, keys: dict[str, str]
) -> None:
    """No external id: it is derived from (owner, key). The same key and body replays the first
    answer; another body with the key is 422; another owner's same key is its own."""
    idem = str(uuid.uuid4())
    body = txn()
    first = await client.post("/v1/terminal/transactions", json=body,
                              headers=headers(keys["full"], idem))  # fmt: skip
    assert first.status_code == 200, first.text
    assert first.json()["external_id"].startswith("idem-")
    again = await client.post("/v1/terminal/transactions", json=body,
                              headers=headers(keys["full"], idem))  # fmt: skip
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    other = await client.post("/v1/terminal/transactions", json={**body, "amount": "99.00"},
                              headers=headers(keys["full"], idem))  # fmt: skip
    assert assert_problem(other, 422, "idempotency-key-reused")["field"] == "Idempotency-Key"
    owner_b = await client.post("/v1/terminal/transactions", json=body,
                                headers=headers(keys["full_b"], idem))  # fmt: skip
    assert owner_b.status_code == 200, owner_b.text
    assert owner_b.json()["external_id"] != first.json()["external_id"]
    missing = await client.post("/v1/terminal/transactions", json=body,
                                headers=bearer(keys["full"]))  # fmt: skip
    assert_problem(missing, 400, "missing-idempotency-key")


async def test_same_external_id_other_content_is_a_conflict(
    client: httpx.AsyncClient, keys: dict[str, str]
) -> None:
    external_id = xid()
    body = txn(external_id)
    first = await client.post("/v1/terminal/transactions", json=body,
                              headers=headers(keys["full"]))  # fmt: skip
    assert first.status_code == 200, first.text
    same = await client.post("/v1/terminal/transactions", json=body,
                             headers=headers(keys["full"]))  # another key, same content
    assert same.status_code == 200 and same.json()["external_id"] == external_id, same.text
    conflict = await client.post("/v1/terminal/transactions", json={**body, "amount": "1.00"},
                                 headers=headers(keys["full"]))  # fmt: skip
    assert assert_problem(conflict, 409, "conflict")["field"] == "external_id"
    batch = {"transactions": [{**body, "amount": "1.00"}, txn(xid())]}
    partial = await client.post("/v1/terminal/batches", json=batch,
                                headers=headers(keys["full"]))  # fmt: skip
    assert partial.status_code == 200, partial.text
    assert [r["external_id"] for r in partial.json()["refused"]] == [external_id]
    assert partial.json()["accepted"] == [batch["transactions"][1]["external_id"]]


@pytest.mark.parametrize(
    ("change", "field"),
    [({"kind": "no_such_kind"}, "kind"), ({"currency": "EUR"}, "currency"),
     ({"amount": "1.001"}, "amount"), ({"external_id": "idem-mine"}, "external_id")],
)  # fmt: skip
async def test_refusals_name_the_field(
    client: httpx.AsyncClient, keys: dict[str, str], change: dict[str, str], field: str
) -> None:
    single = await client.post("/v1/terminal/transactions", json={**txn(xid()), **change},
                               headers=headers(keys["full"]))  # fmt: skip
    assert single.status_code == 422 and single.json()["field"] == field, single.text
    batch = {"transactions": [txn(xid()), {**txn(xid()), **change}]}
    refused = await client.post("/v1/terminal/batches", json=batch,
                                headers=headers(keys["full"]))  # fmt: skip
    assert refused.status_code == 422, refused.text
    assert refused.json()["field"] == f"transactions.1.{field}"


async def test_unknown_transaction_is_404(client: httpx.AsyncClient, keys: dict[str, str]) -> None:
    answer = await client.get("/v1/terminal/transactions/x-never", headers=bearer(keys["full"]))
    assert assert_problem(answer, 404, "not-found")["field"] == "external_id"


async def test_trial_balance_is_zero_and_a_statement_pages(
    client: httpx.AsyncClient, keys: dict[str, str]
) -> None:
    ids = [xid() for _ in range(2)]
    batch = {"transactions": [txn(x, amount="5.00") for x in ids]}
    submitted = await client.post("/v1/terminal/batches", json=batch, params={"wait_s": WAIT_S},
                                  headers=headers(keys["full"]))  # fmt: skip
    assert all(t["state"] == "settled" for t in submitted.json()["transactions"]), submitted.text
    auth = bearer(keys["full"])
    trial = (await client.get("/v1/ledger/trial-balance", headers=auth)).json()
    assert trial["zero"] is True and trial["accounts"] >= 2, trial
    usd = {c["currency"]: c for c in trial["currencies"]}["USD"]
    assert usd["debits"] == usd["credits"] and usd["difference"] == "0.00", usd
    path = f"/v1/ledger/accounts/{DEBIT_ACCOUNT}/USD/statement"
    first = await client.get(path, params={"limit": 1}, headers=auth)
    assert first.status_code == 200, first.text
    page = first.json()
    assert len(page["lines"]) == 1 and page["next_after_seq"] == page["lines"][0]["seq"]
    assert page["lines"][0]["debit"] != "0.00" and page["balance_debits"] == usd["debits"]
    rest = (await client.get(path, params={"after_seq": page["next_after_seq"], "limit": 1000},
                             headers=auth)).json()  # fmt: skip
    seen = [ln["external_id"] for ln in [*page["lines"], *rest["lines"]]]
    assert set(ids) <= set(seen) and len(seen) == len(set(seen)) and rest["next_after_seq"] is None
    unknown = await client.get("/v1/ledger/accounts/9999/USD/statement", headers=auth)
    assert assert_problem(unknown, 422, "validation-error")["field"] == "account"
    not_carried = await client.get(f"/v1/ledger/accounts/{DEBIT_ACCOUNT}/USDC/statement",
                                   headers=auth)  # fmt: skip
    assert not_carried.status_code == 422 and not_carried.json()["field"] == "currency"
    too_many = await client.get(path, params={"limit": 1001}, headers=auth)
    assert assert_problem(too_many, 422, "validation-error")["field"] == "limit"



@pytest.fixture(scope="module")
def temporal_down_api(
    api_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiProcess]:
    """Temporal on a closed port (no worker): the intake records, then cannot start the batch."""
    extra = {"TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"}
    work_dir = tmp_path_factory.mktemp("api-terminal-down")
    with running_api(api_settings, work_dir, name="temporal-down-api", extra=extra,
                     with_worker=False) as process:  # fmt: skip
        yield process


async def test_temporal_down_is_503_naming_it_and_the_key_is_released(
    temporal_down_api: ApiProcess, keys: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=temporal_down_api.url, timeout=60) as http:
        external_id, idem = xid(), str(uuid.uuid4())
        body = txn(external_id)
        for _ in range(2):  # the retry runs again (not 409, not a replay of the 503)
            down = await http.post("/v1/terminal/transactions", json=body,
                                   headers=headers(keys["full"], idem))  # fmt: skip
            problem = assert_problem(down, 503, "dependency-unavailable")
            assert problem["dependency"] == "temporal" and "Retry-After" in down.headers
        recorded = await http.get(f"/v1/terminal/transactions/{external_id}",
                                  headers=bearer(keys["full"]))  # fmt: skip
        assert recorded.status_code == 200 and recorded.json()["state"] == "received"
        trial = await http.get("/v1/ledger/trial-balance", headers=bearer(keys["full"]))
        assert trial.status_code == 200, trial.text
