"""Backfill activities: import legacy wallets into TigerBeetle as opening balances.

One page = one MongoDB cursor page of wallets, claimed in `backfill_imports` (see
stores/backfill_imports.py for why the claim makes the import race-free with the wallets' own
dual-write backlogs), one `create_accounts` batch, one `lookup_accounts` batch and one
`create_transfers` batch (<= 8189 events each). Every id is deterministic, so a page that is
retried after a crash lands on the same accounts and transfers (EXISTS) and imports nothing
twice.

`--with-history` (activities/history_import.py) imports the transaction log first; a page
then refuses to run before that history is done, and its openings post only the residual
(plan_to_reach from the account's posted totals, which include the history).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import tigerbeetle as tb
from pymongo.asynchronous.database import AsyncDatabase
from temporalio import activity

from activities.history_import import HistoryImporter
from messages.backfill import (
    ACTIVITY_COUNT,
    ACTIVITY_ENSURE_IMPORTED,
    ACTIVITY_HISTORY_PAGE,
    ACTIVITY_PAGE,
    WALLETS_PER_PAGE_MAX,
    BackfillCountInput,
    BackfillCountOutput,
    BackfillPageInput,
    BackfillPageOutput,
    EnsureImportedInput,
    EnsureImportedOutput,
    HistoryPageInput,
    HistoryPageOutput,
    ImportOutcome,
    LegacyWallet,
)
from mongobase.mongo import (
    as_utc,
    decimal128_to_minor,
    hex_to_u128,
    insert_new,
    now_ms,
    u128_to_hex,
)
from registries.account_registry import ACCOUNT_REGISTRY, AccountRecord, AccountRegistry
from registries.transfer_registry import TransferRegistry
from stores.backfill_imports import ImportLedger, ImportRecord, ImportStatus
from stores.history_import import HistoryCheckpoints, create_accounts_allowing_imported
from stores.legacy_store import WALLET_TRANSACTIONS, WALLETS, LegacyStore
from stores.reports import IN_CHUNK_MAX, find_keys
from stores.tb_errors import Outcome, account_rule, transfer_rule
from stores.tigerbeetle_client import TigerBeetleClient
from stores.tigerbeetle_store import TigerBeetleStore, customer_account_of
from walletcore.balances import MinorBalance
from walletcore.codes import SystemAccount, TransferCode
from walletcore.errors import InvalidInputError, StoreUnavailableError
from walletcore.ids import account_id, opening_transfer_id, system_account_id
from walletcore.keys import WalletKey
from walletcore.ledgers import DEFAULT_LEDGER_TABLE, LedgerTable
from walletcore.reconcile import PostingPlan, plan_to_reach

BATCH_EVENTS_MAX = 8189  # TigerBeetle's request limit
REGISTRY_CONCURRENCY = 64  # registry get_or_create calls in flight per page
ENSURE_WAIT_S = 0.2
ENSURE_WAIT_ATTEMPTS_MAX = 50  # then raise retryable: the activity retry policy takes over


def _pair_filter(pair: str) -> dict[str, str]:
    currency, _, country = pair.partition(":")
    return {"currency": currency, "country": country}


def opening_transfers(record: AccountRecord, version: int, plan: PostingPlan) -> list[tb.Transfer]:
    """Opening -> customer (credit part) then customer -> Opening (debit part), linked."""
    opening = system_account_id(record.ledger, SystemAccount.OPENING)
    out: list[tb.Transfer] = []
    if plan.credit_minor:
        out.append(
            tb.Transfer(
                id=opening_transfer_id(record.wallet, version, "credit"),
                debit_account_id=opening,
                credit_account_id=record.account_id,
                amount=plan.credit_minor,
                user_data_64=version,
                ledger=record.ledger,
                code=int(TransferCode.OPENING),
            )
        )
    if plan.debit_minor:
        out.append(
            tb.Transfer(
                id=opening_transfer_id(record.wallet, version, "debit"),
                debit_account_id=record.account_id,
                credit_account_id=opening,
                amount=plan.debit_minor,
                user_data_64=version,
                ledger=record.ledger,
                code=int(TransferCode.OPENING),
            )
        )
    if len(out) == 2:  # both or neither: a half-imported wallet would be a wrong balance
        out[0].flags = tb.TransferFlags.LINKED
    return out


def _registry_record(doc: dict[str, Any]) -> AccountRecord:
    wallet = WalletKey.from_canonical(doc["_id"])
    record = AccountRecord(
        wallet=wallet, account_id=hex_to_u128(doc["account_id"]), ledger=int(doc["ledger"]),
        nonce=int(doc["nonce"]), allow_overdraft=bool(doc["allow_overdraft"]),
        created_at=as_utc(doc["created_at"]),
    )
    assert record.account_id == account_id(wallet, record.nonce), f"registry {doc['_id']}"
    return record


class WalletImporter:
    """The import itself, shared by the backfill page and the wallet workflow's lazy import."""

    def __init__(
        self,
        db: AsyncDatabase[Any],
        legacy: LegacyStore,
        tb_store: TigerBeetleStore,
        client: TigerBeetleClient,
        accounts: AccountRegistry,
        imports: ImportLedger,
        ledgers: LedgerTable = DEFAULT_LEDGER_TABLE,
    ) -> None:
        self._db = db
        self._legacy = legacy
        self._tb_store = tb_store
        self._client = client
        self._accounts = accounts
        self._imports = imports
        self._ledgers = ledgers
        self._history = HistoryCheckpoints(db)

    async def import_wallets(
        self, wallets: Sequence[LegacyWallet], claimer: str, *, resume_own: bool = False
    ) -> ImportOutcome:
        """Claim, create accounts, post openings, complete claims. Idempotent.
        `resume_own`: a claim `claimer` already holds is resumed at once (its target, hence the
        same deterministic ids), for claimers that are serialized per wallet."""
        assert len(wallets) <= WALLETS_PER_PAGE_MAX
        if not wallets:
            return ImportOutcome()
        by_key = {w.wallet.canonical: w for w in wallets}
        for w in wallets:
            self._ledgers.ledger_of(w.wallet.currency, w.wallet.country)  # unknown pair: fail
        now = now_ms()
        # Claim first: a fresh wallet (the common case) then costs one insert and no read;
        # only the wallets that already had a record (lost inserts) are read back, by key.
        fresh = [
            ImportRecord(
                wallet=key,
                version=w.version,
                balance=w.balance,
                status=ImportStatus.CLAIMED,
                claimed_by=claimer,
                claimed_at=now,
            )
            for key, w in by_key.items()
        ]
        won = await self._imports.claim_many(fresh)
        targets: dict[str, tuple[int, MinorBalance]] = {  # wallet -> (version, balance)
            rec.wallet: (rec.version, rec.balance) for rec in fresh if rec.wallet in won}
        lost = [key for key in by_key if key not in won]
        existing = await self._imports.get_many(lost)
        already = 0
        busy = len(lost) - len(existing)  # deleted since the insert: left for a later page
        for key in lost:
            rec = existing.get(key)
            if rec is None:
                continue
            if rec.status is ImportStatus.DONE:
                already += 1
            elif (resume_own and rec.status is ImportStatus.CLAIMED
                  and rec.claimed_by == claimer):
                targets[key] = (rec.version, rec.balance)
            elif await self._imports.take_over(rec, claimer):
                targets[key] = (rec.version, rec.balance)  # the claim's target, not the page's
            else:
                busy += 1
        if not targets:
            return ImportOutcome(already=already, busy=busy)

        records = await self.registry_records(
            [(by_key[k].wallet, by_key[k].allow_overdraft) for k in targets])
        failed: dict[str, str] = {}
        for ledger in sorted({r.ledger for r in records.values()}):
            await self._tb_store.ensure_system_accounts(ledger)
        await self._create_accounts(list(records.values()), failed)
        live = [k for k in targets if k not in failed]
        accounts = await self._lookup([records[k].account_id for k in live])
        transfers: list[tb.Transfer] = []
        owners: list[str] = []
        posted: dict[str, tuple[int, int]] = {}
        for key in live:
            version, target = targets[key]
            account = accounts.get(records[key].account_id)
            if account is None:
                failed[key] = "account missing after create_accounts"
                continue
            plan = plan_to_reach(account.credits_posted, account.debits_posted, target)
            if plan is None:
                failed[key] = (
                    f"TigerBeetle already holds more than legacy version {version} "
                    f"(credits {account.credits_posted}, debits "
                    f"{account.debits_posted}); needs reconciliation"
                )
                continue
            batch = opening_transfers(records[key], version, plan)
            transfers.extend(batch)
            owners.extend([key] * len(batch))
            posted[key] = (plan.credit_minor, plan.debit_minor)
        assert len(transfers) <= BATCH_EVENTS_MAX
        if transfers:
            results = await self._client.create_transfers(transfers)
            assert len(results) == len(transfers)
            for owner, transfer, result in zip(owners, transfers, results, strict=True):
                rule = transfer_rule(result.status)
                if rule.outcome is Outcome.FAILED and owner not in failed:
                    failed[owner] = f"opening transfer {transfer.id:032x}: {result.status.name}"
        done = {k: v for k, v in posted.items() if k not in failed}
        if failed:  # first: mark_done's range update must find failed claims no longer claimed
            await self._imports.mark_failed(claimer, failed)
        await self._imports.mark_done(claimer, sorted(done))
        imported = [k for k, (c, d) in done.items() if c or d]
        return ImportOutcome(
            imported=imported,
            already=already + len(done) - len(imported),
            busy=busy,
            failed=failed,
            transfers=sum(1 for o in owners if o in done),
        )

    async def registry_records(
        self, wallets: Sequence[tuple[WalletKey, bool]]
    ) -> dict[str, AccountRecord]:
        """Registry records of (wallet, allow_overdraft) pairs: one range read, one unordered
        bulk insert of the missing ones (nonce 0, the foundation's document format); anything
        that collides or races falls back to AccountRegistry.get_or_create, which owns the
        nonce logic."""
        found: dict[str, AccountRecord] = {}
        for ledger, keys in self._keys_by_ledger(wallets).items():
            found.update({k: _registry_record(d)
                          for k, d in (await self._registry_find(ledger, keys)).items()})
        missing = [(w, allow) for w, allow in wallets if w.canonical not in found]
        now = now_ms()
        docs: list[dict[str, Any]] = [{
            "_id": w.canonical, "client_id": w.client_id,
            "country": w.country, "currency": w.currency,
            "issuer_type": w.issuer_type, "account_id": u128_to_hex(account_id(w)),
            "ledger": self._ledgers.ledger_of(w.currency, w.country), "nonce": 0,
            "allow_overdraft": allow, "created_at": now,
        } for w, allow in missing]
        # Taken meanwhile (a live write registered it): read back through get_or_create below.
        lost = await insert_new(self._db[ACCOUNT_REGISTRY], docs)
        for i, doc in enumerate(docs):
            if i not in lost:
                found[doc["_id"]] = _registry_record(doc)
        gate = asyncio.Semaphore(REGISTRY_CONCURRENCY)

        async def one(w: tuple[WalletKey, bool]) -> AccountRecord:
            async with gate:
                return await self._accounts.get_or_create(w[0], allow_overdraft=w[1])

        slow = await asyncio.gather(*(one(missing[i]) for i in sorted(lost)))
        found.update({r.wallet.canonical: r for r in slow})
        return found

    def _keys_by_ledger(self, wallets: Sequence[tuple[WalletKey, bool]]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for w, _ in wallets:
            out.setdefault(self._ledgers.ledger_of(w.currency, w.country), []).append(w.canonical)
        return out

    async def _registry_find(self, ledger: int, keys: list[str]) -> dict[str, Any]:
        """Registry entries of `keys` (one ledger): one `(ledger, _id)` index range read for a
        page, key lookups for a few. A bare `_id` range scans the whole collection on
        SecantusDB. An entry this misses (another ledger) only loses the insert below and
        goes through get_or_create."""
        if len(keys) <= IN_CHUNK_MAX:
            return await find_keys(self._db[ACCOUNT_REGISTRY], keys)
        wanted = set(keys)
        cursor = self._db[ACCOUNT_REGISTRY].find(
            {"ledger": ledger, "_id": {"$gte": min(keys), "$lte": max(keys)}}
        ).batch_size(len(keys))
        return {d["_id"]: d async for d in cursor if d["_id"] in wanted}

    async def _create_accounts(self, records: list[AccountRecord], failed: dict[str, str]) -> None:
        for start in range(0, len(records), BATCH_EVENTS_MAX):
            chunk = records[start : start + BATCH_EVENTS_MAX]
            statuses = await create_accounts_allowing_imported(
                self._client,
                [customer_account_of(r, self._tb_store.deployment_tag) for r in chunk])
            assert len(statuses) == len(chunk)
            for record, status in zip(chunk, statuses, strict=True):
                if account_rule(status).outcome is Outcome.FAILED:
                    failed[record.wallet.canonical] = f"create account: {status.name}"

    async def _lookup(self, ids: list[int]) -> dict[int, tb.Account]:
        found: dict[int, tb.Account] = {}
        for start in range(0, len(ids), BATCH_EVENTS_MAX):
            for account in await self._client.lookup_accounts(
                ids[start : start + BATCH_EVENTS_MAX]
            ):
                found[account.id] = account
        return found

    async def ensure_imported(
        self,
        wallet: WalletKey,
        claimer: str,
        *,
        record_absent: bool = False,
        since_version: int | None = None,
    ) -> int:
        """The legacy version the wallet's opening balance holds, importing it now if needed.

        Call it from the wallet's TigerBeetle backlog applier before applying any operation
        (serialized per wallet); skip operations whose legacy version is <= the answer.
        `record_absent`: a wallet legacy does not hold is recorded as imported at version 0
        (TigerBeetle answers first and creates it: a later import at the projected legacy
        version would count its operations twice).
        `since_version`: the caller will apply every legacy operation after this version (its
        backlog holds them all), so a fresh import may stop there: those operations then
        reach TigerBeetle as transfers of their own instead of inside the opening balance.
        """
        key = wallet.canonical
        for _attempt in range(ENSURE_WAIT_ATTEMPTS_MAX):
            record = await self._imports.get(key)
            if record is not None and record.status is ImportStatus.DONE:
                return record.version
            current = await self._legacy.get_wallet_version(wallet)
            if current is None and record_absent and record is None:
                await self._record_empty(key, claimer)
                continue  # won or lost the claim: the record says which version
            if current is None:
                return 0  # nothing in legacy: every operation goes to TigerBeetle as it comes
            balance, version = current
            if since_version is not None and since_version < version:
                earlier = await self._balance_at(key, wallet.currency, since_version)
                if earlier is not None:
                    balance, version = earlier, since_version
            doc = await self._db[WALLETS].find_one({"_id": key}, {"allow_overdraft": 1})
            allow_overdraft = bool(doc and doc.get("allow_overdraft"))
            outcome = await self.import_wallets(
                [
                    LegacyWallet(
                        wallet=wallet,
                        balance=balance,
                        version=version,
                        allow_overdraft=allow_overdraft,
                    )
                ],
                claimer,
                resume_own=True,  # the wallet's backlog is serialized: a claim of ours is dead
            )
            if key in outcome.failed:
                raise InvalidInputError(
                    f"import of {key} failed: {outcome.failed[key]}", field="wallet"
                )
            if outcome.busy == 0:
                continue  # done (now or before): read the version from the record
            await asyncio.sleep(ENSURE_WAIT_S)  # another importer holds a fresh claim
        raise StoreUnavailableError(f"import of {key} is still in progress elsewhere")

    async def _balance_at(self, key: str, currency: str, version: int) -> MinorBalance | None:
        """The legacy balance right after `version` (its transaction's balance_after)."""
        if version == 0:
            return MinorBalance(credit_minor=0, debit_minor=0, historical_credit_minor=0)
        doc = await self._db[WALLET_TRANSACTIONS].find_one(
            {"wallet": key, "wallet_version": version}, {"balance_after": 1})
        if doc is None:
            return None  # seeded without a transaction log: import the current balance
        after = doc["balance_after"]
        return MinorBalance(
            credit_minor=decimal128_to_minor(after["credit"], currency, field="credit"),
            debit_minor=decimal128_to_minor(after["debit"], currency, field="debit"),
            historical_credit_minor=decimal128_to_minor(
                after["historical_credit"], currency, field="historical_credit"),
        )

    async def _record_empty(self, key: str, claimer: str) -> None:
        empty = MinorBalance(credit_minor=0, debit_minor=0, historical_credit_minor=0)
        claim = ImportRecord(wallet=key, version=0, balance=empty, status=ImportStatus.CLAIMED,
                             claimed_by=claimer, claimed_at=now_ms())
        if key in await self._imports.claim_many([claim]):
            await self._imports.mark_done(claimer, [key])

    def history_importer(self) -> HistoryImporter:
        """The --with-history importer over the same database, clients and registries."""
        return HistoryImporter(
            self._db, self._client, self.registry_records, TransferRegistry(self._db),
            self._ledgers, deployment_tag=self._tb_store.deployment_tag)

    async def count(self, pairs: list[str]) -> dict[str, int]:
        return {pair: await self._db[WALLETS].count_documents(_pair_filter(pair)) for pair in pairs}

    async def page(self, inp: BackfillPageInput) -> BackfillPageOutput:
        currency, _, country = inp.pair.partition(":")
        self._ledgers.ledger_of(currency, country)
        if inp.with_history and not await self._history.done_for(inp.pair):
            raise InvalidInputError(
                f"the history of {inp.pair} is not imported yet: with --with-history the "
                "openings come after it (they post only what the history does not hold)",
                field="with_history",
            )
        docs = await self._legacy.page_wallets(
            after=inp.after, limit=inp.limit, currency=currency, country=country
        )
        wallets = [
            LegacyWallet(
                wallet=d["wallet"],
                balance=d["balance"],
                version=d["version"],
                allow_overdraft=d["allow_overdraft"],
            )
            for d in docs
        ]
        outcome = await self.import_wallets(wallets, inp.run_id)
        return BackfillPageOutput(
            scanned=len(wallets),
            last_key=docs[-1]["_id"] if docs else inp.after,
            imported=len(outcome.imported),
            already=outcome.already,
            busy=outcome.busy,
            failed=outcome.failed,
            transfers=outcome.transfers,
            exhausted=len(docs) < inp.limit,
        )


class BackfillActivities:
    """Temporal activities around WalletImporter (one pydantic input model each)."""

    def __init__(self, importer: WalletImporter) -> None:
        self._importer = importer
        self._history = importer.history_importer()

    @activity.defn(name=ACTIVITY_COUNT)
    async def count(self, inp: BackfillCountInput) -> BackfillCountOutput:
        return BackfillCountOutput(totals=await self._importer.count(inp.pairs))

    @activity.defn(name=ACTIVITY_PAGE)
    async def page(self, inp: BackfillPageInput) -> BackfillPageOutput:
        activity.heartbeat(inp.after)
        return await self._importer.page(inp)

    @activity.defn(name=ACTIVITY_ENSURE_IMPORTED)
    async def ensure_imported(self, inp: EnsureImportedInput) -> EnsureImportedOutput:
        version = await self._importer.ensure_imported(inp.wallet, inp.claimer)
        return EnsureImportedOutput(version=version)

    @activity.defn(name=ACTIVITY_HISTORY_PAGE)
    async def history_page(self, inp: HistoryPageInput) -> HistoryPageOutput:
        activity.heartbeat(inp.pairs)
        return await self._history.page(inp)

    def all(self) -> list[Any]:
        return [self.count, self.page, self.ensure_imported, self.history_page]
