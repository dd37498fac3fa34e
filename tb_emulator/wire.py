"""Binary wire format between the emulator client adapter and the emulator server.

Encoding/decoding is the hot path (>= 50k transfers/s through one Python client and one Python
server), so the representation is chosen for what CPython does fast:

* Accounts and transfers are COLUMNAR: a batch of N is `count u32 | block mask u32 | blocks`,
  one block per field in TigerBeetle's declaration order (N little-endian u64/u32/u16 values; a
  u128 field is a block of low halves then a block of high halves). All-zero blocks are left
  out (mask bit clear): most fields of typical events are 0. Each block converts with one C
  call (`array(typecode, values)` / `array.tolist()`) and objects are built with
  `map(tb.Transfer, *columns)`: measured 15-40 % cheaper than per-row `struct.pack_into` /
  `iter_unpack` of TigerBeetle's 128-byte rows, half the bytes, and no third-party package.
* lookup_accounts replies are rows of TigerBeetle's 128-byte Account layout: the engine keeps
  each account packed that way, so the server joins ready rows instead of touching every field
  of every record (the lookup was bound by that), and the client slices each field out of all
  rows with one strided C-level copy. All found in request order: the client keeps its ids.
* Ids are columnar too: N low halves, then N high halves (u64 each, 16 bytes per id as in
  TigerBeetle). Ids below 2**64 convert with one `array('Q', ids)` call each way; wider ones
  (`tb.id()`, hashes) with an `int.to_bytes` each and two strided slices. Filters and balances
  are compact `struct` rows (TigerBeetle's reserved bytes dropped).
* Create results are sparse: a CREATED event i carries timestamp `base + i`; only the other
  events are listed (index, status, timestamp). The server verifies every implicit result
  against the engine's result instead of assuming its timestamp scheme.

Frame (both directions), little endian:
    body_size u32 | request_id u64 | operation u8 | status u8 | version u16 | body
`request_id` lets one connection pipeline many concurrent requests; requests carry status 0.
A lookup of more than LOOKUP_CHUNK_IDS ids is answered in several frames: PARTIAL ones of
exactly LOOKUP_CHUNK_IDS ids each, then the rest with OK.
"""

from __future__ import annotations

import enum
import struct
import sys
from array import array
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from operator import attrgetter
from typing import Any, Final, TypeVar

import tigerbeetle as tb

from tb_emulator import request_limit
from tb_emulator.engine_defs import account_tuple
from tb_emulator.gc_pause import build_without_gc
from tb_emulator.layout import (
    ACCOUNT_ROW_SIZE,
    CODE_U16,
    FLAGS_U16,
    LEDGER_U32,
    TIMESTAMP_WORD,
    U128_WORDS,
    USER_DATA_32_U32,
    USER_DATA_64_WORD,
    WORDS_PER_ROW,
    pack_account_row,
)

E = TypeVar("E")

# 4: ids as a low and a high block. 5: lookup_accounts replies as rows. 6: REGISTER.
VERSION: Final = 6
# Largest batch at the largest request limit (1 MiB), and most rows of any reply: the bound of
# every buffer. The announced request limit may allow fewer: see batch_max_by_op.
BATCH_EVENTS_MAX: Final = 8189
assert BATCH_EVENTS_MAX == request_limit.ROWS_MAX
U64_MASK: Final = (1 << 64) - 1
U128_MASK: Final = (1 << 128) - 1
# A lookup of more ids is answered in chunks of this many ids (PARTIAL frames, then the last
# chunk with OK): the client decodes a chunk while the server looks up and packs the next one,
# which measured ~25 % off a full lookup on 2 cores. The server computes every chunk in the
# same synchronous step, so the lookup still reads one state like the real server's.
LOOKUP_CHUNK_IDS: Final = 2048

HEADER = struct.Struct("<IQBBH")
HEADER_SIZE: Final = HEADER.size  # 16

