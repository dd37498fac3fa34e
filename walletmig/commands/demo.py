"""`walletmig demo [--json]`: a full migration under live traffic (see walletmig/demo.py).

Exit status 0 only when the report is `ok`: every acknowledged operation exactly once in both
stores, every wallet's balance in both stores equal to the demo's ledger, no write failed
without an answer, no step had to be forced and the migration reached `complete` (the report's
`failures` lists what was not).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from walletconfig.settings import Settings


async def cmd_demo(args: argparse.Namespace) -> int:
    from walletmig.demo import DemoOptions, render, run_demo

    # The latency gate's default is DemoOptions' (the plan's, walletcore GateThresholds).
    ratio = {} if args.tb_p95_ratio is None else {"max_tb_p95_ratio": args.tb_p95_ratio}
    rate = {} if args.write_rate is None else {"write_rate_per_s": args.write_rate}
    if args.backfill_wallets_per_s is not None:  # 0: unpaced
        rate["backfill_wallets_per_s"] = args.backfill_wallets_per_s or None
    options = DemoOptions(wallets=args.wallets, writers=args.writers, readers=args.readers,
                          phase_dwell_s=args.dwell_s, **ratio, **rate)
    stream = sys.stderr if args.json else sys.stdout  # --json keeps stdout for the report

    def log(line: str) -> None:
        print(line, file=stream, flush=True)

    settings = Settings.from_env()
    settings.id_key()  # no wallet id key: one line now, not after the stack's servers start
    report = await run_demo(settings, options, log)
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        print(render(report))
    return 0 if report.ok else 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="run a full migration under live traffic",
        description="Seeds legacy wallets in a database of its own, runs live traffic and "
        "drives the migration through every phase to complete on the running stack "
        "(`walletmig dev up` first), then prints the report.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--wallets", type=int, default=2000, help="legacy wallets to seed (2000)")
    p.add_argument("--write-rate", type=float, default=None,
                   help="open-loop writes/s offered instead of the closed-loop writers "
                        "(issue 18's baseline traffic is ~16: walletmig/demo.py "
                        "BASELINE_WRITES_PER_S)")
    p.add_argument("--backfill-wallets-per-s", type=float, default=None, metavar="RATE",
                   help="the backfill's pace (default: walletmig/demo.py "
                        "DEMO_BACKFILL_WALLETS_PER_S; 0: unpaced)")
    p.add_argument("--writers", type=int, default=8, help="closed-loop write loops (8)")
    p.add_argument("--readers", type=int, default=4, help="concurrent read loops (4)")
    p.add_argument("--dwell-s", type=float, default=5.0, help="seconds of traffic per phase")
    p.add_argument("--tb-p95-ratio", type=float, default=None,
                   help="latency gate: TigerBeetle read p95 below this x MongoDB's (default: "
                        "the plan's gate, 0.5)")
    p.set_defaults(handler=cmd_demo)
