"""Injection and abuse at the entry points: every text field of the wallet operations refuses
MongoDB-operator shapes, huge strings, control characters and non-UTF-8 with a field-named error.

The models (walletcore) are the one gate the client library, the CLI and the API share; the CLI is
also checked end to end (a subprocess, exit 2 and one line, before any connection is opened).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from api_support import make_key, running_api
from wallet_support import isolated_settings

from walletcore.errors import InvalidInputError
from walletcore.keys import ID_MAX, WalletKey
from walletcore.operations import (
    AddCredit,
    GetMultiBalance,
    SubtractCredit,
    Void,
    parse_input,
)

REPO = Path(__file__).resolve().parent.parent
CLI_TIMEOUT_S = 60

# Each value must be refused in every identifier field (a dict is what a JSON body can carry).
ABUSIVE: list[Any] = [
    {"$gt": ""},
    {"$where": "sleep(1000)"},
    ["$in"],
    "$gt",
    "$where",
    "a$where",
    "c1'; db.dropDatabase(); '",
    "x" * (ID_MAX + 1),
    "x" * 1_000_000,
    "a\x00b",
    "a\nb",
    "a\rb",
    "a\x1bb",
    "\ud800",
    "a\udcffb",  # what a non-UTF-8 argv byte becomes (surrogateescape)
    "ümlaut",
    "a b",
    "",
    17,
]

WALLET: dict[str, Any] = {"client_id": "c-1", "country": "MEX", "currency": "MXN"}


def _credit(**fields: Any) -> dict[str, Any]:
    return {"wallet": WALLET, "transaction_id": "t-1", "amount": "1.00", **fields}


def _void(**fields: Any) -> dict[str, Any]:
    return {"wallet": WALLET, "transaction_id": "t-2", "original_transaction_id": "t-1", **fields}


def _refused(model: type[Any], data: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_input(model, data)
    assert caught.value.field == field, (caught.value.field, field)


@pytest.mark.parametrize("value", ABUSIVE, ids=lambda v: repr(v)[:24])
@pytest.mark.parametrize("field", ["client_id", "country", "currency", "issuer_type"])
def test_wallet_key_fields_refuse_abuse(field: str, value: Any) -> None:
    _refused(WalletKey, {**WALLET, field: value}, field)
    _refused(AddCredit, _credit(wallet={**WALLET, field: value}), f"wallet.{field}")
    _refused(Void, _void(wallet={**WALLET, field: value}), f"wallet.{field}")


@pytest.mark.parametrize("value", ABUSIVE, ids=lambda v: repr(v)[:24])
@pytest.mark.parametrize("model", [AddCredit, SubtractCredit])
@pytest.mark.parametrize("field", ["transaction_id", "reference_id"])
def test_credit_and_debit_ids_refuse_abuse(model: type[Any], field: str, value: Any) -> None:
    _refused(model, _credit(**{field: value}), field)


@pytest.mark.parametrize("value", ABUSIVE, ids=lambda v: repr(v)[:24])
@pytest.mark.parametrize("field", ["transaction_id", "original_transaction_id", "reference_id"])
def test_void_ids_refuse_abuse(field: str, value: Any) -> None:
    _refused(Void, _void(**{field: value}), field)


@pytest.mark.parametrize("value", ABUSIVE, ids=lambda v: repr(v)[:24])
def test_multi_balance_client_refuses_abuse(value: Any) -> None:
    _refused(GetMultiBalance, {"client_id": value}, "client_id")


@pytest.mark.parametrize(
    "value", ["a\x00b", "line\nbreak", "\x1b[31m", "\ud800", "x" * 513, {"$gt": ""}]
)
def test_description_refuses_control_characters_and_huge_text(value: Any) -> None:
    _refused(AddCredit, _credit(description=value), "description")


def test_ordinary_ids_still_validate() -> None:
    """The shapes tests, histories and the demo use: letters, digits and `_ . : @ -`."""
    for client_id in ("c-1", "client_42", "acme.llc", "user@example.com", "a:b:c", "x" * ID_MAX):
        key = parse_input(WalletKey, {**WALLET, "client_id": client_id, "issuer_type": "bank-1"})
        assert key.client_id == client_id
    op = parse_input(
        AddCredit, _credit(reference_id="order-1", description="Café refund, ticket #12 (ok)")
    )
    assert op.reference_id == "order-1"
    assert parse_input(Void, _void(reference_id="void-1")).original_transaction_id == "t-1"


def _cli(*args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL", "MONGO"))}
    # An unreachable Temporal: a refused input must fail before any connection is tried.
    env["TEMPORAL_ADDRESS"] = "127.0.0.1:9"
    return subprocess.run(
        [sys.executable, "-m", "walletmig", *args],
        cwd=REPO, env=env, capture_output=True, timeout=CLI_TIMEOUT_S, check=False,
    )  # fmt: skip


CLI_CASES: list[tuple[str, list[str | bytes]]] = [
    ("client_id", ["--client", "$where"]),
    ("client_id", ["--client", "a\nb"]),
    ("client_id", ["--client", "x" * 5000]),
    ("client_id", ["--client", b"c\xff1"]),  # non-UTF-8 bytes in argv
    ("country", ["--country", '{"$gt": ""}']),
    ("currency", ["--currency", "MX\x01N"]),
    ("issuer_type", ["--issuer", "$ne"]),
    ("transaction_id", ["--txn", "t$where"]),
    ("transaction_id", ["--txn", b"t-\xc3\x28"]),
    ("reference_id", ["--reference", '{"$gt": ""}']),
    ("reference_id", ["--reference", "r\n1"]),
    ("description", ["--description", "evil\x1b[2J"]),
]


@pytest.mark.parametrize(("field", "override"), CLI_CASES, ids=lambda v: repr(v)[:30])
def test_cli_credit_refuses_with_exit_2_and_one_line(
    field: str, override: list[str | bytes]
) -> None:
    base = {
        "--client": "c-1", "--country": "MEX", "--currency": "MXN", "--amount": "1.00",
        "--txn": "t-1",
    }  # fmt: skip
    options: dict[str | bytes, str | bytes] = dict(base)
    options[override[0]] = override[1]
    argv: list[str | bytes] = ["wallet", "credit"]
    for name, value in options.items():
        argv += [name, value]
    done = _cli(*argv)
    assert done.returncode == 2, done
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    assert len(lines) == 1, lines
    assert f"{field}:" in lines[0], lines[0]
    assert "Traceback" not in lines[0]


def test_cli_void_refuses_an_operator_shaped_original() -> None:
    done = _cli(
        "wallet", "void", "--client", "c-1", "--country", "MEX", "--currency", "MXN",
        "--txn", "v-1", "--original-txn", "$where",
    )  # fmt: skip
    assert done.returncode == 2, done
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "original_transaction_id:" in lines[0], lines


# ----------------------------------------------------------------------------- the HTTP API

API_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("wallet.client_id", "credit", {"wallet": {**WALLET, "client_id": {"$gt": ""}}}),
    ("wallet.client_id", "credit", {"wallet": {**WALLET, "client_id": "$where"}}),
    ("wallet.client_id", "credit", {"wallet": {**WALLET, "client_id": "a\u0000b"}}),
    ("wallet.country", "credit", {"wallet": {**WALLET, "country": {"$ne": None}}}),
    ("wallet.currency", "credit", {"wallet": {**WALLET, "currency": "MX\nN"}}),
    ("wallet.issuer_type", "credit", {"wallet": {**WALLET, "issuer_type": "$where"}}),
    ("transaction_id", "credit", {"transaction_id": "x" * 5_000}),
    ("transaction_id", "credit", {"transaction_id": {"$gt": ""}}),
    ("reference_id", "credit", {"reference_id": "$where"}),
    ("reference_id", "credit", {"reference_id": "r\n1"}),
    ("description", "credit", {"description": "evil\u001b[2J"}),
    ("original_transaction_id", "void", {"original_transaction_id": {"$gt": ""}}),
    ("original_transaction_id", "void", {"original_transaction_id": "a$where"}),
]
# Lone surrogates cannot be encoded by a JSON library that writes UTF-8; send them as the JSON
# escape `\ud800`, which is what a hostile client would do.
SURROGATE_BODY = (
    b'{"wallet": {"client_id": "\\ud800", "country": "MEX", "currency": "MXN"}, "amount": "1"}'
)


@pytest.fixture(scope="module")
def abuse_settings(settings: Any) -> Any:
    return isolated_settings(settings, "abuse")


@pytest.fixture(scope="module")
def abuse_api(abuse_settings: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # No worker: a refused input must never reach one.
    work_dir = tmp_path_factory.mktemp("abuse")
    with running_api(abuse_settings, work_dir, with_worker=False) as process:
        yield process


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def abuse_key(mongo_client: Any, abuse_settings: Any) -> str:
    db = mongo_client[abuse_settings.mongodb_database]
    return await make_key(db, "abuse", ["wallets:read", "wallets:write"], owner="abuse")


def _api_body(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    if kind == "void":
        return {"wallet": WALLET, "original_transaction_id": "t-1", **fields}
    return {"wallet": WALLET, "amount": "1.00", **fields}


def _assert_field_problem(response: Any, field: str) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["field"] == field, body
    assert "Traceback" not in response.text


async def test_api_refuses_abuse_naming_the_field(abuse_api: Any, abuse_key: str) -> None:
    headers = {"Authorization": f"Bearer {abuse_key}"}
    async with httpx.AsyncClient(base_url=abuse_api.url, timeout=60) as http:
        for field, kind, fields in API_CASES:
            response = await http.post(
                f"/v1/wallets/{kind}", json=_api_body(kind, fields),
                headers={**headers, "Idempotency-Key": str(uuid.uuid4())},
            )  # fmt: skip
            _assert_field_problem(response, field)
        surrogate = await http.post(
            "/v1/wallets/credit", content=SURROGATE_BODY,
            headers={**headers, "Idempotency-Key": str(uuid.uuid4()),
                     "Content-Type": "application/json"},
        )  # fmt: skip
        assert surrogate.status_code in (400, 422), surrogate.text
        assert "Traceback" not in surrogate.text
        # Beyond the body limit the API refuses before parsing anything.
        huge = await http.post(
            "/v1/wallets/credit", json=_api_body("credit", {"reference_id": "x" * 100_000}),
            headers={**headers, "Idempotency-Key": str(uuid.uuid4())},
        )  # fmt: skip
        assert huge.status_code == 413, huge.text
        path = await http.get("/v1/wallets/%24where/MEX/MXN/balance", headers=headers)
        _assert_field_problem(path, "client_id")
