"""MigrationWorkflow against a real Temporal dev server and MongoDB: every action, validator
messages, rollback from each phase, auto-rollback, pause, continue-as-new, archive, replay;
the Web UI console at the API level (the requests the UI's "Send an Update" dialog makes: one-
line answers without stack traces, summaries, descriptions, details), cancellation, terminate
and restart, reset, and a quarter hour idle in time-skipped time (no search-attribute
writes across several continue-as-new).

Gate evidence comes from the real reconciliation workflow over real wallets (recon_support's
env: a ledger table of the test's own): never a hand-made report. Another pair's report, an
empty scope, a missing transfer, a conservation failure and a difference still in flight each
keep the reconciliation gate shut with a reason."""

from __future__ import annotations

import asyncio
import json
import random
import string
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import tigerbeetle as tb
from pymongo.asynchronous.database import AsyncDatabase
from recon_support import Env, backfill_all, credit, run_reconciliation
from temporalio.api.common.v1 import Payload, Payloads, WorkflowExecution
from temporalio.api.enums.v1 import (
    EventType,
    ResetReapplyExcludeType,
    UpdateWorkflowExecutionLifecycleStage,
)
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.api.update.v1 import Input, Meta, Outcome, WaitPolicy
from temporalio.api.update.v1 import Request as UpdateRequestProto
from temporalio.api.workflowservice.v1 import (
    ResetWorkflowExecutionRequest,
    UpdateWorkflowExecutionRequest,
)
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer
from wallet_support import eventually, history_wanted, sandboxed_worker, save_history

from activities.migration import MigrationActivities
from messages.migration import (
    ACTIVITY_AWAIT_REVERSE_DRAIN,
    ACTOR_CANCEL,
    ACTOR_UNNAMED,
    AdvanceRequest,
    ApproveRequest,
    ForceAdvanceRequest,
    GatesView,
    MigrationConfig,
    MigrationStatus,
    PauseRequest,
    RollbackRequest,
    SetRolloutRequest,
)
from messages.reconciliation import ReconcileSummary
from registries.transfer_registry import TransferRecord, TransferRegistry
from stores.audit_log import AuditLog
from stores.bundle import open_stores
from stores.history_import import BACKFILL_HISTORY
from stores.migration_state import MigrationStateStore
from stores.read_metrics import ReadMetricsStore, ReadMode, ReadObservation, ReadOutcome
from walletconfig.settings import Settings
from walletcore.codes import SystemAccount, TransferCode
from walletcore.gates import GateThresholds
from walletcore.ids import hash_u128, system_account_id, transfer_id
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, GetBalance
from walletcore.phases import MigrationState, Phase
from walletcore.reconcile import IssueKind
from walletmig.commands.migration import start_migration_workflow
from workers.migration_worker import migration_workflow_runner as workflow_runner
from workers.process import run_worker
from workflows.migration import MigrationWorkflow
from workflows.reads import GetBalanceWorkflow
from workflows.reconciliation import ReconciliationWorkflow

WAIT_S = 30.0
ROGUE_ACCOUNT_CODE = 999  # neither a customer nor a system account
UniqueId = Callable[..., str]


def unique_scope() -> str:
    letters = random.choices(string.ascii_uppercase, k=8)
    return f"{''.join(letters[:5])}:{''.join(letters[5:])}"


def thresholds(**overrides: Any) -> GateThresholds:
    base: dict[str, Any] = dict(
        window_s=120, min_shadow_samples=20, min_cutover_samples=20, tb_primary_stable_s=1,
        auto_rollback_min_samples=20,
    )
    base.update(overrides)
    return GateThresholds(**base)


@pytest_asyncio.fixture(loop_scope="session")
async def migration_worker(
    temporal_client: Client, mongo_db: AsyncDatabase[dict[str, Any]], env: Env
) -> AsyncIterator[str]:
    """The migration workflow and the real reconciliation workflow (over the env's stores, on
    the same database the migration's evidence reads) on one task queue."""
    acts = MigrationActivities(mongo_db)
    await acts.ensure_indexes()
    async with sandboxed_worker(temporal_client, "migration-test",
                                [MigrationWorkflow, ReconciliationWorkflow],
                                [*acts.all(), *env.reconcile_activities().all()]) as (_, queue):
        yield queue


async def start(client: Client, task_queue: str, scope: str, tmp_path: Path,
                **config: Any) -> WorkflowHandle[Any, MigrationStatus]:
    """Started as `walletmig migration start` does (summary and details for the Web UI)."""
    config.setdefault("evidence_interval_s", 0.3)
    cfg = MigrationConfig(
        migration_id=config.pop("migration_id", f"m-{uuid.uuid4().hex[:10]}"), scopes=[scope],
        thresholds=config.pop("thresholds", thresholds()), state_cache_ttl_s=0,
        archive_dir=str(tmp_path / "archive"), **config,
    )
    return await start_migration_workflow(client, cfg, task_queue=task_queue)


async def evidence_rounds_pass(handle: WorkflowHandle[Any, MigrationStatus]) -> None:
    """Until the workflow has run an evidence round that started after this call (what a check
    that nothing happened meanwhile needs: a fixed wait may see none on a loaded host)."""
    since = datetime.now(UTC)

    async def newer() -> bool:
        status: MigrationStatus = await handle.query(MigrationWorkflow.status)
        at = status.evidence.collected_at if status.evidence is not None else None
        return at is not None and at > since

    await eventually(newer, "an evidence round")


async def gates_pass(handle: WorkflowHandle[Any, MigrationStatus]) -> None:
    async def check() -> bool:
        view: GatesView = await handle.query(MigrationWorkflow.gates)
        return view.all_passed

    await eventually(check, "gates to pass")


async def seed_and_backfill(env: Env, pair: str, unique_id: UniqueId, n: int = 2) -> None:
    """Legacy wallets of `pair` with a credit each, imported by the real backfill."""
    currency, country = pair.split(":")
    for i in range(n):
        key = WalletKey(client_id=unique_id(f"c{i}"), country=country, currency=currency)
        await credit(env, key, unique_id("t"), "10")
    await backfill_all(env, [pair])


async def reconcile(queue: str, client: Client, pairs: list[str]) -> ReconcileSummary:
    return await run_reconciliation((client, queue), pairs, recheck_delay_s=0.2)


async def observe(db: AsyncDatabase[Any], scope: str, mode: ReadMode, outcome: ReadOutcome,
                  n: int, *, tb_ms: float = 1.0, mongo_ms: float = 10.0) -> None:
    store = ReadMetricsStore(db)
    for _ in range(n):
        store.record(ReadObservation(scope=scope, mode=mode, outcome=outcome, tb_ms=tb_ms,
                                     mongo_ms=mongo_ms, at=datetime.now(UTC)))
    await store.flush()


