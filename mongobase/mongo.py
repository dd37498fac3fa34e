"""Shared MongoDB helpers: client creation, exact Decimal128 money, u128 hex, retry policy.

Money never passes through float: Decimal128 is built from the exact Decimal of the minor
units and read back digit by digit, so what was stored is what is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

from bson.decimal128 import Decimal128
from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    ClientBulkWriteException,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)
from pymongo.uri_parser import parse_uri

from mongobase import cancel_safe
from walletcore.currencies import precision_of
from walletcore.errors import ConfigurationError, ConflictError, StoreUnavailableError
from walletcore.money import from_minor
from walletcore.tb_limits import TB_EVENTS_MAX

log = logging.getLogger(__name__)

# Before any client exists: a cancelled server selection must never wedge the client.
cancel_safe.install()

DECIMAL128_DIGITS_MAX = 34  # IEEE 754-2008 decimal128 coefficient digits
U128_MAX = 2**128 - 1
U128_HEX_CHARS = 32
# Documents of one store call (page, get_many, insert_many): the largest TigerBeetle batch, so
# a page can line up with a lookup or create at any request limit (callers cut it smaller by
# walletcore.tb_limits.BatchLimits; TigerBeetle calls are cut by stores.tb_batches).
PAGE_LIMIT_MAX = TB_EVENTS_MAX
IN_CHUNK_MAX = 64  # large `$in` lists are quadratic on the embedded server; chunks are not
# An unreachable MongoDB fails an operation after this (the wallet workflow retries its write
# within 10 s, so callers hear "MongoDB: ..." inside their 15 s bound); a restarted server is
# found again within pymongo's 0.5 s re-check. URI options win over both.
SERVER_SELECTION_TIMEOUT_MS_DEFAULT = 5_000
CONNECT_TIMEOUT_MS_DEFAULT = 5_000  # pymongo's own default is 20 s
WRITE_CONFLICT_CODE = 112
INTERNAL_ERROR_CODE = 1  # see CommitConflictError
DUPLICATE_KEY_CODE = 11000

# Bounded optimistic-concurrency retries: attempts and a capped, fully jittered backoff.
TXN_ATTEMPTS_MAX = 200
TXN_BACKOFF_BASE_MS = 2
TXN_BACKOFF_CAP_MS = 50


def make_mongo_client(uri: str, **kwargs: Any) -> AsyncMongoClient[dict[str, Any]]:
    """A client for `uri`. URI options (retryWrites, journal, ...) come from the URI;
    we only add server selection and connect bounds when the URI has none, and tz-aware
    datetimes."""
    options = parse_uri(uri)["options"]
    extra: dict[str, Any] = {"tz_aware": True, "appname": "walletmig"}
    if "serverSelectionTimeoutMS" not in options:
        extra["serverSelectionTimeoutMS"] = SERVER_SELECTION_TIMEOUT_MS_DEFAULT
    if "connectTimeoutMS" not in options:
        extra["connectTimeoutMS"] = CONNECT_TIMEOUT_MS_DEFAULT
    extra.update(kwargs)
    return AsyncMongoClient(uri, **extra)


# MongoDB 8.0's wire version: the client-level `bulkWrite` command (PyMongo's
# `AsyncMongoClient.bulk_write`) exists from it on. The legacy store's hot path and group
# commit, the reverse projection's batches and the audit log's appends send it; on a 7.0
# server every one of those writes would fail.
SERVER_WIRE_VERSION_MIN = 25
SERVER_VERSION_MIN = "8.0"
SERVER_VERSION_TEXT_MAX = 24  # a release is "8.0.4": bounds what a server's answer puts in a line


async def require_supported_server(client: AsyncMongoClient[Any]) -> None:
    """Fail at start-up, with the reason, when the server is older than MongoDB 8.0
    (instead of every write failing later). An unreachable server raises what PyMongo
    raises, as the index set-up after it would."""
    require_wire_version(await server_hello(client))


async def server_hello(client: AsyncMongoClient[Any]) -> dict[str, Any]:
    """The server's `hello` answer with its release (`buildInfo`'s `version`) added as
    `version`: the wire version decides, the release is what an operator recognises."""
    hello = dict(await client.admin.command("hello"))
    build = await client.admin.command("buildInfo")
    hello["version"] = str(build.get("version", ""))[:SERVER_VERSION_TEXT_MAX]
    return hello



def require_wire_version(hello: Mapping[str, Any]) -> None:
    """ConfigurationError (non-retryable, naming the setting) when the `hello` answer is of
    a server older than SERVER_VERSION_MIN; one line, naming the release when `hello` has it
    (server_hello adds it)."""
    wire_version = int(hello.get("maxWireVersion", 0))
    if wire_version < SERVER_WIRE_VERSION_MIN:
        release = " ".join(str(hello.get("version") or "")[:SERVER_VERSION_TEXT_MAX].split())
        server = f"server {release} (wire version {wire_version})" if release else (
            f"server wire version {wire_version}"
        )  # fmt: skip
        raise ConfigurationError(
            f"MongoDB {server} is older than MongoDB {SERVER_VERSION_MIN} (wire version "
            f"{SERVER_WIRE_VERSION_MIN}), which the platform's writes need (the client-level "
            "bulkWrite); upgrade the server",
            field="mongodb_uri",
        )


def database_of(
    client: AsyncMongoClient[dict[str, Any]], name: str
) -> AsyncDatabase[dict[str, Any]]:
    return client[name]


def now_ms() -> datetime:
    """UTC now truncated to milliseconds (BSON's resolution), so a stored and re-read
    timestamp equals the one returned at write time."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def as_utc(value: datetime) -> datetime:
    """Datetimes from a client without tz_aware come back naive; they are UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# ---- money ---------------------------------------------------------------------------------


def minor_to_decimal128(minor: int, currency: str) -> Decimal128:
    """Non-negative minor units as a Decimal128 with exactly the currency's decimals."""
    assert minor >= 0, "stored amounts and balance fields are never negative"
    amount = from_minor(minor, currency)
    digit_count = len(amount.as_tuple().digits)
    if digit_count > DECIMAL128_DIGITS_MAX:
        raise ConflictError(
            f"{amount} {currency} has {digit_count} digits; Decimal128 holds 34", field="amount"
        )
    return Decimal128(amount)


# Decimal128 is IEEE 754-2008 BID: sign bit 127, then (unless bits 126-125 are 0b11: large
# coefficients, infinities, NaN) a 14-bit biased exponent and a 113-bit coefficient.
BID_COEFFICIENT_MASK = (1 << 113) - 1
BID_COEFFICIENT_MAX = 10**34 - 1
BID_EXPONENT_BIAS = 6176
BID_PLAIN_TOP_BITS_MAX = 0b010  # bits 127-125: non-negative, not the 0b11 combination form


def decimal128_to_minor(value: object, currency: str, *, field: str) -> int:
    """A stored Decimal128 (or Decimal) back to exact minor units; anything inexact is a
    corrupted document and raises rather than rounds.

    Fast path: the plain non-negative BID encoding is decoded from its bits
    (`Decimal128.to_decimal` dominated reconciliation's profile); everything else, and anything
    inexact, takes the exact Decimal path, which also raises for corrupt values."""
    if type(value) is Decimal128:
        bits = int.from_bytes(value.bid, "little")
        coefficient = bits & BID_COEFFICIENT_MASK
        if bits >> 125 <= BID_PLAIN_TOP_BITS_MAX and coefficient <= BID_COEFFICIENT_MAX:
            shift = ((bits >> 113) & 0x3FFF) - BID_EXPONENT_BIAS + precision_of(currency)
            scale: int = 10 ** abs(shift)  # int ** int is typed Any (negative powers)
            if shift >= 0:
                return coefficient * scale
            quotient, remainder = divmod(coefficient, scale)
            if remainder == 0:
                return quotient
    if isinstance(value, Decimal128):
        amount = value.to_decimal()
    elif isinstance(value, Decimal):
        amount = value
    else:
        raise ConflictError(f"stored value {value!r} is not a Decimal128", field=field)
    minor = decimal_to_minor_exact(amount, precision_of(currency))
    if minor is None or minor < 0:
        raise ConflictError(f"stored value {amount} does not fit {currency}", field=field)
    return minor


def decimal_to_minor_exact(amount: Decimal, precision: int) -> int | None:
    """amount * 10**precision as an int using the digit tuple (no context rounding)."""
    if not amount.is_finite():
        return None
    sign, digit_tuple, exponent = amount.as_tuple()
    assert isinstance(exponent, int)
    coefficient = int("".join(map(str, digit_tuple)) or "0")
    shift = exponent + precision
    value: int
    if shift >= 0:
        value = coefficient * 10**shift
    else:
        divisor = 10**-shift
        if coefficient % divisor:
            return None
        value = coefficient // divisor
    return -value if sign else value


# ---- u128 ids ------------------------------------------------------------------------------


def u128_to_hex(value: int) -> str:
    """32-char zero-padded lowercase hex: sorts like the number and survives BSON (no u128)."""
    assert 0 <= value <= U128_MAX, f"{value} outside u128"
    return f"{value:032x}"


def hex_to_u128(text: str) -> int:
    assert len(text) == U128_HEX_CHARS, f"u128 hex must have 32 chars, got {text!r}"
    return int(text, 16)


def int_to_bson(value: int) -> int | str:
    """Int64 when it fits, else a decimal string (BSON has no unsigned 64/128-bit type)."""
    assert value >= 0
    return value if value <= 2**63 - 1 else str(value)


def bson_to_int(value: object) -> int:
    if isinstance(value, bool):
        raise ConflictError(f"stored value {value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise ConflictError(f"stored value {value!r} is not an integer")


@contextlib.contextmanager
def mongodb_outage_as_unavailable() -> Iterator[None]:
    """Where a store's caller is a client library's user: MongoDB unreachable (no server, a
    dropped connection, a network timeout) is the retryable StoreUnavailableError naming
    MongoDB, like every other store answers, never a raw pymongo error."""
    try:
        yield
    except ConnectionFailure as exc:
        raise StoreUnavailableError(f"MongoDB: {exc}", field=None) from exc


# ---- transaction retry policy ----------------------------------------------------------------


class CommitConflictError(PyMongoError):
    """The server answered the commit with InternalError (code 1): SecantusDB's storage engine
    found a conflict between concurrent transactions at commit ("transaction requires
    rollback") and rolled the transaction back, without the TransientTransactionError label a
    MongoDB server would add. Seen under load in `bench clearing` (it failed a batch's settle for
    good) and in the demo's live writes. Retrying is safe: nothing was written, and every
    transaction here re-reads its state on the next attempt (replay, conflict, apply)."""


def is_retryable_txn_error(exc: PyMongoError) -> bool:
    """Write conflicts, transient transaction errors, commit conflicts and duplicate keys raced
    by a concurrent writer: a fresh attempt re-reads the state and decides again (replay,
    conflict, apply)."""
    if exc.has_error_label("TransientTransactionError"):
        return True
    if isinstance(exc, CommitConflictError):
        return True
    if isinstance(exc, DuplicateKeyError):
        return True
    return isinstance(exc, OperationFailure) and exc.code in (
        WRITE_CONFLICT_CODE,
        DUPLICATE_KEY_CODE,
    )


async def backoff(attempt: int) -> None:
    """Full-jitter exponential backoff, capped: spreads contending writers apart."""
    assert attempt >= 0
    ceiling_ms = min(TXN_BACKOFF_CAP_MS, TXN_BACKOFF_BASE_MS * 2 ** min(attempt, 10))
    await asyncio.sleep(random.uniform(0, ceiling_ms) / 1000)


async def insert_new(collection: AsyncCollection[Any], docs: list[dict[str, Any]]) -> set[int]:
    """One unordered insert; returns the indexes of the documents whose `_id` (or another
    unique key) was taken already. Any other write error raises, and so does a failure with
    no write error (a write concern error: nothing is known to be durable)."""
    if not docs:
        return set()
    try:
        await collection.insert_many(docs, ordered=False)
    except BulkWriteError as exc:
        taken = duplicate_insert_indexes(exc)
        if taken is None:
            raise
        return set(taken)
    return set()


def duplicate_insert_indexes(exc: BulkWriteError) -> list[int] | None:
    """The positions of the documents an `insert_many` refused for a taken unique key, when
    that is all that failed; None when anything else did (another write error, a write
    concern error: nothing is known to be durable). An ordered insert stops at the first, so
    it names one. The collection-level twin of duplicate_key_indexes."""
    errors = exc.details.get("writeErrors", [])
    if (not errors or exc.details.get("writeConcernErrors")
            or any(e.get("code") != DUPLICATE_KEY_CODE for e in errors)):  # fmt: skip
        return None
    return [int(e["index"]) for e in errors]


def duplicate_key_indexes(exc: ClientBulkWriteException) -> list[int] | None:
    """The positions of the writes a client-level bulk write refused for a taken unique key,
    when that is all that failed; None when anything else did (an error of the command, a
    write concern error, another write error). The driver types the write errors as
    WriteError; what arrives are the server's error documents (`idx`, `code`)."""
    errors = cast(list[Mapping[str, Any]], exc.write_errors or [])
    if (not errors or exc.error is not None or exc.write_concern_errors
            or any(e.get("code") != DUPLICATE_KEY_CODE for e in errors)):  # fmt: skip
        return None
    return [int(e["idx"]) for e in errors]


# ---- transactions -------------------------------------------------------------------------

COMMIT_ATTEMPTS_MAX = 3  # retries of a commit whose outcome is unknown (the commit is idempotent)


async def abort_quietly(session: AsyncClientSession) -> None:
    """Abort the session's transaction if one is open; an abort that fails changes nothing."""
    if session.in_transaction:
        with contextlib.suppress(PyMongoError):
            await session.abort_transaction()


async def commit(session: AsyncClientSession) -> None:
    """Commit, retrying only an unknown outcome (commit is idempotent on the server)."""
    for attempt in range(COMMIT_ATTEMPTS_MAX):
        try:
            await session.commit_transaction()
            return
        except PyMongoError as exc:
            if isinstance(exc, OperationFailure) and exc.code == INTERNAL_ERROR_CODE:
                raise CommitConflictError(str(exc)) from exc
            unknown = exc.has_error_label("UnknownTransactionCommitResult")
            if not unknown or attempt + 1 == COMMIT_ATTEMPTS_MAX:
                raise
            log.warning("commit outcome unknown, retrying commit: %s", exc)
