"""Migration control over HTTP (a real `walletmig api` process and worker): scopes
(`migration:operate`, `migration:approve`), the API key's name as the actor, four eyes through
the API, a refused Update as 409, Idempotency-Key replays that never move the migration twice,
injection-shaped inputs refused naming the field; and the audit chain of what it did (the
migration audit and a credit's record), verified by `walletmig audit verify`."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from api_support import ALL_SCOPES, ApiProcess, api_module_fixtures, bearer, make_key
from pymongo.asynchronous.database import AsyncDatabase
from temporalio.client import Client
from wallet_support import REPO_ROOT

from messages.migration import MigrationConfig, MigrationInput, migration_workflow_id
from stores.audit_chain import AUDIT_RECORDS, CHAIN_API, MIGRATION_AUDIT

PROBLEM = "application/problem+json"
CLI_TIMEOUT_S = 120
OPERATE = ["migration:operate", "migration:read"]


api_settings, api, db = api_module_fixtures("apimig")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def keys(db: AsyncDatabase[Any]) -> dict[str, str]:
    return {
        "ana": await make_key(db, "ana", OPERATE),
        # The same engineer's approve key: four eyes compares names, not keys.
        "ana_approver": await make_key(db, "ana", ["migration:approve"], owner="ana-2"),
        "carol": await make_key(db, "carol", ["migration:approve"]),
        "reader": await make_key(db, "reader", ["migration:read"]),
        "payments": await make_key(db, "payments", ALL_SCOPES),
    }


@pytest_asyncio.fixture(loop_scope="session")
async def client(api: ApiProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        yield http


@pytest_asyncio.fixture(loop_scope="session")
async def migration(temporal_client: Client, api: ApiProcess) -> AsyncIterator[str]:
    """A migration asking for one approval (four eyes), on the API's worker."""
    name = f"m-{uuid.uuid4().hex[:8]}"
    config = MigrationConfig(migration_id=name, scopes=["USD:USA"], archive_dir="/tmp",
                             approvals_required=1, evidence_interval_s=3600)  # fmt: skip
    handle = await temporal_client.start_workflow(
        "MigrationWorkflow", MigrationInput(config=config), id=migration_workflow_id(name),
        task_queue=api.env["MIGRATION_TASK_QUEUE"],
    )  # fmt: skip
    try:
        yield name
    finally:
        await handle.terminate("test over")


def headers(key: str, idem: str | None = None) -> dict[str, str]:
    return {**bearer(key), "Idempotency-Key": idem or str(uuid.uuid4())}


