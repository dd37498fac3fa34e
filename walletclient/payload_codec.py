"""AES-256-GCM payload codec: what Temporal stores (inputs, results, signals, queries,
failures' details) is ciphertext; only processes holding a key read client ids and amounts.

- Several keys are loaded at once: the NEWEST (last listed) encrypts, every key decrypts, so
  histories written before a rotation still decode. The key id travels in the payload's
  metadata (`encryption-key-id`), the nonce is random (12 bytes) and prefixed to the
  ciphertext; the metadata `encoding` is `binary/encrypted`.
- Keys come from a file or an environment variable, never from code (`load_codec`). No key
  configured = no codec (payloads stay plaintext JSON, as before).
- The key id is bound to the ciphertext as associated data: a payload re-labelled with
  another key id, or with any bit flipped, fails to decode (tamper detection).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's standard nonce; random per payload (2^32 payloads per key is safe)
KEYS_MAX = 64  # a key ring, not a key store: old keys are dropped once no history needs them
KEY_ID_LEN_MAX = 64
KEYS_FILE_BYTES_MAX = 1 << 20


class CodecKeyError(ValueError):
    """The configured keys are unusable (bad id, bad length, duplicated id)."""


class PayloadDecodeError(ValueError):
    """A payload cannot be decrypted: unknown key id, tampered, or truncated."""


class AesGcmPayloadCodec(PayloadCodec):
    """Encrypts with the newest key, decrypts with whichever key the payload names."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not 1 <= len(keys) <= KEYS_MAX:
            raise CodecKeyError(f"1..{KEYS_MAX} keys expected, got {len(keys)}")
        ring: dict[str, AESGCM] = {}
        for key_id, key in keys:
            check_key(key_id, key)
            if key_id in ring:
                raise CodecKeyError(f"key id {key_id!r} listed twice")
            ring[key_id] = AESGCM(key)
        self._ring = ring
        self.encrypt_key_id = keys[-1][0]

    @property
    def key_ids(self) -> list[str]:
        return list(self._ring)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(payload) for payload in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(payload) for payload in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        key_id = self.encrypt_key_id
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ring[key_id].encrypt(nonce, payload.SerializeToString(), key_id.encode())
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID_METADATA: key_id.encode()},
            data=nonce + sealed,
        )

    def decrypt(self, payload: Payload) -> Payload:
        # Payloads written before the codec was switched on (or by a client without it) are
        # passed through: a rollout does not break the histories already recorded.
        if payload.metadata.get("encoding") != ENCODING:
            return payload
        key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode(errors="replace")
        aead = self._ring.get(key_id)
        if aead is None:
            raise PayloadDecodeError(f"payload encrypted with unknown key id {key_id!r}")
        if len(payload.data) <= NONCE_BYTES:
            raise PayloadDecodeError("encrypted payload too short")
        nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
        try:
            plain = aead.decrypt(nonce, sealed, key_id.encode())
        except InvalidTag as err:
            raise PayloadDecodeError(f"payload (key id {key_id!r}) fails authentication") from err
        decoded = Payload()
        decoded.ParseFromString(plain)
        return decoded


def check_key(key_id: str, key: bytes) -> None:
    if not 1 <= len(key_id) <= KEY_ID_LEN_MAX or not key_id.isprintable() or ":" in key_id:
        raise CodecKeyError(f"key id must be 1..{KEY_ID_LEN_MAX} printable chars without ':'")
    if len(key) != KEY_BYTES:
        raise CodecKeyError(f"key {key_id!r} is {len(key)} bytes; AES-256 needs {KEY_BYTES}")


def parse_keys(text: str) -> list[tuple[str, bytes]]:
    """Keys from JSON (`{"keys": [{"id": ..., "key": base64}, ...]}` or `{id: base64, ...}`)
    or lines `id:base64key` (blank lines and `#` comments skipped). Oldest first, newest last:
    the last one encrypts."""
    stripped = text.strip()
    if stripped.startswith("{"):
        document = json.loads(stripped)
        if isinstance(document, Mapping) and isinstance(document.get("keys"), list):
            pairs = [(str(item["id"]), str(item["key"])) for item in document["keys"]]
        elif isinstance(document, Mapping):
            pairs = [(str(key_id), str(key)) for key_id, key in document.items()]
        else:
            raise CodecKeyError("codec keys JSON must be an object")
    else:
        pairs = []
        for line in stripped.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key_id, sep, key = line.partition(":")
            if not sep:
                raise CodecKeyError("codec key lines look like `id:base64key`")
            pairs.append((key_id.strip(), key.strip()))
    return [(key_id, decode_key(key_id, key)) for key_id, key in pairs]


def decode_key(key_id: str, key_b64: str) -> bytes:
    try:
        return base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError) as err:
        raise CodecKeyError(f"key {key_id!r} is not valid base64") from err


def load_codec(keys_file: Path | None, keys_text: str = "") -> AesGcmPayloadCodec | None:
    """The codec from a keys file and/or key text (an environment variable's value); file keys
    first, then the text's. None when neither holds a key: the codec is off."""
    keys: list[tuple[str, bytes]] = []
    if keys_file is not None:
        size = keys_file.stat().st_size
        if size > KEYS_FILE_BYTES_MAX:
            raise CodecKeyError(f"{keys_file}: {size} bytes, more than {KEYS_FILE_BYTES_MAX}")
        keys.extend(parse_keys(keys_file.read_text()))
    if keys_text.strip():
        keys.extend(parse_keys(keys_text))
    return AesGcmPayloadCodec(keys) if keys else None


def new_key_line(key_id: str) -> str:
    """A fresh `id:base64key` line (for `walletmig dev up` and key rotation)."""
    key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
    check_key(key_id, key)
    return f"{key_id}:{base64.b64encode(key).decode()}"
