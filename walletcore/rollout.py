"""Sticky, deterministic read-cutover rollout: which clients read from TigerBeetle at p %.

A client's bucket is a hash of its id, so the same client always gets the same answer at the
same percentage, and raising the percentage only ever adds clients (monotone): nobody flips
back and forth between stores while the rollout grows.
"""

from __future__ import annotations

import hashlib

ROLLOUT_BUCKETS = 10_000  # basis points: 1 bucket = 0.01 %


def rollout_bucket(client_id: str, salt: str = "") -> int:
    digest = hashlib.sha256(f"rollout:{salt}:{client_id}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % ROLLOUT_BUCKETS
    assert 0 <= bucket < ROLLOUT_BUCKETS
    return bucket


def in_rollout(client_id: str, rollout_percent: int, salt: str = "") -> bool:
    assert 0 <= rollout_percent <= 100, rollout_percent
    return rollout_bucket(client_id, salt) < rollout_percent * (ROLLOUT_BUCKETS // 100)
