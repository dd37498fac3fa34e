"""The codec server: Temporal's Remote Data Encoding protocol over the payload codec, so
engineers read (decrypted) payloads in the Temporal Web UI and CLI without the keys ever
reaching the Temporal server.

    POST /decode   {"payloads": [{"metadata": {"encoding": "<base64>"}, "data": "<base64>"}]}
    POST /encode   same shape (the UI encodes the inputs of signals/updates it sends)

The bodies are proto3 JSON of temporal.api.common.v1.Payloads: every bytes field (data and each
metadata value) is base64. Every request needs `Authorization: Bearer <token>` (the CLI's
`--codec-auth`) or the browser session cookie (401 without); CORS lets only the configured Web UI
origins call it from a browser. Bounded: a body larger than BODY_MAX_BYTES gets 413, more than
PAYLOADS_MAX payloads 400.

    GET/POST /login   the browser sign-in: the Temporal Web UI sends no static token (only an
                      SSO user's access token, or cookies with "Include cross-origin
                      credentials"), so the engineer pastes the token once here and gets an
                      HttpOnly, SameSite=Strict cookie holding a digest of it (never the token).
                      The Web UI on the same host, another port, is same-site: the cookie goes
                      with its requests.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from walletclient.payload_codec import AesGcmPayloadCodec, PayloadDecodeError

BODY_MAX_BYTES = 8 * 1024 * 1024
PAYLOADS_MAX = 4096
ORIGINS_MAX = 32
TOKEN_LEN_MIN = 16  # a guessable token is no access control
CORS_MAX_AGE_S = 600
SESSION_COOKIE = "walletmig_codec_session"
SESSION_MAX_AGE_S = 12 * 3600  # a working day: then the engineer signs in again
LOGIN_BODY_MAX_BYTES = 8192
# The login page: no script, posts only to itself.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; form-action 'self'; "
                                           "style-src 'unsafe-inline'",
                "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
LOGIN_FORM = """<!doctype html><title>walletmig codec server</title>
<body style="font-family:sans-serif;max-width:40em">
<h1>walletmig codec server</h1><p>{message}</p>
<form method="post" action="/login"><label>Access token
<input name="token" type="password" autocomplete="off" size="50"></label>
<button>Sign in</button></form>
<p>Then, in the Temporal Web UI's codec server settings, tick <b>Include cross-origin
credentials</b> (README, "Payload encryption").</p></body>"""


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


def session_value(token: str) -> str:
    """What the browser cookie holds: a digest of the token (a stolen cookie is not the token
    the CLI uses, and the token never sits in a browser's cookie store)."""
    return hmac.new(token.encode(), b"walletmig codec-server browser session",
                    hashlib.sha256).hexdigest()


def _login_routes(app: FastAPI, token: str | None) -> None:
    def page(message: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(LOGIN_FORM.format(message=message), status, headers=PAGE_HEADERS)

    async def show(_request: Request) -> Response:
        return page("Paste the codec server's access token to read payloads in the Web UI.")

    async def sign_in(request: Request) -> Response:
        if token is None:
            return page("This codec server needs no token.")
        body = await read_bounded(request, LOGIN_BODY_MAX_BYTES)
        given = parse_qs(body.decode(errors="replace")).get("token", [""])[0].strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            return page("Wrong token: try again.", 401)
        answer = page("Signed in for 12 hours.")
        answer.set_cookie(SESSION_COOKIE, session_value(token), max_age=SESSION_MAX_AGE_S,
                          httponly=True, samesite="strict", path="/")
        return answer

    app.add_api_route("/login", show, methods=["GET"])
    app.add_api_route("/login", sign_in, methods=["POST"])


def create_app(codec: AesGcmPayloadCodec, token: str | None, origins: Sequence[str]) -> FastAPI:
    """`token` None = no access check (loopback only, see check_token)."""
    app = FastAPI(title="walletmig codec server", docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    expected = None if token is None else f"Bearer {token}".encode()
    session = None if token is None else session_value(token).encode()

    def authorized(request: Request) -> bool:
        if expected is None or session is None:
            return True
        given = request.headers.get("authorization", "").encode()
        cookie = request.cookies.get(SESSION_COOKIE, "").encode()
        return hmac.compare_digest(given, expected) or hmac.compare_digest(cookie, session)

    async def run(request: Request, transform: Callable[[Payload], Payload]) -> Response:
        if not authorized(request):
            raise HTTPException(401, "missing or wrong bearer token (or browser session: "
                                     "sign in at /login)",
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
    _login_routes(app, token)
    app.add_middleware(
        CORSMiddleware, allow_origins=list(origins), allow_methods=["POST"],
        allow_headers=["authorization", "content-type", "x-namespace"],
        allow_credentials=True, max_age=CORS_MAX_AGE_S,
    )  # fmt: skip
    return app


async def read_bounded(request: Request, limit: int = BODY_MAX_BYTES) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise HTTPException(413, f"body larger than {limit} bytes")
    return bytes(body)
