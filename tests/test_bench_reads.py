"""`walletmig bench reads` on the session's real servers, tiny: every path runs at every reader
count, the TigerBeetle router answers from TigerBeetle (no fallback), the goals are judged, and
the report prints as rich tables."""

from __future__ import annotations

import io

from rich.console import Console

from walletconfig.settings import Settings
from walletmig.bench_reads import PATHS, ReadsConfig, print_report, run_reads_bench


async def test_bench_reads_small(settings: Settings) -> None:
    config = ReadsConfig(clients=4, reads=40, readers=(1, 100), rounds=1)
    report = await run_reads_bench(settings, config)
    assert [(m.path, m.readers) for m in report.medians] == [
        (path, readers) for readers in (1, 100) for path in PATHS]
    assert all(m.reads == 40 and m.p50_ms <= m.p95_ms for m in report.medians)
    assert report.tb_router_fallbacks == 0  # its figures are TigerBeetle's
    assert report.tb_balance_p50_ms_1 is not None and report.tb_of_mongo_balance_p95_100
    assert len(report.goals) == 2
    out = io.StringIO()
    print_report(report, Console(file=out, width=200))
    text = out.getvalue()
    assert "balance router tigerbeetle" in text and "TigerBeetle balance read p50" in text