ID = struct.Struct("<QQ")
ACCOUNT_FILTER = struct.Struct("<QQQQQIHxxQQII")  # Compact: 58 reserved bytes dropped.
QUERY_FILTER = struct.Struct("<QQQIIHxxQQII")
BALANCE = struct.Struct("<8QQ")  # Compact: TigerBeetle's 56 reserved bytes dropped.
CREATE_RESULTS_HEAD = struct.Struct("<QII")  # base_timestamp, count, explicit_count
CREATE_RESULT = struct.Struct("<IIQ")  # index, status, timestamp
assert sys.byteorder == "little"  # array blocks are native-endian.

# Largest body either side may send: a full batch of 128-byte events (or rows).
BODY_SIZE_MAX: Final = 8 + BATCH_EVENTS_MAX * 128
assert CREATE_RESULTS_HEAD.size + BATCH_EVENTS_MAX * CREATE_RESULT.size <= BODY_SIZE_MAX


class Status(enum.IntEnum):
    OK = 0
    TOO_MUCH_DATA = 1  # Same codes as tigerbeetle.PacketStatus where they overlap.
    INVALID_OPERATION = 6
    INVALID_DATA_SIZE = 7
    MALFORMED = 8  # Bad header/version: the server closes the connection after replying.
    BUSY = 9
    INTERNAL_ERROR = 10
    PARTIAL = 11  # One chunk of a lookup's reply; more frames of the same request follow.


class Op(enum.IntEnum):
    # A client's first request on each connection (VSR's `register`, not a tb.Operation): the
    # reply announces the server's request limit (REGISTER_REPLY), as the real server's does.
    REGISTER = 2
    LOOKUP_ACCOUNTS = int(tb.Operation.LOOKUP_ACCOUNTS)
    LOOKUP_TRANSFERS = int(tb.Operation.LOOKUP_TRANSFERS)
    GET_ACCOUNT_TRANSFERS = int(tb.Operation.GET_ACCOUNT_TRANSFERS)
    GET_ACCOUNT_BALANCES = int(tb.Operation.GET_ACCOUNT_BALANCES)
    QUERY_ACCOUNTS = int(tb.Operation.QUERY_ACCOUNTS)
    QUERY_TRANSFERS = int(tb.Operation.QUERY_TRANSFERS)
    CREATE_ACCOUNTS = int(tb.Operation.CREATE_ACCOUNTS)
    CREATE_TRANSFERS = int(tb.Operation.CREATE_TRANSFERS)


REGISTER_REPLY = struct.Struct("<I")  # request_limit_bytes
CREATE_OPS: Final = frozenset({Op.CREATE_ACCOUNTS, Op.CREATE_TRANSFERS})
LOOKUP_OPS: Final = frozenset({Op.LOOKUP_ACCOUNTS, Op.LOOKUP_TRANSFERS})  # chunked replies

# Request event size per row-encoded operation (creates are columnar: see CREATE_CODECS).
EVENT_SIZE: Final[dict[int, int]] = {
    Op.LOOKUP_ACCOUNTS: ID.size,
    Op.LOOKUP_TRANSFERS: ID.size,
    Op.GET_ACCOUNT_TRANSFERS: ACCOUNT_FILTER.size,
    Op.GET_ACCOUNT_BALANCES: ACCOUNT_FILTER.size,
    Op.QUERY_ACCOUNTS: QUERY_FILTER.size,
    Op.QUERY_TRANSFERS: QUERY_FILTER.size,
}
SINGLE_EVENT_OPS: Final = frozenset(
    {Op.GET_ACCOUNT_TRANSFERS, Op.GET_ACCOUNT_BALANCES, Op.QUERY_ACCOUNTS, Op.QUERY_TRANSFERS}
)


def batch_max_by_op(limit_bytes: int) -> dict[int, int]:
    """Most events per request of each operation under a request limit, by TigerBeetle's
    element sizes (not this wire format's): 128-byte events and filters, 16-byte ids."""
    creates = request_limit.create_batch_max(limit_bytes)
    lookups = request_limit.lookup_batch_max(limit_bytes)
    batch_max: dict[int, int] = {op: creates for op in (*CREATE_OPS, *SINGLE_EVENT_OPS)}
    batch_max.update({op: lookups for op in LOOKUP_OPS})
    assert set(batch_max) == set(Op) - {Op.REGISTER}
    assert all(1 <= count <= BATCH_EVENTS_MAX for count in batch_max.values())
    return batch_max