async def replays_on_current_code(client: Client,
                                  handle: WorkflowHandle[Any, MigrationStatus]) -> None:
    """The run's whole history replays on the current code (deterministic)."""
    await Replayer(workflows=[MigrationWorkflow], workflow_runner=workflow_runner(),
                   data_converter=client.data_converter).replay_workflow(
        await handle.fetch_history())


async def expect_rejected(call: Awaitable[Any], *fragments: str) -> str:
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await call
    message = str(info.value.cause)
    for fragment in fragments:
        assert fragment in message, message
    return message


async def test_full_migration_path(
    temporal_client: Client, migration_worker: str, mongo_db: AsyncDatabase[Any],
    tmp_path: Path, env: Env, unique_id: UniqueId,
) -> None:
    scope = env.pairs[0]
    handle = await start(temporal_client, migration_worker, scope, tmp_path)
    state_store = MigrationStateStore(mongo_db, cache_ttl_s=0)
    audit = AuditLog(mongo_db)
    mid = (await handle.query(MigrationWorkflow.status)).migration_id

    status = await handle.execute_update(MigrationWorkflow.advance, AdvanceRequest(actor="ana"))
    assert status.phase == Phase.DUAL_WRITE and status.epoch == 1
    published = await state_store.get(scope)
    assert (published.phase, published.epoch, published.migration_id) == (
        Phase.DUAL_WRITE, 1, mid)

    # Unproven: no backfill, no reconciliation. Rejected with the gate, nothing written.
    await expect_rejected(
        handle.execute_update(MigrationWorkflow.advance, AdvanceRequest(actor="ana")),
        "gate backfill_complete: measured not complete, threshold complete",
        "gate reconciliation_match_rate: measured no report",
    )
    assert (await state_store.get(scope)).epoch == 1
    assert len(await audit.list(mid)) == 1

    await seed_and_backfill(env, scope, unique_id)
    clean = await reconcile(migration_worker, temporal_client, [scope])
    assert (clean.wallets, clean.match_rate, clean.findings) == (2, 1.0, {})
    await gates_pass(handle)
    status = await handle.execute_update(MigrationWorkflow.advance,
                                         AdvanceRequest(actor="ana", reason="backfill done"))
    assert status.phase == Phase.SHADOW_READ

    await observe(mongo_db, scope, ReadMode.SHADOW, ReadOutcome.MATCH, 30)
    await gates_pass(handle)
    status = await handle.execute_update(MigrationWorkflow.advance, AdvanceRequest())
    assert (status.phase, status.rollout_percent) == (Phase.READ_CUTOVER, 10)

    await expect_rejected(
        handle.execute_update(MigrationWorkflow.set_rollout, SetRolloutRequest(percent=50)),
        "gate fallback_rate: measured no data over 0 cutover reads",
    )
    for expected in (50, 90, 100):
        await observe(mongo_db, scope, ReadMode.CUTOVER, ReadOutcome.TB_SERVED, 25)
        await gates_pass(handle)
        status = await handle.execute_update(MigrationWorkflow.advance, AdvanceRequest())
        assert status.rollout_percent == expected
    await reconcile(migration_worker, temporal_client, [scope])  # fresh evidence, as an
    await gates_pass(handle)  # engineer re-runs it: last full reconciliation = 100 %
    status = await handle.execute_update(MigrationWorkflow.advance, AdvanceRequest())
    assert status.phase == Phase.TB_PRIMARY

    await expect_rejected(
        handle.execute_update(MigrationWorkflow.advance, AdvanceRequest()), "confirm=true")
    await expect_rejected(
        handle.execute_update(MigrationWorkflow.set_rollout, SetRolloutRequest(percent=10)),
        "read_cutover only")
    await gates_pass(handle)
    status = await handle.execute_update(MigrationWorkflow.advance,
                                         AdvanceRequest(confirm=True, actor="ana"))
    assert status.phase == Phase.COMPLETE and status.archive is not None
    assert Path(status.archive.path).exists() and len(status.archive.sha256) == 64
    result = await handle.result()
    assert result.phase == Phase.COMPLETE

    entries = await audit.list(mid)
    assert [e.to_phase for e in entries][-2:] == [Phase.TB_PRIMARY, Phase.COMPLETE]
    assert entries[1].reason == "backfill done" and entries[1].actor == "ana"
    assert any("gate" in g for g in entries[1].gates)
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    final = await state_store.get(scope)
    assert (final.phase, final.epoch) == (Phase.COMPLETE, result.epoch)

    desc = await handle.describe()
    assert desc.typed_search_attributes is not None
    phase_attr = [p.value for p in desc.typed_search_attributes
                  if p.key.name == "MigrationPhase"]
    assert phase_attr == ["complete"]

    if history_wanted("migration_full_path"):
        await save_history(handle, "migration_full_path")
    await replays_on_current_code(temporal_client, handle)


async def in_dual_write(
    client: Client, queue: str, scope: str, tmp_path: Path
) -> WorkflowHandle[Any, MigrationStatus]:
    handle = await start(client, queue, scope, tmp_path)
    status = await handle.execute_update(MigrationWorkflow.advance, AdvanceRequest())
    assert status.phase == Phase.DUAL_WRITE
    return handle


async def reconciliation_gate_shut(
    handle: WorkflowHandle[Any, MigrationStatus], *fragments: str
) -> None:
    """The reconciliation gate of the next step fails for the reason in `fragments` (once the
    evidence has seen the report), and an advance is refused with it."""
    async def shut_for_that_reason() -> bool:
        view: GatesView = await handle.query(MigrationWorkflow.gates)
        gate = next(g for g in view.gates if g.name == "reconciliation_match_rate")
        return not gate.passed and all(f in gate.measured for f in fragments)

    await eventually(shut_for_that_reason, f"the reconciliation gate to say {fragments}")
    await expect_rejected(handle.execute_update(MigrationWorkflow.advance, AdvanceRequest()),
                          "gate reconciliation_match_rate: measured", *fragments)
    assert (await handle.query(MigrationWorkflow.status)).phase == Phase.DUAL_WRITE


async def test_another_pairs_report_is_not_evidence(
    temporal_client: Client, migration_worker: str, tmp_path: Path, env: Env,
    unique_id: UniqueId,
) -> None:
    scope, other = env.pairs[0], env.pairs[1]
    handle = await in_dual_write(temporal_client, migration_worker, scope, tmp_path)
    await seed_and_backfill(env, scope, unique_id)
    await seed_and_backfill(env, other, unique_id)
    theirs = await reconcile(migration_worker, temporal_client, [other])
    assert theirs.wallets == 2 and theirs.match_rate == 1.0 and not theirs.alerts
    await reconciliation_gate_shut(handle, "no report", f"covers {other} only")
    # The scope's own clean report opens it: the gate is shut for the reason above only.
    await reconcile(migration_worker, temporal_client, [scope])
    await gates_pass(handle)
    status = await handle.execute_update(MigrationWorkflow.advance, AdvanceRequest())
    assert status.phase == Phase.SHADOW_READ
    await handle.terminate("test done")


