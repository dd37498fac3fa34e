"""The HTTP API as a real `walletmig api` process (uvicorn) in front of a real worker process and
the session's servers: auth per operation, rate limits, every Idempotency-Key rule, problem
details, body limits, HTTPS, the api-key CLI and the request log."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from api_support import (
    ALL_SCOPES,
    ApiProcess,
    bearer,
    make_key,
    running_api,
    self_signed_certificate,
    wait_log,
)
from pymongo.asynchronous.database import AsyncDatabase
from temporalio.client import Client
from wallet_support import REPO_ROOT, isolated_settings

from messages.migration import MigrationConfig, MigrationInput, migration_workflow_id
from mongobase.mongo import now_ms
from stores.api_keys import API_KEYS, ApiKeyStore
from stores.legacy_store import WALLET_TRANSACTIONS
from walletconfig.settings import ENVIRONMENT, Settings
from walletmig.processes import free_port

PROBLEM = "application/problem+json"
OPERATION_IDS = {
    "add_credit", "subtract_credit", "void_transaction", "get_balance", "get_balances",
    "get_history", "get_migration", "healthz", "readyz", "submit_transaction",
    "submit_transactions", "get_transaction", "get_trial_balance", "get_statement",
    "advance_migration", "force_advance_migration", "rollback_migration",
    "set_migration_rollout", "pause_migration", "resume_migration", "approve_migration",
}  # fmt: skip


@pytest.fixture(scope="module")
def api_settings(settings: Settings) -> Settings:
    return isolated_settings(settings, "api")


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api")


@pytest.fixture(scope="module")
def api(api_settings: Settings, work_dir: Path) -> Iterator[ApiProcess]:
    with running_api(api_settings, work_dir) as process:
        yield process


@pytest.fixture(scope="module")
def db(mongo_client: Any, api_settings: Settings) -> AsyncDatabase[Any]:
    return mongo_client[api_settings.mongodb_database]  # type: ignore[no-any-return]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def keys(db: AsyncDatabase[Any]) -> dict[str, str]:
    """name -> key: every scope, read-only, write-only, migration-only, expired, revoked."""
    made = {
        "full": await make_key(db, "full", ALL_SCOPES, owner="owner-a"),
        "full_b": await make_key(db, "full_b", ALL_SCOPES, owner="owner-b"),
        "reader": await make_key(db, "reader", ["wallets:read"]),
        "writer": await make_key(db, "writer", ["wallets:write"]),
        "migration": await make_key(db, "migration", ["migration:read"]),
        "expired": await make_key(db, "expired", ALL_SCOPES),
        "revoked": await make_key(db, "revoked", ALL_SCOPES),
    }
    store = ApiKeyStore(db)
    await db[API_KEYS].update_one(
        {"_id": made["expired"].split("_")[1]},
        {"$set": {"expires_at": now_ms() - timedelta(minutes=1)}},
    )
    await store.revoke(made["revoked"].split("_")[1])
    return made


@pytest_asyncio.fixture(loop_scope="session")
async def client(api: ApiProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        yield http


def wallet(client_id: str, currency: str = "USD", country: str = "USA") -> dict[str, str]:
    return {"client_id": client_id, "country": country, "currency": currency}


def idem() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


def assert_problem(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["type"] == f"urn:walletmig:problem:{kind}", body
    assert body["title"] and body["detail"]
    assert "Traceback" not in response.text
    return body


# ----------------------------------------------------------------------------- schema, health


async def test_openapi_has_every_operation_with_a_stable_id(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert schema["openapi"].startswith("3.1")
    ids = {op["operationId"] for ops in schema["paths"].values() for op in ops.values()}
    assert ids == OPERATION_IDS
    credit = schema["paths"]["/v1/wallets/credit"]["post"]
    assert credit["x-required-scope"] == "wallets:write"
    assert PROBLEM in credit["responses"]["422"]["content"]
    assert "Problem" in schema["components"]["schemas"]


async def test_health_and_readiness_name_every_dependency(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    deps = ready.json()["dependencies"]
    assert set(deps) == {"temporal", "mongodb", "redis", "rate_limiter", "tigerbeetle"}
    assert all(d["state"] == "up" for d in deps.values()), deps


# ----------------------------------------------------------------------------- auth


def _requests() -> dict[str, tuple[str, str, dict[str, Any] | None]]:
    """operationId -> (method, path, body): a valid request of each guarded operation."""
    w = wallet("c-auth")
    return {
        "add_credit": ("POST", "/v1/wallets/credit", {"wallet": w, "amount": "1"}),
        "subtract_credit": ("POST", "/v1/wallets/debit", {"wallet": w, "amount": "1"}),
        "void_transaction": ("POST", "/v1/wallets/void",
                             {"wallet": w, "original_transaction_id": "t-1"}),
        "get_balance": ("GET", "/v1/wallets/c-auth/USA/USD/balance", None),
        "get_balances": ("GET", "/v1/clients/c-auth/balances", None),
        "get_history": ("GET", "/v1/wallets/c-auth/USA/USD/history", None),
        "get_migration": ("GET", "/v1/migrations/main", None),
    }  # fmt: skip


@pytest.mark.parametrize("operation", sorted(_requests()))
async def test_every_operation_needs_a_valid_key_and_its_scope(
    client: httpx.AsyncClient, keys: dict[str, str], operation: str
) -> None:
    method, path, body = _requests()[operation]

    async def call(headers: dict[str, str]) -> httpx.Response:
        return await client.request(method, path, json=body, headers={**headers, **idem()})

    response = await call({})
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")
    for bad in ("wmk_0123456789abcdef_nope", "not-a-key", keys["expired"], keys["revoked"]):
        assert_problem(await call(bearer(bad)), 401, "unauthorized")
    assert_problem(await call({"Authorization": f"Basic {keys['full']}"}), 401, "unauthorized")
    wrong = "reader" if method == "POST" or operation == "get_migration" else "writer"
    assert_problem(await call(bearer(keys[wrong])), 403, "forbidden")
    allowed = await call(bearer(keys["full"]))
    assert allowed.status_code not in (401, 403), allowed.text


# ----------------------------------------------------------------------------- operations


async def test_credit_debit_void_then_read_back(
    client: httpx.AsyncClient, keys: dict[str, str]
) -> None:
    auth = bearer(keys["full"])
    cid = f"c-{uuid.uuid4().hex[:8]}"
    w = wallet(cid)
    credit = await client.post("/v1/wallets/credit", headers={**auth, **idem()},
                               json={"wallet": w, "amount": "10.50", "reference_id": "r-1"})
    assert credit.status_code == 200, credit.text
    assert credit.json()["credit"] == "10.50"
    assert credit.json()["transaction_id"].startswith("idem-")
    debit = await client.post("/v1/wallets/debit", headers={**auth, **idem()},
                              json={"wallet": w, "amount": "3", "transaction_id": f"{cid}.d1"})
    assert debit.status_code == 200, debit.text
    assert debit.json()["credit"] == "7.50" and debit.json()["transaction_id"] == f"{cid}.d1"
    void = await client.post("/v1/wallets/void", headers={**auth, **idem()},
                             json={"wallet": w, "original_transaction_id": f"{cid}.d1"})
    assert void.status_code == 200 and void.json()["credit"] == "10.50", void.text
    balance = (await client.get(f"/v1/wallets/{cid}/USA/USD/balance", headers=auth)).json()
    assert (balance["credit"], balance["debit"], balance["historical_credit"]) == (
        "10.50", "0.00", "13.50")
    history = (await client.get(f"/v1/wallets/{cid}/USA/USD/history?limit=10",
                                headers=auth)).json()  # fmt: skip
    assert [e["type"] for e in history["entries"]][::-1][:2] == ["credit", "debit"]
    assert len(history["entries"]) == 3
    balances = (await client.get(f"/v1/clients/{cid}/balances", headers=auth)).json()
    assert [b["credit"] for b in balances["balances"]] == ["10.50"]
    missing = await client.get(f"/v1/wallets/{cid}/MEX/MXN/balance", headers=auth)
    assert_problem(missing, 404, "not-found")


async def test_migration_status_from_the_workflow_and_the_state_store(
    client: httpx.AsyncClient, keys: dict[str, str], temporal_client: Client, api: ApiProcess
) -> None:
    auth = bearer(keys["migration"])
    assert_problem(await client.get("/v1/migrations/nope", headers=auth), 404, "not-found")
    name = f"m-{uuid.uuid4().hex[:8]}"
    config = MigrationConfig(migration_id=name, scopes=["USD:USA"], archive_dir="/tmp")
    handle = await temporal_client.start_workflow(
        "MigrationWorkflow", MigrationInput(config=config), id=migration_workflow_id(name),
        task_queue=api.env["MIGRATION_TASK_QUEUE"],
    )  # fmt: skip
    try:
        response = await client.get(f"/v1/migrations/{name}", headers=auth)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"]["phase"] == "legacy" and body["status"]["migration_id"] == name
        assert [p["scope"] for p in body["published"]] == ["USD:USA"]
    finally:
        await handle.terminate("test over")


# ----------------------------------------------------------------------------- idempotency


async def test_same_key_same_body_replays_the_first_answer_once_applied(
    client: httpx.AsyncClient, keys: dict[str, str], db: AsyncDatabase[Any]
) -> None:
    headers = {**bearer(keys["full"]), **idem()}
    cid = f"c-{uuid.uuid4().hex[:8]}"
    body = {"wallet": wallet(cid), "amount": "5.00"}
    first = await client.post("/v1/wallets/credit", headers=headers, json=body)
    # The same request in another key order and with an explicit default is the same body.
    again = await client.post("/v1/wallets/credit",
                              headers={**headers, "Content-Type": "application/json"},
                              content=json.dumps({"allow_overdraft": False, "amount": "5.00",
                                                  "wallet": wallet(cid)}))  # fmt: skip
    assert first.status_code == again.status_code == 200
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    txn = first.json()["transaction_id"]
    assert await db[WALLET_TRANSACTIONS].count_documents({"_id": txn}) == 1
    balance = await client.get(f"/v1/wallets/{cid}/USA/USD/balance", headers=headers)
    assert balance.json()["credit"] == "5.00"


async def test_errors_are_replayed_too(client: httpx.AsyncClient, keys: dict[str, str]) -> None:
    auth = bearer(keys["full"])
    cid = f"c-{uuid.uuid4().hex[:8]}"
    debit_headers = {**auth, **idem()}
    debit = {"wallet": wallet(cid), "amount": "2"}
    refused = await client.post("/v1/wallets/debit", headers=debit_headers, json=debit)
    assert assert_problem(refused, 409, "insufficient-funds")["error_type"] == (
        "InsufficientFundsError")
    await client.post("/v1/wallets/credit", headers={**auth, **idem()},
                      json={"wallet": wallet(cid), "amount": "10"})  # fmt: skip
    # Funds arrived, but this key's answer is recorded: the retry gets the same refusal.
    replay = await client.post("/v1/wallets/debit", headers=debit_headers, json=debit)
    assert replay.status_code == 409 and replay.content == refused.content
    assert replay.headers["idempotent-replayed"] == "true"


async def test_same_key_other_body_is_refused(
    client: httpx.AsyncClient, keys: dict[str, str]
) -> None:
    headers = {**bearer(keys["full"]), **idem()}
    body = {"wallet": wallet(f"c-{uuid.uuid4().hex[:8]}"), "amount": "1"}
    assert (await client.post("/v1/wallets/credit", headers=headers, json=body)).status_code == 200
    other = await client.post("/v1/wallets/credit", headers=headers, json={**body, "amount": "2"})
    assert assert_problem(other, 422, "idempotency-key-reused")["field"] == "Idempotency-Key"
    # Another operation under the same key is another request too.
    debit = await client.post("/v1/wallets/debit", headers=headers, json=body)
    assert_problem(debit, 422, "idempotency-key-reused")


async def test_missing_or_malformed_key_is_a_bad_request(
    client: httpx.AsyncClient, keys: dict[str, str]
) -> None:
    body = {"wallet": wallet("c-nokey"), "amount": "1"}
    auth = bearer(keys["full"])
    missing = await client.post("/v1/wallets/credit", headers=auth, json=body)
    assert assert_problem(missing, 400, "missing-idempotency-key")["field"] == "Idempotency-Key"
    bad = await client.post("/v1/wallets/credit", json=body,
                            headers={**auth, "Idempotency-Key": "with space"})  # fmt: skip
    assert assert_problem(bad, 422, "validation-error")["field"] == "Idempotency-Key"
    # The draft's structured-header form names the same key as the bare form.
    key = str(uuid.uuid4())
    bare = await client.post("/v1/wallets/credit", json=body,
                             headers={**auth, "Idempotency-Key": key})  # fmt: skip
    quoted = await client.post("/v1/wallets/credit", json=body,
                               headers={**auth, "Idempotency-Key": f'"{key}"'})  # fmt: skip
    assert quoted.headers.get("idempotent-replayed") == "true" and quoted.content == bare.content


async def test_concurrent_requests_with_one_key_run_once(
    client: httpx.AsyncClient, keys: dict[str, str], db: AsyncDatabase[Any]
) -> None:
    """Two requests at once with one key: one runs; the other is told it is in progress (409,
    Retry-After), or, when it arrives after the first finished, gets the replay."""
    auth = bearer(keys["full"])
    cid = f"c-{uuid.uuid4().hex[:8]}"
    conflicts = 0
    rounds = 6
    for _ in range(rounds):
        headers = {**auth, **idem()}
        body = {"wallet": wallet(cid), "amount": "1"}
        pair = await asyncio.gather(*(client.post("/v1/wallets/credit", headers=headers, json=body)
                                      for _ in range(2)))  # fmt: skip
        fresh = [r for r in pair if r.status_code == 200 and "idempotent-replayed" not in r.headers]
        assert len(fresh) == 1, [(r.status_code, r.text) for r in pair]
        other = next(r for r in pair if r is not fresh[0])
        if other.status_code == 409:
            assert_problem(other, 409, "request-in-progress")
            assert int(other.headers["retry-after"]) >= 1
            conflicts += 1
        else:
            assert other.headers["idempotent-replayed"] == "true", other.text
    assert conflicts >= 1, "no pair ever overlapped"
    balance = await client.get(f"/v1/wallets/{cid}/USA/USD/balance", headers=auth)
    assert balance.json()["credit"] == f"{rounds}.00"
    assert await db[WALLET_TRANSACTIONS].count_documents(
        {"wallet": f"{cid}|USA|USD|"}) == rounds


async def test_transaction_ids_are_per_owner_or_the_bodys_own(
    client: httpx.AsyncClient, keys: dict[str, str]
) -> None:
    cid = f"c-{uuid.uuid4().hex[:8]}"
    shared = idem()
    body = {"wallet": wallet(cid), "amount": "1"}
    a = await client.post("/v1/wallets/credit", headers={**bearer(keys["full"]), **shared},
                          json=body)  # fmt: skip
    b = await client.post("/v1/wallets/credit", headers={**bearer(keys["full_b"]), **shared},
                          json=body)  # fmt: skip
    assert a.status_code == b.status_code == 200
    assert "idempotent-replayed" not in b.headers  # another owner: another operation
    assert a.json()["transaction_id"] != b.json()["transaction_id"]
    assert b.json()["credit"] == "2.00"
    reserved = await client.post("/v1/wallets/credit", headers={**bearer(keys["full"]), **idem()},
                                 json={**body, "transaction_id": a.json()["transaction_id"]})
    assert assert_problem(reserved, 422, "validation-error")["field"] == "transaction_id"


# ----------------------------------------------------------------------------- problems


async def test_validation_problems_name_the_field(
    client: httpx.AsyncClient, keys: dict[str, str]
) -> None:
    headers = {**bearer(keys["full"]), **idem()}
    number = await client.post("/v1/wallets/credit", headers=headers,
                               json={"wallet": wallet("c-v"), "amount": 10.5})  # fmt: skip
    problem = assert_problem(number, 422, "validation-error")
    assert problem["field"] == "amount" and problem["errors"][0]["location"] == "body"
    decimals = await client.post("/v1/wallets/credit", headers=headers,
                                 json={"wallet": wallet("c-v"), "amount": "1.234"})  # fmt: skip
    assert assert_problem(decimals, 422, "invalid-amount")["field"] == "amount"
    nested = await client.post("/v1/wallets/credit", headers=headers,
                               json={"wallet": wallet("c-v", country="usa"), "amount": "1"})
    assert assert_problem(nested, 422, "validation-error")["field"] == "wallet.country"
    ledger = await client.post("/v1/wallets/credit", headers={**headers, **idem()},
                               json={"wallet": wallet("c-v", "EUR", "USA"), "amount": "1"})
    assert assert_problem(ledger, 422, "unknown-ledger")["error_type"] == "UnknownLedgerError"
    limit = await client.get("/v1/wallets/c-v/USA/USD/history?limit=0", headers=headers)
    assert assert_problem(limit, 422, "validation-error")["field"] == "limit"


async def test_lean_balance_route_answers_as_fastapi_routes_do(
    client: httpx.AsyncClient, keys: dict[str, str], api: ApiProcess
) -> None:
    """get_balance is served without FastAPI's routing and parameter solving (gateway.fastpath,
    gateway.routers.wallets.BalanceRoute): its problems must match get_history's, which
    FastAPI validates, for the same wallet path (fields, locations, details), and auth still
    comes before validation."""
    auth = bearer(keys["full"])
    for wallet_path, query in (("c-v/usa/USD", ""), ("c%20v/USA/USD", ""),
                               ("c-v/USA/USD", "?issuer_type=%20x"),
                               ("c-v/USA/toolong", "?issuer_type=-x")):  # fmt: skip
        lean = await client.get(f"/v1/wallets/{wallet_path}/balance{query}", headers=auth)
        routed = await client.get(f"/v1/wallets/{wallet_path}/history{query}", headers=auth)
        problem = assert_problem(lean, 422, "validation-error")
        expected = assert_problem(routed, 422, "validation-error")
        assert (problem["field"], problem["errors"]) == (expected["field"], expected["errors"])
    anonymous = await client.get("/v1/wallets/c-v/usa/USD/balance")
    assert_problem(anonymous, 401, "unauthorized")
    writer_only = await client.get("/v1/wallets/c-v/usa/USD/balance",
                                     headers=bearer(keys["writer"]))  # fmt: skip
    assert_problem(writer_only, 403, "forbidden")
    cid = f"client-{uuid.uuid4().hex}"
    missing = await client.get(f"/v1/wallets/{cid}/USA/USD/balance", headers=auth)
    assert_problem(missing, 404, "not-found")
    path = f"/v1/wallets/cl***{cid[-2:]}/USA/USD/balance"
    log = await wait_log(api.log_path, lambda text: path in text, path)
    line = next(x for x in log.splitlines() if path in x)
    assert "op=get_balance status=404" in line and " key=full(" in line
    # Answered in front of FastAPI's routing (gateway.fastpath), still behind the body limit
    # and counted in the metrics by operationId.
    big = await client.request("GET", f"/v1/wallets/{cid}/USA/USD/balance", headers=auth,
                               content=b"x" * 70_000)  # fmt: skip
    assert_problem(big, 413, "payload-too-large")
    metrics = (await client.get("/metrics")).text
    assert 'operation="get_balance",status="404"' in metrics


async def test_malformed_json_and_oversized_bodies(
    client: httpx.AsyncClient, keys: dict[str, str]
) -> None:
    headers = {**bearer(keys["full"]), **idem(), "Content-Type": "application/json"}
    malformed = await client.post("/v1/wallets/credit", headers=headers, content=b'{"wallet": ')
    assert_problem(malformed, 400, "malformed-json")
    big = b'{"description": "' + b"x" * 70_000 + b'"}'
    assert_problem(await client.post("/v1/wallets/credit", headers=headers, content=big),
                   413, "payload-too-large")  # fmt: skip

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(20):
            yield b"x" * 8192

    streamed = await client.post("/v1/wallets/credit", headers=headers, content=chunks())
    assert_problem(streamed, 413, "payload-too-large")
    text = {**headers, "Content-Type": "text/plain"}
    assert_problem(await client.post("/v1/wallets/credit", headers=text, content=b"{}"),
                   415, "unsupported-media-type")  # fmt: skip


async def test_unknown_routes_and_methods_are_problems(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/nothing"), 404, "not-found")
    wrong = await client.put("/v1/wallets/credit")
    assert_problem(wrong, 405, "method-not-allowed")
    assert wrong.headers["allow"] == "POST"


# ----------------------------------------------------------------------------- CLI, log


def _cli(settings_env: dict[str, str], *args: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "walletmig", "api-key", *args, "--json"], cwd=REPO_ROOT,
        env=settings_env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


async def test_api_key_cli_create_list_revoke(
    client: httpx.AsyncClient, api: ApiProcess, api_settings: Settings
) -> None:
    env = {**api.env}
    created = _cli(env, "create", "--name", "cli-reader", "--scopes", "wallets:read",
                   "--expires-in-days", "1")  # fmt: skip
    assert created["key"].startswith("wmk_") and created["scopes"] == ["wallets:read"]
    path = "/v1/clients/c-cli/balances"
    assert (await client.get(path, headers=bearer(created["key"]))).status_code == 200
    listed = _cli(env, "list")
    assert created["key_id"] in {k["key_id"] for k in listed}
    assert created["key"] not in json.dumps(listed)
    _cli(env, "revoke", created["key_id"])
    assert_problem(await client.get(path, headers=bearer(created["key"])), 401, "unauthorized")
    bad = subprocess.run(
        [sys.executable, "-m", "walletmig", "api-key", "create", "--name", "x", "--scopes",
         "wallets:admin"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown scopes" in bad.stderr


async def test_request_log_names_the_key_and_masks_identifiers(
    client: httpx.AsyncClient, keys: dict[str, str], api: ApiProcess
) -> None:
    cid = f"client-{uuid.uuid4().hex}"
    await client.get(f"/v1/clients/{cid}/balances", headers=bearer(keys["reader"]))
    masked = f"/v1/clients/cl***{cid[-2:]}/balances"
    log = await wait_log(api.log_path, lambda text: masked in text, masked)
    line = next(x for x in log.splitlines() if masked in x)
    assert cid not in log and keys["reader"] not in log
    assert "op=get_balances status=200" in line and " key=reader(" in line


# ----------------------------------------------------------------------------- other servers


@pytest.fixture(scope="module")
def tls_api(api_settings: Settings, work_dir: Path) -> Iterator[ApiProcess]:
    """HTTPS with a certificate made here, and a tiny read limit (3 per second per key)."""
    cert, key = self_signed_certificate(work_dir)
    extra = {
        "WALLETMIG_API_TLS_CERT": str(cert), "WALLETMIG_API_TLS_KEY": str(key),
        "WALLETMIG_API_RATE_LIMIT_READ": "3/second",
    }  # fmt: skip
    with running_api(api_settings, work_dir, name="tls-api", extra=extra, ca_file=cert,
                     with_worker=False) as process:  # fmt: skip
        yield process


async def test_https_with_a_generated_certificate(tls_api: ApiProcess) -> None:
    assert tls_api.url.startswith("https://")
    async with httpx.AsyncClient(verify=tls_api.verify) as http:
        assert (await http.get(f"{tls_api.url}/healthz")).status_code == 200
    async with httpx.AsyncClient() as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get(f"http://127.0.0.1:{tls_api.port}/healthz", timeout=5)


async def test_rate_limit_then_success_after_retry_after(
    tls_api: ApiProcess, keys: dict[str, str]
) -> None:
    path = f"{tls_api.url}/v1/clients/c-rate/balances"
    async with httpx.AsyncClient(verify=tls_api.verify, headers=bearer(keys["reader"])) as http:
        statuses = []
        limited = None
        for _ in range(8):
            response = await http.get(path)
            statuses.append(response.status_code)
            if response.status_code == 429:
                limited = response
                break
        assert limited is not None, statuses
        assert_problem(limited, 429, "rate-limited")
        retry_after = int(limited.headers["retry-after"])
        assert 1 <= retry_after <= 2
        assert limited.headers["ratelimit-limit"] == "3"
        assert limited.headers["ratelimit-remaining"] == "0"
        await asyncio.sleep(retry_after)
        assert (await http.get(path)).status_code == 200
        # Another key has a budget of its own.
        other = await http.get(path, headers=bearer(keys["full"]))
        assert other.status_code == 200


@pytest.fixture(scope="module")
def limiter_down_api(api_settings: Settings, work_dir: Path) -> Iterator[ApiProcess]:
    """The rate limiter's Redis and Temporal are closed ports: money fails closed, reads fail
    open, what needs Temporal is 503 naming it."""
    extra = {
        "WALLETMIG_API_RATE_LIMIT_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
    }
    with running_api(api_settings, work_dir, name="limiter-down-api", extra=extra,
                     with_worker=False) as process:  # fmt: skip
        yield process


async def test_limiter_down_fails_closed_for_money_and_open_for_reads(
    limiter_down_api: ApiProcess, keys: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=limiter_down_api.url, timeout=30,
                                 headers=bearer(keys["full"])) as http:  # fmt: skip
        credit = await http.post("/v1/wallets/credit", headers=idem(),
                                 json={"wallet": wallet("c-down"), "amount": "1"})
        assert assert_problem(credit, 503, "dependency-unavailable")["dependency"] == "redis"
        assert (await http.get("/v1/clients/c-down/balances")).status_code == 200
        migration = await http.get("/v1/migrations/main")
        assert assert_problem(migration, 503, "dependency-unavailable")["dependency"] == "temporal"
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        states = {name: d["state"] for name, d in ready.json()["dependencies"].items()}
        assert states == {"temporal": "down", "mongodb": "up", "redis": "up",
                          "rate_limiter": "down", "tigerbeetle": "up"}  # fmt: skip


def test_client_errors_name_the_dependency_that_is_down() -> None:
    from pymongo.errors import DuplicateKeyError, ServerSelectionTimeoutError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from temporalio.service import RPCError, RPCStatusCode

    from gateway.problems import dependency_of

    assert dependency_of(ServerSelectionTimeoutError("no primary")) == "mongodb"
    assert dependency_of(DuplicateKeyError("dup")) is None  # a bug, not an outage
    assert dependency_of(RedisConnectionError("refused")) == "redis"
    assert dependency_of(RPCError("down", RPCStatusCode.UNAVAILABLE, b"")) == "temporal"
    assert dependency_of(RuntimeError("Failed client connect: refused")) == "temporal"
    assert dependency_of(RuntimeError("something else")) is None


def test_settings_env_names_are_not_the_platforms() -> None:
    """The gateway's variables never shadow walletconfig's (one home per setting)."""
    from gateway.settings import ENVIRONMENT as API_ENVIRONMENT

    assert not set(API_ENVIRONMENT) & set(ENVIRONMENT)
    assert all(name.startswith("WALLETMIG_API_") for name in API_ENVIRONMENT)


def test_amount_strings_round_trip_exactly() -> None:
    from gateway.models import BalanceOut
    from walletcore.balances import WalletBalance
    from walletcore.keys import WalletKey

    key = WalletKey(client_id="c", country="USA", currency="BTC")
    zero = Decimal(0).scaleb(-8).quantize(Decimal(1).scaleb(-8))
    balance = WalletBalance(wallet=key, credit=zero, debit=zero, historical_credit=zero,
                            source="mongodb")  # fmt: skip
    assert str(zero) == "0E-8"
    assert json.loads(BalanceOut.of(balance).model_dump_json())["credit"] == "0.00000000"
    # The read path's model-free JSON is byte for byte the validated model's.
    issued = WalletKey(client_id="c-1_x.y", country="USA", currency="BTC", issuer_type="bank")
    amounts = (zero, Decimal("-12.5"), Decimal("1E+5"), Decimal("12345678901234567890.123"))
    for wallet in (key, issued):
        for amount in amounts:
            shown = balance.model_copy(update={"wallet": wallet, "credit": amount,
                                               "historical_credit": -amount})  # fmt: skip
            assert BalanceOut.json_of(shown) == BalanceOut.of(shown).model_dump_json().encode()


async def test_idempotency_records_lease_takeover_and_expiry(
    db: AsyncDatabase[Any], api_settings: Settings
) -> None:
    """The store's rules directly: claim (a Redis lease), in progress, mismatch while running,
    a dead holder's lease ended and the key taken (its late release and answer change nothing),
    one final document written once and replayed, an expired document counts as absent."""
    import redis.asyncio as redis_asyncio

    from stores.idempotency_keys import (
        IDEMPOTENCY_KEYS,
        LEASE_PREFIX,
        IdempotencyStore,
        KeyedRequest,
        record_id,
    )
    from stores.idempotency_keys import StoredResponse as Stored

    redis = redis_asyncio.Redis.from_url(api_settings.redis_url)
    try:
        store = IdempotencyStore(db, redis, lease_s=30)
        await store.ensure_indexes()
        owner, key = "owner-x", str(uuid.uuid4())
        asked = KeyedRequest(owner=owner, key=key, operation="add_credit", fingerprint="f1",
                             transaction_id="t-1")  # fmt: skip
        other = asked.model_copy(update={"fingerprint": "f2"})
        first = await store.claim(asked)
        assert first.outcome == "acquired" and first.token
        running = await store.claim(asked)
        assert running.outcome == "in_progress" and running.locked_until is not None
        assert (await store.claim(other)).outcome == "mismatch"
        await redis.delete(LEASE_PREFIX + record_id(owner, key))  # the holder died, lease ended
        second = await store.claim(asked)
        assert second.outcome == "acquired" and second.token and second.token != first.token
        await store.release(asked, token=first.token)  # the dead holder's: changes nothing
        assert (await store.claim(asked)).outcome == "in_progress"
        answer = Stored(status=200, media_type="application/json", body="{}")
        assert await store.complete(asked, token=second.token, response=answer)
        late = Stored(status=409, media_type="application/problem+json", body="{}")
        assert not await store.complete(asked, token=first.token, response=late)
        replay = await store.claim(asked)
        assert replay.outcome == "replay" and replay.response == answer
        assert (await store.claim(other)).outcome == "mismatch"
        collection = db[IDEMPOTENCY_KEYS]
        assert await collection.count_documents({"_id": record_id(owner, key)}) == 1
        # The finished request left its lease to end: meeting it, a claim reads the answer.
        assert await redis.exists(LEASE_PREFIX + record_id(owner, key)) == 1
        await redis.delete(LEASE_PREFIX + record_id(owner, key))
        assert (await store.claim(asked)).outcome == "replay"
        assert await redis.exists(LEASE_PREFIX + record_id(owner, key)) == 0  # let go
        await collection.update_one({"_id": record_id(owner, key)},
                                    {"$set": {"expires_at": now_ms() - timedelta(seconds=1)}})
        assert (await store.claim(other)).outcome == "acquired"
        ttl = [i for i in (await collection.index_information()).values()
               if i["key"] == [("expires_at", 1)]]  # fmt: skip
        assert ttl and ttl[0]["expireAfterSeconds"] == 0
    finally:
        await redis.aclose()


async def test_rate_limiter_batches_hold_the_limit_across_processes(
    api_settings: Settings,
) -> None:
    """Two limiters (two gateway processes) on one Redis, units taken in batches (1 % of the
    limit): together they admit exactly the limit in a window, then 429 with the headers."""
    from gateway.operations import OperationClass
    from gateway.problems import ProblemError
    from gateway.ratelimit import GatewayRateLimiter

    def limiter(read: str) -> GatewayRateLimiter:
        return GatewayRateLimiter.from_limits(
            api_settings.redis_url, strategy="fixed-window", money="100/second", read=read,
            money_fail_open=False, read_fail_open=False,
        )  # fmt: skip

    processes = [limiter("400/minute"), limiter("400/minute")]
    assert processes[0].policy(OperationClass.READ).batch == 4
    assert processes[0].policy(OperationClass.MONEY).batch == 1  # < 200: unit by unit
    key_id = f"k-{uuid.uuid4().hex[:12]}"
    admitted, refused = 0, []
    try:
        for i in range(600):
            try:
                await processes[i % 2].enforce(key_id, OperationClass.READ)
                admitted += 1
            except ProblemError as over:
                refused.append(over)
    finally:
        for each in processes:
            await each.close()
    # Each process spends its batch's units before asking Redis again, so nothing is lost
    # when both keep asking; Redis never hands out more than the limit per window.
    assert admitted == 400 and len(refused) == 200
    assert refused[0].problem.status == 429
    assert refused[0].headers["RateLimit-Limit"] == "400"
    # Concurrent requests that find the batch empty share refills (not one Redis batch each).
    together, other_key = limiter("400/minute"), f"k-{uuid.uuid4().hex[:12]}"
    try:
        await asyncio.gather(*(together.enforce(other_key, OperationClass.READ)
                               for _ in range(40)))  # fmt: skip
        stats = await together._limiter.get_window_stats(
            together.policy(OperationClass.READ).item, other_key, OperationClass.READ.value)
    finally:
        await together.close()
    assert 400 - stats.remaining <= 40 + 4, "40 requests took at most one batch too many"


async def test_workers_share_the_port_and_log_every_request(
    api_settings: Settings, work_dir: Path, keys: dict[str, str]
) -> None:
    """`WALLETMIG_API_WORKERS=2` (`walletmig api --workers 2`): two uvicorn processes serve
    the port, each with the access log, and SIGTERM to the supervisor stops both."""
    extra = {"WALLETMIG_API_WORKERS": "2"}
    with running_api(api_settings, work_dir, name="workers-api", extra=extra,
                     with_worker=False) as process:  # fmt: skip
        assert process.proc is not None
        children = Path(f"/proc/{process.proc.pid}/task/{process.proc.pid}/children")
        pids = [int(pid) for pid in children.read_text().split()  # not the resource tracker
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(pids) == 2, pids
        async with httpx.AsyncClient(base_url=process.url, headers=bearer(keys["reader"])) as http:
            answers = await asyncio.gather(*(http.get("/v1/clients/c-workers/balances")
                                             for _ in range(20)))  # fmt: skip
        assert {a.status_code for a in answers} == {200}
        # The second process may still be starting when the first answers all 20.
        log = await wait_log(
            process.log_path,
            lambda text: text.count("op=get_balances status=200") >= 20
            and all(f"Started server process [{pid}]" in text for pid in pids),
            "20 answers logged and both processes started",
        )
        assert log.count("op=get_balances status=200") == 20
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
