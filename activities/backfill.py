"""Backfill activities: import legacy wallets into TigerBeetle as opening balances.

One page = one MongoDB cursor page of wallets, claimed in `backfill_imports` (see
stores/backfill_imports.py for why the claim makes the import race-free with the wallets' own
dual-write backlogs), one `create_accounts` batch, one `lookup_accounts` batch and one
`create_transfers` batch. A page holds at most `BatchLimits.backfill_wallets_per_page_max`
wallets of the connected cluster (4094 at 1 MiB, 126 at 32 KiB, 14 at 4 KiB: two opening
transfers each fit one request), whatever size the workflow asks for; the client cuts any
larger batch (stores.tb_batches) and keeps each wallet's linked pair in one request. Every id
is deterministic, so a page that is retried after a crash lands on the same accounts and
transfers (EXISTS) and imports nothing twice.

`--with-history` (activities/history_import.py) imports the transaction log first; a page
then refuses to run before that history is done, and its openings post only the residual
(plan_to_reach from the account's posted totals, which include the history).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import tigerbeetle as tb
from temporalio import activity

from activities.history_import import HistoryImporter, ImportBooks
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
from mongobase.mongo import now_ms
from registries.account_registry import AccountRecord
from stores.backfill_imports import ImportLedger, ImportRecord, ImportStatus
from stores.history_import import create_accounts_allowing_imported
from stores.legacy_store import LegacyStore
from stores.tb_errors import Outcome, account_rule, transfer_rule
from stores.tigerbeetle_store import TigerBeetleStore, customer_account_of
from walletcore.balances import MinorBalance
from walletcore.codes import SystemAccount, TransferCode
from walletcore.errors import InvalidInputError, StoreUnavailableError
from walletcore.ids import opening_transfer_id, system_account_id
from walletcore.keys import WalletKey
from walletcore.reconcile import PostingPlan, plan_to_reach

ENSURE_WAIT_S = 0.2
ENSURE_WAIT_ATTEMPTS_MAX = 50  # then raise retryable: the activity retry policy takes over

Targets = dict[str, tuple[int, MinorBalance]]  # wallet -> (legacy version, balance) to import
EMPTY = MinorBalance(credit_minor=0, debit_minor=0, historical_credit_minor=0)


def _own_empty_claim(record: ImportRecord, claimer: str) -> bool:
    """`claimer`'s claim of an empty import at version 0, not completed (_record_empty's)."""
    return (record.status is ImportStatus.CLAIMED and record.claimed_by == claimer
            and record.version == 0 and record.balance == EMPTY)


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


class WalletImporter:
    """The import itself, shared by the backfill page and the wallet workflow's lazy import.

    Three stores: the legacy side, the TigerBeetle side (client, registries, ledger table,
    deployment tag) and the importers' books (claims; the history's checkpoints gate a page
    run with --with-history)."""

    def __init__(
        self, legacy: LegacyStore, tigerbeetle: TigerBeetleStore, books: ImportBooks
    ) -> None:
        self._legacy = legacy
        self._tb_store = tigerbeetle
        self._client = tigerbeetle.client  # cut to the cluster's request limit
        self._limits = tigerbeetle.limits
        self._accounts = tigerbeetle.accounts
        self._ledgers = tigerbeetle.ledgers
        self._imports = books.imports
        self._history = HistoryImporter(legacy, tigerbeetle, books)

    @property
    def imports(self) -> ImportLedger:
        return self._imports

    @property
    def history(self) -> HistoryImporter:
        """The --with-history importer over the same stores."""
        return self._history

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
        targets, already, busy = await self._claim(by_key, claimer, resume_own=resume_own)
        if not targets:
            return ImportOutcome(already=already, busy=busy)
        records = await self._accounts.get_or_create_many(
            [(by_key[k].wallet, by_key[k].allow_overdraft) for k in targets])
        failed: dict[str, str] = {}
        for ledger in sorted({r.ledger for r in records.values()}):
            await self._tb_store.ensure_system_accounts(ledger)
        await self._create_accounts(list(records.values()), failed)
        posted, owners = await self._post_openings(targets, records, failed)
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

    async def _claim(
        self, by_key: dict[str, LegacyWallet], claimer: str, *, resume_own: bool
    ) -> tuple[Targets, int, int]:
        """(the wallets this call imports with their targets, already done, busy elsewhere).
        Claim first: a fresh wallet (the common case) then costs one insert and no read; only
        the wallets that already had a record (lost inserts) are read back, by key."""
        now = now_ms()
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
        targets: Targets = {rec.wallet: (rec.version, rec.balance) for rec in fresh
                            if rec.wallet in won}
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
        return targets, already, busy

    async def _post_openings(
        self, targets: Targets, records: dict[str, AccountRecord], failed: dict[str, str]
    ) -> tuple[dict[str, tuple[int, int]], list[str]]:
        """Post what brings each claimed wallet's account to its target: ((credit, debit)
        posted per wallet, the wallet of each transfer sent). Failures land in `failed`."""
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
            if version == 0 and target == EMPTY:
                # An empty claim (a wallet recorded absent from legacy, or held at version 0):
                # the opening holds no operation, so whatever TigerBeetle holds came as
                # transfers of their own (tb_primary answered them before this claim was done,
                # and legacy's projection of them must not be imported a second time).
                posted[key] = (0, 0)
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
        if transfers:  # linked pairs stay in one request (stores.tb_batches)
            results = await self._client.create_transfers(transfers)
            assert len(results) == len(transfers)
            for owner, transfer, result in zip(owners, transfers, results, strict=True):
                rule = transfer_rule(result.status)
                if rule.outcome is Outcome.FAILED and owner not in failed:
                    failed[owner] = f"opening transfer {transfer.id:032x}: {result.status.name}"
        return posted, owners

    async def _create_accounts(self, records: list[AccountRecord], failed: dict[str, str]) -> None:
        statuses = await create_accounts_allowing_imported(
            self._client, [customer_account_of(r, self._tb_store.deployment_tag) for r in records])
        assert len(statuses) == len(records)
        for record, status in zip(records, statuses, strict=True):
            if account_rule(status).outcome is Outcome.FAILED:
                failed[record.wallet.canonical] = f"create account: {status.name}"

    async def _lookup(self, ids: list[int]) -> dict[int, tb.Account]:
        if not ids:
            return {}
        return {account.id: account for account in await self._client.lookup_accounts(ids)}

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
            if current is None and record_absent and (
                    record is None or _own_empty_claim(record, claimer)):
                # Done before the caller writes TigerBeetle: a claim left CLAIMED would later
                # be resumed against legacy's projection of what TigerBeetle answered.
                await self._record_empty(key, claimer, record)
                continue  # won or lost the claim: the record says which version
            if current is None:
                return 0  # nothing in legacy: every operation goes to TigerBeetle as it comes
            balance, version = current
            if since_version is not None and since_version < version:
                earlier = await self._balance_at(wallet, since_version)
                if earlier is not None:
                    balance, version = earlier, since_version
            allow_overdraft = await self._legacy.overdraft_allowed(wallet)
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

    async def _balance_at(self, wallet: WalletKey, version: int) -> MinorBalance | None:
        """The legacy balance right after `version` (None: seeded without a transaction log,
        import the current balance)."""
        if version == 0:
            return EMPTY
        return await self._legacy.balance_after(wallet, version)

    async def _record_empty(self, key: str, claimer: str, record: ImportRecord | None) -> None:
        """Record a wallet legacy does not hold as imported at version 0. `record`: our own
        empty claim already there, left CLAIMED by an attempt cancelled (its timeout) between
        claim and completion; the wallet's writes are serialized, so that attempt is dead and
        its claim is completed here (mark_done matches only our CLAIMED record)."""
        if record is None:
            claim = ImportRecord(wallet=key, version=0, balance=EMPTY, claimed_by=claimer,
                                 status=ImportStatus.CLAIMED, claimed_at=now_ms())
            if key not in await self._imports.claim_many([claim]):
                return  # lost: the winner's record says which version
        await self._imports.mark_done(claimer, [key])

    async def count(self, pairs: list[str]) -> dict[str, int]:
        totals: dict[str, int] = {}
        for pair in pairs:
            currency, _, country = pair.partition(":")
            totals[pair] = await self._legacy.count_wallets(currency=currency, country=country)
        return totals

    async def page(self, inp: BackfillPageInput) -> BackfillPageOutput:
        currency, _, country = inp.pair.partition(":")
        self._ledgers.ledger_of(currency, country)
        if inp.with_history and not await self._history.checkpoints.done_for(inp.pair):
            raise InvalidInputError(
                f"the history of {inp.pair} is not imported yet: with --with-history the "
                "openings come after it (they post only what the history does not hold)",
                field="with_history",
            )
        # The workflow's size (recorded histories keep theirs), cut to the cluster's limit.
        limit = min(inp.limit, self._limits.backfill_wallets_per_page_max)
        docs = await self._legacy.page_wallets(
            after=inp.after, limit=limit, currency=currency, country=country
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
            exhausted=len(docs) < limit,
        )


class BackfillActivities:
    """Temporal activities around WalletImporter (one pydantic input model each)."""

    def __init__(self, importer: WalletImporter) -> None:
        self._importer = importer
        self._history = importer.history

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
