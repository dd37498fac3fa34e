"""kill -9 the emulator while 4 clients stream linked transfers; after the restart, every
acknowledged transfer is there, no chain is half-applied and balances match the transfers."""

from __future__ import annotations

import asyncio
import random
import shutil
from pathlib import Path

import tigerbeetle as tb

from tb_emulator.client import EmulatorClientAsync
from tb_emulator.server import EmulatorProcess

ACCOUNTS = 20
CLIENTS = 4
CHAINS_PER_REQUEST = 40
STREAM_S = 1.5
CREATED = tb.CreateTransferStatus.CREATED
LINKED_EVENT_FAILED = tb.CreateTransferStatus.LINKED_EVENT_FAILED


def _chain(rng: random.Random, next_id: list[int], poison: bool) -> list[tb.Transfer]:
    """2-4 linked transfers; a poisoned chain's last transfer fails (unknown credit account),
    so the whole chain must roll back."""
    size = rng.randint(2, 4)
    chain = []
    for i in range(size):
        debit = rng.randint(1, ACCOUNTS)
        credit = rng.randint(1, ACCOUNTS - 1)
        credit += credit >= debit
        if poison and i == size - 1:
            credit = 10_000  # no such account
        last = i == size - 1
        next_id[0] += 1
        chain.append(tb.Transfer(
            id=next_id[0], debit_account_id=debit, credit_account_id=credit,
            amount=rng.randint(1, 1000), ledger=1, code=1,
            flags=tb.TransferFlags.NONE if last else tb.TransferFlags.LINKED))
    return chain


async def _stream(
    address: str, worker: int, stop: asyncio.Event,
    sent: list[list[tb.Transfer]], acknowledged: set[int],
) -> None:
    rng = random.Random(worker)
    next_id = [worker * 10_000_000]
    client = EmulatorClientAsync(0, address, timeout_s=1.0)
    try:
        while not stop.is_set():
            chains = [_chain(rng, next_id, poison=rng.random() < 0.1)
                      for _ in range(CHAINS_PER_REQUEST)]
            sent.extend(chains)
            batch = [t for chain in chains for t in chain]
            try:
                results = await client.create_transfers(batch)
            except (TimeoutError, OSError):
                return  # The server died under us: this request is unacknowledged.
            position = 0
            for chain in chains:
                statuses = {r.status for r in results[position:position + len(chain)]}
                position += len(chain)
                if statuses == {CREATED}:
                    acknowledged.update(t.id for t in chain)
                else:  # A chain fails as a whole.
                    assert CREATED not in statuses and LINKED_EVENT_FAILED in statuses
    finally:
        await client.close()


async def test_kill_9_during_linked_transfer_stream(tmp_path: Path) -> None:
    data_file = str(tmp_path / "data.tbemu")
    process = EmulatorProcess(data_file).start()
    try:
        setup = EmulatorClientAsync(0, process.address)
        account_ids = list(range(1, ACCOUNTS + 1))
        results = await setup.create_accounts(
            [tb.Account(id=i, ledger=1, code=1) for i in account_ids])
        assert all(r.status == tb.CreateAccountStatus.CREATED for r in results)
        await setup.close()

        stop = asyncio.Event()
        sent: list[list[tb.Transfer]] = []
        acknowledged: set[int] = set()
        workers = [asyncio.ensure_future(_stream(process.address, w, stop, sent, acknowledged))
                   for w in range(CLIENTS)]
        await asyncio.sleep(STREAM_S)
        process.kill()  # SIGKILL while requests are in flight.
        stop.set()
        await asyncio.gather(*workers)
        assert acknowledged, "no request was acknowledged before the crash"

        process.start()
        client = EmulatorClientAsync(0, process.address, timeout_s=30)
        try:
            all_ids = [t.id for chain in sent for t in chain]
            present: dict[int, tb.Transfer] = {}
            for start in range(0, len(all_ids), 8189):
                for t in await client.lookup_transfers(all_ids[start:start + 8189]):
                    present[t.id] = t
            missing = acknowledged - present.keys()
            assert not missing, f"{len(missing)} acknowledged transfers lost"
            for chain in sent:
                applied = [t.id in present for t in chain]
                assert all(applied) or not any(applied), f"half-applied chain {chain}"
            debits = dict.fromkeys(account_ids, 0)
            credits = dict.fromkeys(account_ids, 0)
            for t in present.values():
                debits[t.debit_account_id] += t.amount
                credits[t.credit_account_id] += t.amount
            for account in await client.lookup_accounts(account_ids):
                assert account.debits_posted == debits[account.id]
                assert account.credits_posted == credits[account.id]
                assert account.debits_pending == account.credits_pending == 0
            # Unacknowledged but applied chains are allowed (the reply was lost); applied ones
            # equal what was sent.
            assert len(present) >= len(acknowledged)
        finally:
            await client.close()
    except BaseException:
        print("emulator log:\n" + process.read_log())  # Shown by pytest on failure.
        raise
    finally:
        process.kill()
        shutil.rmtree(tmp_path, ignore_errors=True)
