"""Constants, record layouts and client-side argument checks for the TigerBeetle engine.

Kept apart from ``engine.py`` so the state machine reads as the server's rules only.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from array import array
from bisect import bisect_left
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any

import tigerbeetle as tb
from tigerbeetle.lib import validate_uint

# ---------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------

BATCH_EVENTS_MAX = 8189  # events per request and rows per query (1 MiB message, 128 B rows)
U128_MAX = (1 << 128) - 1
U64_MAX = (1 << 64) - 1
TIMESTAMP_MAX = (1 << 63) - 1  # u63: the top bit of a u64 timestamp is reserved upstream
NS_PER_S = 1_000_000_000

# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

# Plain-int copies of the tigerbeetle package's flag enums (IntFlag arithmetic costs ~1 us an
# operation on the hot path); taken from the enums, never written out.
AF_LINKED = int(tb.AccountFlags.LINKED)
AF_DEBITS_MUST_NOT_EXCEED_CREDITS = int(tb.AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
AF_CREDITS_MUST_NOT_EXCEED_DEBITS = int(tb.AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)
AF_HISTORY = int(tb.AccountFlags.HISTORY)
AF_IMPORTED = int(tb.AccountFlags.IMPORTED)
AF_CLOSED = int(tb.AccountFlags.CLOSED)
AF_KNOWN = functools.reduce(operator.or_, map(int, tb.AccountFlags))

TF_LINKED = int(tb.TransferFlags.LINKED)
TF_PENDING = int(tb.TransferFlags.PENDING)
TF_POST = int(tb.TransferFlags.POST_PENDING_TRANSFER)
TF_VOID = int(tb.TransferFlags.VOID_PENDING_TRANSFER)
TF_BALANCING_DEBIT = int(tb.TransferFlags.BALANCING_DEBIT)
TF_BALANCING_CREDIT = int(tb.TransferFlags.BALANCING_CREDIT)
TF_CLOSING_DEBIT = int(tb.TransferFlags.CLOSING_DEBIT)
TF_CLOSING_CREDIT = int(tb.TransferFlags.CLOSING_CREDIT)
TF_IMPORTED = int(tb.TransferFlags.IMPORTED)
TF_KNOWN = functools.reduce(operator.or_, map(int, tb.TransferFlags))
TF_POST_OR_VOID = TF_POST | TF_VOID
TF_BALANCING = TF_BALANCING_DEBIT | TF_BALANCING_CREDIT
TF_CLOSING = TF_CLOSING_DEBIT | TF_CLOSING_CREDIT
TF_EXCLUSIVE_WITH_POST_OR_VOID = TF_PENDING | TF_BALANCING | TF_CLOSING

FF_DEBITS = int(tb.AccountFilterFlags.DEBITS)
FF_CREDITS = int(tb.AccountFilterFlags.CREDITS)
FF_REVERSED = int(tb.AccountFilterFlags.REVERSED)
FF_KNOWN = functools.reduce(operator.or_, map(int, tb.AccountFilterFlags))
QF_REVERSED = int(tb.QueryFilterFlags.REVERSED)
QF_KNOWN = functools.reduce(operator.or_, map(int, tb.QueryFilterFlags))
# The engine's fast path spells a few of these as literals (comments name them).
assert (AF_DEBITS_MUST_NOT_EXCEED_CREDITS, AF_CREDITS_MUST_NOT_EXCEED_DEBITS, AF_CLOSED) == (
    0x2, 0x4, 0x20)
assert (AF_KNOWN, TF_KNOWN, FF_KNOWN, QF_KNOWN) == ((1 << 6) - 1, (1 << 9) - 1, 7, 1)

# ---------------------------------------------------------------------------------------------
# Event tuples: the dataclass fields in declaration order (what ``attrgetter`` extracts and
# what a wire decoder can produce without building dataclasses).
# ---------------------------------------------------------------------------------------------

ACCOUNT_FIELDS = (
    "id", "debits_pending", "debits_posted", "credits_pending", "credits_posted",
    "user_data_128", "user_data_64", "user_data_32", "ledger", "code", "flags", "timestamp",
)
TRANSFER_FIELDS = (
    "id", "debit_account_id", "credit_account_id", "amount", "pending_id", "user_data_128",
    "user_data_64", "user_data_32", "timeout", "ledger", "code", "flags", "timestamp",
)
assert tuple(f.name for f in dataclasses.fields(tb.Account)) == ACCOUNT_FIELDS
assert tuple(f.name for f in dataclasses.fields(tb.Transfer)) == TRANSFER_FIELDS
account_tuple: Callable[[tb.Account], tuple[Any, ...]] = attrgetter(*ACCOUNT_FIELDS)
transfer_tuple: Callable[[tb.Transfer], tuple[Any, ...]] = attrgetter(*TRANSFER_FIELDS)
T_ID, T_DR, T_CR, T_AMOUNT, T_PENDING_ID, T_UD128, T_UD64, T_UD32 = range(8)
T_TIMEOUT, T_LEDGER, T_CODE, T_FLAGS, T_TIMESTAMP = range(8, 13)

# ---------------------------------------------------------------------------------------------
# Account records: a plain list per account (cheap indexed reads, in-place updates) whose
# first 12 slots are exactly tb.Account's fields, so ``tb.Account(*a[:A_PUBLIC])`` builds the
# public object.  A_FLAGS_ENUM mirrors A_FLAGS (the int used for bit tests).
# ---------------------------------------------------------------------------------------------

A_ID = 0
A_DP = 1  # debits_pending
A_DPO = 2  # debits_posted
A_CP = 3  # credits_pending
A_CPO = 4  # credits_posted
A_UD128 = 5
A_UD64 = 6
A_UD32 = 7
A_LEDGER = 8
A_CODE = 9
A_FLAGS_ENUM = 10
A_TS = 11
A_FLAGS = 12
A_ROWS = 13  # array('I') of transfer rows touching the account, ascending
A_SNAPS = 14  # HISTORY accounts: 4 balances after each row in A_ROWS, flattened; else None
A_PUBLIC = 12  # leading slots that mirror tb.Account
A_MUTABLE = 13  # leading slots a transfer may change (balances, flags); undo restores them

# Pending transfer states.
P_PENDING = 0
P_POSTED = 1
P_VOIDED = 2
P_EXPIRED = 3

# Undo-log entry kinds (recorded only while a linked chain is open).
U_ACCOUNT = 0  # (kind, account record, tuple(record[:A_MUTABLE]) before)
U_PENDING = 1  # (kind, pending row, status before or None if the chain created it)

ID_ORPHAN = -1  # transfer index value of an id burnt by a transient failure

CAS = tb.CreateAccountStatus
CTS = tb.CreateTransferStatus

# Failures that depend on current state: the id may never be reused (ID_ALREADY_FAILED).
TRANSIENT_TRANSFER_STATUSES = frozenset(
    {
        CTS.DEBIT_ACCOUNT_NOT_FOUND,
        CTS.CREDIT_ACCOUNT_NOT_FOUND,
        CTS.PENDING_TRANSFER_NOT_FOUND,
        CTS.EXCEEDS_CREDITS,
        CTS.EXCEEDS_DEBITS,
        CTS.DEBIT_ACCOUNT_ALREADY_CLOSED,
        CTS.CREDIT_ACCOUNT_ALREADY_CLOSED,
    }
)


class FlagCache:
    """IntFlag construction is slow (~1 us); flags take few distinct values, so memoize."""

    _ENTRIES_MAX = 4096

    def __init__(self, flag_type: Callable[[int], Any]) -> None:
        self._type = flag_type
        self._cache: dict[int, Any] = {}

    def get(self, value: int) -> Any:
        flag = self._cache.get(value)
        if flag is None:
            flag = self._type(value)
            if len(self._cache) < self._ENTRIES_MAX:
                self._cache[value] = flag
        return flag


ACCOUNT_FLAGS = FlagCache(tb.AccountFlags)
TRANSFER_FLAGS = FlagCache(tb.TransferFlags)

# ---------------------------------------------------------------------------------------------
# Client-side checks (what tigerbeetle.ClientSync raises before sending anything)
# ---------------------------------------------------------------------------------------------

_ACCOUNT_BITS = (128, 128, 128, 128, 128, 128, 64, 32, 32, 16, 0, 64)  # 0: flags (c_uint16)
_TRANSFER_BITS = (128, 128, 128, 128, 128, 128, 64, 32, 32, 32, 16, 0, 64)
_ACCOUNT_FILTER_FIELDS: tuple[tuple[str, int], ...] = (
    ("account_id", 128), ("user_data_128", 128), ("user_data_64", 64), ("user_data_32", 32),
    ("code", 16), ("timestamp_min", 64), ("timestamp_max", 64), ("limit", 32),
)
_QUERY_FILTER_FIELDS: tuple[tuple[str, int], ...] = (
    ("user_data_128", 128), ("user_data_64", 64), ("user_data_32", 32), ("ledger", 32),
    ("code", 16), ("timestamp_min", 64), ("timestamp_max", 64), ("limit", 32),
)


def _raise_for_fields(values: Sequence[Any], names: Sequence[str], bits: Sequence[int]) -> None:
    """Raise exactly what the official client raises for an out-of-range or non-int field."""
    for name, width, value in zip(names, bits, values, strict=True):
        if width:
            validate_uint(bits=width, name=name, number=value)
        if not isinstance(value, int):
            raise TypeError(f"{name}: int expected instead of {type(value).__name__}")


def validate_account_rows(rows: Sequence[Sequence[Any]]) -> None:
    try:
        for a_id, dp, dpo, cp, cpo, ud128, ud64, ud32, ledger, code, flags, ts in rows:
            # OR-ing a group is negative if any member is negative, so one shift checks both
            # bounds of the whole group.
            if (
                (a_id | dp | dpo | cp | cpo | ud128) >> 128
                or (ud64 | ts) >> 64
                or (ud32 | ledger) >> 32
                or code >> 16
                or not isinstance(flags, int)
            ):
                break
        else:
            return
    except TypeError:
        pass
    for row in rows:
        _raise_for_fields(row, ACCOUNT_FIELDS, _ACCOUNT_BITS)


def validate_transfers(transfers: Sequence[tb.Transfer]) -> None:
    try:
        for t in transfers:
            if (
                (t.id | t.debit_account_id | t.credit_account_id | t.amount | t.pending_id
                 | t.user_data_128) >> 128
                or (t.user_data_64 | t.timestamp) >> 64
                or (t.user_data_32 | t.timeout | t.ledger) >> 32
                or t.code >> 16
                or not isinstance(t.flags, int)
            ):
                break
        else:
            return
    except TypeError:
        pass
    for t in transfers:
        _raise_for_fields(transfer_tuple(t), TRANSFER_FIELDS, _TRANSFER_BITS)


# The client converts its arguments first (IntegerOverflowError / TypeError), then a closed
# client refuses the request (ClientClosedError), and only then is the size checked
# (TooMuchDataError): the validators below are the first step, ``check_batch_size`` the last.


def validate_account_filter(f: tb.AccountFilter) -> None:
    for name, bits in _ACCOUNT_FILTER_FIELDS:
        _raise_for_fields((getattr(f, name),), (name,), (bits,))
    # flags is a c_uint32 field: any int is truncated, anything else is a TypeError.
    _raise_for_fields((f.flags,), ("flags",), (0,))


def validate_query_filter(f: tb.QueryFilter) -> None:
    for name, bits in _QUERY_FILTER_FIELDS:
        _raise_for_fields((getattr(f, name),), (name,), (bits,))
    _raise_for_fields((f.flags,), ("flags",), (0,))


def check_batch_size(count: int) -> None:
    """More than a message's worth of events (or of filter rows) is refused."""
    if count > BATCH_EVENTS_MAX:
        raise tb.TooMuchDataError()


def lookup_keys(ids: list[int]) -> list[int]:
    """Ids as the client encodes them: wrapped to u128 (it does not range-check lookups)."""
    if not ids:
        return []
    if set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) <= U128_MAX:
        return ids
    for i in ids:
        if not isinstance(i, int):
            raise TypeError(f"int expected instead of {type(i).__name__}")
    return [i & U128_MAX for i in ids]


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def sorted_contains(values: array[int], value: int) -> bool:
    i = bisect_left(values, value)
    return i < len(values) and values[i] == value


def timestamp_bounds(ts_min: int, ts_max: int) -> tuple[int, int] | None:
    """Inclusive range of a filter's bounds (0 = unbounded), None if the server rejects them."""
    if ts_min > TIMESTAMP_MAX or ts_max > TIMESTAMP_MAX:
        return None
    if ts_max != 0 and ts_min > ts_max:
        return None
    return (ts_min or 1, ts_max or TIMESTAMP_MAX)
