"""The legacy write's group commit (stores.group_commit, LegacyStore._commit_group), against
the real servers: writes of many wallets that arrive while a commit is in flight share ONE
MongoDB transaction and answer exactly what one-by-one writes answer; a group holding one
write that cannot commit (a stale snapshot, a used transaction id) commits nothing and every
write then goes alone, each applied once; a worker killed with SIGKILL while a group's
transaction is open leaves nothing applied, and the retries apply each operation once.

Every state is built, never waited for by time: the committer's lane is held (a commit in
flight) while the writes queue, and released once the queue holds them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
from bson.decimal128 import Decimal128
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.database import AsyncDatabase
from wallet_support import DUAL_PAIR, REPO_ROOT, isolated_settings, kill_when_stopped, worker_env

from messages.wallet import WalletCommand
from stores.group_commit import GroupCommitter
from stores.legacy_store import WALLET_TRANSACTIONS, WALLETS, LegacyStore
from stores.outbox import WALLET_OUTBOX, OutboxIntent
from walletconfig.settings import Settings
from walletcore.errors import DuplicateTransactionError, StoreUnavailableError
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit, OperationResult, SubtractCredit, WalletOperation
from walletcore.phases import Phase

Db = AsyncDatabase[dict[str, Any]]
WALLET_COUNT = 24  # fewer than GROUP_OPS_MAX: one group carries them all


class Commits(monitoring.CommandListener):
    """Counts the commitTransaction commands this client sends (one per transaction)."""

    def __init__(self) -> None:
        self.count = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "commitTransaction":
            self.count += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@contextlib.asynccontextmanager
async def counted_db(mongodb_uri: str) -> AsyncIterator[tuple[Db, Commits]]:
    commits = Commits()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongodb_uri, event_listeners=[commits])
    try:
        yield client[f"walletmig_group_{uuid.uuid4().hex[:10]}"], commits
    finally:
        await client.close()


async def store_of(db: Db, *, group_commit: bool = True) -> LegacyStore:
    store = LegacyStore(db, group_commit=group_commit)
    await store.ensure_indexes()
    return store


def wallets(prefix: str, count: int = WALLET_COUNT) -> list[WalletKey]:
    run = uuid.uuid4().hex[:8]
    return [WalletKey(client_id=f"{prefix}-{run}-{n}", country="USA", currency="USD")
            for n in range(count)]


def movement(wallet: WalletKey, n: int) -> WalletOperation:
    """A credit or, every third, a debit the seed covers."""
    txn = f"{wallet.client_id}.{n}"
    if n % 3 == 2:
        return SubtractCredit(wallet=wallet, transaction_id=txn, amount=Decimal("1.25"))
    return AddCredit(wallet=wallet, transaction_id=txn, amount=Decimal("2.50"))


async def seed(store: LegacyStore, keys: list[WalletKey]) -> None:
    """Each wallet's first write (the full read path), leaving the snapshot the hot path and
    so the group commit write from."""
    for w in keys:
        await store.add_credit(AddCredit(wallet=w, transaction_id=f"{w.client_id}.seed",
                                         amount=Decimal("100.00")))


async def grouped(store: LegacyStore, ops: list[WalletOperation]) -> list[Any]:
    """`ops` (one per wallet) written while the committer's lane is held, so they all queue,
    then released: they go as one group. Each caller's result or exception, in order."""
    committer = store.group_commit
    async with committer.turn(cast(Any, None), key="the commit in flight", size=0) as alone:
        assert not alone
        tasks = [asyncio.create_task(store.apply(op)) for op in ops]
        await all_queued(committer, tasks)
    done = await asyncio.gather(*tasks, return_exceptions=True)
    return [d if isinstance(d, BaseException) else d[0] for d in done]


QUEUE_WAIT_S = 30.0


