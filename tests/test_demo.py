"""`walletmig demo` end to end on the session's real servers (small size): every phase to
complete under live traffic, checked against the traffic generator's own ledger."""

from __future__ import annotations

import pytest

from walletmig.config import Settings
from walletmig.demo import DemoOptions, render, run_demo


@pytest.mark.slow
async def test_demo_small(settings: Settings) -> None:
    lines: list[str] = []
    report = await run_demo(settings, DemoOptions(wallets=30, writers=3, readers=2,
                                                  phase_dwell_s=1.5), lines.append)
    text = render(report) + "\n" + "\n".join(lines)
    assert report.refused_advance is not None and "gate backfill_complete" in report.refused_advance
    assert report.rollback is not None and "shadow_read" in report.rollback, text
    assert report.final_phase == "complete", text
    assert report.archive is not None, text
    assert report.lost_operations == 0, text
    assert report.duplicated_operations == 0, text
    assert report.final_match_rate == 1.0, text
    assert report.operations_succeeded > 30
    positions = [p.position for p in report.phases]
    for step in ("dual_write", "shadow_read", "read_cutover 100%", "tb_primary", "complete"):
        assert step in positions, positions
    assert "lost_operations: 0" in text