async def test_an_empty_scope_is_no_data(
    temporal_client: Client, migration_worker: str, tmp_path: Path, env: Env,
) -> None:
    scope = env.pairs[2]  # no legacy wallet
    handle = await in_dual_write(temporal_client, migration_worker, scope, tmp_path)
    empty = await reconcile(migration_worker, temporal_client, [scope])
    assert empty.wallets == 0 and empty.match_rate is None and not empty.alerts
    await reconciliation_gate_shut(handle, f"no data: report {empty.run_id} compared 0 wallets")
    await handle.terminate("test done")


async def test_a_missing_transfer_keeps_the_gate_shut(
    temporal_client: Client, migration_worker: str, tmp_path: Path, env: Env,
    unique_id: UniqueId,
) -> None:
    scope = env.pairs[0]
    handle = await in_dual_write(temporal_client, migration_worker, scope, tmp_path)
    await seed_and_backfill(env, scope, unique_id)
    # A Transfer Registry record whose transfer never reached TigerBeetle (real writer).
    currency, country = scope.split(":")
    record = await env.accounts.get_or_create(
        WalletKey(client_id=unique_id("c"), country=country, currency=currency),
        allow_overdraft=False)
    ghost = unique_id("ghost")
    await env.transfers.record(TransferRecord(
        transaction_id=ghost, transfer_id=transfer_id(ghost), wallet=record.wallet,
        account_id=record.account_id, type="credit", amount_minor=100,
        created_at=datetime.now(UTC)))
    found = await reconcile(migration_worker, temporal_client, [scope])
    assert found.findings.get(IssueKind.MISSING_TRANSFER) == 1, found.findings
    await reconciliation_gate_shut(handle, "findings:", "missing_transfer 1")
    await handle.terminate("test done")


async def test_money_not_conserved_keeps_the_gate_shut(
    temporal_client: Client, migration_worker: str, tmp_path: Path, env: Env,
    unique_id: UniqueId,
) -> None:
    """Every wallet matches, yet money left the ledger's customer and system accounts: a
    transfer from the Reserve to an account that is neither, made behind the platform's back."""
    scope = env.pairs[0]
    handle = await in_dual_write(temporal_client, migration_worker, scope, tmp_path)
    await seed_and_backfill(env, scope, unique_id)
    currency, country = scope.split(":")
    ledger = env.ledgers.ledger_of(currency, country)
    rogue = hash_u128(unique_id("rogue"))
    (created,) = await env.tb_client.create_accounts(
        [tb.Account(id=rogue, ledger=ledger, code=ROGUE_ACCOUNT_CODE)])
    assert created.status == tb.CreateAccountStatus.CREATED, created
    (moved,) = await env.tb_client.create_transfers([tb.Transfer(
        id=hash_u128(unique_id("leak")), debit_account_id=system_account_id(
            ledger, SystemAccount.RESERVE), credit_account_id=rogue, amount=500,
        ledger=ledger, code=int(TransferCode.CREDIT))])
    assert moved.status == tb.CreateTransferStatus.CREATED, moved
    found = await reconcile(migration_worker, temporal_client, [scope])
    assert found.wallets == 2 and found.real == 0 and not found.conservation_ok
    assert found.findings == {IssueKind.CONSERVATION: 1}
    await reconciliation_gate_shut(handle, "100% over 2 wallets", "findings: conservation 1")
    await handle.terminate("test done")


async def test_a_difference_still_in_flight_keeps_the_gate_shut(
    temporal_client: Client, migration_worker: str, tmp_path: Path, env: Env,
    unique_id: UniqueId,
) -> None:
    """A legacy write whose TigerBeetle side has not landed by the re-check: in flight at the
    first read, not cleared at the re-check, so real (in_flight_not_cleared): no gate passes."""
    scope = env.pairs[0]
    handle = await in_dual_write(temporal_client, migration_worker, scope, tmp_path)
    await seed_and_backfill(env, scope, unique_id, n=1)
    currency, country = scope.split(":")
    (wallet,) = [r["wallet"] for r in await env.legacy.page_wallets(
        after=None, limit=10, currency=currency, country=country)]
    await credit(env, wallet, unique_id("late"), "1")  # its backlog item never ran
    found = await reconcile(migration_worker, temporal_client, [scope])
    assert (found.in_flight, found.real) == (0, 1) and found.alerts, found
    assert found.findings.get("in_flight_not_cleared") == 1, found.findings
    await reconciliation_gate_shut(handle, "findings: in_flight_not_cleared 1")
    await handle.terminate("test done")


async def test_dual_write_waits_for_a_running_history_import(
    temporal_client: Client, migration_worker: str, mongo_db: AsyncDatabase[Any],
    tmp_path: Path,
) -> None:
    """Imported transfers must be newer than every transfer: no dual-write may start while a
    `backfill --with-history` of the scope runs."""
    scope = unique_scope()
    handle = await start(temporal_client, migration_worker, scope, tmp_path)
    history = mongo_db[BACKFILL_HISTORY]
    await history.insert_one({"_id": scope, "pairs": [scope], "status": "running"})

    async def gate_fails() -> bool:
        view: GatesView = await handle.query(MigrationWorkflow.gates)
        return any(g.name == "history_import_finished" and not g.passed for g in view.gates)

    await eventually(gate_fails, "the history import gate to close")
    await expect_rejected(
        handle.execute_update(MigrationWorkflow.advance, AdvanceRequest()),
        "gate history_import_finished: measured 1 history import(s) running")
    await history.update_one({"_id": scope}, {"$set": {"status": "done"}})
    await gates_pass(handle)
    status = await handle.execute_update(MigrationWorkflow.advance, AdvanceRequest())
    assert status.phase == Phase.DUAL_WRITE


async def test_rollback_from_every_phase(
    temporal_client: Client, migration_worker: str, mongo_db: AsyncDatabase[Any],
    tmp_path: Path,
) -> None:
    scope = unique_scope()
    handle = await start(temporal_client, migration_worker, scope, tmp_path)
    state_store = MigrationStateStore(mongo_db, cache_ttl_s=0)
    await expect_rejected(
        handle.execute_update(MigrationWorkflow.rollback, RollbackRequest(to=Phase.LEGACY)),
        "not earlier than the current phase legacy")
    await expect_rejected(
        handle.execute_update(MigrationWorkflow.force_advance, ForceAdvanceRequest(reason=" ")),
        "needs a reason")
    epoch = 0
    forward = [Phase.DUAL_WRITE, Phase.SHADOW_READ, Phase.READ_CUTOVER, Phase.TB_PRIMARY]
    for i, phase in enumerate(forward):
        while (await handle.query(MigrationWorkflow.status)).phase != phase:
            await handle.execute_update(MigrationWorkflow.force_advance,
                                        ForceAdvanceRequest(reason="test", confirm=False))
            epoch += 1
        back = Phase.LEGACY if i == 0 else forward[i - 1]
        status = await handle.execute_update(
            MigrationWorkflow.rollback, RollbackRequest(to=back, reason="drill"))
        epoch += 1
        assert status.phase == back and status.epoch == epoch
        assert status.rollout_percent == (100 if back == Phase.READ_CUTOVER else 0)
        published = await state_store.get(scope)
        assert (published.phase, published.epoch) == (back, epoch)
    status = await handle.query(MigrationWorkflow.status)
    assert status.recent_actions[-1].action == "rollback"
    await handle.terminate("test done")


