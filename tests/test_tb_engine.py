"""In-process tests of the TigerBeetle 0.17.9 engine (tb_emulator.engine).

* every golden trace recorded from a real 0.17.9 cluster replays without a mismatch,
* determinism: the same calls with the same clock values give the same results and state
  (what the server's write-ahead-log replay relies on),
* the fast path for plain transfers agrees with the general path on random batches,
* client-side argument checks match the official client.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tigerbeetle as tb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tb_emulator import wire
from tb_emulator.engine import Engine
from tb_emulator.engine_defs import BATCH_EVENTS_MAX, U128_MAX

CONFORMANCE_DIR = Path(__file__).parent / "data" / "tigerbeetle-0.17.9"  # The project's copy.
TRACES = sorted(CONFORMANCE_DIR.glob("*.jsonl"))
WALL_CLOCK_START_NS = 1_800_000_000_000_000_000  # ~2027, like a real server's clock


class FakeClock:
    """Deterministic nanosecond clock; ``sleep`` advances it (replay.py calls engine.sleep)."""

    def __init__(self, start_ns: int = WALL_CLOCK_START_NS, step_ns: int = 1_000) -> None:
        self.now_ns = start_ns
        self.step_ns = step_ns

    def __call__(self) -> int:
        self.now_ns += self.step_ns
        return self.now_ns

    def sleep(self, seconds: float) -> None:
        self.now_ns += int(seconds * 1_000_000_000)


def _engine_with_fake_clock() -> Engine:
    clock = FakeClock()
    engine = Engine(clock_ns=clock)
    engine.sleep = clock.sleep  # type: ignore[attr-defined]
    return engine


def _load_replay() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tb_replay", CONFORMANCE_DIR / "replay.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tb_replay", module)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Golden traces
# ---------------------------------------------------------------------------------------------


def _check_rows_after_every_call(engine: Engine) -> None:
    """The server answers lookup_accounts from the engine's ready rows: after every call they
    must equal the records, and a lookup through them must equal lookup_accounts."""
    for name in ("create_accounts", "create_transfers", "lookup_transfers",
                 "get_account_transfers", "get_account_balances", "query_accounts",
                 "query_transfers"):
        call = getattr(engine, name)

        def checked(arg: Any, call: Callable[[Any], Any] = call) -> Any:
            result = call(arg)
            assert engine.rows_are_current()
            return result

        setattr(engine, name, checked)
    lookup = engine.lookup_accounts

    def lookup_both_ways(ids: list[int]) -> list[tb.Account]:
        result = lookup(ids)
        if len(ids) <= BATCH_EVENTS_MAX and all(isinstance(i, int) for i in ids):
            sent = list(wire.canonical_ids(ids))
            rows, count = engine.lookup_accounts_rows(sent)
            body = wire.pack_lookup_rows(rows, count, all_found=count == len(sent))
            assert wire.unpack_lookup_accounts(body, sent) == result
        assert engine.rows_are_current()
        return result

    engine.lookup_accounts = lookup_both_ways  # type: ignore[method-assign]


@pytest.mark.skipif(not TRACES, reason=f"no conformance traces in {CONFORMANCE_DIR}")
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "general"])
@pytest.mark.parametrize("trace", TRACES, ids=[t.stem for t in TRACES])
def test_trace_replays_without_mismatch(trace: Path, fast_path: bool) -> None:
    replay = _load_replay()
    opts = argparse.Namespace(
        reset_cmd=None, max_mismatches=10, stop_after=0, no_failed_timestamps=False,
        addresses=None, timeout=60.0,
    )

    def factory() -> Engine:
        engine = _engine_with_fake_clock()
        engine.fast_path = fast_path
        _check_rows_after_every_call(engine)
        return engine

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ok = replay.replay_file(str(trace), factory, opts)
    assert ok, out.getvalue()


# ---------------------------------------------------------------------------------------------
# Workload generator and state snapshot shared by the property tests
# ---------------------------------------------------------------------------------------------

LEDGER = 1
ACCOUNT_IDS = list(range(1, 9))
ACCOUNT_FLAG_CHOICES = [
    tb.AccountFlags.NONE,
    tb.AccountFlags.HISTORY,
    tb.AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS | tb.AccountFlags.HISTORY,
    tb.AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS,
]


def _accounts(flags: list[tb.AccountFlags]) -> list[tb.Account]:
    accounts = [
        tb.Account(id=i, ledger=LEDGER, code=1, flags=f)
        for i, f in zip(ACCOUNT_IDS, flags, strict=True)
    ]
    return [*accounts, tb.Account(id=100, ledger=2, code=1)]  # 100: another ledger


def _setup_accounts(engine: Engine, flags: list[tb.AccountFlags]) -> None:
    results = engine.create_accounts(_accounts(flags))
    assert all(r.status == tb.CreateAccountStatus.CREATED for r in results)


def _fixed(value: int) -> Callable[[], int]:
    return lambda: value


def _all_filter(account_id: int) -> tb.AccountFilter:
    return tb.AccountFilter(
        account_id=account_id, user_data_128=0, user_data_64=0, user_data_32=0, code=0,
        timestamp_min=0, timestamp_max=0, limit=BATCH_EVENTS_MAX,
        flags=tb.AccountFilterFlags.DEBITS | tb.AccountFilterFlags.CREDITS,
    )


def _everything() -> tb.QueryFilter:
    return tb.QueryFilter(
        user_data_128=0, user_data_64=0, user_data_32=0, ledger=0, code=0, timestamp_min=0,
        timestamp_max=0, limit=BATCH_EVENTS_MAX, flags=tb.QueryFilterFlags.NONE,
    )


def _snapshot(engine: Engine) -> dict[str, Any]:
    """Everything observable through the public API, plus the burnt ids."""
    assert engine.rows_are_current()
    accounts = engine.query_accounts(_everything())
    return {
        "accounts": accounts,
        "transfers": engine.query_transfers(_everything()),
        "balances": {a.id: engine.get_account_balances(_all_filter(a.id)) for a in accounts},
        "account_transfers": {
            a.id: engine.get_account_transfers(_all_filter(a.id)) for a in accounts
        },
        "burnt": sorted(k for k, v in engine._tx_index.items() if v < 0),
    }


def _random_transfer(
    rng: random.Random, next_id: Callable[[], int], known: list[int], pending: list[int]
) -> tb.Transfer:
    """Mostly plain transfers, with duplicates, unknown accounts, limits, overflow amounts,
    pending / post / void / linked / balancing / closing mixed in."""
    kind = rng.random()
    tid = rng.choice(known) if known and rng.random() < 0.1 else next_id()
    dr = rng.choice([*ACCOUNT_IDS, *ACCOUNT_IDS, *ACCOUNT_IDS, 100, 999])
    cr = rng.choice([*ACCOUNT_IDS, *ACCOUNT_IDS, *ACCOUNT_IDS, 100, 0])
    amount = rng.choice([0, 1, 5, 50, 1_000, U128_MAX - 10, *(rng.randrange(1, 500),) * 6])
    flags = tb.TransferFlags.NONE
    pending_id = 0
    timeout = 0
    if kind < 0.15:
        flags = tb.TransferFlags.PENDING
        timeout = rng.choice([0, 0, 1, 2])
        pending.append(tid)
    elif kind < 0.27 and pending:
        flags = rng.choice([tb.TransferFlags.POST_PENDING_TRANSFER,
                            tb.TransferFlags.VOID_PENDING_TRANSFER])
        pending_id = rng.choice(pending)
        dr = cr = 0
        amount = rng.choice([0, amount, U128_MAX])
    elif kind < 0.34:
        flags = tb.TransferFlags.LINKED
    elif kind < 0.38:
        flags = rng.choice([tb.TransferFlags.BALANCING_DEBIT, tb.TransferFlags.BALANCING_CREDIT])
    elif kind < 0.40:
        flags = tb.TransferFlags.PENDING | tb.TransferFlags.CLOSING_DEBIT
        pending.append(tid)
    known.append(tid)
    return tb.Transfer(
        id=tid, debit_account_id=dr, credit_account_id=cr, amount=amount,
        pending_id=pending_id, user_data_128=rng.choice([0, 7]), user_data_64=rng.choice([0, 9]),
        user_data_32=rng.choice([0, 3]), timeout=timeout,
        ledger=rng.choice([LEDGER] * 20 + [0, 2]), code=rng.choice([1] * 20 + [0]), flags=flags,
    )


def _workload(seed: int, batches: int = 12) -> Iterator[list[tb.Transfer]]:
    rng = random.Random(seed)
    counter = iter(range(1, 10**9))
    known: list[int] = []
    pending: list[int] = []
    for _ in range(batches):
        yield [_random_transfer(rng, lambda: next(counter), known, pending)
               for _ in range(rng.randrange(1, 40))]


# ---------------------------------------------------------------------------------------------
# Determinism (the server's write-ahead-log replay depends on it)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_calls_and_clock_give_same_results_and_state(seed: int) -> None:
    """Run a workload with pending timeouts against a jumping clock and interleaved reads,
    then replay only the create calls with the recorded clock values into a fresh engine."""
    rng = random.Random(seed)
    recorded: list[tuple[int, str, Any]] = []
    now_ns = [WALL_CLOCK_START_NS]

    def live_clock() -> int:
        now_ns[0] += rng.choice([1_000, 400_000_000, 1_500_000_000])  # crosses 1-2 s timeouts
        return now_ns[0]

    live = Engine(clock_ns=live_clock)
    flags = [rng.choice(ACCOUNT_FLAG_CHOICES) for _ in ACCOUNT_IDS]
    live_results: list[Any] = []

    def logged(op: str, args: Any) -> Any:
        clock_value = live_clock()
        live.clock_ns = _fixed(clock_value)
        recorded.append((clock_value, op, args))
        return getattr(live, op)(args)

    logged("create_accounts", _accounts(flags))
    for batch in _workload(seed):
        live_results.append(logged("create_transfers", batch))
        live.clock_ns = live_clock
        live.lookup_accounts(ACCOUNT_IDS)  # reads may expire pending transfers as well
    final_clock = live_clock()
    live.clock_ns = _fixed(final_clock)

    replayed = Engine()
    replayed_results = []
    for clock_value, op, args in recorded:
        replayed.clock_ns = _fixed(clock_value)
        result = getattr(replayed, op)(args)
        if op == "create_transfers":
            replayed_results.append(result)
    replayed.clock_ns = _fixed(final_clock)

    assert replayed_results == live_results
    assert _snapshot(replayed) == _snapshot(live)


def test_timestamps_are_consecutive_strictly_increasing_and_follow_the_clock() -> None:
    clock = FakeClock(step_ns=0)
    engine = Engine(clock_ns=clock)
    a = engine.create_accounts([tb.Account(id=i, ledger=1, code=1) for i in (1, 2, 3)])
    assert [r.timestamp for r in a] == [clock.now_ns + i for i in range(3)]
    # The clock did not move: the next batch still starts after the previous one.
    t = engine.create_transfers([tb.Transfer(id=1, debit_account_id=1, credit_account_id=2,
                                             amount=1, ledger=1, code=1)])
    assert t[0].timestamp == a[-1].timestamp + 1
    clock.now_ns += 10**9
    t = engine.create_transfers([tb.Transfer(id=2, debit_account_id=1, credit_account_id=2,
                                             amount=1, ledger=1, code=1)])
    assert t[0].timestamp == clock.now_ns


def test_pending_expiry_is_a_function_of_the_clock() -> None:
    clock = FakeClock(step_ns=0)
    engine = Engine(clock_ns=clock)
    engine.create_accounts([tb.Account(id=i, ledger=1, code=1) for i in (1, 2)])
    created = engine.create_transfers([tb.Transfer(
        id=1, debit_account_id=1, credit_account_id=2, amount=10, ledger=1, code=1, timeout=1,
        flags=tb.TransferFlags.PENDING,
    )])
    expires_at_ns = created[0].timestamp + 1_000_000_000
    assert engine.lookup_accounts([1])[0].debits_pending == 10
    clock.now_ns = expires_at_ns - 1
    assert engine.lookup_accounts([1])[0].debits_pending == 10
    clock.now_ns = expires_at_ns
    assert engine.lookup_accounts([1])[0].debits_pending == 0
    post = engine.create_transfers([tb.Transfer(id=2, pending_id=1,
                                                flags=tb.TransferFlags.POST_PENDING_TRANSFER)])
    assert post[0].status == tb.CreateTransferStatus.PENDING_TRANSFER_EXPIRED
    # Expiry writes no balance row.
    assert engine.get_account_balances(_all_filter(1)) == []


# ---------------------------------------------------------------------------------------------
# Fast path == general path
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    flags=st.lists(st.sampled_from(ACCOUNT_FLAG_CHOICES), min_size=8, max_size=8),
)
def test_fast_path_matches_general_path(seed: int, flags: list[tb.AccountFlags]) -> None:
    engines = []
    for fast in (True, False):
        engine = Engine(clock_ns=FakeClock())
        engine.fast_path = fast
        _setup_accounts(engine, flags)
        # Fund the accounts so limit flags sometimes pass and sometimes fail.
        engine.create_transfers([
            tb.Transfer(id=10**12 + i, debit_account_id=(i % 8) + 1,
                        credit_account_id=((i + 3) % 8) + 1, amount=100, ledger=1, code=1)
            for i in range(8)
        ])
        engines.append(engine)
    for batch in _workload(seed, batches=6):
        fast_results = engines[0].create_transfers(batch)
        general_results = engines[1].create_transfers(batch)
        assert fast_results == general_results
    assert _snapshot(engines[0]) == _snapshot(engines[1])


# ---------------------------------------------------------------------------------------------
# Client-side behaviour
# ---------------------------------------------------------------------------------------------


def test_argument_checks_match_the_client() -> None:
    engine = Engine()
    with pytest.raises(tb.IntegerOverflowError, match="ledger"):
        engine.create_accounts([tb.Account(id=1, ledger=2**32, code=1)])
    with pytest.raises(tb.IntegerOverflowError, match="amount"):
        engine.create_transfers([tb.Transfer(id=1, amount=-1)])
    with pytest.raises(tb.TooMuchDataError):
        engine.create_transfers([tb.Transfer(id=i + 1) for i in range(BATCH_EVENTS_MAX + 1)])
    with pytest.raises(tb.TooMuchDataError):
        engine.lookup_accounts(list(range(1, BATCH_EVENTS_MAX + 2)))
    too_many = _all_filter(1)
    too_many.limit = BATCH_EVENTS_MAX + 1
    with pytest.raises(tb.TooMuchDataError):
        engine.get_account_transfers(too_many)
    # Nothing was applied by the rejected calls.
    assert engine.query_accounts(_everything()) == []
    assert engine.create_transfers([]) == []


def test_engine_state_is_isolated_from_caller_objects() -> None:
    engine = Engine(clock_ns=FakeClock())
    accounts = [tb.Account(id=i, ledger=1, code=1) for i in (1, 2)]
    engine.create_accounts(accounts)
    transfer = tb.Transfer(id=5, debit_account_id=1, credit_account_id=2, amount=7, ledger=1,
                           code=1)
    engine.create_transfers([transfer])
    accounts[0].ledger = 99
    transfer.amount = 1000
    looked_up = engine.lookup_accounts([1])[0]
    looked_up.debits_posted = 123
    assert engine.lookup_accounts([1])[0].ledger == 1
    assert engine.lookup_accounts([1])[0].debits_posted == 7
    assert engine.lookup_transfers([5])[0].amount == 7


def test_lookup_keeps_order_and_duplicates_and_raw_rows_match() -> None:
    engine = Engine(clock_ns=FakeClock())
    engine.create_accounts([tb.Account(id=i, ledger=1, code=1) for i in (1, 2)])
    assert [a.id for a in engine.lookup_accounts([2, 3, 1, 2])] == [2, 1, 2]
    raw = engine.lookup_accounts_raw([2, 1])
    assert [tb.Account(*row) for row in raw] == engine.lookup_accounts([2, 1])
    engine.close()
    with pytest.raises(tb.ClientClosedError):
        engine.lookup_accounts([1])


def test_history_rows_hold_balances_beyond_64_bits_and_follow_chain_rollback() -> None:
    engine = Engine(clock_ns=FakeClock())
    engine.create_accounts([tb.Account(id=i, ledger=1, code=1, flags=tb.AccountFlags.HISTORY)
                            for i in (1, 2)])
    small = tb.Transfer(id=1, debit_account_id=1, credit_account_id=2, amount=5, ledger=1,
                        code=1)
    big = tb.Transfer(id=2, debit_account_id=1, credit_account_id=2, amount=2**100, ledger=1,
                      code=1, flags=tb.TransferFlags.LINKED)
    failing = tb.Transfer(id=3, debit_account_id=1, credit_account_id=99, amount=1, ledger=1,
                          code=1)
    results = engine.create_transfers([small, big, failing])
    assert [r.status for r in results] == [
        tb.CreateTransferStatus.CREATED,
        tb.CreateTransferStatus.LINKED_EVENT_FAILED,
        tb.CreateTransferStatus.CREDIT_ACCOUNT_NOT_FOUND,
    ]
    big.flags = tb.TransferFlags.NONE
    big.id = 4
    assert engine.create_transfers([big])[0].status == tb.CreateTransferStatus.CREATED
    rows = engine.get_account_balances(_all_filter(1))
    assert [(r.debits_posted, r.credits_posted) for r in rows] == [(5, 0), (5 + 2**100, 0)]
    rows = engine.get_account_balances(_all_filter(2))
    assert [r.credits_posted for r in rows] == [5, 5 + 2**100]
    assert [r.timestamp for r in rows] == [t.timestamp for t in engine.lookup_transfers([1, 4])]


# ---------------------------------------------------------------------------------------------
# Audit against the 0.17.9 server and client (each test cites its source)
# ---------------------------------------------------------------------------------------------


def test_rolled_back_pending_does_not_expire_an_imported_pending_reusing_its_slot() -> None:
    # docs/reference/requests/create_transfers.md (imported_event_timeout_must_be_zero): an
    # imported pending transfer has no timeout and never expires; it must be posted or voided.
    # A pending transfer rolled back with its chain frees its row and its timestamp, which an
    # imported transfer may then take (> newest transfer, < cluster time).
    clock = FakeClock(step_ns=0)
    engine = Engine(clock_ns=clock)
    engine.create_accounts([tb.Account(id=i, ledger=1, code=1) for i in (1, 2)])
    flags = tb.TransferFlags
    rolled_back = engine.create_transfers([
        tb.Transfer(id=10, debit_account_id=1, credit_account_id=2, amount=5, ledger=1, code=1,
                    timeout=1, flags=flags.PENDING | flags.LINKED),
        tb.Transfer(id=11, debit_account_id=1, credit_account_id=99, amount=5, ledger=1,
                    code=1),
    ])
    assert rolled_back[0].status == tb.CreateTransferStatus.LINKED_EVENT_FAILED
    freed_ns = rolled_back[0].timestamp
    clock.now_ns += 1_000
    imported = engine.create_transfers([tb.Transfer(
        id=20, debit_account_id=1, credit_account_id=2, amount=7, ledger=1, code=1,
        timestamp=freed_ns, flags=flags.PENDING | flags.IMPORTED,
    )])
    assert imported[0] == tb.CreateTransferResult(freed_ns, tb.CreateTransferStatus.CREATED)
    clock.now_ns += 5 * 1_000_000_000  # well past the rolled-back transfer's expiry
    assert engine.lookup_accounts([1])[0].debits_pending == 7
    post = engine.create_transfers([tb.Transfer(id=21, pending_id=20, amount=U128_MAX,
                                                flags=flags.POST_PENDING_TRANSFER)])
    assert post[0].status == tb.CreateTransferStatus.CREATED
    assert engine.lookup_accounts([1])[0].debits_posted == 7


def test_client_errors_come_in_the_official_clients_order() -> None:
    # tigerbeetle/client.py: _submit converts every argument (_acquire_packet: validate_uint,
    # c_uint128.from_param, ctypes fields) before tb_client_submit, which refuses a closed
    # client (ClientClosedError) before the request size is checked (TooMuchDataError).
    engine = Engine(clock_ns=FakeClock())
    too_many_ids: list[Any] = list(range(1, BATCH_EVENTS_MAX + 2))
    big_filter = _all_filter(1)
    big_filter.limit = BATCH_EVENTS_MAX + 1
    big_query = _everything()
    big_query.limit = BATCH_EVENTS_MAX + 1
    bad_ids: list[Any] = [*too_many_ids, "1"]
    with pytest.raises(TypeError):
        engine.lookup_transfers(bad_ids)
    # AccountFilter.flags / QueryFilter.flags are ctypes c_uint32 fields: a non-int is a
    # TypeError (an out-of-range int is silently truncated).
    bad_flags = _all_filter(1)
    bad_flags.flags = 1.5  # type: ignore[assignment]
    with pytest.raises(TypeError):
        engine.get_account_transfers(bad_flags)
    bad_query = _everything()
    bad_query.flags = "0"  # type: ignore[assignment]
    with pytest.raises(TypeError):
        engine.query_transfers(bad_query)
    engine.close()
    for call in (
        lambda: engine.lookup_accounts(too_many_ids),
        lambda: engine.lookup_transfers(too_many_ids),
        lambda: engine.get_account_transfers(big_filter),
        lambda: engine.get_account_balances(big_filter),
        lambda: engine.query_accounts(big_query),
        lambda: engine.query_transfers(big_query),
        lambda: engine.create_transfers(
            [tb.Transfer(id=i + 1) for i in range(BATCH_EVENTS_MAX + 1)]
        ),
    ):
        with pytest.raises(tb.ClientClosedError):
            call()
    with pytest.raises(tb.IntegerOverflowError):
        engine.get_account_transfers(tb.AccountFilter(
            account_id=-1, user_data_128=0, user_data_64=0, user_data_32=0, code=0,
            timestamp_min=0, timestamp_max=0, limit=1, flags=tb.AccountFilterFlags.DEBITS,
        ))


def test_stale_rows_are_packed_between_requests_or_by_the_lookup() -> None:
    """Writes only mark account rows stale; the server packs them a slice at a time between
    requests, and a lookup packs the stale ones it reads. Either way a lookup through the
    rows equals lookup_accounts."""
    engine = Engine(clock_ns=FakeClock())
    ids = list(range(1, 301))
    engine.create_accounts([tb.Account(id=i, ledger=1, code=1) for i in ids])
    engine.create_transfers([
        tb.Transfer(id=10_000 + i, debit_account_id=i, credit_account_id=301 - i, amount=i,
                    ledger=1, code=1) for i in range(1, 151)])
    assert engine.rows_are_current()
    assert engine.pack_stale_rows(100) == 200  # 300 stale: 100 packed
    assert engine.rows_are_current()
    rows, count = engine.lookup_accounts_rows(ids[:50] + ids[250:])  # some packed, some not
    expected = engine.lookup_accounts(ids[:50] + ids[250:])
    assert count == len(expected) == 100
    assert wire.unpack_lookup_accounts(wire.pack_lookup_rows(rows, count, True),
                                       ids[:50] + ids[250:]) == expected
    while engine.pack_stale_rows(64):
        pass
    assert engine.rows_are_current() and not engine._stale_rows
