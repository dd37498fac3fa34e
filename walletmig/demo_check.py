"""The demo's checker: both stores held to the demo's own ledger (walletmig/demo_traffic.py).

Per operation the ledger says a store holds (seed data and acknowledged live writes):
- MongoDB: its `wallet_transactions` document, with the same wallet, type and amount, whenever
  MongoDB must hold it: every operation answered before `complete` was requested (MongoDB
  answered it, or tb_primary's reverse projection owes it). Later ones may have been answered
  under complete, which owes MongoDB nothing.
- TigerBeetle, read from TigerBeetle itself (`lookup_transfers` on the derived id, never the
  Transfer Registry): exactly once, i.e. either a transfer with the derived id, the right
  accounts, code and amount, or inside its wallet's imported opening balance (legacy version
  <= the import's version). Both at once is an operation applied twice; neither is a loss.
Per wallet: each store's balance equals the ledger's sum (seed + acknowledged + the ambiguous
writes that store holds), so an operation applied twice under another id shows; and neither
store holds an operation on the demo's wallets that the demo never sent (MongoDB documents;
TigerBeetle transfers on the wallet's account other than the backfill's opening ones).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import tigerbeetle as tb
from pydantic import BaseModel

from mongobase.mongo import bson_to_int
from mongobase.queries import find_in
from registries.account_registry import AccountRecord
from stores.backfill_imports import ImportLedger, ImportStatus
from stores.bundle import Stores
from stores.legacy_store import WALLET_TRANSACTIONS
from stores.tigerbeetle_store import balance_of
from walletcore.balances import MinorBalance
from walletcore.codes import TransferCode
from walletcore.ids import transfer_id, void_transfer_id
from walletcore.keys import WalletKey
from walletmig.demo_traffic import Ledger, SentOp

REQUEST_EVENTS_MAX = 8189  # TigerBeetle's request limit: lookups and filters per call
ACCOUNT_TRANSFER_PAGES_MAX = 100  # per wallet; a demo wallet holds a few hundred at most
READ_CONCURRENCY = 16
DETAILS_MAX = 20
T = TypeVar("T")


def derived_transfer_id(transaction_id: str, original: str | None) -> int:
    """The TigerBeetle id of an operation: a void's derives from its original (once per
    original), every other operation's from its own transaction id."""
    return void_transfer_id(original) if original is not None else transfer_id(transaction_id)


def expected_code(op: SentOp) -> TransferCode:
    if op.kind == "credit":
        return TransferCode.CREDIT
    if op.kind == "debit":
        return TransferCode.DEBIT
    # A void moves money against its original: a voided credit takes it away (CREDIT_VOID).
    return TransferCode.CREDIT_VOID if op.effect == "debit" else TransferCode.DEBIT_VOID


class Deadlines(BaseModel):
    """time.monotonic() instants splitting which store must hold which operation."""

    # Operations finished before this must be in MongoDB (`complete` was requested here).
    mongodb_required_until: float = math.inf
    # Operations started from here on were answered by TigerBeetle (tb_primary was requested):
    # missing from MongoDB, they are "not projected".
    tigerbeetle_answers_from: float = math.inf


class StoreFindings(BaseModel):
    required: int  # operations this store must hold (seed + acknowledged live writes)
    missing: int  # required and absent (or present with other content)
    twice: int  # TigerBeetle: a transfer AND inside the imported opening balance
    unknown: int  # operations on the demo's wallets whose id the demo never sent
    ambiguous_applied: int  # unanswered writes the store holds (counted in its balances)
    balance_mismatches: int  # wallets whose balance differs from the ledger's sum


class PhasePresence(BaseModel):
    """Live acknowledged operations sent while one phase report was open."""

    operations: int = 0
    missing_in_mongodb: int = 0
    missing_in_tigerbeetle: int = 0
    twice_in_tigerbeetle: int = 0


class CheckReport(BaseModel):
    wallets: int
    seed_operations: int
    acknowledged_operations: int
    mongodb: StoreFindings
    tigerbeetle: StoreFindings
    not_projected_to_mongodb: int  # of mongodb.missing: answered by TigerBeetle in tb_primary
    by_phase: dict[int, PhasePresence]  # phase report index -> presence of its operations
    match_rate: float  # wallets whose balance equals the ledger's in BOTH stores
    details: list[str]  # the first problems found, for the reader

    def failures(self) -> list[str]:
        found = []
        for name, s in (("mongodb", self.mongodb), ("tigerbeetle", self.tigerbeetle)):
            for figure in ("missing", "twice", "unknown", "balance_mismatches"):
                if getattr(s, figure):
                    found.append(f"{name}.{figure} = {getattr(s, figure)}")
        if self.not_projected_to_mongodb:
            found.append(f"not_projected_to_mongodb = {self.not_projected_to_mongodb}")
        if self.match_rate != 1.0:
            found.append(f"match_rate = {self.match_rate}")
        return found


