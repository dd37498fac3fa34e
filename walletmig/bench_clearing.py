"""`walletmig bench clearing`: the credit terminal end to end against raw two-phase transfers.

End to end: ClearingClient.submit_many (record in MongoDB, start the batch workflow) ->
pending -> checks -> post/void -> journal entries and final states, by a clearing worker in
this process (walletmig/terminal_demo.clearing_worker) on a database, task queue and terminal
ledgers of the run's own. A transaction's latency is its batch's: from the submit call to the
batch workflow's result (every transaction of the batch is final then). Two runs:

- saturation: `--concurrency` batches in flight, the next submitted as one finishes;
- fixed offered load: batches submitted on a clock at `--fixed-share` of the saturation rate.

Raw two-phase, in the same run and on the same ledgers: pending transfers then their posts,
straight to TigerBeetle in requests of the cluster's create max (8189 at 1 MiB).

CPU per transaction per process: this process (client and worker) from process_time, the
stack's servers (MongoDB, TigerBeetle, Temporal, ...) from /proc (walletmig dev up records
their PIDs), over the saturation run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import tigerbeetle as tb
from pydantic import BaseModel, Field

from messages.clearing import INTAKE_BATCH_MAX, PostVoidBatch, StepInput
from messages.clearing_pipeline import FinalizeBatch
from stores.clearing_store import ClearingStore
from stores.clearing_tb import transfer_of
from walletclient.clearing_client import ClearingClient
from walletconfig.settings import Settings
from walletcore.clearing import ClearingTable, ExternalTransaction, pending_spec, post_spec
from walletmig.bench_wallet_ops import ServerCpu, percentile
from walletmig.terminal_demo import DemoStack, clearing_worker, own_ledgers

TRANSACTIONS_MAX = 1_000_000
BATCH_TIMEOUT_S = 600.0
KIND = "ach_credit_in"  # asset debited, liability credited: no balance limit can refuse it
PARTIES = 10_000  # counterparties: 50 transactions each per hour before velocity refuses
STEP_BATCHES_MAX = 16
STEPS = ("intake", "pending", "checks", "post_void", "settle")


class ClearingBenchConfig(BaseModel):
    transactions: int = Field(default=20_000, ge=100, le=TRANSACTIONS_MAX)
    batch_size: int = Field(default=INTAKE_BATCH_MAX, ge=1, le=INTAKE_BATCH_MAX)
    concurrency: int = Field(default=4, ge=1, le=64)
    fixed_share: float = Field(default=0.5, ge=0.0, le=1.0,
                               description="offered load of the fixed run, share of saturation")
    step_batches: int = Field(default=2, ge=0, le=STEP_BATCHES_MAX,
                              description="batches run step by step, alone, for the CPU per step")


class RunFigures(BaseModel):
    name: str
    transactions: int
    seconds: float
    tx_per_s: float
    offered_tx_per_s: float | None = None
    p50_ms: float
    p99_ms: float
    settled: int
    rejected: int


class ClearingBenchReport(BaseModel):
    tx_per_s: float
    raw_tx_per_s: float
    ratio: float
    p50_ms: float
    p99_ms: float
    runs: list[RunFigures]
    raw_transactions: int
    raw_seconds: float
    cpu_ms_per_tx: dict[str, float]
    # step -> process -> CPU ms per transaction, from batches run one step at a time, alone
    # (no other batch in flight): where each process's CPU goes.
    step_cpu_ms_per_tx: dict[str, dict[str, float]] = Field(default_factory=dict)
    batch_size: int
    concurrency: int
    database: str
    notes: list[str] = Field(default_factory=list)


class _Stream:
    """Transactions of the run, numbered: every id is new."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.n = 0

    def batch(self, size: int) -> list[ExternalTransaction]:
        out = []
        for _ in range(size):
            self.n += 1
            out.append(ExternalTransaction(
                external_id=f"{self.run_id}-{self.n}", kind=KIND,
                amount=Decimal(1 + self.n % 97) / 4, currency="USD",
                counterparty=f"party-{self.n % PARTIES}"))
        return out


async def _one_batch(client: ClearingClient, txns: list[ExternalTransaction],
                     latencies_ms: list[float], totals: list[int]) -> None:
    started = time.monotonic()
    result = await client.submit_many(txns)
    assert not result.refused and len(result.accepted) == len(txns), result.refused[:3]
    outcome = await client.batch_outcome(result.batch_id, BATCH_TIMEOUT_S)
    elapsed_ms = (time.monotonic() - started) * 1e3
    latencies_ms.extend([elapsed_ms] * len(txns))
    totals[0] += outcome.settled
    totals[1] += outcome.rejected