async def test_pause_auto_rollback_and_continue_as_new(
    temporal_client: Client, migration_worker: str, mongo_db: AsyncDatabase[Any],
    tmp_path: Path,
) -> None:
    scope = unique_scope()
    handle = await start(temporal_client, migration_worker, scope, tmp_path,
                         actions_per_run_max=3)
    for _ in range(3):
        await handle.execute_update(MigrationWorkflow.force_advance,
                                    ForceAdvanceRequest(reason="to cutover", actor="bob"))
    # actions_per_run_max=3: the run continues-as-new; state travels with it.
    async def rotated() -> bool:
        return (await handle.query(MigrationWorkflow.status)).runs >= 2

    await eventually(rotated, "continue-as-new")
    status = await handle.query(MigrationWorkflow.status)
    assert (status.phase, status.rollout_percent, status.epoch) == (Phase.READ_CUTOVER, 10, 3)

    await handle.execute_update(MigrationWorkflow.pause, PauseRequest(actor="bob"))
    await expect_rejected(handle.execute_update(MigrationWorkflow.advance, AdvanceRequest()),
                          "paused")
    await expect_rejected(handle.execute_update(MigrationWorkflow.pause, PauseRequest()),
                          "already paused")
    # TigerBeetle failing: 30 of 30 cutover reads fell back. Paused = no automatic action.
    await observe(mongo_db, scope, ReadMode.CUTOVER, ReadOutcome.FALLBACK_ERROR, 30)

    async def failures_seen() -> bool:
        """An evidence round measured them (a fixed wait could end before one on a loaded
        host, and prove nothing): unpaused, that round would have rolled back."""
        evidence = (await handle.query(MigrationWorkflow.status)).evidence
        return evidence is not None and evidence.cutover_fallbacks >= 30

    await eventually(failures_seen, "an evidence round to see the failed reads")
    assert (await handle.query(MigrationWorkflow.status)).phase == Phase.READ_CUTOVER
    await handle.execute_update(MigrationWorkflow.resume, PauseRequest(actor="bob"))

    async def rolled_back() -> bool:
        return (await handle.query(MigrationWorkflow.status)).phase == Phase.SHADOW_READ

    await eventually(rolled_back, "automatic rollback")
    status = await handle.query(MigrationWorkflow.status)
    assert status.auto_rollbacks == 1
    last = status.recent_actions[-1]
    assert last.automatic and last.action == "auto_rollback"
    assert "error rate 100% over 30 reads" in last.reason

    # The status shows the action as soon as it is decided; its audit entry is written by an
    # activity right after (fresh7 under load read the log in between).
    async def audited() -> bool:
        entries = await AuditLog(mongo_db).list(status.migration_id)
        return entries[-1].seq == last.seq

    await eventually(audited, "the automatic rollback's audit entry")
    entries = await AuditLog(mongo_db).list(status.migration_id)
    assert entries[-1].automatic and entries[-1].actor == "migration-workflow"
    await handle.terminate("test done")


async def to_tb_primary(handle: WorkflowHandle[Any, MigrationStatus]) -> None:
    while (await handle.query(MigrationWorkflow.status)).phase != Phase.TB_PRIMARY:
        await handle.execute_update(MigrationWorkflow.force_advance,
                                    ForceAdvanceRequest(reason="to tb_primary", actor="test"))


async def answered_by_tigerbeetle(db: AsyncDatabase[Any], scope: str) -> tuple[str, str]:
    """A tb_primary operation: in the Transfer Registry, not yet projected to MongoDB."""
    currency, country = scope.split(":")
    key = WalletKey(client_id=f"c-{uuid.uuid4().hex[:6]}", country=country, currency=currency)
    txn = f"t-{uuid.uuid4().hex}"
    await TransferRegistry(db).record(TransferRecord(
        transaction_id=txn, transfer_id=transfer_id(txn), wallet=key,
        account_id=random.randint(1, 2**127), type="credit", amount_minor=100,
        created_at=datetime.now(UTC)))
    return key.canonical, txn


async def test_complete_waits_for_the_reverse_projection(
    temporal_client: Client, migration_worker: str, mongo_db: AsyncDatabase[Any],
    tmp_path: Path,
) -> None:
    scope = unique_scope()
    handle = await start(temporal_client, migration_worker, scope, tmp_path)
    await to_tb_primary(handle)
    wallet, txn = await answered_by_tigerbeetle(mongo_db, scope)

    async def gate_sees_it() -> bool:
        view: GatesView = await handle.query(MigrationWorkflow.gates)
        return any(g.name == "unapplied_mongodb_writes" and g.measured.startswith("1 ")
                   for g in view.gates)

    await eventually(gate_sees_it, "the reverse-projection gate to count the operation")
    await expect_rejected(
        handle.execute_update(MigrationWorkflow.advance, AdvanceRequest(confirm=True)),
        "gate unapplied_mongodb_writes: measured 1 (reverse projection backlog), "
        "threshold <= 0 (FAILED)")
    assert (await handle.query(MigrationWorkflow.status)).phase == Phase.TB_PRIMARY

    # Forced past the gate: complete is published, but the archive waits for MongoDB.
    forced = asyncio.create_task(handle.execute_update(
        MigrationWorkflow.force_advance,
        ForceAdvanceRequest(reason="drill", confirm=True, actor="test")))

    async def completing() -> bool:
        status: MigrationStatus = await handle.query(MigrationWorkflow.status)
        return status.phase == Phase.COMPLETE

    async def drain_counted_it() -> bool:
        """The drain activity runs and has counted the missing operation (its heartbeat): the
        archive, which comes after it, waits (a fixed wait may see no drain poll yet)."""
        described = await handle.describe()
        for pending in described.raw_description.pending_activities:
            if (pending.activity_type.name == ACTIVITY_AWAIT_REVERSE_DRAIN
                    and pending.heartbeat_details.payloads):
                return await temporal_client.data_converter.decode(
                    pending.heartbeat_details.payloads) == [1]
        return False

    await eventually(completing, "complete to be published")
    await eventually(drain_counted_it, "the reverse drain to count the missing operation")
    status = await handle.query(MigrationWorkflow.status)
    assert status.archive is None and not forced.done()  # still draining
    # The wallet workflow's reverse projection lands: the archive is written with it.
    await mongo_db["wallet_transactions"].insert_one({
        "_id": txn, "wallet": wallet, "type": "credit", "wallet_version": 1,
        "created_at": datetime.now(UTC)})
    status = await asyncio.wait_for(forced, WAIT_S)
    assert status.archive is not None and status.archive.unprojected_writes == 0
    assert status.archive.transactions == 1 and txn in Path(status.archive.path).read_text()
    await replays_on_current_code(temporal_client, handle)