@dataclass
class _Facts:
    """What the stores hold for the ledger's operations and wallets, read once."""

    docs: dict[str, dict[str, Any]]  # MongoDB transaction documents by transaction id
    imported: dict[str, int]  # wallet -> imported legacy version (finished imports only)
    accounts: dict[str, AccountRecord]  # wallet -> Account Registry record
    transfers: dict[int, tb.Transfer]  # derived id -> TigerBeetle transfer
    details: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.details) < DETAILS_MAX:
            self.details.append(text)

    def in_mongodb(self, txn: str, op: SentOp) -> bool:
        doc = self.docs.get(txn)
        return (doc is not None and doc.get("wallet") == op.wallet and doc.get("type") == op.kind
                and bson_to_int(doc.get("amount_minor")) == op.amount_minor)

    def in_opening(self, txn: str, op: SentOp) -> bool:
        doc, version = self.docs.get(txn), self.imported.get(op.wallet)
        return (doc is not None and version is not None
                and int(doc["wallet_version"]) <= version)

    def tigerbeetle_count(self, txn: str, op: SentOp) -> int:
        """How many times TigerBeetle holds `op`: as its transfer, inside the opening."""
        found = self.transfers.get(derived_transfer_id(txn, op.original))
        account = self.accounts.get(op.wallet)
        as_transfer = found is not None and account is not None and _same_movement(
            found, op, account.account_id)
        if found is not None and not as_transfer:
            self.note(f"{txn}: TigerBeetle transfer {found.id:x} differs from the operation "
                      f"(amount {found.amount}, code {found.code})")
        return int(as_transfer) + int(self.in_opening(txn, op))


def _same_movement(t: tb.Transfer, op: SentOp, account_id: int) -> bool:
    customer_side = t.credit_account_id if op.effect == "credit" else t.debit_account_id
    return (t.amount == op.amount_minor and t.code == expected_code(op)
            and customer_side == account_id)


