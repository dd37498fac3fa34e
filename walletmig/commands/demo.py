"""`walletmig demo [--json]`: a full migration under live traffic (see walletmig/demo.py)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from walletmig.config import Settings


async def cmd_demo(args: argparse.Namespace) -> int:
    from walletmig.demo import DemoOptions, render, run_demo

    options = DemoOptions(wallets=args.wallets, phase_dwell_s=args.dwell_s,
                          tb_primary=args.tb_primary, writers=args.writers)
    quiet = args.json

    def log(line: str) -> None:
        if not quiet:
            print(line, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    report = await run_demo(Settings.from_env(), options, log)
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        print(render(report))
    ok = report.lost_operations == 0 and report.duplicated_operations == 0
    return 0 if ok else 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="run a full migration under live traffic")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--wallets", type=int, default=200, help="legacy wallets to seed (200)")
    p.add_argument("--writers", type=int, default=6, help="concurrent write loops")
    p.add_argument("--dwell-s", type=float, default=4.0, help="seconds of traffic per phase")
    p.add_argument("--tb-primary", action="store_true",
                   help="also drive tb_primary and complete (needs the wallet workflow's "
                        "tb_primary write path)")
    p.set_defaults(handler=cmd_demo)
