"""Determinism guard: recorded wallet and migration workflow histories must replay on the
current code.

`tests/data/histories/*.json` were recorded from real runs covering credit, debit, void, a
refused operation, a rejected update, the dual-write backlog with a divergence, continue-as-new
and idle close, and the write-path switch dual_write -> tb_primary -> read_cutover (drain first,
reverse projection; `tb_primary_reverse_outbox`: the same through the reverse outbox). A change
that makes the workflow non-deterministic for running executions fails here. Record the
histories that are missing with:

    WALLETMIG_RECORD_HISTORIES=1 pytest tests/test_replay.py -k record

and re-record all of them (after an intentional, versioned change) with `=all`. Histories
recorded by older code stay: they are what running executions look like.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHistory
from temporalio.worker import Replayer
from wallet_support import (
    DUAL_PAIR,
    HISTORIES,
    RECORD_MODE,
    WalletHarness,
    history_wanted,
    isolated_settings,
    key,
    save_history,
    set_phase,
    wait_completed,
    wait_drained,
    wallet_harness,
    workflow_id_of,
)

from walletclient.temporal_connect import data_converter
from walletconfig.settings import Settings
from walletcore.errors import InsufficientFundsError, InvalidAmountError
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, SubtractCredit, Void
from walletcore.phases import Phase
from workers.migration_worker import MIGRATION_WORKFLOWS
from workers.wallet_worker import WORKFLOWS, workflow_runner

RECORD = RECORD_MODE in ("1", "all")


def _files() -> list[Path]:
    return sorted(HISTORIES.glob("*.json"))


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.stem)
async def test_replay_recorded_history(path: Path) -> None:
    data = json.loads(path.read_text())
    history = WorkflowHistory.from_json(data["workflow_id"], data["history"])
    replayer = Replayer(
        workflows=[*WORKFLOWS, *MIGRATION_WORKFLOWS],
        data_converter=data_converter(),  # plain: the recordings are plaintext
        workflow_runner=workflow_runner(),
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure!r}"


def test_histories_present() -> None:
    names = {p.stem for p in _files()}
    expected = {
        "legacy_ops", "refused_ops", "dual_write_backlog", "continue_as_new", "idle_close",
        "continue_as_new_commit_timer",
        "tb_primary_switch",
        # the dual-write outbox (patch outbox-write-path): no backlog item, no activity
        "outbox_dual_write",
        # the migration workflow: recorded by test_migration_workflow / test_phase_switch_crash
        "migration_full_path", "migration_switch_crash",
        # the Web UI console (patch migration-ui-console): test_migration_workflow
        "migration_console",
    }  # fmt: skip
    assert expected <= names, f"missing recorded histories: {sorted(expected - names)}"


# ---- recording --------------------------------------------------------------------------------


async def _save(temporal: Client, name: str, wallet: WalletKey, run_id: str | None) -> None:
    if history_wanted(name):
        handle = temporal.get_workflow_handle(workflow_id_of(wallet), run_id=run_id)
        await save_history(handle, name)


async def _run_id(temporal: Client, wallet: WalletKey) -> str:
    described = await temporal.get_workflow_handle(workflow_id_of(wallet)).describe()
    return described.run_id


def _c(w: WalletKey, txn: str, amount: str, **kw: object) -> AddCredit:
    return AddCredit(wallet=w, transaction_id=f"{w.client_id}.{txn}", amount=Decimal(amount), **kw)  # type: ignore[arg-type]


def _d(w: WalletKey, txn: str, amount: str) -> SubtractCredit:
    return SubtractCredit(wallet=w, transaction_id=f"{w.client_id}.{txn}", amount=Decimal(amount))


def _v(w: WalletKey, txn: str, original: str) -> Void:
    return Void(
        wallet=w,
        transaction_id=f"{w.client_id}.{txn}",
        original_transaction_id=f"{w.client_id}.{original}",
    )


@pytest.mark.skipif(not RECORD, reason="set WALLETMIG_RECORD_HISTORIES=1 to re-record")
async def test_record_histories(
    temporal_client: Client, settings: Settings, unique_id: Callable[..., str]
) -> None:
    isolated = isolated_settings(settings, "wallet_replay")
    async with wallet_harness(
        temporal_client, isolated, idle_timeout_s=1.5, max_ops_per_run=6
    ) as h:
        await _record_all(h, temporal_client, unique_id)


async def _record_all(h: WalletHarness, temporal: Client, unique_id: Callable[..., str]) -> None:
    if history_wanted("outbox_dual_write"):
        await _record_outbox(h, temporal, unique_id)
    if history_wanted("tb_primary_switch"):
        await _record_switch(h, temporal, unique_id)
    if history_wanted("tb_primary_reverse_outbox"):
        await _record_reverse_outbox(h, temporal, unique_id)
    if history_wanted("continue_as_new_commit_timer"):
        # Recorded after the `commit-writes-before-continue-as-new` patch: the rotation's
        # writes land in a task of their own before the continue-as-new command.
        w = key(unique_id("cant"), DUAL_PAIR)
        await h.client.add_credit(_c(w, "seed", "100.00"))
        first_run = await _run_id(temporal, w)
        await asyncio.gather(*(h.client.add_credit(_c(w, f"c{i}", "1.00")) for i in range(10)))
        handle = temporal.get_workflow_handle(workflow_id_of(w), run_id=first_run)
        for _ in range(300):  # the first run's history is complete once it has rotated
            if (await handle.describe()).status == WorkflowExecutionStatus.CONTINUED_AS_NEW:
                break
            await asyncio.sleep(0.1)
        await _save(temporal, "continue_as_new_commit_timer", w, first_run)
    if not any(history_wanted(n) for n in ("legacy_ops", "refused_ops", "dual_write_backlog",
                                     "continue_as_new", "idle_close")):
        return
    client = h.client
    # credit, debit, void of each kind, a replay; the run then idles out.
    w = key(unique_id("legacy"))
    await client.add_credit(_c(w, "c1", "10.00"))
    await client.subtract_credit(_d(w, "d1", "2.50"))
    await client.void(_v(w, "v1", "d1"))
    await client.void(_v(w, "v2", "c1"))
    await client.add_credit(_c(w, "c1", "10.00"))  # replay from the guard
    await wait_completed(temporal, workflow_id_of(w))
    await _save(temporal, "legacy_ops", w, None)

    # refused operations: insufficient funds (update failed), bad amount (validator rejected)
    w = key(unique_id("refused"))
    await client.add_credit(_c(w, "c1", "1.00"))
    with pytest.raises(InsufficientFundsError):
        await client.subtract_credit(_d(w, "d1", "5.00"))
    with pytest.raises(InvalidAmountError):
        await client.add_credit({"wallet": w, "transaction_id": "x", "amount": "0.001"})
    await wait_completed(temporal, workflow_id_of(w))
    await _save(temporal, "refused_ops", w, None)

    # dual-write backlog, with a divergence: the credit predates dual_write (not in TigerBeetle)
    w = key(unique_id("backlog"), DUAL_PAIR)
    await set_phase(h.stores, DUAL_PAIR, Phase.LEGACY)
    await client.add_credit(_c(w, "c1", "10.00"))
    await set_phase(h.stores, DUAL_PAIR, Phase.DUAL_WRITE)
    await client.subtract_credit(_d(w, "d1", "1.00"))  # TigerBeetle: insufficient funds
    await client.add_credit(_c(w, "c2", "4.00", allow_overdraft=True))
    await client.void(_v(w, "v1", "c2"))
    status = await wait_drained(client, w)
    assert status is not None and status.divergence_count == 1, status
    await wait_completed(temporal, workflow_id_of(w))
    await _save(temporal, "dual_write_backlog", w, None)

    # continue-as-new after max_ops_per_run (6), carrying the backlog and recent results
    w = key(unique_id("can"), DUAL_PAIR)
    await client.add_credit(_c(w, "seed", "100.00"))
    first_run = await _run_id(temporal, w)
    await asyncio.gather(*(client.add_credit(_c(w, f"c{i}", "1.00")) for i in range(10)))
    await _save(temporal, "continue_as_new", w, first_run)
    await wait_completed(temporal, workflow_id_of(w))
    await _save(temporal, "idle_close", w, None)  # the last run: idles out after rotating


async def _record_outbox(h: WalletHarness, temporal: Client, unique_id: Callable[..., str]) -> None:
    """dual_write through the transactional outbox (patch outbox-write-path): the operations'
    TigerBeetle side goes with their MongoDB write (no backlog, no activity); the run idles
    out."""
    await set_phase(h.stores, DUAL_PAIR, Phase.DUAL_WRITE)
    await asyncio.sleep(1.1)  # past the workers' migration state cache
    w = key(unique_id("outbox"), DUAL_PAIR)
    await h.client.add_credit(_c(w, "c1", "10.00"))
    await h.client.subtract_credit(_d(w, "d1", "2.50"))
    await h.client.void(_v(w, "v1", "d1"))
    await h.client.add_credit(_c(w, "c2", "1.00"))
    status = await wait_drained(h.client, w)
    assert status is not None and status.outbox_ops == 4 and status.divergence_count == 0, status
    await wait_completed(temporal, workflow_id_of(w))
    await _save(temporal, "outbox_dual_write", w, None)


async def _record_reverse_outbox(
    h: WalletHarness, temporal: Client, unique_id: Callable[..., str]
) -> None:
    """As tb_primary_switch, with tb_primary's MongoDB side through the reverse outbox (patch
    reverse-outbox-write-path; recorded with WALLETMIG_REVERSE_OUTBOX=on): no `to_mongodb`
    backlog item, no activity; the rollback's MongoDB answer waits for the wallet's pending
    reverse records (drain_first with outbox_pending) when the drainer has not applied them."""
    from activities.wallet import REVERSE_OUTBOX_DEFAULT
    assert REVERSE_OUTBOX_DEFAULT, "record with WALLETMIG_REVERSE_OUTBOX=on"
    client = h.client
    w = key(unique_id("revout"), DUAL_PAIR)
    await set_phase(h.stores, DUAL_PAIR, Phase.LEGACY)
    await client.add_credit(_c(w, "c0", "10.00"))
    await set_phase(h.stores, DUAL_PAIR, Phase.DUAL_WRITE)
    await client.add_credit(_c(w, "c1", "1.00"))
    await set_phase(h.stores, DUAL_PAIR, Phase.TB_PRIMARY)
    await asyncio.sleep(1.2)  # the migration state cache
    await client.subtract_credit(_d(w, "d1", "0.50"))
    await client.void(_v(w, "v0", "c0"))
    await set_phase(h.stores, DUAL_PAIR, Phase.READ_CUTOVER)
    await asyncio.sleep(1.2)
    await client.add_credit(_c(w, "c4", "1.00"))
    status = await wait_drained(client, w)
    assert status is not None and status.divergence_count == 0, status
    assert status.reverse_outbox_ops == 2 and status.mongo_applied == 0, status
    await set_phase(h.stores, DUAL_PAIR, Phase.DUAL_WRITE)
    await wait_completed(temporal, workflow_id_of(w))
    await _save(temporal, "tb_primary_reverse_outbox", w, None)


async def _record_switch(h: WalletHarness, temporal: Client, unique_id: Callable[..., str]) -> None:
    """dual_write -> tb_primary (the update waits for the TigerBeetle backlog: drain_first) ->
    read_cutover (waits for the reverse projection), a void of a pre-migration credit."""
    client = h.client
    w = key(unique_id("switch"), DUAL_PAIR)
    await set_phase(h.stores, DUAL_PAIR, Phase.LEGACY)
    await client.add_credit(_c(w, "c0", "10.00"))
    await set_phase(h.stores, DUAL_PAIR, Phase.DUAL_WRITE)
    await client.add_credit(_c(w, "c1", "1.00"))  # 5 operations: one run (max_ops_per_run 6)
    await set_phase(h.stores, DUAL_PAIR, Phase.TB_PRIMARY)
    await asyncio.sleep(1.2)  # the migration state cache
    await client.subtract_credit(_d(w, "d1", "0.50"))
    await client.void(_v(w, "v0", "c0"))
    await set_phase(h.stores, DUAL_PAIR, Phase.READ_CUTOVER)
    await asyncio.sleep(1.2)
    await client.add_credit(_c(w, "c4", "1.00"))
    status = await wait_drained(client, w)
    assert status is not None and status.divergence_count == 0 and status.mongo_applied == 2
    await set_phase(h.stores, DUAL_PAIR, Phase.DUAL_WRITE)
    await wait_completed(temporal, workflow_id_of(w))
    await _save(temporal, "tb_primary_switch", w, None)