async def _bounded(calls: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
    gate = asyncio.Semaphore(READ_CONCURRENCY)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    return list(await asyncio.gather(*(one(c) for c in calls)))


async def lookup_transfers(client: Any, ids: list[int]) -> dict[int, tb.Transfer]:
    """TigerBeetle's own answer for `ids`, in request-sized batches."""
    found: dict[int, tb.Transfer] = {}
    for start in range(0, len(ids), REQUEST_EVENTS_MAX):
        for t in await client.lookup_transfers(ids[start:start + REQUEST_EVENTS_MAX]):
            found[t.id] = t
    return found


async def account_transfers(client: Any, account_id: int) -> list[tb.Transfer]:
    """Every transfer on an account, oldest first, straight from TigerBeetle."""
    out: list[tb.Transfer] = []
    after = 0
    for _ in range(ACCOUNT_TRANSFER_PAGES_MAX):
        page = await client.get_account_transfers(tb.AccountFilter(
            account_id=account_id, user_data_128=0, user_data_64=0, user_data_32=0, code=0,
            timestamp_min=after + 1 if after else 0, timestamp_max=0, limit=REQUEST_EVENTS_MAX,
            flags=tb.AccountFilterFlags.DEBITS | tb.AccountFilterFlags.CREDITS))
        out += page
        if len(page) < REQUEST_EVENTS_MAX:
            return out
        after = page[-1].timestamp
    raise AssertionError(f"account {account_id:x}: more than {ACCOUNT_TRANSFER_PAGES_MAX} pages")


async def _read_facts(stores: Stores, ledger: Ledger, wallets: list[WalletKey]) -> _Facts:
    sent = {**ledger.applied(), **ledger.ambiguous}
    docs = await find_in(stores.db[WALLET_TRANSACTIONS], "_id", sorted(sent),
                         {"wallet": 1, "type": 1, "amount_minor": 1, "wallet_version": 1})
    names = [w.canonical for w in wallets]
    imports = ImportLedger(stores.db)
    imported: dict[str, int] = {}
    for start in range(0, len(names), REQUEST_EVENTS_MAX):
        for name, rec in (await imports.get_many(names[start:start + REQUEST_EVENTS_MAX])).items():
            if rec.status is ImportStatus.DONE:
                imported[name] = rec.version
    records = await _bounded([partial(stores.accounts.get, w) for w in wallets])
    ids = [derived_transfer_id(t, op.original) for t, op in sent.items()]
    return _Facts(docs={d["_id"]: d for d in docs}, imported=imported,
                  accounts={r.wallet.canonical: r for r in records if r is not None},
                  transfers=await lookup_transfers(stores.tb_client, ids))


def _presence(facts: _Facts, ledger: Ledger, deadlines: Deadlines
              ) -> tuple[dict[str, int], dict[str, bool], dict[int, PhasePresence], int]:
    """Per operation: how often TigerBeetle holds it, whether MongoDB holds it; per phase."""
    in_tb = {t: facts.tigerbeetle_count(t, op) for t, op in ledger.applied().items()}
    in_mongo = {t: facts.in_mongodb(t, op) for t, op in ledger.applied().items()}
    by_phase: dict[int, PhasePresence] = {}
    not_projected = 0
    for txn, op in ledger.applied().items():
        mongo_missing = op.finished < deadlines.mongodb_required_until and not in_mongo[txn]
        if mongo_missing:
            facts.note(f"{txn} ({op.kind} on {op.wallet}): missing in MongoDB")
            not_projected += int(op.started >= deadlines.tigerbeetle_answers_from)
        if in_tb[txn] != 1:
            facts.note(f"{txn} ({op.kind} on {op.wallet}): {in_tb[txn]} times in TigerBeetle")
        if txn in ledger.seed:
            continue
        phase = by_phase.setdefault(op.phase_index, PhasePresence())
        phase.operations += 1
        phase.missing_in_mongodb += int(mongo_missing)
        phase.missing_in_tigerbeetle += int(in_tb[txn] == 0)
        phase.twice_in_tigerbeetle += int(in_tb[txn] > 1)
    return in_tb, in_mongo, by_phase, not_projected


def _sums(ops: Iterable[SentOp]) -> dict[str, MinorBalance]:
    credits: dict[str, int] = {}
    debits: dict[str, int] = {}
    for op in ops:
        into = credits if op.effect == "credit" else debits
        into[op.wallet] = into.get(op.wallet, 0) + op.amount_minor
    return {w: MinorBalance.from_posted(credits.get(w, 0), debits.get(w, 0))
            for w in set(credits) | set(debits)}


async def _unknown_in_tigerbeetle(stores: Stores, facts: _Facts, ledger: Ledger) -> int:
    """Transfers on the demo's accounts that no operation the demo sent derives (the backfill's
    opening transfers aside): an operation applied twice under another id, a stray repair."""
    derived = {derived_transfer_id(t, op.original)
               for t, op in {**ledger.applied(), **ledger.ambiguous}.items()}
    records = list(facts.accounts.values())
    pages = await _bounded([partial(account_transfers, stores.tb_client, r.account_id)
                            for r in records])
    unknown = 0
    for record, transfers in zip(records, pages, strict=True):
        for t in transfers:
            if t.id not in derived and t.code != TransferCode.OPENING:
                unknown += 1
                facts.note(f"{record.wallet.canonical}: TigerBeetle transfer {t.id:x} (code "
                           f"{t.code}, amount {t.amount}) was never sent")
    return unknown


async def _unknown_in_mongodb(stores: Stores, facts: _Facts, ledger: Ledger,
                              wallets: list[WalletKey]) -> int:
    known = ledger.known()
    docs = await find_in(stores.db[WALLET_TRANSACTIONS], "wallet",
                         [w.canonical for w in wallets], {"_id": 1, "wallet": 1})
    strays = [d for d in docs if d["_id"] not in known]
    for d in strays:
        facts.note(f"{d['wallet']}: MongoDB transaction {d['_id']} was never sent")
    return len(strays)


async def _balances(stores: Stores, facts: _Facts, wallets: list[WalletKey]
                    ) -> tuple[dict[str, MinorBalance | None], dict[str, MinorBalance | None]]:
    """Each wallet's balance as MongoDB and TigerBeetle hold it (None: no such wallet)."""
    legacy = await _bounded([partial(stores.legacy.get_wallet_version, w) for w in wallets])
    mongo = {w.canonical: None if found is None else found[0]
             for w, found in zip(wallets, legacy, strict=True)}
    records = list(facts.accounts.values())
    by_id: dict[int, tb.Account] = {}
    for start in range(0, len(records), REQUEST_EVENTS_MAX):
        batch = [r.account_id for r in records[start:start + REQUEST_EVENTS_MAX]]
        by_id.update({a.id: a for a in await stores.tb_client.lookup_accounts(batch)})
    tb_balances: dict[str, MinorBalance | None] = {w.canonical: None for w in wallets}
    for r in records:
        if r.account_id in by_id:
            tb_balances[r.wallet.canonical] = balance_of(by_id[r.account_id])
    return mongo, tb_balances


def _mismatches(name: str, held: dict[str, MinorBalance | None],
                expected: dict[str, MinorBalance], facts: _Facts) -> set[str]:
    zero = MinorBalance.from_posted(0, 0)
    wrong = set()
    for wallet, balance in held.items():
        want = expected.get(wallet, zero)
        if balance != want:
            wrong.add(wallet)
            facts.note(f"{wallet}: {name} holds {balance}, the ledger says {want}")
    return wrong


async def check(stores: Stores, ledger: Ledger, wallets: list[WalletKey],
                deadlines: Deadlines | None = None) -> CheckReport:
    """Every figure of the module docstring, from the stores' own records."""
    assert wallets
    deadlines = deadlines or Deadlines()
    facts = await _read_facts(stores, ledger, wallets)
    in_tb, in_mongo, by_phase, not_projected = _presence(facts, ledger, deadlines)
    amb_tb = {t for t, op in ledger.ambiguous.items() if facts.tigerbeetle_count(t, op)}
    amb_mongo = {t for t, op in ledger.ambiguous.items() if facts.in_mongodb(t, op)}
    applied = ledger.applied()
    mongo_required = {t for t, op in applied.items()
                      if op.finished < deadlines.mongodb_required_until}
    expect_tb = _sums([*applied.values(), *(ledger.ambiguous[t] for t in amb_tb)])
    expect_mongo = _sums([*(op for t, op in applied.items()
                            if t in mongo_required or in_mongo[t]),
                          *(ledger.ambiguous[t] for t in amb_mongo)])
    held_mongo, held_tb = await _balances(stores, facts, wallets)
    wrong_mongo = _mismatches("MongoDB", held_mongo, expect_mongo, facts)
    wrong_tb = _mismatches("TigerBeetle", held_tb, expect_tb, facts)
    return CheckReport(
        wallets=len(wallets), seed_operations=len(ledger.seed),
        acknowledged_operations=len(ledger.acknowledged),
        mongodb=StoreFindings(
            required=len(mongo_required),
            missing=sum(1 for t in mongo_required if not in_mongo[t]), twice=0,
            unknown=await _unknown_in_mongodb(stores, facts, ledger, wallets),
            ambiguous_applied=len(amb_mongo), balance_mismatches=len(wrong_mongo)),
        tigerbeetle=StoreFindings(
            required=len(applied), missing=sum(1 for n in in_tb.values() if n == 0),
            twice=sum(1 for n in in_tb.values() if n > 1),
            unknown=await _unknown_in_tigerbeetle(stores, facts, ledger),
            ambiguous_applied=len(amb_tb), balance_mismatches=len(wrong_tb)),
        not_projected_to_mongodb=not_projected, by_phase=by_phase,
        match_rate=(len(wallets) - len(wrong_mongo | wrong_tb)) / len(wallets),
        details=facts.details,
    )


async def tigerbeetle_ids(stores: Stores, wallet: WalletKey, answered: dict[str, str | None]
                          ) -> tuple[set[int], set[int]]:
    """(held, expected) for one wallet, straight from TigerBeetle: the ids of the operation
    transfers on its account (the backfill's opening ones aside), and the derived ids of the
    `answered` operations (transaction id -> a void's original, else None) that are not inside
    its imported opening balance. Equal sets: every answered operation is in TigerBeetle
    exactly once, as its own transfer or inside the opening, and nothing else is there."""
    record = await stores.accounts.get(wallet)
    assert record is not None, f"{wallet} has no account"
    held = {t.id for t in await account_transfers(stores.tb_client, record.account_id)
            if t.code != TransferCode.OPENING}
    imported = await ImportLedger(stores.db).get(wallet.canonical)
    version = imported.version if imported and imported.status is ImportStatus.DONE else -1
    docs = await find_in(stores.db[WALLET_TRANSACTIONS], "_id", sorted(answered),
                         {"wallet_version": 1})
    versions = {d["_id"]: int(d["wallet_version"]) for d in docs}
    expected = {derived_transfer_id(txn, original) for txn, original in answered.items()
                if versions.get(txn, version + 1) > version}
    return held, expected
