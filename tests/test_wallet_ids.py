"""Keyed-hash workflow ids (walletcore.wallet_ids): stable per key, different across keys, no
client id in them; the key comes only from configuration (a file or the environment, validated,
never printed); `walletmig wallet workflow-id` and WalletClient compute the same id.

The raw-history check (no client id anywhere Temporal stores in the clear) is in test_codec.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path

import pytest
from temporalio.client import Client

import walletconfig.settings as config
import walletcore.wallet_ids as ids
from walletclient.wallet_client import WalletClient
from walletconfig.settings import IdKeyConfigError, Settings
from walletcore.keys import WalletKey
from walletmig import cli

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
WALLET = WalletKey(client_id="alice-42", country="MEX", currency="MXN", issuer_type="bank")
ID_FORMAT = re.compile(r"wallet/[0-9a-f]{32}")


def test_ids_are_stable_keyed_and_name_no_client() -> None:
    first = ids.wallet_workflow_id(KEY_A, WALLET)
    assert ID_FORMAT.fullmatch(first), first
    assert "alice" not in first and "MXN" not in first
    # Stable: the same key and wallet give the same id in every process (a known answer).
    mac = hmac.new(KEY_A, b"wallet|alice-42|MEX|MXN|bank", hashlib.sha256).hexdigest()
    assert first == f"wallet/{mac[:32]}"
    assert ids.wallet_workflow_id(KEY_A, WalletKey.model_validate(WALLET.model_dump())) == first
    # Keyed: another key gives another id; every field of the wallet key counts.
    assert ids.wallet_workflow_id(KEY_B, WALLET) != first
    others = [WALLET.model_copy(update={name: value}) for name, value in (
        ("client_id", "alice-43"), ("country", "USA"), ("currency", "USD"),
        ("issuer_type", None))]  # fmt: skip
    assert len({first, *(ids.wallet_workflow_id(KEY_A, w) for w in others)}) == 1 + len(others)
    # Separate id spaces for one key: a client's and a transaction's pseudonyms never collide
    # with a wallet's, even for the same text.
    refs = {ids.wallet_ref(KEY_A, WALLET), ids.client_ref(KEY_A, WALLET.canonical),
            ids.transaction_ref(KEY_A, WALLET.canonical)}  # fmt: skip
    assert len(refs) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", r) for r in refs)


def test_short_or_missing_keys_are_refused() -> None:
    for bad in (b"", b"x" * 31, b"x" * (ids.ID_KEY_BYTES_MAX + 1)):
        with pytest.raises(ids.IdKeyError, match="bytes"):
            ids.wallet_workflow_id(bad, WALLET)
    # The configuration layer imports nothing of the platform: its copy of the bounds agrees.
    assert (config.ID_KEY_BYTES_MIN, config.ID_KEY_BYTES_MAX) == (
        ids.ID_KEY_BYTES_MIN, ids.ID_KEY_BYTES_MAX)


def test_the_key_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "id.key"
    key_file.write_text(KEY_A.hex() + "\n")
    from_file = Settings.from_env({"WALLETMIG_ID_HASH_KEY_FILE": str(key_file),
                                   "WALLETMIG_ID_HASH_KEY": KEY_B.hex()})  # fmt: skip
    assert from_file.id_key() == KEY_A  # the file wins
    from_env = Settings.from_env({"WALLETMIG_ID_HASH_KEY": KEY_B.hex().upper()})
    assert from_env.id_key() == KEY_B
    assert KEY_B.hex().upper() not in repr(from_env)  # a secret: never printed
    with pytest.raises(IdKeyConfigError, match=r"^no wallet id key: set WALLETMIG_ID"):
        Settings.from_env({}).id_key()
    with pytest.raises(IdKeyConfigError, match="WALLETMIG_ID_HASH_KEY: 16 bytes"):
        Settings.from_env({"WALLETMIG_ID_HASH_KEY": "ab" * 16}).id_key()
    with pytest.raises(ValueError, match="id_hash_key") as refused:
        Settings.from_env({"WALLETMIG_ID_HASH_KEY": KEY_B.hex() + "x"})
    assert KEY_B.hex()[:8] not in str(refused.value)  # a refused secret is not echoed
    key_file.write_text("zz" * 32)
    with pytest.raises(IdKeyConfigError, match=re.escape(f"{key_file}: not a hex string")):
        from_file.id_key()
    missing = Settings.from_env({"WALLETMIG_ID_HASH_KEY_FILE": str(tmp_path / "nope")})
    with pytest.raises(IdKeyConfigError, match="No such file"):
        missing.id_key()


async def test_cli_and_client_compute_the_same_id(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("WALLETMIG_STATE_DIR", str(tmp_path))  # no dev stack's env file to load
    monkeypatch.delenv("WALLETMIG_ID_HASH_KEY_FILE", raising=False)
    monkeypatch.setenv("WALLETMIG_ID_HASH_KEY", KEY_A.hex())
    argv = ["wallet", "workflow-id", "--client-id", "alice-42", "--country", "MEX",
            "--currency", "MXN", "--issuer-type", "bank"]  # fmt: skip
    assert cli.run(argv) == 0
    printed = capsys.readouterr().out.splitlines()[0]  # then the Web UI link, on the dev stack
    assert cli.run([*argv, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["workflow_id"] == printed
    assert answer["web_ui"] is None or answer["web_ui"].endswith(printed.replace("/", "%2F"))
    temporal = await Client.connect("127.0.0.1:1", lazy=True)  # never reached
    client = WalletClient(temporal, "wallet", id_key=Settings.from_env().id_key())
    assert client.workflow_id(WALLET) == printed == ids.wallet_workflow_id(KEY_A, WALLET)
    with pytest.raises(ids.IdKeyError):
        WalletClient(temporal, "wallet", id_key=b"short")
    monkeypatch.delenv("WALLETMIG_ID_HASH_KEY")
    assert cli.run(argv) == 1  # one line naming the settings, before anything is opened
    assert "no wallet id key: set WALLETMIG_ID_HASH_KEY_FILE" in capsys.readouterr().err