async def test_complete_archives_after_the_drain_timeout_and_says_what_is_missing(
    temporal_client: Client, migration_worker: str, mongo_db: AsyncDatabase[Any],
    tmp_path: Path,
) -> None:
    scope = unique_scope()
    handle = await start(temporal_client, migration_worker, scope, tmp_path,
                         complete_drain_timeout_s=1.0)
    await to_tb_primary(handle)
    await answered_by_tigerbeetle(mongo_db, scope)  # MongoDB refused it: never arrives
    status = await handle.execute_update(
        MigrationWorkflow.force_advance,
        ForceAdvanceRequest(reason="drill", confirm=True, actor="test"))
    assert status.phase == Phase.COMPLETE and status.archive is not None
    assert status.archive.unprojected_writes == 1


async def asked_and_approved(
    handle: WorkflowHandle[Any, MigrationStatus], req: ForceAdvanceRequest, approver: str
) -> MigrationStatus:
    """Four eyes: `req.actor` asks, nothing moves, `approver` approves and it runs."""
    before = await handle.query(MigrationWorkflow.status)
    asked = await handle.execute_update(MigrationWorkflow.force_advance, req)
    assert asked.pending_approval is not None and asked.pending_approval.actor == req.actor
    assert (asked.phase, asked.epoch) == (before.phase, before.epoch), "ran unapproved"
    assert "awaits approval" in asked.summary, asked.summary
    done: MigrationStatus = await handle.execute_update(
        MigrationWorkflow.approve, ApproveRequest(actor=approver, reason="looked at it"))
    assert done.pending_approval is None and done.epoch == before.epoch + 1
    return done


async def test_four_eyes_on_force_advance_and_complete(
    temporal_client: Client, migration_worker: str, mongo_db: AsyncDatabase[Any],
    tmp_path: Path,
) -> None:
    scope = unique_scope()
    handle = await start(temporal_client, migration_worker, scope, tmp_path,
                         approvals_required=1, complete_drain_timeout_s=1.0)
    mid = (await handle.query(MigrationWorkflow.status)).migration_id
    await expect_rejected(handle.execute_update(
        MigrationWorkflow.approve, ApproveRequest(actor="bob")), "nothing awaits approval")
    asked = await handle.execute_update(
        MigrationWorkflow.force_advance, ForceAdvanceRequest(actor="ana", reason="drill"))
    assert asked.phase == Phase.LEGACY and asked.pending_approval is not None
    # The requester cannot approve their own request, nor can nobody; a second one waits.
    await expect_rejected(handle.execute_update(
        MigrationWorkflow.approve, ApproveRequest(actor="ana")),
        "approve refused: ana asked for force_advance", "another engineer must approve it")
    await expect_rejected(handle.execute_update(MigrationWorkflow.approve, {}),
                          "name the approver")
    await expect_rejected(handle.execute_update(
        MigrationWorkflow.force_advance, ForceAdvanceRequest(actor="carl", reason="me too")),
        "already awaits `approve`")
    await evidence_rounds_pass(handle)  # an unapproved request never runs
    status = await handle.query(MigrationWorkflow.status)
    assert (status.phase, status.epoch) == (Phase.LEGACY, 0)
    done = await handle.execute_update(MigrationWorkflow.approve, ApproveRequest(actor="bob"))
    assert (done.phase, done.epoch) == (Phase.DUAL_WRITE, 1)
    while (await handle.query(MigrationWorkflow.status)).phase != Phase.TB_PRIMARY:
        await asked_and_approved(handle, ForceAdvanceRequest(actor="ana", reason="drill"), "bob")

    # complete: ana cannot approve her own; it does not run until bob does.
    asked = await handle.execute_update(MigrationWorkflow.force_advance, ForceAdvanceRequest(
        actor="ana", reason="finish", confirm=True))
    assert asked.phase == Phase.TB_PRIMARY and asked.pending_approval is not None
    await expect_rejected(handle.execute_update(
        MigrationWorkflow.approve, ApproveRequest(actor="ana")), "another engineer")
    await evidence_rounds_pass(handle)
    assert (await handle.query(MigrationWorkflow.status)).phase == Phase.TB_PRIMARY
    done = await handle.execute_update(MigrationWorkflow.approve, ApproveRequest(actor="bob"))
    assert done.phase == Phase.COMPLETE and done.archive is not None

    entries = await AuditLog(mongo_db).list(mid)
    requested = [e for e in entries if e.action == "approval_requested"]
    applied = [e for e in entries if e.action == "force_advance"]
    assert len(requested) == len(applied) == 8
    assert all(e.actor == "ana" and e.from_phase == e.to_phase for e in requested)
    assert all(e.actor == "ana" and "approved by bob" in e.reason for e in applied)
    assert all(e.request is not None and e.request["approved_by"] == "bob" for e in applied)
    assert applied[-1].to_phase == Phase.COMPLETE
    await replays_on_current_code(temporal_client, handle)


async def test_worker_records_served_reads_as_gate_evidence(
    temporal_client: Client, settings: Settings
) -> None:
    """The read workflows' activities record their observations and the worker process flushes
    them: the migration gates see reads served through Temporal, not only direct ones."""
    queue = f"reads-{uuid.uuid4().hex[:8]}"
    isolated = settings.model_copy(update={
        "mongodb_database": f"reads_{uuid.uuid4().hex[:8]}", "wallet_task_queue": queue,
        "migration_task_queue": queue})
    wallet = WalletKey(client_id=f"c-{uuid.uuid4().hex[:8]}", country="USA", currency="USD")
    since = datetime.now(UTC)
    async with open_stores(isolated) as stores:
        await stores.legacy.add_credit(AddCredit(
            wallet=wallet, transaction_id=f"t-{uuid.uuid4().hex}", amount=Decimal("5.00"),
            allow_overdraft=False))
        await stores.migration.set(MigrationState(scope="USD:USA", phase=Phase.SHADOW_READ,
                                                  epoch=1))
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(isolated, stop=stop))
        try:
            balance = await temporal_client.execute_workflow(
                GetBalanceWorkflow.run, GetBalance(wallet=wallet),
                id=f"read-{uuid.uuid4().hex[:8]}", task_queue=queue)
            assert balance.credit == Decimal("5.00")  # MongoDB answered (shadow_read)
            metrics = ReadMetricsStore(stores.db)

            async def recorded() -> bool:
                summary = await metrics.summary(["USD:USA"], since)
                return summary.tb_reads >= 1  # the shadow TigerBeetle read, compared

            await eventually(recorded, "the shadow read's observation to be flushed")
        finally:
            stop.set()
            await asyncio.wait_for(worker, WAIT_S)


