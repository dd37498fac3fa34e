"""kill -9 the emulator while 4 clients stream linked transfers; requests are in flight at the
kill (by construction: the emulator is stopped with SIGSTOP, a request is sent, then SIGKILL).
After the restart the emulator holds exactly the acknowledged transfers plus whole chains of
the in-flight requests, each as it was sent; no chain is half-applied and the balances match
the transfers."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import time
from pathlib import Path

import tigerbeetle as tb

from tb_emulator.client import EmulatorClientAsync
from tb_emulator.server import EmulatorProcess

ACCOUNTS = 20
CLIENTS = 4
CHAINS_PER_REQUEST = 40
STREAM_S = 1.5
IN_FLIGHT_WAIT_S = 10.0  # bound on waiting for an acknowledged request, then for one sent to
# the stopped emulator
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


class _Frozen:
    """Set once the emulator is stopped (SIGSTOP); counts the requests sent after: none of
    them can be answered, so each is in flight at the kill (as is one the stopped emulator
    left unanswered until its client's timeout)."""

    def __init__(self) -> None:
        self.stopped = False
        self.sent_after = 0


async def _stream(
    address: str, worker: int, stop: asyncio.Event, frozen: _Frozen,
    sent: list[list[tb.Transfer]], acknowledged: set[int], unanswered: set[int],
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
            frozen.sent_after += frozen.stopped
            try:
                results = await client.create_transfers(batch)
            except (TimeoutError, OSError):
                # The server died under us: this request was in flight, unacknowledged.
                unanswered.update(t.id for t in batch)
                return
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
        unanswered: set[int] = set()  # ids of the requests in flight at the kill
        frozen = _Frozen()
        workers = [asyncio.ensure_future(
            _stream(process.address, w, stop, frozen, sent, acknowledged, unanswered))
            for w in range(CLIENTS)]
        await asyncio.sleep(STREAM_S)  # acknowledged requests first: some, whatever the host
        deadline = time.monotonic() + IN_FLIGHT_WAIT_S
        while not acknowledged:  # (a slow host may have had none answered in STREAM_S)
            assert time.monotonic() < deadline, "no request acknowledged before the kill"
            await asyncio.sleep(0.01)
        # A killed emulator's answers already written are still read by the clients after
        # it: stop it first, so a request sent now is in flight at the kill by construction.
        os.kill(process.pid, signal.SIGSTOP)
        frozen.stopped = True
        deadline = time.monotonic() + IN_FLIGHT_WAIT_S
        while frozen.sent_after == 0 and not unanswered:  # or a request left unanswered:
            # the clients time out (1 s) on requests the stopped emulator holds
            assert time.monotonic() < deadline, "no request sent to the stopped emulator"
            await asyncio.sleep(0.001)
        process.kill()  # SIGKILL while requests are in flight (a stopped process dies too).
        stop.set()
        await asyncio.gather(*workers)
        assert acknowledged, "no request was acknowledged before the crash"
        assert unanswered, "no request was in flight at the kill"

        process.start()
        client = EmulatorClientAsync(0, process.address, timeout_s=30)
        try:
            await _check_against_sent(client, sent, acknowledged, unanswered, account_ids)
        finally:
            await client.close()
    except BaseException:
        print("emulator log:\n" + process.read_log())  # Shown by pytest on failure.
        raise
    finally:
        process.kill()
        shutil.rmtree(tmp_path, ignore_errors=True)


async def _check_against_sent(
    client: EmulatorClientAsync, sent: list[list[tb.Transfer]], acknowledged: set[int],
    unanswered: set[int], account_ids: list[int],
) -> None:
    """What the restarted emulator holds is exactly what it acknowledged plus whole chains of
    the requests in flight at the kill (their replies were lost), each transfer field for field
    as sent; the accounts' balances are the sum of those transfers."""
    by_id = {t.id: t for chain in sent for t in chain}
    present: dict[int, tb.Transfer] = {}
    ids = list(by_id)
    for start in range(0, len(ids), 8189):
        for t in await client.lookup_transfers(ids[start:start + 8189]):
            present[t.id] = t
    missing = acknowledged - present.keys()
    assert not missing, f"{len(missing)} acknowledged transfers lost"
    extra = present.keys() - acknowledged
    # Refused chains of answered requests are absent; only in-flight requests may add more.
    assert extra <= unanswered, f"{len(extra - unanswered)} transfers never acknowledged"
    assert present.keys() == acknowledged | (present.keys() & unanswered)
    for chain in sent:
        applied = [t.id in present for t in chain]
        assert all(applied) or not any(applied), f"half-applied chain {chain}"
    fields = ("debit_account_id", "credit_account_id", "amount", "ledger", "code", "flags")
    for tid, t in present.items():
        want = by_id[tid]
        assert [getattr(t, f) for f in fields] == [getattr(want, f) for f in fields], (t, want)
    debits = dict.fromkeys(account_ids, 0)
    credits = dict.fromkeys(account_ids, 0)
    for t in present.values():
        debits[t.debit_account_id] += t.amount
        credits[t.credit_account_id] += t.amount
    for account in await client.lookup_accounts(account_ids):
        assert account.debits_posted == debits[account.id]
        assert account.credits_posted == credits[account.id]
        assert account.debits_pending == account.credits_pending == 0
