"""Reading what to compare: legacy wallets page by page (one server cursor per pair, one page
read ahead), the Account Registry entries of the page's key range, and each wallet's
TigerBeetle account (ONE `lookup_accounts` batch per page).

Changes when the read pattern changes (page size, cursor reuse, which store answers what).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import tigerbeetle as tb
from pymongo.asynchronous.cursor import AsyncCursor
from pymongo.errors import CursorNotFound

from messages.reconciliation import PAGE_MAX, WalletPageInput
from registries.account_registry import AccountRegistry, RegistryEntry
from stores.legacy_store import LegacyStore, ScannedWallet
from stores.tigerbeetle_client import TigerBeetleClient
from walletcore.balances import MinorBalance
from walletcore.keys import WalletKey

SCANS_MAX = 8  # wallet cursors kept open between pages (one per pair being reconciled)
REGISTRY_RANGE_MAX = 2 * PAGE_MAX  # a page's registry entries plus as many orphans


@dataclass
class Subject:
    """One legacy wallet under comparison: its balance fields as read (plain ints; the
    MinorBalance, with its invariants, is built when a wallet needs more than the fast check,
    whose equalities already imply those invariants)."""

    key: WalletKey
    credit_minor: int
    debit_minor: int
    historical_credit_minor: int
    version: int
    allow_overdraft: bool
    registry: RegistryEntry | None = None
    account: tb.Account | None = None
    canonical: str = ""  # key.canonical, computed once (the hot loop uses it a lot)

    def __post_init__(self) -> None:
        if not self.canonical:
            self.canonical = self.key.canonical
        assert self.canonical == self.key.canonical

    @classmethod
    def of(cls, key: WalletKey, balance: MinorBalance, version: int,
           allow_overdraft: bool) -> Subject:
        return cls(key=key, credit_minor=balance.credit_minor, debit_minor=balance.debit_minor,
                   historical_credit_minor=balance.historical_credit_minor, version=version,
                   allow_overdraft=allow_overdraft)

    @classmethod
    def scanned(cls, row: ScannedWallet) -> Subject:
        key = WalletKey.from_canonical(row.canonical)
        assert key.client_id == row.client_id and key.currency == row.currency
        return cls(key=key, credit_minor=row.credit_minor, debit_minor=row.debit_minor,
                   historical_credit_minor=row.historical_credit_minor, version=row.version,
                   allow_overdraft=row.allow_overdraft, canonical=row.canonical)

    @cached_property
    def balance(self) -> MinorBalance:
        return MinorBalance(credit_minor=self.credit_minor, debit_minor=self.debit_minor,
                            historical_credit_minor=self.historical_credit_minor)


PageRead = tuple[list[Subject], dict[str, RegistryEntry]]  # wallets, registry entries in range


@dataclass
class _Scan:
    cursor: AsyncCursor[Any]
    opened_s: float  # time.monotonic() when the query ran
    ahead: asyncio.Task[PageRead] | None = None  # the next page, read meanwhile


class WalletScans:
    """One wallet cursor per pair, continued from page to page, one page read ahead.

    Pages are contiguous: the next page starts after this page's last key. Re-running
    `{_id > after} sort _id limit N` for every page makes a server that materialises the
    whole result before the limit (SecantusDB does) read the rest of the pair each time:
    quadratic in the number of wallets. So the worker keeps the open server cursor keyed by
    (pair, last key, limit); the page that starts there continues it, and its getMore and
    registry range read have been running while the previous page was checked (the servers
    read while we compare). Any other `after` (a retry, another worker, a new run) opens a
    new cursor; so does a cursor older than half the in-flight age limit: its documents may
    be a snapshot from when it was opened, and a much older legacy read could turn in-flight
    operations into stale ones. Bounded: at most SCANS_MAX open cursors, each holding at
    most one page read ahead."""

    def __init__(self, legacy: LegacyStore, accounts: AccountRegistry) -> None:
        self._legacy = legacy
        self._accounts = accounts
        self._open: dict[tuple[str, str, int], _Scan] = {}

    async def page(self, inp: WalletPageInput, ledger: int) -> PageRead:
        """The page's wallets (in key order) and the ledger's registry entries in its range."""
        assert 1 <= inp.limit <= PAGE_MAX
        scan = self._open.pop((inp.pair, inp.after or "", inp.limit), None)
        if scan is not None and time.monotonic() - scan.opened_s > inp.in_flight_max_age_s / 2:
            await _close(scan)
            scan = None
        read: PageRead | None = None
        if scan is not None:
            assert scan.ahead is not None
            try:
                read = await scan.ahead
            except CursorNotFound:  # the server timed it out: query again
                await _close(scan)
            except BaseException:
                await _close(scan)
                raise
        if read is None:
            currency, _, country = inp.pair.partition(":")
            scan = _Scan(cursor=self._legacy.pair_cursor(
                currency, country, after=inp.after, batch_size=inp.limit),
                opened_s=time.monotonic())
            try:
                read = await self._read(scan.cursor, inp.after, inp.limit, ledger)
            except BaseException:
                await _close(scan)
                raise
        assert scan is not None and len(read[0]) <= inp.limit
        await self._continue(scan, inp, read[0], ledger)
        return read

    async def _continue(
        self, scan: _Scan, inp: WalletPageInput, subjects: list[Subject], ledger: int
    ) -> None:
        """Keep a cursor with more to read, its next page already on the way."""
        if len(subjects) < inp.limit:
            await _close(scan)
            return
        last_key = subjects[-1].canonical
        scan.ahead = asyncio.create_task(self._read(scan.cursor, last_key, inp.limit, ledger))
        await self._keep((inp.pair, last_key, inp.limit), scan)

    async def _read(
        self, cursor: AsyncCursor[Any], after: str | None, limit: int, ledger: int
    ) -> PageRead:
        docs = await cursor.to_list(limit)
        subjects = [Subject.scanned(LegacyStore.scanned_wallet(d)) for d in docs]
        last_key = subjects[-1].canonical if subjects else after
        exhausted = len(subjects) < limit
        return subjects, await self._accounts.entries_in_range(
            ledger, after=after, last_key=None if exhausted else last_key,
            limit=REGISTRY_RANGE_MAX)

    async def _keep(self, key: tuple[str, str, int], scan: _Scan) -> None:
        evicted = []
        while len(self._open) >= SCANS_MAX:
            oldest = min(self._open, key=lambda k: self._open[k].opened_s)
            evicted.append(self._open.pop(oldest))
        self._open[key] = scan
        for old in evicted:
            await _close(old)

    async def close(self) -> None:
        while self._open:
            await _close(self._open.popitem()[1])


async def _close(scan: _Scan) -> None:
    """Stop the read-ahead (its error, if any, is dropped with it) and the server cursor."""
    ahead, scan.ahead = scan.ahead, None
    if ahead is not None:
        ahead.cancel()
        await asyncio.wait([ahead])  # unlike `await ahead`, leaves our own cancellation alone
        if not ahead.cancelled():
            ahead.exception()  # retrieved: no "never retrieved" warning
    await scan.cursor.close()


async def subjects_of(legacy: LegacyStore, wallets: Sequence[str]) -> list[Subject]:
    """Wallets named by key, read again now (re-check, repair); gone ones are left out."""
    assert len(wallets) <= PAGE_MAX
    subjects = []
    for canonical in wallets:
        key = WalletKey.from_canonical(canonical)
        state = await legacy.wallet_state(key)
        if state is not None:
            subjects.append(Subject.of(key, *state))
    return subjects


async def attach_tigerbeetle(
    client: TigerBeetleClient, accounts: AccountRegistry, subjects: list[Subject],
    in_range: dict[str, RegistryEntry] | None = None,
) -> None:
    """Each subject's registry entry, then ONE lookup_accounts batch of the ids they hold.
    Entries come from the page's range read when there is one, then by key for the rest (an
    entry with another ledger, or no range read)."""
    assert len(subjects) <= PAGE_MAX
    if not subjects:
        return
    registry = {} if in_range is None else {
        s.canonical: entry for s in subjects
        if (entry := in_range.get(s.canonical)) is not None}
    missing = [s.canonical for s in subjects if s.canonical not in registry]
    if missing:
        registry.update(await accounts.entries_of(missing))
    wanted = [entry.account_id for entry in registry.values()]
    found = {a.id: a for a in await client.lookup_accounts(wanted)} if wanted else {}
    for s in subjects:
        s.registry = registry.get(s.canonical)
        s.account = None if s.registry is None else found.get(s.registry.account_id)