# ---- the Web UI console ------------------------------------------------------------------------


async def ui_update(client: Client, handle: WorkflowHandle[Any, Any], name: str,
                    data: str | None) -> Outcome:
    """What the Web UI's "Send an Update" dialog sends: the typed Data as one json/plain
    payload, or no payload at all when Data is left empty; waits for the outcome."""
    payloads = [] if data is None else [
        Payload(metadata={"encoding": b"json/plain"}, data=data.encode())]
    request = UpdateWorkflowExecutionRequest(
        namespace=client.namespace, workflow_execution=WorkflowExecution(workflow_id=handle.id),
        request=UpdateRequestProto(meta=Meta(update_id=str(uuid.uuid4()), identity="webui"),
                                   input=Input(name=name, args=Payloads(payloads=payloads))),
        wait_policy=WaitPolicy(lifecycle_stage=UpdateWorkflowExecutionLifecycleStage.
                               UPDATE_WORKFLOW_EXECUTION_LIFECYCLE_STAGE_COMPLETED),
    )
    for _ in range(10):  # the server answers a long poll that ran out with no outcome yet
        response = await client.workflow_service.update_workflow_execution(request)
        if response.HasField("outcome"):
            return response.outcome
    raise AssertionError(f"{name}: no outcome")


async def ui_refused(client: Client, handle: WorkflowHandle[Any, Any], name: str,
                     data: str | None) -> str:
    """The failure the UI shows: its message, one line, and no stack trace under it."""
    outcome = await ui_update(client, handle, name, data)
    assert outcome.HasField("failure"), f"{name} {data}: accepted"
    failure = outcome.failure
    assert failure.stack_trace == "" and not failure.HasField("cause"), failure
    assert "\n" not in failure.message and failure.message, failure.message
    return failure.message


async def ui_accepted(client: Client, handle: WorkflowHandle[Any, Any], name: str,
                      data: str | None) -> dict[str, Any]:
    outcome = await ui_update(client, handle, name, data)
    assert outcome.HasField("success"), outcome.failure.message
    result: dict[str, Any] = json.loads(outcome.success.payloads[0].data)
    assert next(iter(result)) == "summary", "the result begins with its summary"
    return result


async def test_web_ui_updates_answer_in_one_line(
    temporal_client: Client, migration_worker: str, mongo_db: AsyncDatabase[Any],
    tmp_path: Path,
) -> None:
    client = temporal_client
    handle = await start(client, migration_worker, unique_scope(), tmp_path)
    mid = (await handle.query(MigrationWorkflow.status)).migration_id

    # Empty Data: every default. The answer starts with what happened.
    done = await ui_accepted(client, handle, "advance", None)
    assert done["summary"] == "advanced legacy → dual_write (epoch 1)"
    assert done["phase"] == "dual_write"

    assert await ui_refused(client, handle, "advance", '{"reson": "gates green"}') == (
        'advance: unknown field "reson"; allowed: reason, actor, confirm')
    assert await ui_refused(client, handle, "rollback", '{"to": "Legacy"}') == (
        'rollback: "to" must be one of legacy, dual_write, shadow_read, read_cutover, '
        'tb_primary (got "Legacy")')
    assert await ui_refused(client, handle, "rollback", None) == (
        'rollback: "to" is required, e.g. {"to": "shadow_read", "actor": "ana", '
        '"reason": "p95 regression"}')
    assert await ui_refused(client, handle, "set_rollout", '{"percent": 150}') == (
        'set_rollout: "percent" must be an integer 0..100 (got 150)')
    assert await ui_refused(client, handle, "force_advance", '{"reason": "x", "confirm": '
                                                              '"yes"}') == (
        'force_advance: "confirm" must be true or false (got "yes")')
    assert await ui_refused(client, handle, "pause", '["ana"]') == (
        'pause: Data must be a JSON object such as {"actor": "ana", "reason": "incident 123"} '
        '(got ["ana"])')

    # A refused gate: what blocks (measured, threshold) and what unblocks it, one line.
    refused = await ui_refused(client, handle, "advance", None)
    assert refused.startswith(
        "advance refused: cannot advance dual_write -> shadow_read: gate backfill_complete: "
        "measured not complete, threshold complete (FAILED)"), refused
    assert "Next: run `walletmig backfill start`" in refused, refused
    assert "`walletmig reconcile run`" in refused and "force_advance" in refused, refused

    paused = await ui_accepted(client, handle, "pause", '{"actor": "ana", "reason": "drill"}')
    assert paused["summary"] == "paused in dual_write (epoch 1)" and paused["paused"]
    assert await ui_refused(client, handle, "advance", "{}") == (
        "advance refused: migration is paused: resume it first. Next: send `resume` "
        "(or `walletmig migration resume`)")
    assert (await ui_accepted(client, handle, "resume", None))["summary"] == (
        "resumed in dual_write (epoch 1)")

    # The SDK client sees the same: the failure carries no stack trace.
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await handle.execute_update("advance", {"reson": 1})
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "InvalidUpdateInput"
    assert cause.failure is not None and cause.failure.stack_trace == ""

    # The audit keeps who acted and the input as sent.
    entries = await AuditLog(mongo_db).list(mid)
    assert [(e.action, e.actor, e.request) for e in entries] == [
        ("advance", ACTOR_UNNAMED, {}),
        ("pause", "ana", {"actor": "ana", "reason": "drill"}),
        ("resume", ACTOR_UNNAMED, {}),
    ]
    assert all(e.update_id for e in entries)
    await handle.terminate("test done")


