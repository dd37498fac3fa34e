"""The codec server: Temporal's Remote Data Encoding protocol over the payload codec, so
engineers read (decrypted) payloads in the Temporal Web UI and CLI without the keys ever
reaching the Temporal server.

    POST /decode   {"payloads": [{"metadata": {"encoding": "<base64>"}, "data": "<base64>"}]}
    POST /encode   same shape (the UI encodes the inputs of signals/updates it sends)

The bodies are proto3 JSON of temporal.api.common.v1.Payloads: every bytes field (data and each
metadata value) is base64. Every request needs `Authorization: Bearer <token>` (401 without);
CORS lets only the configured Web UI origins call it from a browser. Bounded: a body larger than
BODY_MAX_BYTES gets 413, more than PAYLOADS_MAX payloads 400.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Sequence

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from walletclient.payload_codec import AesGcmPayloadCodec, PayloadDecodeError

BODY_MAX_BYTES = 8 * 1024 * 1024
PAYLOADS_MAX = 4096
ORIGINS_MAX = 32
TOKEN_LEN_MIN = 16  # a guessable token is no access control
CORS_MAX_AGE_S = 600


class CodecServerError(ValueError):
    """The codec server's configuration is unsafe or incomplete."""


def parse_origins(text: str) -> list[str]:
    origins = [origin.strip().rstrip("/") for origin in text.split(",") if origin.strip()]
    if len(origins) > ORIGINS_MAX:
        raise CodecServerError(f"at most {ORIGINS_MAX} CORS origins, got {len(origins)}")
    if "*" in origins:
        raise CodecServerError("CORS origin '*' would let any web page use the codec server")
    return origins


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(token: str | None, host: str) -> None:
    """A token of TOKEN_LEN_MIN+ characters, or none only on a loopback interface (the
    embedded stack's Web UI cannot send a static token: it forwards only an SSO user's)."""
    if token is None:
        if not is_loopback(host):
            raise CodecServerError("serving without a token is allowed on loopback only")
        return
    if len(token) < TOKEN_LEN_MIN:
        raise CodecServerError(f"the access token needs at least {TOKEN_LEN_MIN} characters")


def create_app(codec: AesGcmPayloadCodec, token: str | None, origins: Sequence[str]) -> FastAPI:
    """`token` None = no access check (loopback only, see check_token)."""
    app = FastAPI(title="walletmig codec server", docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    expected = None if token is None else f"Bearer {token}".encode()

    async def run(request: Request, transform: Callable[[Payload], Payload]) -> Response:
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise HTTPException(401, "missing or wrong bearer token",
                                    headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        body = await read_bounded(request)
        try:
            payloads = json_format.Parse(body, Payloads())
        except json_format.ParseError as err:
            raise HTTPException(400, f"not a Payloads JSON body: {err}") from err
        if len(payloads.payloads) > PAYLOADS_MAX:
            raise HTTPException(400, f"more than {PAYLOADS_MAX} payloads")
        try:
            result = Payloads(payloads=[transform(payload) for payload in payloads.payloads])
        except PayloadDecodeError as err:
            raise HTTPException(400, str(err)) from err
        return Response(json_format.MessageToJson(result), media_type="application/json")

    def route(transform: Callable[[Payload], Payload]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await run(request, transform)

        return endpoint

    app.add_api_route("/decode", route(codec.decrypt), methods=["POST"])
    app.add_api_route("/encode", route(codec.encrypt), methods=["POST"])
    app.add_middleware(
        CORSMiddleware, allow_origins=list(origins), allow_methods=["POST"],
        allow_headers=["authorization", "content-type", "x-namespace"],
        allow_credentials=True, max_age=CORS_MAX_AGE_S,
    )  # fmt: skip
    return app


async def read_bounded(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > BODY_MAX_BYTES:
        raise HTTPException(413, f"body larger than {BODY_MAX_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > BODY_MAX_BYTES:
            raise HTTPException(413, f"body larger than {BODY_MAX_BYTES} bytes")
    return bytes(body)
