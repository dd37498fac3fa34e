"""pymongo's condition waits made safe to cancel on Python 3.11 (installed by mongobase.mongo).

pymongo (4.20) waits on its topology and pool conditions with
`asyncio.wait_for(condition.wait(), timeout)`. On Python 3.11 `wait_for` runs the wait in a task
of its own; a cancellation that arrives while `wait_for` is cancelling that task on its own
timeout returns before the wait has re-acquired the condition's lock. pymongo's
`async with lock` then releases a lock it does not hold ("RuntimeError: Lock is not acquired")
and the orphaned wait re-acquires it for good: every later server selection of the process
waits forever. Seen as a wallet worker that never wrote to MongoDB again after an outage: the
outage made server selections wait, and Temporal cancelled the local activities doing them at
their start-to-close timeout (tests/test_outages.py reproduces the wedge without a server).

`asyncio.timeout` runs the wait in the caller's task, so the wait's own re-acquire completes
before any cancellation propagates: the semantics of Python 3.12's `wait_for`, which is built
that way. From 3.12 on nothing is patched.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from typing import Any

# The modules that call `_async_cond_wait` (each imported it by name).
PATCHED_MODULES = ("pymongo.lock", "pymongo.asynchronous.topology", "pymongo.asynchronous.pool")
PATCHED_NAME = "_async_cond_wait"


async def cond_wait(condition: Any, timeout: float | None) -> bool:
    """Wait on `condition` (its lock held) up to `timeout`: True if notified, False on
    timeout; on cancellation the lock is held again before CancelledError propagates."""
    try:
        async with asyncio.timeout(timeout):
            return bool(await condition.wait())
    except TimeoutError:
        return False


def install() -> bool:
    """Replace pymongo's condition wait (idempotent); False when the Python needs none."""
    if sys.version_info >= (3, 12):
        return False
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        # A pymongo that renamed or dropped the helper must be re-checked, not silently missed.
        assert hasattr(module, PATCHED_NAME), f"{name}.{PATCHED_NAME} is gone: re-check"
        setattr(module, PATCHED_NAME, cond_wait)
    return True