class WireError(Exception):
    """A frame or body violates the wire format."""


class _EnumCache(dict[int, E]):
    """int -> enum member; constructing an IntFlag/IntEnum per row costs ~1 us, a hit ~30 ns.
    Misses call the enum (unknown flag bits are kept, unknown statuses raise ValueError)."""

    def __init__(self, enum_type: Callable[[int], E], prefill: Iterable[int]) -> None:
        super().__init__((i, enum_type(i)) for i in prefill)
        self._enum_type = enum_type

    def __missing__(self, key: int) -> E:
        return self._enum_type(key)


ACCOUNT_FLAGS: Final = _EnumCache(tb.AccountFlags, range(1 << 6))
TRANSFER_FLAGS: Final = _EnumCache(tb.TransferFlags, range(1 << 9))
ACCOUNT_STATUS: Final = _EnumCache(tb.CreateAccountStatus, map(int, tb.CreateAccountStatus))
TRANSFER_STATUS: Final = _EnumCache(tb.CreateTransferStatus, map(int, tb.CreateTransferStatus))
CREATED: Final = 0xFFFFFFFF
assert int(tb.CreateAccountStatus.CREATED) == CREATED == int(tb.CreateTransferStatus.CREATED)


# ------------------------------------------------------------------------------------------
# Frames
# ------------------------------------------------------------------------------------------


def frame(request_id: int, op: int, status: int, body: bytes | bytearray) -> bytes:
    return HEADER.pack(len(body), request_id, op, status, VERSION) + body


