"""The audit chain's append without a transaction (stores.audit_chain.AuditChain._append_by_seq,
`audit_records` only) on the session's real MongoDB: the unique `_id` (chain, seq) is the fork
guard, the batch is inserted in order and the head moved after it, only forward (one ordered
bulk write for one record, an insert and an update for more: both are exercised). States built
by hand: records a writer left beyond the head, another writer's record taking a seq in the
middle of a batch, a head already beyond the batch."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase
from test_audit_chain import credit_record

from stores.audit_chain import AUDIT_HEADS, AUDIT_RECORDS, AuditChain, link, record_id
from walletcore.journal import ChainHead


@pytest.fixture
def db(mongo_client: Any) -> AsyncDatabase[Any]:
    return mongo_client[f"audit_seq_{uuid.uuid4().hex[:10]}"]  # type: ignore[no-any-return]


async def test_records_beyond_the_head_are_chained_after(db: AsyncDatabase[Any]) -> None:
    """A writer died after inserting records 3-4 and before moving the head (still 2): a new
    writer links after record 4 and moves the head over them; the chain verifies."""
    first = AuditChain(db)
    await first.ensure_indexes()
    await first.append(AUDIT_RECORDS, "c", [credit_record(0), credit_record(1)])
    head = await first.head("c")
    assert head.seq == 2
    orphans = link(head, "c", [credit_record(2), credit_record(3)])
    await db[AUDIT_RECORDS].insert_many(orphans)
    assert (await first.head("c")).seq == 2  # the dead writer never moved it

    later = AuditChain(db)  # another process: nothing cached
    (stored,) = await later.append(AUDIT_RECORDS, "c", [credit_record(4)])
    assert (stored["chain_seq"], stored["prev_hash"]) == (5, orphans[-1]["hash"])
    assert await later.head("c") == ChainHead(seq=5, hash=stored["hash"])
    result = await later.verify()
    assert result.ok and [c.checked for c in result.chains] == [5], result


async def test_a_seq_taken_mid_batch_keeps_the_prefix(db: AsyncDatabase[Any]) -> None:
    """The writer's cached head is 2; another writer has chained record 4 after this writer's
    record 3 (read while the batch was going in): record 3 stays, the rest of the batch is
    linked after record 4, the head ends on the batch's last record."""
    writer = AuditChain(db)
    await writer.ensure_indexes()
    await writer.append(AUDIT_RECORDS, "c", [credit_record(0), credit_record(1)])
    head = await writer.head("c")
    batch = [credit_record(10), credit_record(11), credit_record(12)]
    (mine_first,) = link(head, "c", batch[:1])  # deterministic: what the writer will insert
    (theirs,) = link(ChainHead(seq=3, hash=mine_first["hash"]), "c", [credit_record(20)])
    await db[AUDIT_RECORDS].insert_one(theirs)
    assert theirs["_id"] == record_id("c", 4)

    stored = await writer.append(AUDIT_RECORDS, "c", batch)
    assert [d["chain_seq"] for d in stored] == [3, 5, 6]
    assert stored[0]["hash"] == mine_first["hash"] and stored[1]["prev_hash"] == theirs["hash"]
    assert writer.conflict_retries == 1
    assert (await writer.head("c")).seq == 6
    result = await writer.verify()
    assert result.ok and [c.checked for c in result.chains] == [6], result


async def test_the_head_never_moves_back(db: AsyncDatabase[Any]) -> None:
    """A head already beyond the batch (moved there by hand here: a writer that chained after
    these seqs) is left where it is; the records go in (their upsert meets the head)."""
    writer = AuditChain(db)
    await writer.ensure_indexes()
    stored = await writer.append(AUDIT_RECORDS, "c", [credit_record(0), credit_record(1)])
    await db[AUDIT_HEADS].update_one({"_id": "c"}, {"$set": {"seq": 9, "hash": "f" * 64}})
    (third,) = await writer.append(AUDIT_RECORDS, "c", [credit_record(2)])  # cached head: 2
    assert (third["chain_seq"], third["prev_hash"]) == (3, stored[-1]["hash"])
    assert await writer.head("c") == ChainHead(seq=9, hash="f" * 64)
    assert await db[AUDIT_RECORDS].count_documents({"chain": "c"}) == 3
    # A batch of several records (an insert, then the head's update): the same rule.
    more = await writer.append(AUDIT_RECORDS, "c", [credit_record(3), credit_record(4)])
    assert [d["chain_seq"] for d in more] == [4, 5] and more[0]["prev_hash"] == third["hash"]
    assert await writer.head("c") == ChainHead(seq=9, hash="f" * 64)
    assert await db[AUDIT_RECORDS].count_documents({"chain": "c"}) == 5
