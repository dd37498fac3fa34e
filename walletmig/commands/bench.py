"""`walletmig bench wallet-ops|tigerbeetle|reconcile|backfill|api`: benchmarks on the embedded
stack.

The benchmark modules load inside the handlers: building the parser must stay cheap.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from walletconfig.settings import Settings
from walletmig.commands import CommandError, UsageError

RECONCILE_WALLETS_DEFAULT = 100_000
# (sub-command, help) of walletmig/bench_reconcile.py's two benchmarks.
STORE_BENCHES = (
    ("reconcile", "reconciliation wallets/s next to the raw reads (MongoDB cursor + "
                  "lookup_accounts of 8189 ids)"),
    ("backfill", "backfill wallets/s next to raw batched create_transfers"),
)


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help="benchmarks", description="Benchmarks on the running (embedded) stack."
    )
    benches = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)

    ops = benches.add_parser(
        "wallet-ops",
        help="wallet operations through Temporal: bare vs legacy vs dual_write",
        description="Runs an in-process worker; prints ops/s and p50/p95/p99 per mode and round "
        "(dual_write timed until TigerBeetle has applied every operation).",
    )
    ops.add_argument("--ops", type=int, default=2000, help="operations per mode")
    ops.add_argument("--concurrency", type=int, default=100, help="concurrent callers")
    ops.add_argument("--wallets", type=int, default=None, help="default: one per caller")
    ops.add_argument("--rounds", type=int, default=2,
                     help="every mode once per round, in a rotated order (2); medians compared")
    ops.add_argument("--profile", type=Path, default=None, help="write cProfile stats here")
    ops.add_argument("--metrics", choices=("on", "off", "both"), default="on",
                     help="store/TigerBeetle timers on (default), off, or both: rounds "
                     "alternate and the throughput cost of metrics is printed (goal <= 3 %%)")
    ops.add_argument("--group-commit", choices=("on", "off", "both"), default=None,
                     help="the legacy store's group commit on, off, or both: rounds alternate "
                     "and each wallet mode's figures are split by it (default: as "
                     "WALLETMIG_LEGACY_GROUP_COMMIT, on)")
    ops.add_argument("--json", action="store_true", help="print the figures as JSON")
    ops.set_defaults(handler=_wallet_ops)

    tb = benches.add_parser(
        "tigerbeetle",
        help="the TigerBeetle emulator benchmark (tb_emulator.bench); its options after --",
        description="Runs tb_emulator.bench. Pass its options after `--`, e.g. "
        "`walletmig bench tigerbeetle -- --transfers 100000 --json`.",
    )
    tb.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of tb_emulator.bench")
    tb.set_defaults(handler=_tigerbeetle)

    clearing = benches.add_parser(
        "clearing", help="credit terminal end to end vs raw two-phase TigerBeetle transfers",
        description="walletmig/bench_clearing.py: saturation and fixed offered load, p50/p99, "
        "CPU per transaction per process, raw pending+post batches in the same run.")
    clearing.add_argument("--transactions", type=int, default=20_000)
    clearing.add_argument("--batch-size", type=int, default=2000)
    clearing.add_argument("--concurrency", type=int, default=4, help="batches in flight")
    clearing.add_argument("--fixed-share", type=float, default=0.5,
                          help="offered load of the fixed run, share of saturation (0: skip)")
    clearing.add_argument("--step-batches", type=int, default=2,
                          help="batches run step by step for CPU per transaction per step "
                               "(0: none)")
    clearing.add_argument("--json", action="store_true", help="tx_per_s, raw_tx_per_s, ratio, "
                                                              "p99_ms, ...")
    clearing.set_defaults(handler=_clearing)

    for kind, text in STORE_BENCHES:
        p = benches.add_parser(kind, help=text, description=text + " (walletmig.bench_reconcile)")
        p.add_argument("--wallets", type=int, default=RECONCILE_WALLETS_DEFAULT,
                       help="legacy wallets to seed in a scratch pair")
        p.add_argument("--json", action="store_true", help="print the figures as JSON "
                                                           "(with `ratio`)")
        p.set_defaults(handler=_store_bench, kind=kind)

    _register_api(benches)
    _register_reads(benches)


def _register_reads(benches: Any) -> None:
    reads = benches.add_parser(
        "reads", help="balance and all-balances reads: router MongoDB vs TigerBeetle vs raw",
        description="ReadRouter reads from MongoDB and from TigerBeetle next to a raw find_one "
        "and a raw lookup_accounts, at each reader count, one run (walletmig.bench_reads).")
    reads.add_argument("--clients", type=int, default=100, help="clients (2 wallets each)")
    reads.add_argument("--reads", type=int, default=2000, help="reads per path, count, round")
    reads.add_argument("--readers", default="1,100", help="concurrent reader counts")
    reads.add_argument("--rounds", type=int, default=2, help="rounds, the paths' order rotated")
    reads.add_argument("--json", action="store_true", help="print the figures as JSON")
    reads.set_defaults(handler=_reads)


def _register_api(benches: Any) -> None:
    api = benches.add_parser(
        "api",
        help="balance reads and credits through the HTTP API next to the Python client",
        description="The same balance read and credit through the running stack's HTTP API "
        "(a load generator process, raw HTTP/1.1 keep-alive) and through ReadRouter / "
        "WalletClient directly, rounds "
        "alternating; prints requests/s, p50/p99 and CPU ms per request of each process "
        "(walletmig.bench_api). Writes bench-api-* wallets into the stack's database.",
    )  # fmt: skip
    api.add_argument("--reads", type=int, default=5000, help="balance reads per path and round")
    api.add_argument("--credits", type=int, default=1000, help="credits per path and round")
    api.add_argument("--concurrency", type=int, default=32, help="concurrent callers per path")
    api.add_argument("--wallets", type=int, default=32, help="wallets (caller c uses c %% N)")
    api.add_argument("--rounds", type=int, default=4,
                     help="rounds, the paths' order swapped (the goals judge their median)")
    api.add_argument("--pair", default="USD:USA", help="CURRENCY:COUNTRY of the wallets")
    api.add_argument("--api-url", default=None,
                     help="default: WALLETMIG_API_URL (exported by `walletmig dev up`)")
    api.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate")
    api.add_argument("--json", action="store_true", help="print the figures as JSON")
    api.set_defaults(handler=_api_bench)

    timers = benches.add_parser(
        "metrics",
        help="CPU the store/TigerBeetle timers add per wallet operation (goal <= 3 %%)",
        description="Times the metric timers on vs off in interleaved rounds, then runs one "
        "`bench wallet-ops` round to count timed calls and CPU per wallet operation "
        "(walletmig.bench_metrics).",
    )
    timers.add_argument("--calls", type=int, default=200_000, help="calls per round and kind")
    timers.add_argument("--rounds", type=int, default=10, help="on/off round pairs")
    timers.add_argument("--ops", type=int, default=400, help="wallet operations per mode")
    timers.add_argument("--concurrency", type=int, default=50, help="concurrent callers")
    timers.add_argument("--json", action="store_true", help="print the figures as JSON")
    timers.set_defaults(handler=_metrics_bench)


async def _wallet_ops(args: argparse.Namespace) -> int:
    from walletmig.bench_wallet_ops import BenchConfig, format_report, run_bench

    try:
        config = BenchConfig(
            ops=args.ops, concurrency=args.concurrency, wallets=args.wallets,
            profile=args.profile, rounds=args.rounds, metrics=args.metrics,
            group_commit=args.group_commit,
        )
    except AssertionError as err:
        raise UsageError(str(err)) from None
    report = await run_bench(Settings.from_env(), config)
    print(report.model_dump_json(indent=2) if args.json else format_report(report, args.profile))
    return 0


async def _metrics_bench(args: argparse.Namespace) -> int:
    from walletmig.bench_metrics import MetricsBenchConfig, format_report, run_metrics_bench

    try:
        config = MetricsBenchConfig(calls=args.calls, rounds=args.rounds, ops=args.ops,
                                    concurrency=args.concurrency)
    except AssertionError as err:
        raise UsageError(str(err)) from None
    report = await run_metrics_bench(Settings.from_env(), config)
    print(report.model_dump_json(indent=2) if args.json else format_report(report))
    return 0


def _tigerbeetle(args: argparse.Namespace) -> int:
    from tb_emulator.bench import main

    forwarded = [arg for arg in args.bench_args if arg != "--"]
    return int(main(forwarded))


async def _store_bench(args: argparse.Namespace) -> int:
    from walletmig.bench_reconcile import WALLETS_MAX, run_bench

    if not 0 < args.wallets <= WALLETS_MAX:
        raise UsageError(f"--wallets must be within 1..{WALLETS_MAX}")
    figures = await run_bench(args.kind, Settings.from_env(), args.wallets)
    if args.json:
        print(json.dumps(figures))
    else:
        print("\n".join(f"{name:28} {value}" for name, value in figures.items()))
    return 0


async def _api_bench(args: argparse.Namespace) -> int:

    from walletmig.bench_api import ApiBenchConfig, RequestFailed, format_report, run_bench

    api_url = args.api_url or os.environ.get("WALLETMIG_API_URL")
    if not api_url:
        raise UsageError("no API URL: pass --api-url or start the stack (`walletmig dev up`)")
    currency, _, country = args.pair.partition(":")
    # A bad value is a pydantic ValidationError: the CLI prints one line naming the field.
    config = ApiBenchConfig(
        api_url=api_url.rstrip("/"), reads=args.reads, credits=args.credits,
        concurrency=args.concurrency, wallets=args.wallets, rounds=args.rounds,
        currency=currency, country=country, verify_tls=not args.insecure,
    )  # fmt: skip
    try:
        report = await run_bench(Settings.from_env(), config)
    except RequestFailed as failed:
        raise CommandError(f"bench api: {failed}") from None
    print(report.model_dump_json(indent=2) if args.json else format_report(report))
    return 0


async def _reads(args: argparse.Namespace) -> int:
    import pydantic

    from walletmig.bench_reads import ReadsConfig, print_report, run_reads_bench

    try:
        config = ReadsConfig(clients=args.clients, reads=args.reads, rounds=args.rounds,
                             readers=tuple(int(r) for r in args.readers.split(",")))
    except (ValueError, pydantic.ValidationError) as bad:
        raise UsageError(f"bench reads: {bad}".replace("\n", " ")) from None
    report = await run_reads_bench(Settings.from_env(), config)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print_report(report)
    return 0


async def _clearing(args: argparse.Namespace) -> int:

    from walletmig.bench_clearing import ClearingBenchConfig, format_report, run_bench

    # A bad value is a pydantic ValidationError: the CLI prints one line naming the field.
    config = ClearingBenchConfig(transactions=args.transactions, batch_size=args.batch_size,
                                 concurrency=args.concurrency, fixed_share=args.fixed_share,
                                 step_batches=args.step_batches)
    report = await run_bench(Settings.from_env(), config)
    print(report.model_dump_json(indent=2) if args.json else format_report(report))
    return 0
