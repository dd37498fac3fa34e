"""The one place a Temporal client is built: the data converter (pydantic JSON, then the
payload codec when keys are configured) and the TLS options. Every worker, CLI command, demo,
benchmark and the HTTP gateway connects through `connect_temporal` / `connect_from_settings`.

This layer does not read configuration: `connect_from_settings` takes any object shaped like
walletconfig's Settings (`TemporalSettings`), which the processes pass in.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
)
from temporalio.service import TLSConfig

from walletclient.payload_codec import AesGcmPayloadCodec, load_codec

PEM_BYTES_MAX = 1 << 20


class TemporalTls(BaseModel):
    """TLS towards the Temporal frontend. `ca` alone = server-authenticated TLS with a private
    CA; `cert` + `key` = mTLS (the server checks the client's certificate)."""

    model_config = ConfigDict(frozen=True)

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = Field(default=None, max_length=253)

    def to_config(self) -> TLSConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TEMPORAL_TLS_CERT and TEMPORAL_TLS_KEY go together (mTLS)")
        return TLSConfig(
            server_root_ca_cert=read_pem(self.ca),
            client_cert=read_pem(self.cert),
            client_private_key=read_pem(self.key),
            domain=self.server_name or None,
        )


class TemporalSettings(Protocol):
    """The fields of walletconfig.settings.Settings this module reads ("" = unset)."""

    @property
    def temporal_address(self) -> str: ...
    @property
    def temporal_namespace(self) -> str: ...
    @property
    def temporal_tls(self) -> bool: ...
    @property
    def temporal_tls_ca(self) -> str: ...
    @property
    def temporal_tls_cert(self) -> str: ...
    @property
    def temporal_tls_key(self) -> str: ...
    @property
    def temporal_tls_server_name(self) -> str: ...
    @property
    def codec_keys_file(self) -> str: ...
    @property
    def codec_keys(self) -> str: ...


def read_pem(path: Path | None) -> bytes | None:
    if path is None:
        return None
    size = path.stat().st_size
    assert size <= PEM_BYTES_MAX, f"{path}: {size} bytes is not a PEM file"
    return path.read_bytes()


def data_converter(codec: PayloadCodec | None = None) -> DataConverter:
    """Pydantic JSON payloads, encrypted by `codec` when given. With a codec, failure messages
    and stack traces are encrypted too (they may name a client or an amount); the failure's
    type stays readable, so errors are still classified without keys."""
    if codec is None:
        return pydantic_data_converter
    return dataclasses.replace(
        pydantic_data_converter, payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )  # fmt: skip


async def connect_temporal(
    address: str, namespace: str = "default", *, codec: PayloadCodec | None = None,
    tls: TemporalTls | bool = False, lazy: bool = False,
) -> Client:  # fmt: skip
    """A client whose payloads go through `codec` (None = plaintext JSON). `tls=True` uses the
    system's trust store; a TemporalTls adds a private CA and/or a client certificate."""
    tls_option: TLSConfig | bool = tls.to_config() if isinstance(tls, TemporalTls) else tls
    return await Client.connect(
        address, namespace=namespace, data_converter=data_converter(codec),
        tls=tls_option, lazy=lazy,
    )  # fmt: skip


def optional_path(value: str) -> Path | None:
    return Path(value) if value else None


def codec_from_settings(settings: TemporalSettings) -> AesGcmPayloadCodec | None:
    return load_codec(optional_path(settings.codec_keys_file), settings.codec_keys)


def tls_from_settings(settings: TemporalSettings) -> TemporalTls | bool:
    tls = TemporalTls(
        ca=optional_path(settings.temporal_tls_ca), cert=optional_path(settings.temporal_tls_cert),
        key=optional_path(settings.temporal_tls_key),
        server_name=settings.temporal_tls_server_name or None,
    )  # fmt: skip
    if tls != TemporalTls():
        return tls
    return settings.temporal_tls


async def connect_from_settings(settings: TemporalSettings, *, lazy: bool = False) -> Client:
    """The process's client: its address, namespace, TLS and codec keys from settings."""
    return await connect_temporal(
        settings.temporal_address, settings.temporal_namespace,
        codec=codec_from_settings(settings), tls=tls_from_settings(settings), lazy=lazy,
    )  # fmt: skip