async def all_queued(committer: GroupCommitter[Any], tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Until each task's write waits for the held lane (a state, not a number of loop turns);
    a task that ended instead, or the bound, fails the test with its reason."""
    deadline = time.monotonic() + QUEUE_WAIT_S
    while committer.queued < len(tasks):
        assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()]
        assert time.monotonic() < deadline, f"{committer.queued} of {len(tasks)} writes queued"
        await asyncio.sleep(0)


def comparable(result: OperationResult) -> tuple[Any, ...]:
    """A result without what differs between two wallets (the key, the ids, the clock)."""
    return (result.type, result.amount, result.credit, result.debit,
            result.historical_credit, result.replayed)


async def test_concurrent_writes_of_many_wallets_share_one_transaction(
    mongodb_uri: str,
) -> None:
    async with counted_db(mongodb_uri) as (db, commits):
        store = await store_of(db)
        one_by_one = await store_of(db, group_commit=False)
        keys, twins = wallets("group"), wallets("twin")
        await seed(store, keys)
        await seed(one_by_one, twins)
        for step in range(3):
            before, groups = commits.count, store.group_commit.groups
            results = await grouped(store, [movement(w, step) for w in keys])
            assert commits.count - before == 1, "one transaction for the whole group"
            assert store.group_commit.groups == groups + 1
            expected = [await one_by_one.apply(movement(w, step)) for w in twins]
            assert [comparable(r) for r in results] == [comparable(r) for r, _ in expected]
        for w in keys:  # each operation stored once, in version order
            docs = await db[WALLET_TRANSACTIONS].find({"wallet": w.canonical}).sort(
                "wallet_version", 1).to_list(None)
            assert [d["_id"] for d in docs] == [f"{w.client_id}.{s}" for s in
                                                ("seed", 0, 1, 2)]
            assert [d["wallet_version"] for d in docs] == [1, 2, 3, 4]
            wallet_doc = await db[WALLETS].find_one({"_id": w.canonical})
            assert wallet_doc is not None and wallet_doc["version"] == 4
        # Not forced: concurrent callers queue behind the first commit on their own.
        before = commits.count
        await asyncio.gather(*(store.apply(movement(w, 3)) for w in keys))
        assert commits.count - before < len(keys)
        assert store.group_commit.groups_failed == 0


async def test_a_group_with_one_write_that_cannot_commit_goes_alone_each_once(
    mongodb_uri: str,
) -> None:
    async with counted_db(mongodb_uri) as (db, commits):
        store = await store_of(db)
        keys = wallets("fallback", 8)
        await seed(store, keys)
        stale, used = keys[2], keys[5]
        # Behind the store's back, without a version bump: its snapshot no longer matches.
        await db[WALLETS].update_one({"_id": stale.canonical}, {"$set": {
            "credit": Decimal128("150.00"), "historical_credit": Decimal128("150.00")}})
        ops = [movement(w, 0) for w in keys]
        taken = f"{keys[0].client_id}.seed"  # another wallet's transaction id
        ops[5] = AddCredit(wallet=used, transaction_id=taken, amount=Decimal("2.50"))
        before = commits.count
        results = await grouped(store, ops)
        assert store.group_commit.groups_failed == 1 and store.group_commit.groups == 0
        assert isinstance(results[5], DuplicateTransactionError), results[5]
        for w, r in zip(keys, results, strict=True):
            if w == used:
                continue
            assert isinstance(r, OperationResult) and not r.replayed, r
            base = Decimal("150.00") if w == stale else Decimal("100.00")
            assert r.credit == base + Decimal("2.50")  # the stale one from a fresh read
        # Alone: one commit per applied write, the refused one none.
        assert commits.count - before == len(keys) - 1
        for w in keys:
            count = await db[WALLET_TRANSACTIONS].count_documents({"wallet": w.canonical})
            assert count == (1 if w == used else 2), w


# A worker that dies with a group's transaction open: argv = TB addresses, run id, wallets.
# It seeds its wallets (each wallet's first write), holds the committer's lane while one
# dual-write credit per wallet queues, then lets the group go with `commit` replaced: the
# group's bulkWrite is sent, its commit never. Prints "stopped" there and waits to be killed.
CRASHER = """
import asyncio, sys
from decimal import Decimal
import stores.legacy_store as legacy_module
from messages.wallet import WalletCommand
from stores.bundle import make_stores
from stores.outbox import OutboxIntent
from walletconfig.settings import Settings
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit
from walletcore.phases import Phase

async def main() -> None:
    stores = await make_stores(Settings.from_env(), tb_addresses=sys.argv[1])
    store = stores.legacy
    keys = [WalletKey(client_id=f"{sys.argv[2]}-{n}", country="MEX", currency="MXN")
            for n in range(int(sys.argv[3]))]
    for w in keys:
        await store.add_credit(AddCredit(wallet=w, transaction_id=f"{w.client_id}.seed",
                                         amount=Decimal("100.00")))

    async def stop(*args: object, **kwargs: object) -> None:
        print("stopped", flush=True)
        await asyncio.sleep(3600)

    committer = store.group_commit
    async with committer.turn(None, key="held", size=0):
        tasks = []
        for w in keys:
            op = AddCredit(wallet=w, transaction_id=f"{w.client_id}.1", amount=Decimal("2.50"))
            intent = OutboxIntent(command=WalletCommand.of(op), phase=Phase.DUAL_WRITE,
                                  epoch=1, since_version=None)
            tasks.append(asyncio.create_task(store.apply(op, outbox=intent)))
        while committer.queued < len(keys):
            await asyncio.sleep(0)
        legacy_module.commit = stop
    await asyncio.gather(*tasks)
    print("finished without stopping", flush=True)

asyncio.run(main())
"""


@pytest.mark.slow
async def test_a_worker_killed_with_a_group_transaction_open_applies_each_once(
    short_txn_settings: Settings, tb_addresses: str, short_txn_mongodb_uri: str,
    tmp_path: Path,
) -> None:
    """On the short-transaction MongoDB (conftest.short_txn_mongodb_uri): the killed worker's
    open transaction blocks its wallets for seconds, not mongod's default 60 s."""
    own = isolated_settings(short_txn_settings, "group_kill")
    run, count = f"gkill-{uuid.uuid4().hex[:8]}", 6
    await kill_when_stopped(CRASHER, [tb_addresses, run, str(count)], worker_env(own, "-"),
                            tmp_path / "crasher.log", 180)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(short_txn_mongodb_uri)
    try:
        db = client[own.mongodb_database]
        store = await store_of(db)
        keys = [WalletKey(client_id=f"{run}-{n}", country=DUAL_PAIR[1], currency=DUAL_PAIR[0])
                for n in range(count)]
        ops = [AddCredit(wallet=w, transaction_id=f"{w.client_id}.1", amount=Decimal("2.50"))
               for w in keys]
        assert not await store.transactions_held([op.transaction_id for op in ops])
        # The killed worker's transaction holds its wallets until the server expires it (its
        # transaction lifetime, as mongod's transactionLifetimeLimitSeconds): the retries
        # conflict until then, as the wallet workflow's activity retries would.
        deadline = time.monotonic() + 240
        for op in ops:
            while True:
                assert time.monotonic() < deadline, "the killed worker's wallets stayed blocked"
                with contextlib.suppress(StoreUnavailableError):
                    result, _ = await store.apply(op, outbox=intent_of(op))
                    break
            assert not result.replayed and result.credit == Decimal("102.50")
        for op in ops:  # retried once more (an activity retry after its answer was lost)
            again, _ = await store.apply(op, outbox=intent_of(op))
            assert again.replayed and again.credit == Decimal("102.50")
        for w in keys:
            txns = await db[WALLET_TRANSACTIONS].find({"wallet": w.canonical}).to_list(None)
            assert sorted(d["_id"] for d in txns) == [f"{w.client_id}.1", f"{w.client_id}.seed"]
            records = await db[WALLET_OUTBOX].find({"wallet": w.canonical}).to_list(None)
            assert [d["_id"] for d in records] == [f"{w.client_id}.1"]
    finally:
        await client.close()


def intent_of(op: WalletOperation) -> OutboxIntent:
    return OutboxIntent(command=WalletCommand.of(op), phase=Phase.DUAL_WRITE, epoch=1,
                        since_version=None)


def test_the_switch_is_wired() -> None:
    """WALLETMIG_LEGACY_GROUP_COMMIT=off: the store's default (read at import)."""
    code = "import stores.legacy_store as m; print(m.GROUP_COMMIT_DEFAULT)"
    env = {"WALLETMIG_LEGACY_GROUP_COMMIT": "off", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                         capture_output=True, check=True, timeout=60)
    assert out.stdout.strip() == b"False"


async def test_two_writes_of_one_wallet_never_share_a_group_and_keep_their_order() -> None:
    """The committer alone (its commit function records the groups): a later entry of a key
    already in the group waits for a later group, in arrival order; groups are bounded."""
    groups: list[list[str]] = []

    async def commit_group(entries: list[str]) -> bool:
        groups.append(entries)
        return True

    committer: GroupCommitter[str] = GroupCommitter(commit_group, ops_max=3, bytes_max=100)

    async def write(entry: str) -> None:
        async with committer.turn(entry, key=entry[0], size=99 if entry == "e1" else 1) as done:
            assert done

    arrivals = ["a1", "b1", "a2", "c1", "d1", "a3", "e1", "f1"]
    async with committer.turn("held", key="h", size=0):
        tasks = [asyncio.create_task(write(e)) for e in arrivals]
        await all_queued(committer, tasks)
    await asyncio.gather(*tasks)
    # e1 does not fit group 2 (bytes): it waits; f1, of another key, goes ahead of it.
    assert groups == [["a1", "b1", "c1"], ["a2", "d1", "f1"], ["a3", "e1"]]
    assert (committer.groups, committer.grouped, committer.alone) == (3, 8, 1)