async def test_web_ui_page_reads_well(
    temporal_client: Client, migration_worker: str, tmp_path: Path,
) -> None:
    """Summary, details, descriptions and the current details as the UI gets them."""
    handle = await start(temporal_client, migration_worker, unique_scope(), tmp_path)
    await handle.execute_update(MigrationWorkflow.advance,
                                AdvanceRequest(actor="ana", reason="dual write on"))
    desc = await handle.describe()
    mid = (await handle.query(MigrationWorkflow.status)).migration_id
    summary, details = await desc.static_summary(), await desc.static_details()
    assert summary is not None and mid in summary and "Current Details" in summary
    assert details is not None and '`rollback`' in details and '"actor"' in details
    assert "cancellation request is refused" in details

    metadata: WorkflowMetadata = await handle.query("__temporal_workflow_metadata",
                                                     result_type=WorkflowMetadata)
    updates = {d.name: d.description for d in metadata.definition.update_definitions}
    assert set(updates) == {"advance", "force_advance", "rollback", "set_rollout", "pause",
                            "resume", "approve"}
    # approve's example names another engineer than the requests' (four eyes).
    assert all('"actor": "ana"' in text for name, text in updates.items() if name != "approve")
    assert '"actor": "bob"' in updates["approve"], updates
    queries = {d.name: d.description for d in metadata.definition.query_definitions}
    assert queries["status"] and queries["gates"]

    async def collected() -> bool:
        md: WorkflowMetadata = await handle.query("__temporal_workflow_metadata",
                                                   result_type=WorkflowMetadata)
        return "evidence: collecting" not in md.current_details

    await eventually(collected, "the first evidence")
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    text = metadata.current_details
    first = text.splitlines()[0]
    for part in ("**dual_write**", "rollout 0%", "running", "since ", "epoch 1", "evidence "):
        assert part in first, first
    assert "**FAIL** backfill_complete: not complete (threshold complete)" in text, text
    assert "Next: run `walletmig backfill start`" in text
    assert "**ana**: advanced legacy → dual_write (epoch 1): dual write on" in text, text
    assert not any(line.startswith("|") for line in text.splitlines()), "no tables"
    # Every list is its own block (the renderer needs the blank line before it).
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("- ") and not lines[i - 1].startswith("- "):
            assert lines[i - 1] == "", (lines[i - 1], line)
    status = await handle.query(MigrationWorkflow.status)
    assert status.summary.startswith("dual_write · rollout 0% · running · since ")
    await handle.terminate("test done")


async def test_a_cancellation_request_is_refused_and_recorded(
    temporal_client: Client, migration_worker: str, mongo_db: AsyncDatabase[Any],
    tmp_path: Path,
) -> None:
    handle = await start(temporal_client, migration_worker, unique_scope(), tmp_path)
    await handle.execute_update(MigrationWorkflow.advance, AdvanceRequest(actor="ana"))
    await handle.cancel()

    async def refused() -> bool:
        status: MigrationStatus = await handle.query(MigrationWorkflow.status)
        return status.recent_actions[-1].action == "cancel_refused"

    await eventually(refused, "the cancellation to be refused")
    status = await handle.query(MigrationWorkflow.status)
    assert (status.phase, status.epoch) == (Phase.DUAL_WRITE, 1)
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    audit = AuditLog(mongo_db)

    async def audited() -> bool:
        return (await audit.list(status.migration_id))[-1].action == "cancel_refused"

    await eventually(audited, "the refusal in the audit log")
    entries = await audit.list(status.migration_id)
    assert (entries[-1].action, entries[-1].actor) == ("cancel_refused", ACTOR_CANCEL)
    assert "keeps running in dual_write" in entries[-1].reason
    # It still acts and still watches.
    status = await handle.execute_update(MigrationWorkflow.pause, PauseRequest(actor="ana"))
    assert status.paused and status.summary == "paused in dual_write (epoch 1)"
    # The console's history (patch marker, observation rounds, sync before each action, the
    # refused cancellation) is what running migrations look like from now on: replayed by
    # tests/test_replay.py.
    if history_wanted("migration_console"):
        await save_history(handle, "migration_console")
    await replays_on_current_code(temporal_client, handle)
    await handle.terminate("test done")


async def test_started_again_after_terminate_continues_the_audit(
    temporal_client: Client, migration_worker: str, mongo_db: AsyncDatabase[Any],
    tmp_path: Path,
) -> None:
    """Terminate leaves the phase published; a new start (same name) takes the phase, the pause
    and the audit sequence from what is published and audited."""
    scope, mid = unique_scope(), f"m-{uuid.uuid4().hex[:10]}"
    handle = await start(temporal_client, migration_worker, scope, tmp_path, migration_id=mid)
    await handle.execute_update(MigrationWorkflow.advance, AdvanceRequest(actor="ana"))
    await handle.execute_update(MigrationWorkflow.pause, PauseRequest(actor="ana"))
    await handle.terminate("operator stopped it")
    assert (await MigrationStateStore(mongo_db, cache_ttl_s=0).get(scope)).phase == (
        Phase.DUAL_WRITE)

    again = await start(temporal_client, migration_worker, scope, tmp_path, migration_id=mid)

    async def took_the_published_state() -> bool:
        return bool((await again.query(MigrationWorkflow.status)).epoch)

    await eventually(took_the_published_state, "the new start to read the published phase")
    status = await again.query(MigrationWorkflow.status)
    assert (status.phase, status.epoch, status.paused) == (Phase.DUAL_WRITE, 1, True)
    assert [a.action for a in status.recent_actions] == ["advance", "pause"]
    await expect_rejected(again.execute_update(MigrationWorkflow.advance, AdvanceRequest()),
                          "migration is paused")
    status = await again.execute_update(MigrationWorkflow.resume, PauseRequest(actor="bob"))
    assert not status.paused
    entries = await AuditLog(mongo_db).list(mid)
    assert [(e.seq, e.action) for e in entries] == [(1, "advance"), (2, "pause"),
                                                    (3, "resume")]
    await again.terminate("test done")