def problem(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["type"] == f"urn:walletmig:problem:{kind}", body
    return body


async def test_scopes_actor_refusals_and_four_eyes(
    client: httpx.AsyncClient, keys: dict[str, str], migration: str, db: AsyncDatabase[Any]
) -> None:
    base = f"/v1/migrations/{migration}"
    # Authentication and scopes.
    problem(await client.post(f"{base}/advance", json={}), 401, "unauthorized")
    problem(await client.post(f"{base}/advance", json={}, headers=headers(keys["reader"])),
            403, "forbidden")  # fmt: skip
    problem(await client.post(f"{base}/approve", json={}, headers=headers(keys["ana"])),
            403, "forbidden")  # fmt: skip
    problem(await client.post(f"{base}/advance", json={}, headers=headers(keys["carol"])),
            403, "forbidden")  # fmt: skip

    # advance: the actor is the key's name; a retry with the same key replays, never moves twice.
    key = str(uuid.uuid4())
    first = await client.post(f"{base}/advance", json={"reason": "gates green"},
                              headers=headers(keys["ana"], key))  # fmt: skip
    assert first.status_code == 200, first.text
    assert first.json()["phase"] == "dual_write" and first.json()["epoch"] == 1
    again = await client.post(f"{base}/advance", json={"reason": "gates green"},
                              headers=headers(keys["ana"], key))  # fmt: skip
    assert again.status_code == 200 and again.headers.get("idempotent-replayed") == "true"
    assert again.json() == first.json()
    status = (await client.get(base, headers=bearer(keys["reader"]))).json()["status"]
    assert (status["phase"], status["epoch"]) == ("dual_write", 1)
    assert status["recent_actions"][-1]["actor"] == "ana"

    # A refused Update: 409 with the workflow's reason (the gates) and nothing moved.
    refused = problem(await client.post(f"{base}/advance", json={},
                                        headers=headers(keys["ana"])), 409, "update-refused")
    assert "backfill_complete" in refused["detail"], refused

    # Four eyes: force-advance awaits approval; the same name cannot approve; another can.
    asked = await client.post(f"{base}/force-advance", headers=headers(keys["ana"]),
                              json={"reason": "backfill verified by hand"})  # fmt: skip
    assert asked.status_code == 200, asked.text
    pending = asked.json()["pending_approval"]
    assert asked.json()["phase"] == "dual_write" and pending["actor"] == "ana"
    own = problem(await client.post(f"{base}/approve", json={"reason": "me"},
                                    headers=headers(keys["ana_approver"])), 409, "update-refused")
    assert "another engineer must approve" in own["detail"]
    approved = await client.post(f"{base}/approve", json={"reason": "checked the evidence"},
                                 headers=headers(keys["carol"]))  # fmt: skip
    assert approved.status_code == 200, approved.text
    assert approved.json()["phase"] == "shadow_read"
    assert approved.json()["pending_approval"] is None

    # The migration audit names who asked and who approved, and is chained.
    entries = await db[MIGRATION_AUDIT].find({"migration_id": migration}).sort("seq").to_list(20)
    assert [e["actor"] for e in entries] == ["ana", "ana", "ana"]
    assert entries[-1]["request"]["approved_by"] == "carol"
    assert all(e["chain"] == f"migration:{migration}" and e["hash"] for e in entries)


@pytest.mark.parametrize(("path", "body", "field"), [
    ("rollback", {"to": "$where"}, "to"),
    ("rollback", {"to": {"$gt": ""}}, "to"),
    ("pause", {"reason": "incident\n123"}, "reason"),
    ("pause", {"reason": "x" * 100_000}, None),  # over the body limit or the field's
    ("rollout", {"percent": "50"}, "percent"),
    ("advance", {"actor": "someone-else"}, "actor"),
])  # fmt: skip
async def test_control_inputs_are_refused_naming_the_field(
    client: httpx.AsyncClient, keys: dict[str, str], migration: str, path: str,
    body: dict[str, Any], field: str | None,
) -> None:  # fmt: skip
    response = await client.post(f"/v1/migrations/{migration}/{path}", json=body,
                                 headers=headers(keys["ana"]))  # fmt: skip
    assert response.status_code in (413, 422), response.text
    assert response.headers["content-type"] == PROBLEM
    if field is not None:
        found = json.dumps(response.json())
        assert field in found, found


async def test_unknown_migration_is_404(client: httpx.AsyncClient, keys: dict[str, str]) -> None:
    problem(await client.post("/v1/migrations/nope/pause", json={}, headers=headers(keys["ana"])),
            404, "not-found")  # fmt: skip


async def test_credit_is_audited_with_the_key_name_and_verified(
    client: httpx.AsyncClient, keys: dict[str, str], db: AsyncDatabase[Any], api: ApiProcess,
) -> None:  # fmt: skip
    cid = f"c-{uuid.uuid4().hex[:8]}"
    credit = await client.post(
        "/v1/wallets/credit", headers=headers(keys["payments"]),
        json={"wallet": {"client_id": cid, "country": "USA", "currency": "USD"},
              "amount": "10.50", "reference_id": "order-1"},
    )  # fmt: skip
    assert credit.status_code == 200, credit.text
    txn = credit.json()["transaction_id"]
    record = await db[AUDIT_RECORDS].find_one({"transaction_id": txn})
    assert record is not None and record["chain"] == CHAIN_API
    assert (record["actor"], record["operation"], record["amount"]) == (
        "payments", "add_credit", "10.50")
    assert cid not in json.dumps(record, default=str)  # the account id, not the client id
    assert keys["payments"] not in json.dumps(record, default=str)  # never the secret
    # A reference id shaped like a MongoDB operator is refused naming the field.
    bad = await client.post(
        "/v1/wallets/credit", headers=headers(keys["payments"]),
        json={"wallet": {"client_id": cid, "country": "USA", "currency": "USD"},
              "amount": "1", "reference_id": "$where"},
    )  # fmt: skip
    assert problem(bad, 422, "validation-error")["field"] == "reference_id"

    assert verify(api)[0] == 0
    await db[AUDIT_RECORDS].update_one({"_id": record["_id"]}, {"$set": {"amount": "99.00"}})
    code, report = verify(api)
    assert code == 1
    broken = next(c for c in report["chains"] if c["chain"] == CHAIN_API)
    assert broken["bad_id"] == record["_id"], report


def verify(api: ApiProcess) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "walletmig", "audit", "verify", "--json"], cwd=REPO_ROOT,
        env=api.env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)




async def test_terminal_batch_is_audited_without_counterparties(
    client: httpx.AsyncClient, keys: dict[str, str], db: AsyncDatabase[Any]
) -> None:
    items = [{"kind": "ach_credit_in", "amount": f"{n}.25", "currency": "USD",
              "counterparty": f"acme-{n}", "external_id": f"x-{uuid.uuid4().hex[:10]}",
              "memo": "rent"} for n in (1, 2)]  # fmt: skip
    answer = await client.post("/v1/terminal/batches", json={"transactions": items},
                               headers=headers(keys["payments"]))  # fmt: skip
    assert answer.status_code == 200, answer.text
    record = await db[AUDIT_RECORDS].find_one({"batch_id": answer.json()["batch_id"]})
    assert record is not None and record["operation"] == "submit_transactions"
    assert record["actor"] == "payments"
    assert [(t["external_id"], t["amount"]) for t in record["transactions"]] == [
        (i["external_id"], i["amount"]) for i in items]
    text = json.dumps(record, default=str)
    assert "acme-" not in text and "rent" not in text
    # A memo with a control character is refused naming the field (nothing recorded).
    bad = await client.post("/v1/terminal/transactions", headers=headers(keys["payments"]),
                            json={**items[0], "external_id": "x-bad-memo", "memo": "a\u001bb"})
    assert problem(bad, 422, "validation-error")["field"] == "memo"
