"""Query helpers the stores share: chunked `$in` reads and migration-scope filters.

A migration scope is a list of ledger pairs ("USD:USA") or ["*"] for every pair. Wallet keys
are canonical (`client|country|currency|issuer`, walletcore.keys), so a pair selects the keys
with its country and currency in the 2nd and 3rd fields; `wallets` documents also carry
`currency` and `country` fields. Used by the stores that own those collections (legacy store,
registries, backfill imports) so that no caller writes a filter on someone else's documents.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from pymongo.asynchronous.collection import AsyncCollection

from mongobase.mongo import IN_CHUNK_MAX
from walletcore.gates import GLOBAL_SCOPE

IN_CONCURRENCY = 8  # chunks of one find_in in flight

Document = dict[str, Any]


class Created(NamedTuple):
    """One operation as the unapplied-writes count reads it, from either store."""

    id: str  # transaction id
    wallet: str  # canonical wallet key
    created_at: datetime
    wallet_version: int | None  # legacy only (the Transfer Registry has no version)


async def find_in(
    collection: AsyncCollection[Any], field: str, values: list[Any],
    projection: Document | None = None,
) -> list[Document]:
    """`{field: {$in: values}}` as bounded concurrent chunks (same answer, any server)."""
    gate = asyncio.Semaphore(IN_CONCURRENCY)

    async def chunk(part: list[Any]) -> list[Document]:
        async with gate:
            return [d async for d in collection.find({field: {"$in": part}}, projection)]

    parts = [values[i:i + IN_CHUNK_MAX] for i in range(0, len(values), IN_CHUNK_MAX)]
    found = await asyncio.gather(*(chunk(p) for p in parts))
    return [doc for part in found for doc in part]


async def find_keys(
    collection: AsyncCollection[Any], keys: list[str], projection: Document | None = None
) -> dict[str, Document]:
    """Documents whose `_id` is in `keys`: one `_id` range scan when the keys are many (pages
    are contiguous key ranges), chunked `$in` otherwise."""
    if not keys:
        return {}
    wanted = set(keys)
    if len(keys) <= IN_CHUNK_MAX:
        docs = await find_in(collection, "_id", keys, projection)
    else:
        docs = [d async for d in collection.find(
            {"_id": {"$gte": min(keys), "$lte": max(keys)}}, projection)]
    return {d["_id"]: d for d in docs if d["_id"] in wanted}


def scope_wallet_regex(pair: str) -> str:
    """Regex on canonical wallet keys (`client|country|currency|issuer`) of one ledger pair."""
    currency, sep, country = pair.partition(":")
    assert sep and currency and country, f"scope {pair!r} must be CURRENCY:COUNTRY or '*'"
    return rf"^[^|]*\|{re.escape(country)}\|{re.escape(currency)}\|"


def scope_regex(pairs: Sequence[str]) -> str:
    """One regex on canonical wallet keys for every pair of a scope (a single `$regex`: the
    history scan keeps one query shape whatever the number of pairs)."""
    return "|".join(f"(?:{scope_wallet_regex(pair)})" for pair in sorted(set(pairs)))


def wallet_key_filter(scopes: list[str], field: str) -> Document:
    """Filter on a field holding canonical wallet keys (`{}` for the global scope): ONE
    `$regex` for every pair (scope_regex), not an `$or` of one per pair. A scan by time on a
    (created_at, wallet...) index needs that shape: SecantusDB runs the `$or` as a collection
    scan even with the index (200k documents: 4-8 s of server CPU per query vs 0.1-0.16 s),
    and MongoDB can test the one regex on the index keys before fetching."""
    assert scopes, "a scope is at least one pair or '*'"
    if GLOBAL_SCOPE in scopes:
        return {}
    return {field: {"$regex": scope_regex(scopes)}}


def pair_fields_filter(scopes: list[str]) -> Document:
    """Filter on documents carrying `currency` and `country` fields (`wallets`)."""
    assert scopes, "a scope is at least one pair or '*'"
    if GLOBAL_SCOPE in scopes:
        return {}
    pairs = [s.partition(":") for s in scopes]
    return {"$or": [{"currency": cur, "country": cty} for cur, _, cty in pairs]}
