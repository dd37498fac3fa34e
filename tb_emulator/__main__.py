"""`python -m tb_emulator --port P --data-file PATH`: run the TigerBeetle 0.17.9 emulator."""

from __future__ import annotations

import argparse
import logging
import sys

from tb_emulator import request_limit
from tb_emulator.server import DEFAULT_ENGINE, ServerLimits, load_engine_factory, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tb_emulator",
        description="TigerBeetle 0.17.9 emulator server (durable, single process).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=3000, help="TCP port, 0 = any free port")
    parser.add_argument("--data-file", required=True, help="append-only log; created if missing")
    parser.add_argument("--engine", default=DEFAULT_ENGINE, help=argparse.SUPPRESS)
    parser.add_argument("--connections-max", type=int, default=ServerLimits.connections_max)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--limit-request", metavar="SIZE",
        help="largest request message, 4KiB..1MiB (bytes, or e.g. 32KiB); clients learn it when "
             "they connect and refuse bigger batches (default 1MiB, or 32KiB with --development)")
    parser.add_argument("--development", action="store_true",
                        help="TigerBeetle's development mode: request limit 32KiB by default")
    args = parser.parse_args(argv)
    limit_bytes = (request_limit.REQUEST_LIMIT_BYTES_DEVELOPMENT if args.development
                   else request_limit.REQUEST_LIMIT_BYTES_DEFAULT)
    if args.limit_request is not None:  # Explicit wins over --development's default.
        try:
            limit_bytes = request_limit.parse_request_limit(args.limit_request)
        except ValueError as e:
            print(f"{parser.prog}: error: --limit-request: {e}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    limits = ServerLimits(connections_max=args.connections_max,
                          request_limit_bytes=limit_bytes)
    return serve(args.data_file, args.host, args.port,
                 engine_factory=load_engine_factory(args.engine), limits=limits)


if __name__ == "__main__":
    sys.exit(main())
