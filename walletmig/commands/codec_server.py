"""`walletmig codec-server`: serve /decode and /encode (Temporal's codec server protocol) for
the Web UI and the CLI, with the process's payload keys (WALLETMIG_CODEC_KEYS_FILE /
WALLETMIG_CODEC_KEYS). `walletmig codec-server --new-key ID` prints a fresh key line instead.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from walletmig.commands import CommandError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8234  # beside the embedded Web UI's 8233
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "codec-server", help="serve Temporal's codec server protocol (decrypt for the Web UI)",
        description="Serve POST /decode and /encode for the Temporal Web UI and CLI. Needs "
        "WALLETMIG_CODEC_KEYS_FILE or WALLETMIG_CODEC_KEYS and WALLETMIG_CODEC_SERVER_TOKEN; "
        "CORS origins: WALLETMIG_CODEC_SERVER_CORS_ORIGINS (see README, 'Payload encryption').",
    )  # fmt: skip
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"interface (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT})")  # fmt: skip
    parser.add_argument("--no-token", action="store_true",
                        help="serve without an access token (loopback interfaces only: the "
                        "embedded Web UI cannot send a static token)")  # fmt: skip
    parser.add_argument("--new-key", metavar="ID",
                        help="print a new `ID:base64key` line for the keys file and exit")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"))
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from walletclient.payload_codec import CodecKeyError, new_key_line

    if args.new_key:
        try:
            print(new_key_line(args.new_key))
        except CodecKeyError as err:
            raise CommandError(str(err)) from err
        return 0
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    import uvicorn

    from walletclient.temporal_connect import codec_from_settings
    from walletconfig.settings import Settings
    from walletmig.codec_server import CodecServerError, check_token, create_app, parse_origins

    settings = Settings.from_env()
    codec = codec_from_settings(settings)
    if codec is None:
        raise CommandError("no payload keys: set WALLETMIG_CODEC_KEYS_FILE or WALLETMIG_CODEC_KEYS")
    token = None if args.no_token else settings.codec_server_token
    if token == "":
        raise CommandError("set WALLETMIG_CODEC_SERVER_TOKEN (or --no-token on loopback)")
    try:
        check_token(token, args.host)
        origins = parse_origins(settings.codec_server_cors_origins)
    except CodecServerError as err:
        raise CommandError(str(err)) from err
    logging.getLogger(__name__).info(
        "codec server on http://%s:%d (keys %s, encrypting with %s), CORS %s",
        args.host, args.port, ",".join(codec.key_ids), codec.encrypt_key_id, origins,
    )  # fmt: skip
    uvicorn.run(create_app(codec, token, origins), host=args.host, port=args.port,
                log_config=None, access_log=False, server_header=False)  # fmt: skip
    return 0
