"""`walletmig api`: serve the HTTP API gateway (FastAPI on uvicorn) until SIGTERM/SIGINT.

Settings come from the environment (gateway/settings.py: WALLETMIG_API_HOST, _PORT, _TLS_CERT,
_TLS_KEY, rate limits, ...) plus the platform's (TEMPORAL_ADDRESS, MONGODB_URI, ...); `--host`
and `--port` override. With a certificate and key it serves HTTPS only. Readiness:
GET /readyz (200 when every dependency answers); liveness: GET /healthz. uvicorn serves it with
the gateway's HeadHoldingHttpToolsProtocol (each answer's head and body in one write).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from walletconfig.settings import IdKeyConfigError
from walletmig.commands import CommandError

GRACEFUL_SHUTDOWN_S = 10  # in-flight requests finish within this after SIGTERM


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "api", help="serve the HTTP API (wallets, migration status)",
        description="Serve the HTTP API gateway on uvicorn until SIGTERM/SIGINT. Configuration: "
        "WALLETMIG_API_* environment variables (see README, 'HTTP API').",
    )  # fmt: skip
    parser.add_argument("--host", help="interface (default: WALLETMIG_API_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: WALLETMIG_API_PORT or 8080)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"))
    parser.add_argument("--workers", type=int,
                        help="worker processes (default: WALLETMIG_API_WORKERS or 1)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Synchronous on purpose: uvicorn owns the event loop (uvloop when installed)."""
    # Imported here: the CLI's other commands should not pay for FastAPI and uvicorn.
    import uvicorn

    from gateway.app import configure_logging, create_app
    from gateway.http_protocol import HeadHoldingHttpToolsProtocol

    configure_logging(args.log_level)
    from gateway.settings import ApiSettings

    overrides: dict[str, object] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    if args.workers:
        overrides["workers"] = args.workers
    settings = ApiSettings.from_env(overrides=overrides)
    try:  # the wallet id key: refused in one line here, not in a lifespan traceback
        settings.platform.id_key()
    except IdKeyConfigError as err:
        raise CommandError(str(err)) from None
    if settings.workers > 1:
        return _run_workers(settings, args.log_level)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        **settings.ssl_options(),  # type: ignore[arg-type]  # HTTPS, mTLS (gateway/settings.py)
        http=HeadHoldingHttpToolsProtocol,  # a response's head and body in one write
        lifespan="on",
        log_config=None,  # our logging configuration above
        access_log=False,  # gateway.access logs each request (key name, masked ids)
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(config)
    logging.getLogger(__name__).info("serving %s (OpenAPI at /openapi.json)", settings.url)
    server.run()
    return 0 if server.started else 1


def _run_workers(settings: Any, log_level: str) -> int:
    """`settings.workers` uvicorn processes on one socket, each building its app from the
    environment (gateway.app.app_from_env): the command line's overrides go there first."""
    import os

    import uvicorn

    from gateway.app import LOG_LEVEL_ENV
    from gateway.http_protocol import HeadHoldingHttpToolsProtocol

    os.environ.update({
        "WALLETMIG_API_HOST": settings.host, "WALLETMIG_API_PORT": str(settings.port),
        "WALLETMIG_API_WORKERS": str(settings.workers), LOG_LEVEL_ENV: log_level,
    })  # fmt: skip
    logging.getLogger(__name__).info("serving %s with %d workers", settings.url, settings.workers)
    uvicorn.run(
        "gateway.app:app_from_env", factory=True, workers=settings.workers,
        host=settings.host, port=settings.port,
        **settings.ssl_options(), http=HeadHoldingHttpToolsProtocol,
        lifespan="on", log_config=None, access_log=False, server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )  # fmt: skip
    return 0
