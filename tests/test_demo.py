"""`walletmig demo` end to end on the session's real servers (small size)."""

from __future__ import annotations

import pytest

from walletmig.config import Settings
from walletmig.demo import DemoOptions, render, run_demo


@pytest.mark.slow
async def test_demo_small(settings: Settings) -> None:
    lines: list[str] = []
    report = await run_demo(settings, DemoOptions(wallets=30, writers=3, readers=2,
                                                  phase_dwell_s=1.5), lines.append)
    text = render(report)
    assert report.refused_advance is not None and "gate backfill_complete" in report.refused_advance
    assert report.rollback is not None
    assert report.lost_operations == 0, text
    assert report.duplicated_operations == 0, text
    assert report.final_match_rate == 1.0, text
    assert report.operations_succeeded > 30
    assert "lost_operations: 0" in text
