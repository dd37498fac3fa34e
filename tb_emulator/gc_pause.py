"""Building a batch of result objects with the garbage collector paused.

Every `tigerbeetle` dataclass is GC-tracked: building a full batch (up to 8189 objects)
triggers a dozen young collections that can free nothing, since every object is reachable.
Pausing the collector for that one bounded C-level loop (no await, no callbacks) measured
~25 % cheaper. Used by the wire decoder (client side) and the engine's in-process results.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Final, TypeVar

PAUSE_EVENTS_MIN: Final = 1024  # Smaller batches do not reach enough collections to matter.

T = TypeVar("T")


def build_without_gc(count: int, build: Callable[[], list[T]]) -> list[T]:
    """`build()`, with the collector paused when it makes `count` >= PAUSE_EVENTS_MIN objects
    (and the caller has not paused it already)."""
    if count < PAUSE_EVENTS_MIN or not gc.isenabled():
        return build()
    gc.disable()
    try:
        return build()
    finally:
        gc.enable()
