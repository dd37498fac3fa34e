"""Payload encryption: the AES-256-GCM codec (round trip, rotation, tamper detection), a real
wallet worker and client with the codec on whose raw history holds no client id or amount in
the clear (not in workflow ids either: keyed hashes, walletcore.wallet_ids), and the codec
server (decodes with the token, 401 without)."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from wallet_support import isolated_settings, key, wallet_harness

from walletclient.payload_codec import (
    ENCODING,
    KEY_ID_METADATA,
    AesGcmPayloadCodec,
    CodecKeyError,
    PayloadDecodeError,
    load_codec,
    new_key_line,
    parse_keys,
)
from walletclient.temporal_connect import codec_from_settings, connect_temporal
from walletconfig.settings import Settings
from walletcore.operations import AddCredit
from walletmig.codec_server import CodecServerError, check_token, create_app, parse_origins

TOKEN = "t0ken-" + "x" * 20
UI_ORIGIN = "http://127.0.0.1:8233"


def codec_of(*ids: str) -> AesGcmPayloadCodec:
    codec = load_codec(None, "\n".join(new_key_line(key_id) for key_id in ids))
    assert codec is not None
    return codec


def plain(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=text.encode())


async def test_round_trip_hides_the_data_and_names_the_key() -> None:
    codec = codec_of("k1")
    [sealed] = await codec.encode([plain('{"client_id":"alice-42"}')])
    assert sealed.metadata["encoding"] == ENCODING
    assert sealed.metadata[KEY_ID_METADATA] == b"k1"
    assert b"alice-42" not in sealed.SerializeToString()
    assert await codec.decode([sealed]) == [plain('{"client_id":"alice-42"}')]
    # A payload written before the codec was switched on still reads.
    assert await codec.decode([plain("1")]) == [plain("1")]


async def test_rotation_keeps_old_payloads_readable() -> None:
    line_a, line_b = new_key_line("a"), new_key_line("b")
    only_a = load_codec(None, line_a)
    assert only_a is not None
    [old] = await only_a.encode([plain('"before rotation"')])
    rotated = load_codec(None, f"{line_a}\n{line_b}")  # b is newest: b encrypts
    assert rotated is not None and rotated.encrypt_key_id == "b"
    assert await rotated.decode([old]) == [plain('"before rotation"')]
    [new] = await rotated.encode([plain('"after"')])
    assert new.metadata[KEY_ID_METADATA] == b"b"
    with pytest.raises(PayloadDecodeError, match="unknown key id 'b'"):
        await only_a.decode([new])


async def test_tampering_is_detected() -> None:
    codec = codec_of("a", "b")
    [sealed] = await codec.encode([plain('{"amount":"10.00"}')])
    flipped = bytearray(sealed.data)
    flipped[-1] ^= 1
    with pytest.raises(PayloadDecodeError, match="fails authentication"):
        await codec.decode([Payload(metadata=sealed.metadata, data=bytes(flipped))])
    relabelled = Payload(metadata={**sealed.metadata, KEY_ID_METADATA: b"a"}, data=sealed.data)
    with pytest.raises(PayloadDecodeError, match="fails authentication"):
        await codec.decode([relabelled])
    with pytest.raises(PayloadDecodeError, match="too short"):
        await codec.decode([Payload(metadata=sealed.metadata, data=b"\0" * 12)])


def test_keys_load_from_a_file_or_the_environment(tmp_path: Path) -> None:
    raw = base64.b64encode(b"\1" * 32).decode()
    as_json = f'{{"keys": [{{"id": "old", "key": "{raw}"}}, {{"id": "new", "key": "{raw}"}}]}}'
    assert [k for k, _ in parse_keys(as_json)] == ["old", "new"]
    assert [k for k, _ in parse_keys(f'{{"x": "{raw}"}}')] == ["x"]
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# comment\nfile1:{raw}\n\n")
    codec = load_codec(keys_file, f"env1:{raw}")
    assert codec is not None and codec.key_ids == ["file1", "env1"]
    settings = Settings.from_env({"WALLETMIG_CODEC_KEYS_FILE": str(keys_file)})
    from_settings = codec_from_settings(settings)
    assert from_settings is not None and from_settings.key_ids == ["file1"]
    assert codec_from_settings(Settings.from_env({})) is None  # no keys: the codec is off
    assert raw not in repr(Settings.from_env({"WALLETMIG_CODEC_KEYS": f"e:{raw}"}))
    for bad, match in [(f"k:{base64.b64encode(b'short').decode()}", "needs 32"),
                       ("k:not base64!", "not valid base64"), (f"a:{raw}\na:{raw}", "twice"),
                       ("no separator", "id:base64key")]:  # fmt: skip
        with pytest.raises(CodecKeyError, match=match):
            load_codec(None, bad)


def payloads_in(message: Message) -> Iterator[tuple[str, Payload]]:
    """Every Payload anywhere in a history event (with its field path), except search
    attributes: those are indexed by the server and never encoded (they hold no customer data:
    the raw-bytes check in the test below covers them)."""
    for field, value in message.ListFields():
        if field.name == "search_attributes" or field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            values: list[Any] = list(value.values())
        elif isinstance(value, Message):
            values = [value]
        else:
            values = list(value)  # a repeated field
        for item in values:
            if isinstance(item, Payload):
                yield field.name, item
            elif isinstance(item, Message):
                yield from payloads_in(item)


async def test_history_holds_no_customer_data_in_the_clear(
    temporal_client: Client, settings: Settings, tb_addresses: str
) -> None:
    codec = codec_of("old", "current")
    address = temporal_client.service_client.config.target_host
    encrypted = await connect_temporal(address, temporal_client.namespace, codec=codec)
    client_id = f"codec-{uuid.uuid4().hex[:12]}"
    wallet = key(client_id)
    amount = "4817.23"
    async with wallet_harness(encrypted, isolated_settings(settings, "codec")) as harness:
        result = await harness.client.add_credit(AddCredit(
            wallet=wallet, transaction_id=f"{client_id}.t1", amount=Decimal(amount)))
        assert result.credit == Decimal(amount)
        balance = await harness.client.get_balance(wallet)
        assert balance.credit == Decimal(amount)
        assert [b.credit for b in await harness.client.get_multi_balance(client_id)] == [
            Decimal(amount)]
        workflow_id = harness.client.workflow_id(wallet)
        # Without the codec: what anyone who can reach Temporal sees.
        plain_handle = temporal_client.get_workflow_handle(workflow_id)
        described = await plain_handle.describe()  # search attributes, memo, summaries
        assert client_id.encode() not in described.raw_description.SerializeToString()
        # The Web UI's current details come from a query answered through the codec.
        meta = await encrypted.get_workflow_handle(workflow_id).query(
            "__temporal_workflow_metadata")
        assert client_id not in str(meta), meta
        read_ids = [w.id async for w in temporal_client.list_workflows(
            f"TaskQueue = '{harness.task_queue}'")]  # fmt: skip
    assert re.fullmatch(r"wallet/[0-9a-f]{32}", workflow_id), workflow_id
    assert len(read_ids) >= 2, read_ids  # the wallet's workflow and its read workflows
    for read_id in read_ids:
        assert client_id not in read_id, read_id
        history = await temporal_client.get_workflow_handle(read_id).fetch_history()
        for event in history.events:  # every byte of the raw history, payloads included
            raw = event.SerializeToString()
            assert client_id.encode() not in raw and amount.encode() not in raw, (read_id, event)
    history = await plain_handle.fetch_history()
    seen = 0
    for event in history.events:
        for name, payload in payloads_in(event):
            seen += 1
            # The SDK core's own bookkeeping in its markers (sequence numbers, the activity
            # type) is written in the clear; everything the project puts in is encrypted.
            marker = event.marker_recorded_event_attributes.marker_name
            assert payload.metadata.get("encoding") == ENCODING or marker.startswith("core_"), (
                name, marker, payload.data[:200])
    assert seen >= 2, "the wallet workflow's input and update carried payloads"
    # With the codec the same history reads back.
    decoded = await encrypted.get_workflow_handle(workflow_id).fetch_history()
    assert decoded.events


def test_codec_server_configuration_is_refused_when_unsafe() -> None:
    check_token(TOKEN, "0.0.0.0")
    check_token(None, "127.0.0.1")
    with pytest.raises(CodecServerError, match="loopback only"):
        check_token(None, "0.0.0.0")
    with pytest.raises(CodecServerError, match="at least"):
        check_token("short", "127.0.0.1")
    with pytest.raises(CodecServerError, match="any web page"):
        parse_origins("*")
    assert parse_origins(f"{UI_ORIGIN}/, http://x") == [UI_ORIGIN, "http://x"]


async def test_codec_server_decodes_with_the_token_and_refuses_without() -> None:
    codec = codec_of("k1")
    [sealed] = await codec.encode([plain('{"client_id":"bob-7"}')])
    body = {"payloads": [{
        "metadata": {k: base64.b64encode(v).decode() for k, v in sealed.metadata.items()},
        "data": base64.b64encode(sealed.data).decode()}]}  # fmt: skip
    app = create_app(codec, TOKEN, [UI_ORIGIN])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://codec") as http:
        assert (await http.post("/decode", json=body)).status_code == 401
        wrong = {"Authorization": "Bearer " + "y" * 26}
        assert (await http.post("/decode", json=body, headers=wrong)).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}", "X-Namespace": "default"}
        reply = await http.post("/decode", json=body, headers=auth)
        assert reply.status_code == 200, reply.text
        [out] = reply.json()["payloads"]
        assert base64.b64decode(out["data"]) == b'{"client_id":"bob-7"}'
        assert base64.b64decode(out["metadata"]["encoding"]) == b"json/plain"
        encoded = await http.post("/encode", json=reply.json(), headers=auth)
        [again] = encoded.json()["payloads"]
        assert base64.b64decode(again["metadata"]["encoding"]) == ENCODING
        assert (await http.post("/decode", content=b"{", headers=auth)).status_code == 400
        preflight = await http.options("/decode", headers={
            "Origin": UI_ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-namespace"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == UI_ORIGIN
        evil = await http.options("/decode", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in evil.headers