def lookup_chunks(count: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of a lookup of `count` ids, in reply order."""
    assert 0 <= count <= BATCH_EVENTS_MAX
    starts = range(0, count, LOOKUP_CHUNK_IDS)
    return [(start, min(start + LOOKUP_CHUNK_IDS, count)) for start in starts] or [(0, 0)]


# ------------------------------------------------------------------------------------------
# Validation (slow path, only after a fast-path pack failed): the real client's messages.
# ------------------------------------------------------------------------------------------

# `flags` is not range-checked by the real client: ctypes truncates it to its C width.
_ACCOUNT_FILTER_FIELDS: Final = (
    ("account_id", 128), ("user_data_128", 128), ("user_data_64", 64), ("user_data_32", 32),
    ("code", 16), ("timestamp_min", 64), ("timestamp_max", 64), ("limit", 32), ("flags", 0),
)
_QUERY_FILTER_FIELDS: Final = (
    ("user_data_128", 128), ("user_data_64", 64), ("user_data_32", 32), ("ledger", 32),
    ("code", 16), ("timestamp_min", 64), ("timestamp_max", 64), ("limit", 32), ("flags", 0),
)


def validate_uint(name: str, bits: int, number: object) -> None:
    """Raises what the real client raises: tigerbeetle's validate_uint (IntegerOverflowError),
    then ctypes' TypeError for a non-int. bits=0: only the type is checked."""
    if bits:
        if number > (1 << bits) - 1:  # type: ignore[operator]
            raise tb.IntegerOverflowError(f"{name}=={number} is too large to fit in {bits} bits")
        if number < 0:  # type: ignore[operator]
            raise tb.IntegerOverflowError(f"{name}=={number} cannot be negative")
    if not isinstance(number, int):
        raise TypeError(f"{name}: int expected instead of {type(number).__name__}")


def validate_object(obj: object, fields: tuple[tuple[str, int], ...]) -> None:
    for name, bits in fields:
        validate_uint(name, bits, getattr(obj, name))


# ------------------------------------------------------------------------------------------
# Columnar accounts / transfers
# ------------------------------------------------------------------------------------------

U128: Final = "U"  # Column kind: two u64 blocks. Others are array typecodes.
_ITEM_SIZE: Final = {"Q": 8, "I": 4, "H": 2, U128: 16}
assert array("Q").itemsize == 8 and array("I").itemsize == 4 and array("H").itemsize == 2


class ColumnCodec:
    """Packs/unpacks one record type as columns. `fields`: (name, kind, bits checked like the
    real client; 0 = type only: flags are truncated to their C width, not range-checked)."""

    def __init__(
        self,
        row_type: Callable[..., Any],
        fields: tuple[tuple[str, str, int], ...],
        flags_cache: _EnumCache[Any],
    ) -> None:
        self.row_type = row_type
        self.fields = fields
        self.kinds = tuple(kind for _, kind, _ in fields)
        self.checks = tuple((name, bits) for name, _, bits in fields)
        self.event_size = sum(_ITEM_SIZE[kind] for kind in self.kinds)  # All blocks present.
        self.block_sizes = tuple(
            size for kind in self.kinds for size in ((8, 8) if kind is U128 else
                                                     (_ITEM_SIZE[kind],)))
        assert len(self.block_sizes) <= 32
        self.flags_index = [name for name, _, _ in fields].index("flags")
        self.flags_mask = (1 << (8 * _ITEM_SIZE[self.kinds[self.flags_index]])) - 1
        self.flags_cache = flags_cache
        self._getters = tuple(attrgetter(name) for name, _, _ in fields)

    def pack(self, objects: Sequence[Any]) -> bytes:
        """Raises what the real client raises for a bad field (IntegerOverflowError/TypeError)."""
        try:
            columns = [list(map(getter, objects)) for getter in self._getters]
            return _pack_columns(columns, self.kinds, len(objects))
        except (OverflowError, TypeError, AttributeError):
            for obj in objects:  # Find the first bad field, like the real client.
                validate_object(obj, self.checks)
            # Every field is in range: only flags were wider than their C type.
            columns = [list(map(getter, objects)) for getter in self._getters]
            mask = self.flags_mask
            columns[self.flags_index] = [f & mask for f in columns[self.flags_index]]
            return _pack_columns(columns, self.kinds, len(objects))

    def pack_rows(self, rows: Sequence[Sequence[Any]]) -> bytes:
        """Rows of field values in declaration order (the engine's raw fast path)."""
        if not rows:
            return _pack_columns([[] for _ in self.kinds], self.kinds, 0)
        return _pack_columns(list(zip(*rows, strict=True)), self.kinds, len(rows))

    def count(self, data: bytes | bytearray | memoryview) -> int:
        """Event count of a body; WireError unless its size matches its block mask."""
        if len(data) < COLUMNS_HEAD.size:
            raise WireError(f"columnar body of {len(data)} bytes has no head")
        count, mask = COLUMNS_HEAD.unpack_from(data)
        if mask >> len(self.block_sizes):
            raise WireError(f"columnar block mask {mask:#x} has unknown blocks")
        size = COLUMNS_HEAD.size + count * sum(
            block for i, block in enumerate(self.block_sizes) if mask >> i & 1)
        if len(data) != size:
            raise WireError(f"columnar body of {len(data)} bytes, expected {size}")
        return int(count)

    def unpack_rows(self, data: bytes | bytearray | memoryview) -> list[tuple[int, ...]]:
        """Tuples of field values in declaration order, flags as plain ints: what the engine's
        raw creates take, without building a dataclass per event."""
        count = self.count(data)
        mask = COLUMNS_HEAD.unpack_from(data)[1]
        return list(zip(*_unpack_columns(memoryview(data), self.kinds, count, mask), strict=True))

    def unpack(self, data: bytes | bytearray | memoryview) -> list[Any]:
        count = self.count(data)
        mask = COLUMNS_HEAD.unpack_from(data)[1]
        columns = _unpack_columns(memoryview(data), self.kinds, count, mask)
        columns[self.flags_index] = _flags(self.flags_cache, columns[self.flags_index], count)
        row_type = self.row_type
        return build_without_gc(count, lambda: list(map(row_type, *columns)))


def _flags(cache: _EnumCache[Any], values: Iterable[int], count: int) -> Iterable[Any]:
    """A flags column as the enum the real client returns (`repeat` for an all-zero one)."""
    if isinstance(values, list):
        return list(map(cache.__getitem__, values))
    return repeat(cache[0], count)


# Columnar body: count u32 | block mask u32 | the blocks whose mask bit is set. A block of all
# zeros is left out (bit clear): most fields of typical events are 0 (pending_id, user data,
# timeout, timestamp, the high half of most u128s), so this skips most of the conversions.
COLUMNS_HEAD = struct.Struct("<II")


def canonical_ids(ids: Sequence[int], in_range: bool = False) -> Sequence[int]:
    """Ids as the server sees them: plain ints wrapped to u128 (like pack_ids sends them).
    `in_range`: the caller knows every id is in [0, 2**128) (pack_ids' fast path succeeded)."""
    if set(map(type, ids)) <= {int} and (
            in_range or not ids or (min(ids) >= 0 and max(ids) <= U128_MASK)):
        return ids
    return [int(i) & U128_MASK for i in ids]


def _pack_columns(columns: Sequence[Sequence[int]], kinds: tuple[str, ...], count: int) -> bytes:
    """Converting through `array` also range- and type-checks every value (OverflowError,
    TypeError), which the callers turn into the real client's exceptions."""
    parts: list[bytes] = [b""]
    mask = 0
    bit = 1
    zeros = bytes(8 * count)
    for values, kind in zip(columns, kinds, strict=True):
        blocks: tuple[bytes, ...]
        if kind is U128:
            try:
                blocks = (array("Q", values).tobytes(), zeros)  # Fast path: all fit in u64.
            except OverflowError:
                # Interleaved 16-byte rows, then two strided C-level slices: measured ~35 %
                # cheaper than masking and shifting every value. <0 and >=2^128 raise here.
                halves = array("Q")
                halves.frombytes(b"".join([v.to_bytes(16, "little") for v in values]))
                blocks = (halves[::2].tobytes(), halves[1::2].tobytes())
        else:
            blocks = (array(kind, values).tobytes(),)
        for block in blocks:
            if block != zeros[:len(block)]:
                parts.append(block)
                mask |= bit
            bit <<= 1
    parts[0] = COLUMNS_HEAD.pack(count, mask)
    return b"".join(parts)


def _unpack_columns(
    data: memoryview, kinds: tuple[str, ...], count: int, mask: int
) -> list[Iterable[Any]]:
    columns: list[Iterable[Any]] = []
    offset = COLUMNS_HEAD.size
    bit = 1

    def block(kind: str) -> list[int] | None:
        nonlocal offset, bit
        present = mask & bit
        bit <<= 1
        if not present:
            return None
        values = array(kind)
        size = values.itemsize * count
        values.frombytes(data[offset:offset + size])
        offset += size
        return values.tolist()

    for kind in kinds:
        if kind is U128:
            low = block("Q")
            high = block("Q")
            if high is None:
                columns.append(low if low is not None else repeat(0, count))
            elif low is None:
                columns.append([b << 64 for b in high])
            else:
                columns.append([a | b << 64 for a, b in zip(low, high, strict=True)])
        else:
            values = block(kind)
            columns.append(values if values is not None else repeat(0, count))
    assert offset == len(data)
    return columns


ACCOUNTS: Final = ColumnCodec(tb.Account, (
    ("id", U128, 128), ("debits_pending", U128, 128), ("debits_posted", U128, 128),
    ("credits_pending", U128, 128), ("credits_posted", U128, 128),
    ("user_data_128", U128, 128), ("user_data_64", "Q", 64), ("user_data_32", "I", 32),
    ("ledger", "I", 32), ("code", "H", 16), ("flags", "H", 0), ("timestamp", "Q", 64),
), ACCOUNT_FLAGS)
TRANSFERS: Final = ColumnCodec(tb.Transfer, (
    ("id", U128, 128), ("debit_account_id", U128, 128), ("credit_account_id", U128, 128),
    ("amount", U128, 128), ("pending_id", U128, 128), ("user_data_128", U128, 128),
    ("user_data_64", "Q", 64), ("user_data_32", "I", 32), ("timeout", "I", 32),
    ("ledger", "I", 32), ("code", "H", 16), ("flags", "H", 0), ("timestamp", "Q", 64),
), TRANSFER_FLAGS)
assert ACCOUNTS.event_size == 124 and TRANSFERS.event_size == 128
assert len(ACCOUNTS.block_sizes) <= 32 and len(TRANSFERS.block_sizes) <= 32
CREATE_CODECS: Final[dict[int, ColumnCodec]] = {
    Op.CREATE_ACCOUNTS: ACCOUNTS, Op.CREATE_TRANSFERS: TRANSFERS,
}


def pack_accounts(accounts: Sequence[tb.Account]) -> bytes:
    return ACCOUNTS.pack(accounts)


def pack_account_rows(rows: Sequence[Sequence[Any]]) -> bytes:
    return ACCOUNTS.pack_rows(rows)


def unpack_accounts(data: bytes | bytearray | memoryview) -> list[tb.Account]:
    return ACCOUNTS.unpack(data)


# A lookup_accounts reply: count u32 | flags u32 | count rows of TigerBeetle's 128-byte
# Account layout (tb_emulator.layout), which the engine keeps ready per account, so the server
# only joins them. The decoder slices each field out of all rows at once (C-level strides).
LOOKUP_HEAD: Final = struct.Struct("<II")
ALL_FOUND: Final = 1  # flags: the rows are the request's ids in order (skip rebuilding ids).


def pack_lookup_rows(rows: bytes, count: int, all_found: bool) -> bytes:
    assert len(rows) == count * ACCOUNT_ROW_SIZE
    return LOOKUP_HEAD.pack(count, ALL_FOUND if all_found else 0) + rows


def pack_lookup_accounts(accounts: Sequence[tb.Account], all_found: bool) -> bytes:
    """For engines without ready rows."""
    rows = b"".join([pack_account_row(*account_tuple(a)) for a in accounts])
    return pack_lookup_rows(rows, len(accounts), all_found)


def unpack_lookup_accounts(
    data: bytes | bytearray | memoryview, request_ids: Sequence[int]
) -> list[tb.Account]:
    """`request_ids`: the lookup's ids as `pack_lookup_ids` returned them."""
    if len(data) < LOOKUP_HEAD.size:
        raise WireError(f"lookup reply of {len(data)} bytes has no head")
    count, flags = LOOKUP_HEAD.unpack_from(data)
    if len(data) != LOOKUP_HEAD.size + count * ACCOUNT_ROW_SIZE or flags & ~ALL_FOUND:
        raise WireError(f"lookup reply of {len(data)} bytes for {count} rows, flags {flags}")
    if flags & ALL_FOUND and count != len(request_ids):
        raise WireError(f"{count} rows said to be all of {len(request_ids)} ids")
    if count == 0:
        return []
    # Casts and strided slices of one memoryview: no copy of the rows before `tolist`.
    rows = memoryview(data)[LOOKUP_HEAD.size:]
    words = rows.cast("Q")
    u32 = rows.cast("I")
    u16 = rows.cast("H")
    zeros = bytes(8 * count)

    def u128(word: int) -> list[int]:
        low = words[word::WORDS_PER_ROW]
        high = words[word + 1::WORDS_PER_ROW]
        if high.tobytes() == zeros:
            return low.tolist()
        return [lo | hi << 64 for lo, hi in zip(low.tolist(), high.tolist(), strict=True)]

    ids = request_ids if flags & ALL_FOUND else u128(U128_WORDS["id"])
    columns: list[Iterable[Any]] = [
        ids, u128(U128_WORDS["debits_pending"]), u128(U128_WORDS["debits_posted"]),
        u128(U128_WORDS["credits_pending"]), u128(U128_WORDS["credits_posted"]),
        u128(U128_WORDS["user_data_128"]), words[USER_DATA_64_WORD::WORDS_PER_ROW].tolist(),
        u32[USER_DATA_32_U32::2 * WORDS_PER_ROW].tolist(),
        u32[LEDGER_U32::2 * WORDS_PER_ROW].tolist(), u16[CODE_U16::4 * WORDS_PER_ROW].tolist(),
        _flags(ACCOUNT_FLAGS, u16[FLAGS_U16::4 * WORDS_PER_ROW].tolist(), count),
        words[TIMESTAMP_WORD::WORDS_PER_ROW].tolist(),
    ]
    return build_without_gc(count, lambda: list(map(tb.Account, *columns)))


def pack_transfers(transfers: Sequence[tb.Transfer]) -> bytes:
    return TRANSFERS.pack(transfers)


def pack_transfer_rows(rows: Sequence[Sequence[Any]]) -> bytes:
    return TRANSFERS.pack_rows(rows)


def unpack_transfers(data: bytes | bytearray | memoryview) -> list[tb.Transfer]:
    return TRANSFERS.unpack(data)


# ------------------------------------------------------------------------------------------
# Ids, filters, balances
# ------------------------------------------------------------------------------------------


def pack_ids(ids: Sequence[int]) -> bytes:
    return pack_lookup_ids(ids)[0]


def pack_lookup_ids(ids: Sequence[int]) -> tuple[bytes, Sequence[int]]:
    """(body, the ids as the server sees them: the id column of an ALL_FOUND lookup reply)."""
    try:
        # Fast path: every id in [0, 2**64); one C-level conversion, the high block is zeros.
        return array("Q", ids).tobytes() + bytes(8 * len(ids)), canonical_ids(ids, True)
    except (OverflowError, TypeError):
        pass
    try:
        halves = memoryview(b"".join([i.to_bytes(16, "little") for i in ids])).cast("Q")
        return halves[::2].tobytes() + halves[1::2].tobytes(), canonical_ids(ids, True)
    except (OverflowError, AttributeError):
        # Like ctypes in the real client, lookups wrap ids to u128 instead of range-checking.
        for i in ids:
            validate_uint("id", 0, i)
        wrapped = [int(i) & U128_MASK for i in ids]
        return pack_lookup_ids(wrapped)[0], wrapped


def unpack_ids(data: bytes | bytearray | memoryview) -> list[int]:
    if len(data) % ID.size:
        raise WireError(f"ids body of {len(data)} bytes is not rows of {ID.size}")
    words = memoryview(data).cast("B").cast("Q")  # No copy before `tolist`.
    count = len(words) // 2
    low = words[:count].tolist()
    if words[count:].tobytes() == bytes(8 * count):
        return low
    return [lo | hi << 64 for lo, hi in zip(low, words[count:].tolist(), strict=True)]


def pack_account_filter(f: tb.AccountFilter) -> bytes:
    validate_object(f, _ACCOUNT_FILTER_FIELDS)
    a = f.account_id
    u = f.user_data_128
    return ACCOUNT_FILTER.pack(
        a & U64_MASK, a >> 64, u & U64_MASK, u >> 64, f.user_data_64, f.user_data_32,
        f.code, f.timestamp_min, f.timestamp_max, f.limit, f.flags & 0xFFFFFFFF,
    )


def unpack_account_filter(data: bytes | bytearray | memoryview) -> tb.AccountFilter:
    a, b, c, d, e, f, g, h, i, j, k = ACCOUNT_FILTER.unpack(data)
    return tb.AccountFilter(
        account_id=a | b << 64, user_data_128=c | d << 64, user_data_64=e, user_data_32=f,
        code=g, timestamp_min=h, timestamp_max=i, limit=j, flags=tb.AccountFilterFlags(k),
    )


def pack_query_filter(f: tb.QueryFilter) -> bytes:
    validate_object(f, _QUERY_FILTER_FIELDS)
    u = f.user_data_128
    return QUERY_FILTER.pack(
        u & U64_MASK, u >> 64, f.user_data_64, f.user_data_32, f.ledger, f.code,
        f.timestamp_min, f.timestamp_max, f.limit, f.flags & 0xFFFFFFFF,
    )


def unpack_query_filter(data: bytes | bytearray | memoryview) -> tb.QueryFilter:
    a, b, c, d, e, f, g, h, i, j = QUERY_FILTER.unpack(data)
    return tb.QueryFilter(
        user_data_128=a | b << 64, user_data_64=c, user_data_32=d, ledger=e, code=f,
        timestamp_min=g, timestamp_max=h, limit=i, flags=tb.QueryFilterFlags(j),
    )


def pack_balances(balances: Sequence[tb.AccountBalance]) -> bytes:
    pack = BALANCE.pack
    m = U64_MASK
    parts = []
    for x in balances:
        dp = x.debits_pending
        dq = x.debits_posted
        cp = x.credits_pending
        cq = x.credits_posted
        parts.append(pack(
            dp & m, dp >> 64, dq & m, dq >> 64, cp & m, cp >> 64, cq & m, cq >> 64, x.timestamp,
        ))
    return b"".join(parts)


def unpack_balances(data: bytes | bytearray | memoryview) -> list[tb.AccountBalance]:
    balance = tb.AccountBalance
    return [
        balance(a | b << 64, c | d << 64, e | f << 64, g | h << 64, i)
        for a, b, c, d, e, f, g, h, i in BALANCE.iter_unpack(data)
    ]


# ------------------------------------------------------------------------------------------
# Create results (sparse)
# ------------------------------------------------------------------------------------------


def pack_create_results(
    results: Sequence[tb.CreateAccountResult | tb.CreateTransferResult],
) -> bytes:
    return pack_create_result_lists([r.timestamp for r in results], [r.status for r in results])


def pack_create_result_lists(timestamps: Sequence[int], statuses: Sequence[int]) -> bytes:
    """Results as the engine's raw creates return them. Verifies every implicit result
    instead of assuming the engine's timestamp scheme: only `CREATED` with timestamp
    `base + index` may be left out."""
    count = len(timestamps)
    assert len(statuses) == count <= BATCH_EVENTS_MAX
    base = 0
    for index, status in enumerate(statuses):
        if status == CREATED:
            base = timestamps[index] - index
            break
    explicit: list[tuple[int, int, int]] = []
    # Common case first: all CREATED with consecutive timestamps (two C-level scans).
    if statuses.count(CREATED) != count or list(timestamps) != list(range(base, base + count)):
        explicit = [
            (index, int(status), timestamp)
            for index, (status, timestamp) in enumerate(zip(statuses, timestamps, strict=True))
            if status != CREATED or timestamp != base + index
        ]
    if base < 0:  # Cannot happen with CREATED timestamps >= index; stay encodable anyway.
        base = 0
        explicit = [(index, int(status), timestamp) for index, (status, timestamp)
                    in enumerate(zip(statuses, timestamps, strict=True))]
    pack = CREATE_RESULT.pack
    return CREATE_RESULTS_HEAD.pack(base, count, len(explicit)) + b"".join(
        [pack(index, status, timestamp) for index, status, timestamp in explicit])


def unpack_create_account_results(
    data: bytes | bytearray | memoryview,
) -> list[tb.CreateAccountResult]:
    base, count, explicit = _create_results_head(data)
    result = tb.CreateAccountResult
    created = tb.CreateAccountStatus.CREATED
    results = [result(timestamp, created) for timestamp in range(base, base + count)]
    if explicit:
        statuses = ACCOUNT_STATUS
        for index, status, timestamp in _create_results_body(data, count, explicit):
            results[index] = result(timestamp, statuses[status])
    return results


def unpack_create_transfer_results(
    data: bytes | bytearray | memoryview,
) -> list[tb.CreateTransferResult]:
    base, count, explicit = _create_results_head(data)
    result = tb.CreateTransferResult
    created = tb.CreateTransferStatus.CREATED
    results = [result(timestamp, created) for timestamp in range(base, base + count)]
    if explicit:
        statuses = TRANSFER_STATUS
        for index, status, timestamp in _create_results_body(data, count, explicit):
            results[index] = result(timestamp, statuses[status])
    return results


def _create_results_head(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    if len(data) < CREATE_RESULTS_HEAD.size:
        raise WireError("create results body too short")
    base, count, explicit = CREATE_RESULTS_HEAD.unpack_from(data, 0)
    if count > BATCH_EVENTS_MAX or explicit > count:
        raise WireError(f"create results: count={count} explicit={explicit}")
    if len(data) != CREATE_RESULTS_HEAD.size + explicit * CREATE_RESULT.size:
        raise WireError("create results body has the wrong size")
    return int(base), int(count), int(explicit)


def _create_results_body(
    data: bytes | bytearray | memoryview, count: int, explicit: int
) -> list[tuple[int, int, int]]:
    rows = list(CREATE_RESULT.iter_unpack(memoryview(data)[CREATE_RESULTS_HEAD.size:]))
    assert len(rows) == explicit
    for index, _, _ in rows:
        if index >= count:
            raise WireError(f"create result index {index} >= count {count}")
    return rows