async def test_a_reset_never_moves_the_phase_back_nor_twice(
    temporal_client: Client, migration_worker: str, mongo_db: AsyncDatabase[Any],
    tmp_path: Path,
) -> None:
    """Reset to a point before the last action, Updates reapplied (the UI's default): the
    workflow re-reads the published phase and refuses the re-delivered Update."""
    handle = await start(temporal_client, migration_worker, unique_scope(), tmp_path)
    await handle.execute_update(MigrationWorkflow.advance, AdvanceRequest(actor="ana"))

    async def task_to_reset_to() -> bool:
        """An evidence round's workflow task completed after the advance (a fixed wait could
        pass without one on a loaded host: the reset point below would not exist)."""
        events = [e async for e in handle.fetch_history_events()]
        done = [e.event_id for e in events if e.event_type ==
                EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED]
        return bool(done) and any(
            e.event_id > done[0] and e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
            for e in events)

    await eventually(task_to_reset_to, "a workflow task after the advance")
    await handle.execute_update(MigrationWorkflow.force_advance,
                                ForceAdvanceRequest(actor="ana", reason="drill"))
    events = [e async for e in handle.fetch_history_events()]
    first_done = next(e.event_id for e in events if e.event_type ==
                      EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED)
    second = [e.event_id for e in events if e.event_type ==
              EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED][1]
    point = next(e.event_id for e in events if first_done < e.event_id < second - 1
                 and e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
    desc = await handle.describe()
    await temporal_client.workflow_service.reset_workflow_execution(
        ResetWorkflowExecutionRequest(
            namespace=temporal_client.namespace, reason="drill", request_id=str(uuid.uuid4()),
            workflow_execution=WorkflowExecution(workflow_id=handle.id, run_id=desc.run_id),
            workflow_task_finish_event_id=point,
            reset_reapply_exclude_types=[
                ResetReapplyExcludeType.RESET_REAPPLY_EXCLUDE_TYPE_SIGNAL]))
    latest = temporal_client.get_workflow_handle(handle.id, result_type=MigrationStatus)

    async def adopted() -> bool:
        status: MigrationStatus = await latest.query(MigrationWorkflow.status)
        return "adopt_published" in [a.action for a in status.recent_actions]

    async def redelivered_answered() -> bool:
        """Every Update the reset re-delivered (admitted in the new run) has completed: the
        phase read next is what the workflow left after answering it (a fixed wait could read
        it before the workflow got to it on a loaded host)."""
        admitted: set[str] = set()
        completed: set[str] = set()
        async for e in latest.fetch_history_events():
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ADMITTED:
                admitted.add(e.workflow_execution_update_admitted_event_attributes.request
                             .meta.update_id)
            elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED:
                completed.add(e.workflow_execution_update_completed_event_attributes.meta
                              .update_id)
        return admitted <= completed

    await eventually(adopted, "the reset run to adopt the published phase")
    await eventually(redelivered_answered, "the re-delivered force_advance to be answered")
    status = await latest.query(MigrationWorkflow.status)
    assert (status.phase, status.epoch) == (Phase.SHADOW_READ, 2)

    # The status shows the adoption once decided; an activity writes its audit entry after.
    async def adoption_audited() -> bool:
        entries = await AuditLog(mongo_db).list(status.migration_id)
        return bool(entries) and entries[-1].action == "adopt_published"

    await eventually(adoption_audited, "the adoption's audit entry")
    entries = await AuditLog(mongo_db).list(status.migration_id)
    assert [e.action for e in entries] == ["advance", "force_advance", "adopt_published"]
    status = await latest.execute_update(MigrationWorkflow.rollback, RollbackRequest(
        to=Phase.DUAL_WRITE, actor="ana"))
    assert (status.phase, status.epoch) == (Phase.DUAL_WRITE, 3)
    await latest.terminate("test done")


async def _chain_events(client: Client, workflow_id: str, first_run: str) -> list[list[Any]]:
    """The events of every run from `first_run` on (following continue-as-new)."""
    runs: list[list[Any]] = []
    run_id = first_run
    while len(runs) < 100:
        handle = client.get_workflow_handle(workflow_id, run_id=run_id)
        runs.append([e async for e in handle.fetch_history_events()])
        last = runs[-1][-1]
        if last.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
            break
        run_id = last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    return runs


# Every idle round is the same code path (evidence, UI refresh, timer), each a real evidence
# activity. With the smallest history bound the config allows, the run rotates every ~17
# rounds (~4.5 min at the default interval): the test skips time a minute at a time until the
# chain has IDLE_RUNS_MIN runs (each continue-as-new must carry the search attributes without
# writing them again), then IDLE_AFTER_LAST_RUN more so the last run's own rounds are in the
# history too: 10 min, 40 rounds (seen), instead of a fixed quarter of an hour (50-60). (An
# hour at the default 2,000-event bound took 240 real evidence activities, ~155 s, for 2 runs;
# closing.md's figure.)
IDLE_STEP = timedelta(minutes=1)
IDLE_AFTER_LAST_RUN = timedelta(minutes=1)
IDLE_MAX = timedelta(minutes=20)  # the bound: 3 runs take ~9 min at 15 s a round
IDLE_MIN = timedelta(minutes=6)  # the third run began after 8-9 min (seen): margin below
IDLE_HISTORY_EVENTS_PER_RUN_MAX = 200  # MigrationConfig's minimum
IDLE_ROUNDS_MIN = 30  # 2 x 17 rounds rotate twice, less the activities' own time
IDLE_RUNS_MIN = 3


@pytest.mark.slow
@pytest.mark.timeout(300)  # ~40 real evidence activities: under 1 s each with time skipping
async def test_idle_rounds_write_no_search_attributes(
    time_skipping_env: WorkflowEnvironment, mongo_db: AsyncDatabase[Any], tmp_path: Path,
) -> None:
    """Idle in one phase (time skipped, the default 15 s evidence interval): no search
    attribute is written after the start, across several continue-as-new, and the history is
    rotated by its length (the configured bound, far below the server's suggestion)."""
    env, client = time_skipping_env, time_skipping_env.client
    acts = MigrationActivities(mongo_db)
    async with sandboxed_worker(client, "migration-idle", [MigrationWorkflow],
                                acts.all()) as (_, queue):
        with env.with_time_skipping_disabled():
            handle = await start(client, queue, unique_scope(), tmp_path,
                                 evidence_interval_s=15.0,
                                 history_events_per_run_max=IDLE_HISTORY_EVENTS_PER_RUN_MAX)
        await eventually(lambda: _initialized(handle), "the migration to start")
        first_run = (await handle.describe()).run_id
        baseline = len((await _chain_events(client, handle.id, first_run))[0])
        latest = client.get_workflow_handle(handle.id)
        began = await env.get_current_time(latest)
        seen = {first_run}
        until = IDLE_MAX
        for _ in range(100):  # a fast-forward may end at a continue-as-new: go on from there
            elapsed = await env.get_current_time(latest) - began
            if elapsed >= until:
                break
            await env.fast_forward(latest, min(IDLE_STEP, until - elapsed))
            seen.add((await latest.describe()).run_id)
            if len(seen) >= IDLE_RUNS_MIN and until == IDLE_MAX:  # the last run: a bit more
                until = await env.get_current_time(latest) - began + IDLE_AFTER_LAST_RUN
        elapsed = await env.get_current_time(latest) - began
        runs = await _chain_events(client, handle.id, first_run)
        await latest.terminate("test done")
    events = [e for run in runs for e in run]
    idle = runs[0][baseline:] + [e for run in runs[1:] for e in run]
    writes = [e for e in idle if e.event_type ==
              EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES]
    rounds = [e for e in idle if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED]
    size_bytes = sum(e.ByteSize() for e in idle)
    measured = (f"{len(idle)} events ({size_bytes} bytes) in {elapsed} idle, {len(runs)} "
                f"run(s), {len(rounds)} evidence rounds, {len(writes)} search-attribute "
                f"write(s) after the start ({len(events)} events in all)")
    print(measured)
    assert elapsed >= IDLE_MIN, measured
    assert writes == [], measured  # continue-as-new carries the attributes and the patch
    assert len(rounds) >= IDLE_ROUNDS_MIN, measured
    assert len(runs) >= IDLE_RUNS_MIN, measured  # rotated by history length, not the server
    assert max(len(run) for run in runs) <= IDLE_HISTORY_EVENTS_PER_RUN_MAX + 20, measured


async def _initialized(handle: WorkflowHandle[Any, MigrationStatus]) -> bool:
    try:
        status: MigrationStatus = await handle.query(MigrationWorkflow.status)
    except Exception:
        return False
    return status.evidence is not None
