"""The direct, low-latency read path (no Temporal round trip), for callers that only read.

One implementation serves every reader: `walletmig.read_path.ReadRouter` (phase routing,
sticky rollout hash from walletcore.rollout, shadow comparison, circuit breaker, fallback
metrics). `WalletReader(legacy, tigerbeetle, migration)` is that router without a metrics store.
"""

from __future__ import annotations

from walletmig.read_path import ReadPathConfig, ReadRouter

WalletReader = ReadRouter

__all__ = ["ReadPathConfig", "ReadRouter", "WalletReader"]
