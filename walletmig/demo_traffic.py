"""The demo's traffic and its own record of it: seed data, live writes, balance reads, and the
`walletmig worker` process that serves them.

The `Ledger` is the independent record the checker (walletmig/demo_check.py) holds the stores
to: seed writes (straight to MongoDB, before the migration) and live writes (through the
wallet workflows) are kept apart; a live write is `acknowledged` only when the caller got a
success answer, `ambiguous` when it got no domain answer at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Literal, NamedTuple

from stores.bundle import Stores
from stores.outbox import Outbox
from stores.read_metrics import percentile
from walletclient.read_path import PendingOps, ReadRouter
from walletclient.wallet_client import WalletClient
from walletconfig.settings import ENVIRONMENT, Settings
from walletcore.errors import WalletError
from walletcore.keys import WalletKey
from walletcore.money import to_minor
from walletcore.operations import AddCredit, SubtractCredit, Void, WalletOperation
from workflows.wallet import WalletWorkflow

LATENCY_SAMPLES_MAX = 100_000  # per phase and kind; beyond that, sampling stops
# A reader starts a balance read at most this often (the next one at once when a read took
# longer): paced, not back to back. Back to back (a 5 ms pause) 4 readers made ~200 reads/s,
# plus as many shadow reads, and left the demo's own process CPU-bound: py-spy put 62 % of
# its busy time in the readers, and both stores' read p95 then measured this process's
# run queue (a TigerBeetle lookup the emulator answers in 0.1 ms showed p50 5-9 ms), not the
# stores. The latency gate compares the stores.
READ_EVERY_S = 0.04
WRITE_RATE_MAX_PER_S = 1_000.0  # open-loop traffic's offered rate, at most
IN_FLIGHT_MAX = 1_000  # open-loop traffic's bound on writes in flight, at most
SEED_CONCURRENCY = 16
SEED_OPS_PER_WALLET_MAX = 3
WORKER_STOP_S = 20.0
REPO_ROOT = Path(__file__).resolve().parent.parent

Kind = Literal["credit", "debit", "void"]
Effect = Literal["credit", "debit"]  # which way the money moves for the customer


@dataclass(frozen=True)
class SentOp:
    wallet: str  # canonical key
    kind: Kind
    # credit / debit as the balance sees it: a void of a credit takes money away (debit),
    # a void of a debit gives it back (credit).
    effect: Effect
    amount_minor: int  # of the operation itself; for a void, the original's
    original: str | None  # voids: the original transaction id
    started: float  # time.monotonic()
    finished: float
    phase_index: int  # the demo's phase report that was open when it was sent


class Latencies(NamedTuple):
    """One phase's latencies in ms: every acknowledged write, the first writes of a wallet
    among them, and the reads by the store that answered."""

    writes: list[float]
    first_writes: list[float]
    reads: dict[str, list[float]]


@dataclass
class Ledger:
    """What the traffic generator did and was told: the record the checker trusts."""

    seed: dict[str, SentOp] = field(default_factory=dict)  # straight to MongoDB, pre-migration
    acknowledged: dict[str, SentOp] = field(default_factory=dict)  # live, told succeeded
    ambiguous: dict[str, SentOp] = field(default_factory=dict)  # live, failed without an answer
    by_wallet: dict[str, list[str]] = field(default_factory=dict)  # seed + acknowledged
    voided: set[str] = field(default_factory=set)
    phase_index: int = 0
    writes_ok: int = 0
    writes_rejected: int = 0  # domain refusals (insufficient funds, already voided, ...)
    writes_failed: int = 0  # no domain answer
    # Open-loop traffic (open_loop_writer): writes that came due while every in-flight slot
    # was taken (they started late; their latency still counts from the scheduled start), and
    # writes due when the traffic stopped but never sent (they waited for a slot).
    writes_late: int = 0
    writes_unsent: int = 0
    # Latency of an acknowledged write: from its scheduled start in open-loop traffic (the
    # wait for a slot counts: no coordinated omission), else from its send.
    write_ms: list[float] = field(default_factory=list)
    # Acknowledged writes that were the first the demo sent to their wallet: each started
    # the wallet's workflow (Update-with-Start creating it), costlier than an update.
    first_write_ms: list[float] = field(default_factory=list)
    written: set[str] = field(default_factory=set)  # wallets a live write was sent to
    read_ms: dict[str, list[float]] = field(default_factory=dict)  # answering store -> ms
    reads: int = 0

    def take_latencies(self) -> Latencies:
        taken = Latencies(self.write_ms, self.first_write_ms, self.read_ms)
        self.write_ms, self.first_write_ms, self.read_ms = [], [], {}
        return taken

    def applied(self) -> dict[str, SentOp]:
        """Every operation a store was told to hold: seed data and acknowledged live writes."""
        return {**self.seed, **self.acknowledged}

    def known(self) -> set[str]:
        """Every transaction id the demo ever sent (a store may hold any of these)."""
        return set(self.seed) | set(self.acknowledged) | set(self.ambiguous)

    def find(self, transaction_id: str) -> SentOp:
        found = self.seed.get(transaction_id) or self.acknowledged.get(transaction_id)
        assert found is not None, transaction_id
        return found


def ms_of(values: list[float], fraction: float) -> float | None:
    found = percentile(values, fraction)
    return None if found is None else round(found, 2)


def demo_wallets(run_id: str, pairs: tuple[str, ...], count: int) -> list[WalletKey]:
    """`count` distinct wallets spread over `pairs` ("CUR:CTY"), two per client when there
    are two pairs or more (consecutive wallets are on different pairs)."""
    assert count > 0 and pairs
    per_client = min(2, len(pairs))
    wallets = []
    for i in range(count):
        currency, country = pairs[i % len(pairs)].split(":")
        wallets.append(WalletKey(client_id=f"{run_id}-c{i // per_client}", country=country,
                                 currency=currency))
    assert len({w.canonical for w in wallets}) == count
    return wallets


async def seed(stores: Stores, wallets: list[WalletKey], ledger: Ledger) -> None:
    """Legacy wallets with history, written straight to MongoDB (the pre-migration system)."""
    gate = asyncio.Semaphore(SEED_CONCURRENCY)

    async def one(w: WalletKey) -> None:
        async with gate:
            for _ in range(random.randint(1, SEED_OPS_PER_WALLET_MAX)):
                txn = f"seed-{uuid.uuid4().hex[:12]}"
                amount = Decimal(random.randint(50, 500))
                op = AddCredit(wallet=w, transaction_id=txn, amount=amount,
                               allow_overdraft=random.random() < 0.2)
                now = time.monotonic()
                await stores.legacy.add_credit(op)
                ledger.seed[txn] = SentOp(w.canonical, "credit", "credit",
                                          to_minor(amount, w.currency), None, now, now,
                                          ledger.phase_index)
                ledger.by_wallet.setdefault(w.canonical, []).append(txn)

    await asyncio.gather(*(one(w) for w in wallets))


def credit(w: WalletKey, amount: Decimal, ledger: Ledger) -> tuple[AddCredit, SentOp]:
    txn = f"op-{uuid.uuid4().hex[:16]}"
    return (AddCredit(wallet=w, transaction_id=txn, amount=amount),
            SentOp(w.canonical, "credit", "credit", to_minor(amount, w.currency), None, 0, 0,
                   ledger.phase_index))


def next_op(w: WalletKey, ledger: Ledger) -> tuple[WalletOperation, SentOp]:
    """A random operation on `w` and its ledger entry (times filled in when sent)."""
    txn = f"op-{uuid.uuid4().hex[:16]}"
    roll = random.random()
    voidable = [t for t in ledger.by_wallet.get(w.canonical, [])
                if ledger.find(t).kind != "void" and t not in ledger.voided]
    if roll < 0.1 and voidable:
        original_id = random.choice(voidable)
        original = ledger.find(original_id)
        effect: Effect = "debit" if original.kind == "credit" else "credit"
        return (Void(wallet=w, transaction_id=txn, original_transaction_id=original_id),
                SentOp(w.canonical, "void", effect, original.amount_minor, original_id, 0, 0,
                       ledger.phase_index))
    if roll < 0.45:
        amount = Decimal(random.randint(1, 80))
        return (SubtractCredit(wallet=w, transaction_id=txn, amount=amount),
                SentOp(w.canonical, "debit", "debit", to_minor(amount, w.currency), None, 0, 0,
                       ledger.phase_index))
    return credit(w, Decimal(random.randint(1, 100)), ledger)


def _timed(sent: SentOp, started: float, finished: float) -> SentOp:
    return SentOp(sent.wallet, sent.kind, sent.effect, sent.amount_minor, sent.original,
                  started, finished, sent.phase_index)


async def send(client: WalletClient, op: WalletOperation, sent: SentOp, ledger: Ledger, *,
               scheduled: float | None = None) -> bool:
    """Apply one operation through its wallet workflow and record what the caller was told:
    acknowledged (True), refused by the domain, or failed without an answer (ambiguous).
    `scheduled` (time.monotonic()): when open-loop traffic meant to start it; its latency
    counts from there."""
    first = sent.wallet not in ledger.written
    ledger.written.add(sent.wallet)
    started = time.monotonic()
    assert scheduled is None or scheduled <= started
    since = started if scheduled is None else scheduled
    try:
        await client.apply(op)
    except WalletError as err:
        if not err.retryable:
            ledger.writes_rejected += 1  # insufficient funds, already voided, ...
            return False
        ledger.ambiguous[op.transaction_id] = _timed(sent, started, time.monotonic())
        ledger.writes_failed += 1
        return False
    except Exception:
        ledger.ambiguous[op.transaction_id] = _timed(sent, started, time.monotonic())
        ledger.writes_failed += 1
        await asyncio.sleep(0.05)
        return False
    finished = time.monotonic()
    ledger.acknowledged[op.transaction_id] = _timed(sent, started, finished)
    ledger.by_wallet.setdefault(sent.wallet, []).append(op.transaction_id)
    if sent.original is not None:
        ledger.voided.add(sent.original)
    ledger.writes_ok += 1
    if len(ledger.write_ms) < LATENCY_SAMPLES_MAX:
        ledger.write_ms.append((finished - since) * 1000)
        if first:
            ledger.first_write_ms.append((finished - since) * 1000)
    return True


async def writer(client: WalletClient, wallets: list[WalletKey], ledger: Ledger,
                 stop: asyncio.Event) -> None:
    """Random writes until `stop`."""
    while not stop.is_set():
        op, sent = next_op(random.choice(wallets), ledger)
        await send(client, op, sent, ledger)


async def open_loop_writer(client: WalletClient, wallets: list[WalletKey], ledger: Ledger,
                           stop: asyncio.Event, *, rate_per_s: float, in_flight_max: int
                           ) -> None:
    """Random writes at a fixed offered rate until `stop`: the i-th write is scheduled at
    start + i / rate_per_s whatever the answers do (open loop), at most `in_flight_max` at
    once. A write whose scheduled start finds every slot taken starts as soon as one frees
    (counted late); its latency counts from the scheduled start, so a saturated stack shows as
    latency, not as a lower rate (closed-loop writers only ever measure their own queue).
    Writes in flight at `stop` finish; those due by then and not sent are counted unsent."""
    assert 0 < rate_per_s <= WRITE_RATE_MAX_PER_S and 1 <= in_flight_max <= IN_FLIGHT_MAX
    slots = asyncio.Semaphore(in_flight_max)
    running: set[asyncio.Task[bool]] = set()

    async def one(op: WalletOperation, sent: SentOp, scheduled: float) -> bool:
        try:
            return await send(client, op, sent, ledger, scheduled=scheduled)
        finally:
            slots.release()

    start, index = time.monotonic(), 0  # index: writes sent so far
    slot_at = start  # when the last write got its slot
    try:
        while not stop.is_set():
            scheduled = start + index / rate_per_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, scheduled - time.monotonic()))
            if stop.is_set():
                break
            # Due while the bound was full: now, or while the last write waited for its slot.
            late = slots.locked() or slot_at > scheduled
            await slots.acquire()
            slot_at = time.monotonic()
            if stop.is_set():  # stopped while it waited for a slot
                slots.release()
                break
            ledger.writes_late += late
            index += 1
            op, sent = next_op(random.choice(wallets), ledger)
            task = asyncio.create_task(one(op, sent, scheduled))
            running.add(task)
            task.add_done_callback(running.discard)
        # Due by now (scheduled at or before it) and never sent: reported, not dropped.
        due = int((time.monotonic() - start) * rate_per_s) + 1
        ledger.writes_unsent += max(0, due - index)
        await asyncio.gather(*running, return_exceptions=True)
    finally:
        for task in running:  # cancelled (a failing run): do not wait for writes in flight
            task.cancel()


async def reader(router: ReadRouter, wallets: list[WalletKey], ledger: Ledger,
                 stop: asyncio.Event) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        with contextlib.suppress(WalletError):
            balance = await router.get_balance(random.choice(wallets))
            ledger.reads += 1
            samples = ledger.read_ms.setdefault(balance.source, [])
            if len(samples) < LATENCY_SAMPLES_MAX:
                samples.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(max(0.0, READ_EVERY_S - (time.perf_counter() - started)))


def backlog_of(client: WalletClient, outbox: Outbox) -> PendingOps:
    """Operations still on their way to the other store: the wallet workflow's backlog (its
    status query; tb_primary's reverse projection) plus the wallet's pending dual-write outbox
    records. A shadow difference they explain is in flight, not a mismatch. Unknown counts as
    none."""

    async def pending(wallet: WalletKey) -> int:
        try:
            handle = client.temporal.get_workflow_handle(client.workflow_id(wallet))
            status = await handle.query(WalletWorkflow.status)
            backlog = int(status.backlog_length)
        except Exception:
            backlog = 0
        return backlog + await outbox.pending_count(wallet)

    return pending


# ---------------------------------------------------------------------------- worker process


def worker_env(settings: Settings) -> dict[str, str]:
    values = settings.model_dump()
    env = dict(os.environ)
    env.update({name: str(values[name_field]) for name, (name_field, _) in ENVIRONMENT.items()})
    return env


@contextlib.asynccontextmanager
async def worker_process(settings: Settings, log_path: Path
                         ) -> AsyncIterator[subprocess.Popen[bytes]]:
    """`walletmig worker` for the settings' database and task queues; SIGTERM (graceful) at
    the end, SIGKILL only if it does not stop in WORKER_STOP_S."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "walletmig", "worker", "--log-level", "WARNING"],
            cwd=REPO_ROOT, env=worker_env(settings), stdout=log_file, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + WORKER_STOP_S
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