async def _run(name: str, client: ClearingClient, stream: _Stream, config: ClearingBenchConfig,
               count: int, offered_tx_per_s: float | None) -> RunFigures:
    """`count` transactions in batches: `concurrency` in flight (saturation), or one batch
    every batch_size / offered seconds (fixed offered load, never more than 64 in flight)."""
    sizes = [min(config.batch_size, count - i) for i in range(0, count, config.batch_size)]
    latencies_ms: list[float] = []
    totals = [0, 0]
    started = time.monotonic()
    if offered_tx_per_s is None:
        gate = asyncio.Semaphore(config.concurrency)

        async def gated(size: int) -> None:
            async with gate:
                await _one_batch(client, stream.batch(size), latencies_ms, totals)

        await asyncio.gather(*(gated(size) for size in sizes))
    else:
        tasks = []
        for index, size in enumerate(sizes):
            due = started + index * config.batch_size / offered_tx_per_s
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(
                _one_batch(client, stream.batch(size), latencies_ms, totals)))
        await asyncio.gather(*tasks)
    seconds = time.monotonic() - started
    ordered = sorted(latencies_ms)
    return RunFigures(
        name=name, transactions=count, seconds=round(seconds, 2),
        tx_per_s=round(count / seconds, 1),
        offered_tx_per_s=None if offered_tx_per_s is None else round(offered_tx_per_s, 1),
        p50_ms=round(percentile(ordered, 0.5), 1), p99_ms=round(percentile(ordered, 0.99), 1),
        settled=totals[0], rejected=totals[1])


async def _raw_two_phase(stack: DemoStack, table: ClearingTable, count: int,
                         run_id: str) -> float:
    """Seconds for `count` pending transfers then their posts, in requests of the cluster's
    create max, on the run's mirrors (the same ids and content rules as the pipeline's)."""
    txns = _Stream(f"{run_id}-raw").batch(count)
    pendings = [transfer_of(pending_spec(t, table)) for t in txns]
    posts = [transfer_of(post_spec(t, table)) for t in txns]
    started = time.monotonic()
    for phase in (pendings, posts):
        results = await stack.tb.create_transfers(phase)  # cut to the request limit
        failed = [r.status for r in results if r.status is not tb.CreateTransferStatus.CREATED]
        assert not failed, failed[:3]
    return time.monotonic() - started


class _StepMeter:
    """CPU per step and process, summed over the batches run step by step."""

    def __init__(self, servers: ServerCpu) -> None:
        self._servers = servers
        self.spent_s: dict[str, dict[str, float]] = {step: {} for step in STEPS}

    @contextlib.asynccontextmanager
    async def step(self, name: str) -> AsyncIterator[None]:
        cpu0, server0 = time.process_time(), self._servers.sample()
        yield
        spent = {"bench (client + worker)": time.process_time() - cpu0,
                 **ServerCpu.spent(server0, self._servers.sample())}
        into = self.spent_s[name]
        for process, seconds in spent.items():
            into[process] = into.get(process, 0.0) + seconds

    def per_tx_ms(self, transactions: int) -> dict[str, dict[str, float]]:
        return {step: {process: round(s * 1000 / transactions, 3)
                       for process, s in spent.items()}
                for step, spent in self.spent_s.items()}


async def _step_costs(stack: DemoStack, stream: _Stream, config: ClearingBenchConfig,
                      servers: ServerCpu) -> dict[str, dict[str, float]]:
    """`step_batches` batches through the pipeline's steps called one after the other in this
    process (the activities' code, no workflow), nothing else in flight, CPU sampled around
    each step: intake (record_many), pending, checks, post_void, settle (entries + states)."""
    meter = _StepMeter(servers)
    store = ClearingStore(stack.db)
    acts = stack.activities
    for _ in range(config.step_batches):
        txns = stream.batch(config.batch_size)
        batch_id = f"steps-{uuid.uuid4().hex}"
        ids = [t.external_id for t in txns]
        async with meter.step("intake"):
            recorded = await store.record_many(txns, batch_id)
        assert len(recorded.new) == len(txns)
        async with meter.step("pending"):
            holds = await acts.reserve(StepInput(batch_id=batch_id, external_ids=ids))
        async with meter.step("checks"):
            checked = await acts.check(StepInput(batch_id=batch_id, external_ids=holds.pending))
        async with meter.step("post_void"):
            decided = await acts.decide(PostVoidBatch(batch_id=batch_id, post=checked.passed,
                                                      void=checked.failed))
        async with meter.step("settle"):
            await acts.finalize(FinalizeBatch(
                batch_id=batch_id, posted=decided.posted,
                rejected=[*holds.rejected, *decided.voided]))
    assert config.step_batches > 0
    return meter.per_tx_ms(config.step_batches * config.batch_size)


