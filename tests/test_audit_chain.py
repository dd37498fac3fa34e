"""The audit chain (stores/audit_chain.py) on the session's real MongoDB: group commit under
concurrency (two appenders, no fork), the migration audit chained in place, and
`walletmig audit verify` naming an edited, a deleted and a last-deleted document."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase
from wallet_support import REPO_ROOT

from messages.migration import AuditEntry
from stores.audit_chain import (
    AUDIT_HEADS,
    AUDIT_RECORDS,
    BEYOND_HEAD_MAX,
    CHAIN_API,
    MIGRATION_AUDIT,
    AuditAppender,
    AuditChain,
    link,
    migration_chain,
    record_id,
    wallet_operation_record,
)
from stores.audit_log import AuditLog, audit_id
from walletcore.journal import ChainHead
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit
from walletcore.phases import Phase
from walletcore.wallet_ids import wallet_ref
from walletmig.commands.audit import render
from walletmig.processes import free_port

CLI_TIMEOUT_S = 120
APPENDS = 400
ID_KEY = bytes(range(32))  # a test id key (walletcore.wallet_ids)


@pytest.fixture
def db(mongo_client: Any) -> AsyncDatabase[Any]:
    return mongo_client[f"audit_{uuid.uuid4().hex[:10]}"]  # type: ignore[no-any-return]


def credit_record(n: int) -> dict[str, Any]:
    op = AddCredit(wallet=WalletKey(client_id=f"client-{n}", country="USA", currency="USD"),
                   transaction_id=f"t-{n}", amount=Decimal("1.50"))  # fmt: skip
    return wallet_operation_record(
        op, wallet_ref=wallet_ref(ID_KEY, op.wallet), source="api", actor="svc-payments",
        operation="add_credit", caller={"key_id": "k1", "owner": "payments"},
    )  # fmt: skip


def verify_cli(settings_env: dict[str, str], db: AsyncDatabase[Any]) -> tuple[int, dict[str, Any]]:
    env = {**settings_env, "MONGODB_DATABASE": db.name}
    done = subprocess.run(
        [sys.executable, "-m", "walletmig", "audit", "verify", "--json", "--page", "7"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


async def test_group_commit_batches_concurrent_appends_without_forking(
    db: AsyncDatabase[Any], settings_env: dict[str, str]
) -> None:
    chain = AuditChain(db)
    await chain.ensure_indexes()
    # Two appenders on one chain: two gateway processes sharing `api`.
    first, second = AuditAppender(chain, CHAIN_API), AuditAppender(chain, CHAIN_API)
    try:
        seqs = await asyncio.gather(*(
            (first if n % 2 else second).append(credit_record(n)) for n in range(APPENDS)))
    finally:
        await first.close()
        await second.close()
    assert sorted(seqs) == list(range(1, APPENDS + 1))  # one chain, no seq twice
    batches = first.batches + second.batches
    assert batches < APPENDS / 4, f"{batches} transactions for {APPENDS} records"
    stored = await db[AUDIT_RECORDS].find_one({"_id": record_id(CHAIN_API, 1)})
    assert stored is not None and stored["actor"] == "svc-payments"
    assert "client-" not in json.dumps(stored, default=str)  # the keyed pseudonym only
    assert stored["wallet"] == wallet_ref(ID_KEY, WalletKey(client_id="client-0", country="USA",
                                                             currency="USD"))  # fmt: skip
    code, report = verify_cli(settings_env, db)
    assert code == 0 and report["ok"], report
    assert report["chains"][0]["checked"] == APPENDS

    # Edit one document: verify names it.
    victim = record_id(CHAIN_API, 123)
    await db[AUDIT_RECORDS].update_one({"_id": victim}, {"$set": {"amount": "1000.00"}})
    code, report = verify_cli(settings_env, db)
    assert code == 1 and not report["ok"]
    bad = report["chains"][0]
    assert (bad["bad_id"], bad["bad_seq"]) == (victim, 123) and "content changed" in bad["reason"]

    # Put it back, delete another: the gap is named.
    await db[AUDIT_RECORDS].update_one({"_id": victim}, {"$set": {"amount": "1.50"}})
    assert (await chain.verify()).ok
    await db[AUDIT_RECORDS].delete_one({"_id": record_id(CHAIN_API, 200)})
    code, report = verify_cli(settings_env, db)
    assert code == 1 and report["chains"][0]["bad_seq"] == 200, report

    # The last one deleted: the head is beyond the last document.
    result = await chain.verify()
    assert not result.ok
    tail_chain = AuditAppender(chain, "tail")  # a fresh chain: delete its last document
    try:
        for n in range(3):
            await tail_chain.append(credit_record(n))
    finally:
        await tail_chain.close()
    await db[AUDIT_RECORDS].delete_one({"_id": record_id("tail", 3)})
    tail = next(r for r in (await chain.verify()).chains if r.chain == "tail")
    assert (tail.ok, tail.bad_seq, tail.bad_id) == (False, 3, record_id("tail", 3))
    assert "missing" in (tail.reason or "")


async def test_verify_checks_the_records_a_stopped_writer_left_beyond_the_head(
    db: AsyncDatabase[Any], settings_env: dict[str, str]
) -> None:
    """A writer inserted records 3-4 and stopped before moving the head (still 2), as a
    crashed one does: verify walks them after the head, reports them linked, and names one
    edited there; more than BEYOND_HEAD_MAX are checked up to the bound and said to be more."""
    chain = AuditChain(db)
    await chain.ensure_indexes()
    await chain.append(AUDIT_RECORDS, "c", [credit_record(0), credit_record(1)])
    head = await chain.head("c")
    orphans = link(head, "c", [credit_record(2), credit_record(3)])
    await db[AUDIT_RECORDS].insert_many(orphans)  # the stopped writer's inserts, no head move
    assert await chain.head("c") == head

    result = await AuditChain(db).verify()
    (report,) = result.chains
    assert result.ok and (report.checked, report.head_seq) == (2, 2), result
    assert (report.beyond_head, report.beyond_head_more) == (2, False), report
    assert "c (audit_records): 2 of 2 checked, ok; beyond head: 2, linked" in render(result)
    code, shown = verify_cli(settings_env, db)  # the CLI's JSON says the same
    assert code == 0 and shown["chains"][0]["beyond_head"] == 2, shown

    # Edited beyond the head: broken, named, exit status 1.
    victim = record_id("c", 4)
    await db[AUDIT_RECORDS].update_one({"_id": victim}, {"$set": {"amount": "1000.00"}})
    code, shown = verify_cli(settings_env, db)
    bad = shown["chains"][0]
    assert code == 1 and not shown["ok"] and (bad["bad_id"], bad["bad_seq"]) == (victim, 4), bad
    assert bad["reason"].startswith("beyond the head (2): ") and "content changed" in bad["reason"]
    await db[AUDIT_RECORDS].update_one({"_id": victim}, {"$set": {"amount": "1.50"}})

    # A gap beyond the head (record 5 missing, 6 present) is broken too.
    (_fifth, sixth) = link(ChainHead(seq=4, hash=orphans[-1]["hash"]), "c",
                          [credit_record(4), credit_record(5)])  # fmt: skip
    await db[AUDIT_RECORDS].insert_one(sixth)
    (gap,) = (await chain.verify()).chains
    assert (gap.ok, gap.bad_seq) == (False, 5) and "document 5 missing" in (gap.reason or "")
    await db[AUDIT_RECORDS].delete_one({"_id": sixth["_id"]})

    # Bounded: more than BEYOND_HEAD_MAX beyond the head (two stopped writers' worth and
    # more): the first BEYOND_HEAD_MAX are checked, the rest said to be there.
    extra = [credit_record(10 + n) for n in range(BEYOND_HEAD_MAX)]
    await db[AUDIT_RECORDS].insert_many(link(ChainHead(seq=4, hash=orphans[-1]["hash"]), "c",
                                             extra))  # fmt: skip
    result = await chain.verify(page=500)
    (bounded,) = result.chains
    assert result.ok and bounded.beyond_head == BEYOND_HEAD_MAX and bounded.beyond_head_more
    assert f"beyond head: {BEYOND_HEAD_MAX} (and more, not checked), linked" in render(result)


def entry(mid: str, seq: int, actor: str = "ana") -> AuditEntry:
    return AuditEntry(
        migration_id=mid, seq=seq, at=datetime.now(UTC), actor=actor, action="advance",
        from_phase=Phase.LEGACY, to_phase=Phase.DUAL_WRITE, from_rollout=0, to_rollout=0,
        paused=False, epoch=seq, reason="gates green", evidence={"match": 0.5, "n": 3},
        request={"actor": actor, "reason": "gates green"},
    )  # fmt: skip


async def test_migration_audit_is_chained_in_place(db: AsyncDatabase[Any]) -> None:
    audit = AuditLog(db)
    await audit.ensure_indexes()
    mid = f"m-{uuid.uuid4().hex[:6]}"
    for seq in (1, 2, 3):
        await audit.record(entry(mid, seq))
    await audit.record(entry(mid, 2))  # a retried activity: written once
    with pytest.raises(Exception, match="different action"):
        await audit.record(entry(mid, 2, actor="eve"))
    listed = await audit.list(mid)
    assert [e.seq for e in listed] == [1, 2, 3] and listed[0].evidence == {"match": 0.5, "n": 3}
    chain = AuditChain(db)
    assert (await chain.head(migration_chain(mid))).seq == 3
    assert (await chain.verify()).ok

    await db[MIGRATION_AUDIT].update_one({"_id": audit_id(mid, 2)}, {"$set": {"actor": "bob"}})
    report = (await chain.verify()).chains[0]
    assert (report.ok, report.bad_id, report.bad_seq) == (False, audit_id(mid, 2), 2)
    await db[MIGRATION_AUDIT].update_one({"_id": audit_id(mid, 2)}, {"$set": {"actor": "ana"}})
    assert (await chain.verify()).ok

    # A document slipped in outside the chain, or a head removed: named too.
    await db[MIGRATION_AUDIT].insert_one({"_id": "forged", "migration_id": mid})
    result = await chain.verify()
    assert not result.ok and "forged" in " ".join(result.problems)
    await db[MIGRATION_AUDIT].delete_one({"_id": "forged"})
    await db[AUDIT_HEADS].delete_one({"_id": migration_chain(mid)})
    result = await chain.verify()
    assert not result.ok and "no head" in " ".join(result.problems)


async def test_cli_money_commands_are_audited_before_they_run(
    db: AsyncDatabase[Any], settings_env: dict[str, str]
) -> None:
    """The record names the engineer and is written before Temporal is reached (here: nobody
    listens, so the credit itself fails); a refused input records nothing."""
    env = {**settings_env, "MONGODB_DATABASE": db.name,
           "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"}  # fmt: skip
    wallet = ["--client", "client-cli", "--country", "USA", "--currency", "USD"]
    refused = subprocess.run(
        [sys.executable, "-m", "walletmig", "wallet", "credit", *wallet, "--amount", "1.001",
         "--txn", "t-cli-0", "--actor", "ana"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert await db[AUDIT_RECORDS].count_documents({}) == 0
    subprocess.run(
        [sys.executable, "-m", "walletmig", "wallet", "credit", *wallet, "--amount", "1.50",
         "--txn", "t-cli-1", "--actor", "ana"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )  # fmt: skip
    record = await db[AUDIT_RECORDS].find_one({"transaction_id": "t-cli-1"})
    assert record is not None, "audited before the write was attempted"
    assert (record["chain"], record["actor"], record["source"]) == ("cli", "ana", "cli")
    assert "client-cli" not in json.dumps(record, default=str)
    assert (await AuditChain(db).verify()).ok


async def test_two_writers_with_stale_cached_heads_never_fork(db: AsyncDatabase[Any]) -> None:
    """Each AuditChain caches the head it last wrote; another writer moving the head makes the
    compare-and-swap fail, and the retry re-reads it."""
    first, second = AuditChain(db), AuditChain(db)
    for n in range(6):
        writer = first if n % 2 == 0 else second
        (stored,) = await writer.append(AUDIT_RECORDS, "two", [credit_record(n)])
        assert stored["chain_seq"] == n + 1
    result = await first.verify()
    assert result.ok and [c.checked for c in result.chains] == [6]