async def run_bench(settings: Settings, config: ClearingBenchConfig) -> ClearingBenchReport:
    run_id = f"bclr-{uuid.uuid4().hex[:8]}"
    settings = settings.model_copy(update={
        "mongodb_database": f"walletmig_{run_id}".replace("-", "_"),
        "migration_task_queue": f"{run_id}-clearing"})
    table = own_ledgers(random.Random())
    servers = ServerCpu(settings.state_dir)
    notes: list[str] = []
    async with clearing_worker(settings, table) as stack:
        stream = _Stream(run_id)
        warm = await _run("warm-up", stack.client, stream, config, min(200, config.batch_size),
                          None)
        cpu0, server0 = time.process_time(), servers.sample()
        saturation = await _run("saturation", stack.client, stream, config,
                                config.transactions, None)
        cpu_s = {"bench (client + worker)": time.process_time() - cpu0,
                 **ServerCpu.spent(server0, servers.sample())}
        runs = [saturation]
        if config.fixed_share > 0:
            offered = saturation.tx_per_s * config.fixed_share
            runs.append(await _run("fixed load", stack.client, stream, config,
                                   max(config.transactions // 2, config.batch_size), offered))
        steps = await _step_costs(stack, stream, config, servers) if config.step_batches else {}
        raw_seconds = await _raw_two_phase(stack, table, config.transactions, run_id)
    del warm
    if not servers.sample():
        notes.append("no stack processes recorded under the state dir: server CPU not measured")
    raw_tx_per_s = round(config.transactions / raw_seconds, 1)
    notes.extend(_bounds(cpu_s, config.transactions))
    return ClearingBenchReport(
        tx_per_s=saturation.tx_per_s, raw_tx_per_s=raw_tx_per_s,
        ratio=round(saturation.tx_per_s / raw_tx_per_s, 4), p50_ms=saturation.p50_ms,
        p99_ms=saturation.p99_ms, runs=runs, raw_transactions=config.transactions,
        raw_seconds=round(raw_seconds, 3),
        cpu_ms_per_tx={name: round(value * 1000 / config.transactions, 3)
                       for name, value in cpu_s.items()},
        step_cpu_ms_per_tx=steps,
        batch_size=config.batch_size, concurrency=config.concurrency,
        database=settings.mongodb_database, notes=notes)


def _bounds(cpu_s: dict[str, float], transactions: int) -> list[str]:
    """What each process's CPU per transaction allows at most (one core each; all of them
    share the host's cores): the smallest is what bounds the terminal."""
    ceilings = {name: transactions / seconds for name, seconds in cpu_s.items() if seconds > 0}
    if not ceilings:
        return []
    name = min(ceilings, key=lambda n: ceilings[n])
    total_ms = sum(cpu_s.values()) * 1000 / transactions
    return [f"{name} CPU bounds the terminal at ~{ceilings[name]:,.0f} tx/s (one core); all "
            f"processes together spend {total_ms:.2f} ms CPU per transaction "
            f"(~{(os.cpu_count() or 1) * 1000 / total_ms:,.0f} tx/s on {os.cpu_count()} cores)"]


def format_report(r: ClearingBenchReport) -> str:
    lines = [f"clearing end to end: {r.tx_per_s:,.0f} tx/s (p50 {r.p50_ms:.0f} ms, p99 "
             f"{r.p99_ms:.0f} ms); raw two-phase {r.raw_tx_per_s:,.0f} tx/s; ratio "
             f"{r.ratio:.2%}  (batches of {r.batch_size}, {r.concurrency} in flight)"]
    for run in r.runs:
        offered = "" if run.offered_tx_per_s is None else f" offered {run.offered_tx_per_s:,.0f}"
        lines.append(f"  {run.name:<11} {run.transactions:>8} tx in {run.seconds:>7.1f} s  "
                     f"{run.tx_per_s:>9,.0f} tx/s{offered}  p50 {run.p50_ms:>7.0f} ms  p99 "
                     f"{run.p99_ms:>7.0f} ms  settled {run.settled} rejected {run.rejected}")
    lines.append("  CPU ms per transaction: " + ", ".join(
        f"{name} {value:.2f}" for name, value in r.cpu_ms_per_tx.items()))
    for step, spent in r.step_cpu_ms_per_tx.items():
        lines.append(f"  step {step:<10} CPU ms per transaction: " + ", ".join(
            f"{name} {value:.3f}" for name, value in spent.items()))
    lines += [f"  note: {note}" for note in r.notes]
    return "\n".join(lines)
