"""The wallet store on TigerBeetle: one account per wallet, one transfer per operation.

Mapping (foundation contract): a credit moves RESERVE -> customer, a debit customer -> SPEND,
a void moves the original's amount back (customer -> RESERVE / SPEND -> customer) under an id
derived from the original transaction, so a transaction can be voided at most once. Transfer
ids derive from transaction ids, so every retry lands on the same TigerBeetle id and TigerBeetle
itself answers "already applied" (EXISTS) or "id reused with other content" (EXISTS_WITH_*).

The registries hold what TigerBeetle cannot: wallet key <-> account id (Account Registry) and
transaction id <-> transfer, voided-by (Transfer Registry). Writes go to TigerBeetle first and
to the registry second. Both steps are idempotent, so a crash between them is healed by the
retry of the same operation: TigerBeetle answers EXISTS (a replay) and the registry write is
repeated. The other order could leave a registry record for a transfer that never happened.

Balances in results are TigerBeetle's own history row for the transfer (customer accounts have
the HISTORY flag): the balance right after the operation, identical for the first answer and
every replay, like the legacy store's stored `balance_after`.

Known limits (all need concurrent writers on one wallet, which the wallet workflow prevents,
or a crash between the TigerBeetle write and the registry write):
- Two debits racing past the funds pre-check: the loser gets InsufficientFundsError from
  TigerBeetle, which burns its id (a later retry of that id: ConflictError ID_ALREADY_FAILED).
- A void applied in TigerBeetle whose registry mark was lost: a *different* void transaction
  of the same original arriving before the retry is attributed the (single) void transfer.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TypeVar

import tigerbeetle as tb

from mongobase.mongo import PAGE_LIMIT_MAX
from registries.account_registry import MANY_MAX, AccountRecord, AccountRegistry
from registries.transfer_registry import TransferRecord, TransferRegistry
from stores.history_import import create_accounts_allowing_imported
from stores.store_metrics import instrument_wallet_store, operation_label
from stores.tb_batches import BatchedClient, batched
from stores.tb_errors import Outcome, account_rule, status_error, transfer_rule
from stores.tigerbeetle_client import TigerBeetleClient
from walletcore.balances import MinorBalance, WalletBalance
from walletcore.codes import CUSTOMER_ACCOUNT_CODE, SystemAccount, TransferCode
from walletcore.errors import (
    AlreadyVoidedError,
    ConflictError,
    DuplicateTransactionError,
    InsufficientFundsError,
    InvalidInputError,
    NotFoundError,
    NotVoidableError,
    StoreUnavailableError,
    UnknownLedgerError,
)
from walletcore.ids import reference_hash, system_account_id, transfer_id, void_transfer_id
from walletcore.keys import WalletKey
from walletcore.ledgers import DEFAULT_LEDGER_TABLE, LedgerTable
from walletcore.money import U64_MAX, from_minor
from walletcore.operations import (
    HISTORY_LIMIT_MAX,
    AddCredit,
    HistoryEntry,
    OperationResult,
    OperationType,
    SubtractCredit,
    Void,
    WalletOperation,
    validate_operation,
)
from walletcore.tb_limits import BatchLimits
from walletcore.transfer_map import operation_leg, void_code
from walletcore.write_facts import OriginalFacts

T = TypeVar("T")

STORE_NAME = "tigerbeetle"
KNOWN_ACCOUNTS_MAX = 100_000  # accounts this process has seen exist in TigerBeetle (LRU)
MULTI_BALANCE_WALLETS_MAX = 1000  # wallets of one client answered by get_multi_balance

# Registry `type` values; "void" records carry transfer_id = void_transfer_id(original).
TYPE_CREDIT = OperationType.CREDIT.value
TYPE_DEBIT = OperationType.DEBIT.value
TYPE_VOID = OperationType.VOID.value
# A credit or debit older than TigerBeetle: its effect is inside the wallet's imported opening
# balance, so no transfer of its own exists. Recorded (with transfer_id(txn), never created)
# when such a transaction is voided, so the void is known and a second void is refused.
IN_OPENING_SUFFIX = "_in_opening"
TYPE_CREDIT_IN_OPENING = TYPE_CREDIT + IN_OPENING_SUFFIX
TYPE_DEBIT_IN_OPENING = TYPE_DEBIT + IN_OPENING_SUFFIX
VOIDABLE_TYPES = frozenset({TYPE_CREDIT, TYPE_DEBIT, TYPE_CREDIT_IN_OPENING, TYPE_DEBIT_IN_OPENING})

HISTORY_TYPE_BY_CODE: dict[int, str] = {
    TransferCode.CREDIT: TYPE_CREDIT,
    TransferCode.DEBIT: TYPE_DEBIT,
    TransferCode.CREDIT_VOID: TYPE_VOID,
    TransferCode.DEBIT_VOID: TYPE_VOID,
    TransferCode.OPENING: "opening",
    TransferCode.CORRECTION: "correction",
}

# Failures of the transport, not of the request: the caller may retry the same operation.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    ConnectionError,
    OSError,
    tb.ClientClosedError,
    tb.ClientEvictedError,
)


@dataclass(frozen=True)
class KnownRecords:
    """Registry reads done once for a batch of one wallet's operations. Valid only for
    operations whose transaction id no earlier operation of the batch used (the caller reads
    again for a repeated id), with `account` the latest record the batch saw."""

    wallet: WalletKey
    transfers: Mapping[str, TransferRecord]
    account: AccountRecord | None
    funds_checked: bool = False  # one debit's funds check done with the reads (see there)


@dataclass(frozen=True)
class Replicated:
    replayed: bool
    account: AccountRecord | None  # credits and debits: the wallet's record after the write


@dataclass(frozen=True)
class _Written:
    amount_minor: int
    account: AccountRecord | None
    timestamp: int = 0
    replayed: bool = False
    result: OperationResult | None = None  # answered without a transfer (in-opening replay)
    record: TransferRecord | None = None  # its registry record, left to the caller to write


@dataclass(frozen=True)
class BatchedMovement:
    """A credit or a debit of a batch of many wallets' movements (create_movements)."""

    op: AddCredit  # or SubtractCredit (its subclass)
    kind: OperationType
    account: AccountRecord  # the wallet's registered account (batch_accounts)


def movement_transfer(op: AddCredit, kind: OperationType, account: AccountRecord) -> tb.Transfer:
    """The one construction of a credit's or a debit's transfer (walletcore.transfer_map's
    leg): the per-operation path and the outbox drainer's batches send the same transfer, so
    a batch re-run of a per-operation write (or the reverse) is EXISTS, never EXISTS_WITH_*."""
    assert kind in (OperationType.CREDIT, OperationType.DEBIT), kind
    amount_minor = validate_operation(op)
    code = TransferCode.DEBIT if kind is OperationType.DEBIT else TransferCode.CREDIT
    leg = operation_leg(account.ledger, account.account_id, code)
    return tb.Transfer(
        id=transfer_id(op.transaction_id),
        debit_account_id=leg.debit_account_id,
        credit_account_id=leg.credit_account_id,
        amount=amount_minor,
        user_data_128=reference_hash(op.reference_id),
        ledger=account.ledger,
        code=int(leg.code),
    )


def customer_account(
    record: AccountRecord, client_hash: int, deployment_tag: int = 0
) -> tb.Account:
    """The TigerBeetle account of a wallet (shared with backfill so both create the same one).

    `user_data_64` = the deployment tag (Settings.deployment_tag, 0 = untagged): which
    deployment's Account Registry owns the account when several share one cluster, so
    reconciliation checks only its own accounts."""
    assert 0 <= deployment_tag <= U64_MAX
    flags = tb.AccountFlags.HISTORY
    if not record.allow_overdraft:
        flags |= tb.AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
    return tb.Account(
        id=record.account_id,
        ledger=record.ledger,
        code=CUSTOMER_ACCOUNT_CODE,
        flags=flags,
        user_data_128=client_hash,
        user_data_64=deployment_tag,
    )


def customer_account_of(record: AccountRecord, deployment_tag: int = 0) -> tb.Account:
    return customer_account(record, reference_hash(record.wallet.client_id), deployment_tag)


def system_accounts(ledger: int) -> list[tb.Account]:
    """RESERVE, SPEND, OPENING, CORRECTION of one ledger: no limit flags (they go negative)."""
    return [
        tb.Account(id=system_account_id(ledger, account), ledger=ledger, code=int(account))
        for account in SystemAccount
    ]


def timestamp_to_datetime(timestamp_ns: int) -> datetime:
    """TigerBeetle timestamps are Unix-epoch nanoseconds; microseconds are what datetime holds."""
    assert timestamp_ns > 0
    return datetime.fromtimestamp(timestamp_ns // 1000 / 1_000_000, tz=UTC)


def balance_of(account: tb.Account | tb.AccountBalance) -> MinorBalance:
    # The wallet balance is defined on posted amounts (the store creates no pending transfers).
    return MinorBalance.from_posted(account.credits_posted, account.debits_posted)


class TigerBeetleStore:
    """walletcore.ports.WalletStore on TigerBeetle plus the Account and Transfer registries."""

    name = STORE_NAME

    def __init__(
        self,
        client: TigerBeetleClient,
        accounts: AccountRegistry,
        transfers: TransferRegistry,
        ledgers: LedgerTable = DEFAULT_LEDGER_TABLE,
        *,
        deployment_tag: int = 0,
        limits: BatchLimits | None = None,
    ) -> None:
        """`limits`: the cluster's (stores.bundle asks the client); `client` is cut to them
        (stores.tb_batches), so every batch the store or its importers send fits a request.
        A client batched already brings its own limits."""
        assert 0 <= deployment_tag <= U64_MAX
        cut: BatchedClient = batched(client, limits)
        self._client = cut
        self._accounts = accounts
        self._transfers = transfers
        self._ledgers = ledgers
        # Public views for the importers (backfill, history, reconciliation) built over the
        # same clients: they size their pages by `limits` and send through `client`.
        self.client: TigerBeetleClient = cut
        self.limits = cut.limits
        self.accounts = accounts
        self.transfers = transfers
        self.ledgers = ledgers
        self.deployment_tag = deployment_tag  # customer accounts' user_data_64
        self._system_ledgers: set[int] = set()
        # Account ids known to exist in TigerBeetle: skips one create_accounts per write.
        self._known_accounts: OrderedDict[int, None] = OrderedDict()

    # ---- accounts --------------------------------------------------------------------------

    async def ensure_system_accounts(self, ledger: int) -> None:
        """Create the ledger's system accounts once per process (idempotent: EXISTS is fine)."""
        if ledger in self._system_ledgers:
            return
        accounts = system_accounts(ledger)
        # A history import (backfill --with-history) creates them `imported`: that is EXISTS.
        statuses = await self._tb(create_accounts_allowing_imported(self._client, accounts))
        assert len(statuses) == len(accounts)
        for account, status in zip(accounts, statuses, strict=True):
            rule = account_rule(status)
            if rule.outcome is Outcome.FAILED:
                raise status_error(
                    rule, status, f"system account {account.code} of ledger {ledger}"
                )
        self._system_ledgers.add(ledger)

    async def ensure_account(self, wallet: WalletKey, *, allow_overdraft: bool) -> AccountRecord:
        """Registry entry (the first caller's policy wins) and its TigerBeetle account."""
        self._ledgers.ledger_of(wallet.currency, wallet.country)  # unknown pair: clear error
        record = await self._accounts.get_or_create(wallet, allow_overdraft=allow_overdraft)
        await self._ensure_tb_account(record)
        return record

    async def _ensure_tb_account(self, record: AccountRecord) -> None:
        if record.account_id in self._known_accounts:
            self._known_accounts.move_to_end(record.account_id)
            return
        (status,) = await self._tb(create_accounts_allowing_imported(
            self._client, [customer_account_of(record, self.deployment_tag)]))
        rule = account_rule(status)
        if rule.outcome is Outcome.FAILED:
            raise status_error(rule, status, f"account of wallet {record.wallet}")
        self._remember_account(record.account_id)

    def _remember_account(self, account_id: int) -> None:
        self._known_accounts[account_id] = None
        self._known_accounts.move_to_end(account_id)
        while len(self._known_accounts) > KNOWN_ACCOUNTS_MAX:
            self._known_accounts.popitem(last=False)

    def _forget_accounts(self, ledger: int, account_id: int) -> None:
        """After *_ACCOUNT_NOT_FOUND our caches lied (e.g. a fresh cluster): re-create next time."""
        self._known_accounts.pop(account_id, None)
        self._system_ledgers.discard(ledger)

    # ---- writes ----------------------------------------------------------------------------

    async def add_credit(
        self, op: AddCredit, *, known: KnownRecords | None = None
    ) -> OperationResult:
        return await self._write_movement(op, OperationType.CREDIT, known)

    async def subtract_credit(
        self, op: SubtractCredit, *, known: KnownRecords | None = None
    ) -> OperationResult:
        return await self._write_movement(op, OperationType.DEBIT, known)

    async def _write_movement(
        self, op: AddCredit, kind: OperationType, known: KnownRecords | None
    ) -> OperationResult:
        """A credit or a debit; both create the wallet with the op's overdraft policy.
        `known`: the registry reads done beforehand (known_records of this one operation;
        the tb_primary write path reads them beside its other checks)."""
        written = await self._movement(op, kind, known, defer_record=True)
        if written.result is not None:
            return written.result
        assert written.account is not None and written.timestamp > 0
        # The registry insert (MongoDB) and the balance read (TigerBeetle) in one wait: both
        # follow the transfer, neither needs the other (issue 18: the tb_primary answer).
        balance_read = self._balance_at(written.account, written.timestamp)
        if written.record is None:
            balance = await balance_read
        else:
            recorded, read = await asyncio.gather(self._transfers.record(written.record),
                                                  balance_read, return_exceptions=True)
            for outcome in (recorded, read):  # both finished: the record's error first
                if isinstance(outcome, BaseException):
                    raise outcome
            assert not isinstance(read, BaseException)
            balance = read
        return _result(
            op.transaction_id, kind, op.wallet, written.amount_minor, balance, written.replayed,
            written.timestamp,
        )  # fmt: skip

    async def replicate(
        self,
        op: WalletOperation,
        *,
        opening_original: OriginalFacts | None = None,
        known: KnownRecords | None = None,
    ) -> Replicated:
        """Apply an operation another store already answered (the dual-write backlog): the
        same checks and writes as add_credit / subtract_credit / void, without the balance
        lookup no one reads. `known`: registry reads prefetched for a whole batch (see
        KnownRecords). Returns whether it was a replay, and the wallet's account record."""
        if isinstance(op, Void):
            result = await self.void(op, opening_original=opening_original)
            return Replicated(replayed=result.replayed, account=None)
        kind = OperationType.DEBIT if isinstance(op, SubtractCredit) else OperationType.CREDIT
        written = await self._movement(op, kind, known)
        replayed = written.result.replayed if written.result is not None else written.replayed
        return Replicated(replayed=replayed, account=written.account)

    async def known_records(
        self, wallet: WalletKey, transaction_ids: Sequence[str]
    ) -> KnownRecords:
        """One Transfer Registry query and one Account Registry read for a batch of one
        wallet's operations (see replicate)."""
        assert len(transaction_ids) <= PAGE_LIMIT_MAX
        existing, account = await asyncio.gather(
            self._transfers.get_many(transaction_ids), self._accounts.get(wallet)
        )
        return KnownRecords(wallet=wallet, transfers=existing, account=account)

    async def known_for_movement(self, op: AddCredit) -> KnownRecords:
        """known_records of one credit or debit and, for a debit of a registered wallet with
        no overdraft whose account this process has seen in TigerBeetle, the funds check the
        write would do after them (`funds_checked`: the write skips it). The tb_primary answer
        waits for all of it beside its MongoDB checks (issue 18: was a round trip after)."""
        known = await self.known_records(op.wallet, [op.transaction_id])
        account = known.account
        if (not isinstance(op, SubtractCredit) or account is None or account.allow_overdraft
                or op.transaction_id in known.transfers
                or account.account_id not in self._known_accounts):
            return known
        _check_ledger(account, self._ledgers.ledger_of(op.wallet.currency, op.wallet.country))
        await self._check_funds(account, movement_transfer(op, OperationType.DEBIT, account))
        return replace(known, funds_checked=True)

    async def _movement(
        self, op: AddCredit, kind: OperationType, known: KnownRecords | None,
        *, defer_record: bool = False,
    ) -> _Written:
        amount_minor = validate_operation(op)
        assert 0 < amount_minor <= U64_MAX
        wallet = op.wallet
        ledger = self._ledgers.ledger_of(wallet.currency, wallet.country)
        tid = transfer_id(op.transaction_id)
        if known is not None:
            assert known.wallet == wallet, "records prefetched for another wallet"
            existing, account = known.transfers.get(op.transaction_id), known.account
        else:
            existing, account = await asyncio.gather(
                self._transfers.get(op.transaction_id), self._accounts.get(wallet)
            )
        if existing is not None:  # the id is known: only an identical operation may replay
            if existing.type == kind.value + IN_OPENING_SUFFIX:
                result = await self._replay_in_opening(existing, op, kind, amount_minor)
                return _Written(amount_minor=amount_minor, account=account, result=result)
            _check_same_movement(existing, wallet, kind, amount_minor, tid)
        is_debit = kind is OperationType.DEBIT
        if account is None:
            if is_debit and not op.allow_overdraft:
                # A new wallet has nothing to spend; refuse before creating it, as the legacy
                # store does (nothing is written, the wallet does not come into existence).
                raise InsufficientFundsError(
                    f"insufficient funds: wallet {wallet} has no balance and does not allow "
                    "an overdraft",
                    field="amount",
                )
            account = await self.ensure_account(wallet, allow_overdraft=op.allow_overdraft)
        else:
            await self._ensure_tb_account(account)
        _check_ledger(account, ledger)
        await self.ensure_system_accounts(ledger)
        transfer = movement_transfer(op, kind, account)
        assert transfer.id == tid and transfer.amount == amount_minor
        checked = known is not None and known.funds_checked and known.account == account
        if is_debit and not account.allow_overdraft and existing is None and not checked:
            await self._check_funds(account, transfer)
        timestamp, replayed = await self._create_transfer(
            transfer, account, context=f"{kind.value} {op.transaction_id}"
        )
        record = None if existing is not None else TransferRecord(
            transaction_id=op.transaction_id,
            transfer_id=tid,
            wallet=wallet,
            account_id=account.account_id,
            type=kind.value,
            amount_minor=amount_minor,
            reference_id=op.reference_id,
            created_at=timestamp_to_datetime(timestamp),
        )
        if record is not None and not defer_record:
            await self._transfers.record(record)
            record = None
        return _Written(amount_minor=amount_minor, account=account, timestamp=timestamp,
                        replayed=replayed, record=record)

    # ---- batches of many wallets' movements (the outbox drainer's fast path) -------------

    async def batch_accounts(self, wallets: Sequence[WalletKey]) -> dict[str, AccountRecord]:
        """The registered accounts of `wallets` (by canonical key) whose TigerBeetle account
        exists (the ones this process has not seen are created in one request, EXISTS is
        fine), with their ledgers' system accounts. Left out: unregistered wallets, unknown
        pairs, a ledger other than the pair's, an account TigerBeetle refuses: the
        per-operation path handles (and explains) those."""
        assert len(wallets) <= MANY_MAX
        known_pairs = []
        for wallet in wallets:
            try:
                self._ledgers.ledger_of(wallet.currency, wallet.country)
            except UnknownLedgerError:
                continue
            known_pairs.append(wallet)
        records = await self._accounts.get_many(known_pairs)
        found = {
            canonical: record for canonical, record in records.items()
            if record.ledger == self._ledgers.ledger_of(record.wallet.currency,
                                                        record.wallet.country)
        }
        unseen = [r for r in found.values() if r.account_id not in self._known_accounts]
        if unseen:
            statuses = await self._tb(create_accounts_allowing_imported(
                self._client, [customer_account_of(r, self.deployment_tag) for r in unseen]))
            assert len(statuses) == len(unseen)
            for record, status in zip(unseen, statuses, strict=True):
                if account_rule(status).outcome is Outcome.FAILED:
                    del found[record.wallet.canonical]
                else:
                    self._remember_account(record.account_id)
        for ledger in sorted({r.ledger for r in found.values()}):
            await self.ensure_system_accounts(ledger)
        return found

    async def spendable_minor(self, accounts: Sequence[AccountRecord]) -> dict[int, int]:
        """account id -> posted credits - posted debits - pending debits, one lookup for all:
        a batch's funds pre-check (see _check_funds). Absent: TigerBeetle has no such account."""
        found = await self._tb(self._client.lookup_accounts([a.account_id for a in accounts]))
        return {a.id: a.credits_posted - a.debits_posted - a.debits_pending for a in found}

    async def existing_transfers(self, transfer_ids: Sequence[int]) -> set[int]:
        """Which of `transfer_ids` TigerBeetle holds (lookups cut at the request limit)."""
        found = await self._tb(self._client.lookup_transfers(list(transfer_ids)))
        return {t.id for t in found}

    async def transfer_timestamps(self, transfer_ids: Sequence[int]) -> dict[int, int]:
        """transfer id -> TigerBeetle timestamp, for the ids it holds (one lookup, cut at the
        request limit): the order TigerBeetle applied them in (the reverse projection's)."""
        found = await self._tb(self._client.lookup_transfers(list(transfer_ids)))
        return {t.id: t.timestamp for t in found}

    async def create_movements(self, moves: Sequence[BatchedMovement]) -> list[bool]:
        """Create the transfers of `moves` (many wallets) in this order in as few requests as
        the cluster's limit allows (TigerBeetle applies a request's events in order), then
        register the ones it created or had (EXISTS: identical fields) in one Transfer
        Registry write. Per move: True if it is in both. False: any other result (the
        caller's per-operation path decides, and says why), or the registry refused it.
        The caller funds-checks debits first (an EXCEEDS_CREDITS burns the id)."""
        transfers = [movement_transfer(m.op, m.kind, m.account) for m in moves]
        results = await self._tb(self._client.create_transfers(transfers))
        assert len(results) == len(moves)
        records: list[TransferRecord] = []
        where: list[int] = []
        for index, (move, transfer, result) in enumerate(
                zip(moves, transfers, results, strict=True)):
            if result.status in (tb.CreateTransferStatus.DEBIT_ACCOUNT_NOT_FOUND,
                                 tb.CreateTransferStatus.CREDIT_ACCOUNT_NOT_FOUND):
                self._forget_accounts(transfer.ledger, move.account.account_id)
            if transfer_rule(result.status).outcome is Outcome.FAILED:
                continue
            assert result.timestamp > 0
            records.append(TransferRecord(
                transaction_id=move.op.transaction_id, transfer_id=transfer.id,
                wallet=move.op.wallet, account_id=move.account.account_id,
                type=move.kind.value, amount_minor=transfer.amount,
                reference_id=move.op.reference_id,
                created_at=timestamp_to_datetime(result.timestamp)))
            where.append(index)
        done = [False] * len(moves)
        for start in range(0, len(records), PAGE_LIMIT_MAX):
            refused = await self._transfers.record_many(records[start:start + PAGE_LIMIT_MAX])
            for offset in range(min(PAGE_LIMIT_MAX, len(records) - start)):
                done[where[start + offset]] = offset not in refused
        return done

    async def _replay_in_opening(
        self, existing: TransferRecord, op: AddCredit, kind: OperationType, amount_minor: int
    ) -> OperationResult:
        """A replay of a transaction the opening balance holds. No transfer of its own exists,
        so the balance right after it is unknown here: the current balance is answered."""
        _check_same_movement(
            existing.model_copy(update={"type": kind.value}), op.wallet, kind, amount_minor,
            existing.transfer_id,
        )  # fmt: skip
        account = await self._accounts.get(op.wallet)
        if account is None:
            raise _no_account(op.wallet)
        found = await self._tb(self._client.lookup_accounts([account.account_id]))
        if not found:
            raise _no_account(op.wallet)
        return _result(op.transaction_id, kind, op.wallet, amount_minor, balance_of(found[0]),
                       True, found[0].timestamp)  # fmt: skip

    async def void(
        self, op: Void, *, opening_original: OriginalFacts | None = None
    ) -> OperationResult:
        """`opening_original`: the legacy record of an original that the caller knows is inside
        the wallet's imported opening balance (its legacy version <= the import's). Used only when
        the Transfer Registry has no record of the original: it is then registered as
        `<type>_in_opening` and reversed like any other."""
        validate_operation(op)
        wallet = op.wallet
        ledger = self._ledgers.ledger_of(wallet.currency, wallet.country)
        vtid = void_transfer_id(op.original_transaction_id)
        existing, original = await self._void_records(op, vtid, opening_original)
        known_replay = existing is not None or original.voided
        account = await self._void_account(op, original, ledger)
        voids_credit = original.type in (TYPE_CREDIT, TYPE_CREDIT_IN_OPENING)
        leg = operation_leg(ledger, account.account_id, void_code(voids_credit))
        transfer = tb.Transfer(
            id=vtid,
            debit_account_id=leg.debit_account_id,
            credit_account_id=leg.credit_account_id,
            amount=original.amount_minor,
            user_data_128=reference_hash(op.reference_id),
            ledger=ledger,
            code=int(leg.code),
        )
        if voids_credit and not account.allow_overdraft and not known_replay:
            await self._check_funds(account, transfer)
        try:
            timestamp, replayed = await self._create_transfer(
                transfer, account, context=f"void {op.transaction_id}"
            )
        except DuplicateTransactionError:
            # The void id derives from the original alone, so "exists with other content" means
            # another void of the same original got there first (its registry mark is pending).
            raise AlreadyVoidedError(
                f"transaction {op.original_transaction_id!r} was already voided",
                field="original_transaction_id",
            ) from None
        balance = await self._balance_at(account, timestamp)
        await self._register_void(op, vtid, existing, original, account, timestamp)
        return _result(
            op.transaction_id,
            OperationType.VOID,
            wallet,
            original.amount_minor,
            balance,
            replayed or known_replay,
            timestamp,
        )

    async def _void_records(
        self, op: Void, vtid: int, opening_original: OriginalFacts | None
    ) -> tuple[TransferRecord | None, TransferRecord]:
        """(the void's own record if known, its original's record) once the void is allowed:
        idempotency first, as for every write (a known transaction id replays or conflicts),
        then the original must be this wallet's, voidable and not voided by another void."""
        wallet = op.wallet
        existing, original = await asyncio.gather(
            self._transfers.get(op.transaction_id),
            self._transfers.get(op.original_transaction_id),
        )
        if original is None and opening_original is not None and existing is None:
            original = await self._register_in_opening(op, opening_original)
        if existing is not None and (
            existing.type != TYPE_VOID or existing.wallet != wallet or existing.transfer_id != vtid
        ):
            raise DuplicateTransactionError(
                f"transaction_id {op.transaction_id!r} was already used for a different "
                f"operation ({existing.type} on {existing.wallet})",
                field="transaction_id",
            )
        if original is None or original.wallet != wallet:
            raise NotFoundError(
                f"no transaction {op.original_transaction_id!r} in wallet {wallet}",
                field="original_transaction_id",
            )
        if original.type not in VOIDABLE_TYPES:
            raise NotVoidableError(
                f"transaction {op.original_transaction_id!r} is a {original.type}; only credits "
                "and debits can be voided",
                field="original_transaction_id",
            )
        if original.voided and original.void_transaction_id != op.transaction_id:
            raise AlreadyVoidedError(
                f"transaction {op.original_transaction_id!r} was already voided by "
                f"{original.void_transaction_id!r}",
                field="original_transaction_id",
            )
        return existing, original

    async def _void_account(
        self, op: Void, original: TransferRecord, ledger: int
    ) -> AccountRecord:
        """The wallet's account, which must own the original, with its TigerBeetle accounts
        (customer and system) in place."""
        account = await self._accounts.get(op.wallet)
        if account is None or account.account_id != original.account_id:
            raise ConflictError(
                f"wallet {op.wallet} in the Account Registry does not own transaction "
                f"{op.original_transaction_id!r}",
                field="wallet",
            )
        await self._ensure_tb_account(account)
        _check_ledger(account, ledger)
        await self.ensure_system_accounts(ledger)
        return account

    async def _register_void(
        self,
        op: Void,
        vtid: int,
        existing: TransferRecord | None,
        original: TransferRecord,
        account: AccountRecord,
        timestamp: int,
    ) -> None:
        """The Transfer Registry after TigerBeetle applied the void: the original's mark, then
        the void's own record (each only if not there yet)."""
        if not original.voided:
            # Mark first, record second: of two different voids racing on one original, both
            # see TigerBeetle accept (CREATED / EXISTS of the same derived id), but only one
            # wins the mark; the loser gets AlreadyVoidedError here and records nothing.
            await self._transfers.mark_voided(
                op.original_transaction_id,
                void_transaction_id=op.transaction_id,
                void_transfer_id=vtid,
            )
        if existing is None:
            await self._transfers.record(
                TransferRecord(
                    transaction_id=op.transaction_id,
                    transfer_id=vtid,
                    wallet=op.wallet,
                    account_id=account.account_id,
                    type=TYPE_VOID,
                    amount_minor=original.amount_minor,
                    reference_id=op.reference_id,
                    created_at=timestamp_to_datetime(timestamp),
                )
            )

    async def _register_in_opening(self, op: Void, facts: OriginalFacts) -> TransferRecord:
        """Record the legacy original of `op` as held by the opening balance (see void)."""
        if facts.transaction_id != op.original_transaction_id:
            raise InvalidInputError(
                f"opening original {facts.transaction_id!r} is not the voided "
                f"{op.original_transaction_id!r}",
                field="original_transaction_id",
            )
        if facts.type not in (OperationType.CREDIT, OperationType.DEBIT):
            raise NotVoidableError(
                f"transaction {facts.transaction_id!r} is a {facts.type.value}; only credits "
                "and debits can be voided",
                field="original_transaction_id",
            )
        if facts.voided_by is not None and facts.voided_by != op.transaction_id:
            # Voided before TigerBeetle existed: the opening balance holds the void too.
            raise AlreadyVoidedError(
                f"transaction {facts.transaction_id!r} was already voided by {facts.voided_by!r}",
                field="original_transaction_id",
            )
        account = await self._accounts.get(op.wallet)
        if account is None:
            raise NotFoundError(
                f"no transaction {op.original_transaction_id!r} in wallet {op.wallet}",
                field="original_transaction_id",
            )
        return await self._transfers.record(
            TransferRecord(
                transaction_id=facts.transaction_id,
                transfer_id=transfer_id(facts.transaction_id),  # never created in TigerBeetle
                wallet=op.wallet,
                account_id=account.account_id,
                type=facts.type.value + IN_OPENING_SUFFIX,
                amount_minor=facts.amount_minor,
                reference_id=None,
                created_at=datetime.now(UTC),
            )
        )

    async def _check_funds(self, account: AccountRecord, transfer: tb.Transfer) -> None:
        """Refuse a debit the balance cannot cover *before* sending it.

        TigerBeetle would answer EXCEEDS_CREDITS too, but it also burns the transfer id
        (a later retry with the same transaction id gets ID_ALREADY_FAILED), while the legacy
        store writes nothing and lets the same transaction id succeed once funds arrive.
        A transfer that already exists (its registry record lost to a crash) is let through
        so that TigerBeetle answers EXISTS and the retry heals the registry.
        """
        found = await self._tb(self._client.lookup_accounts([account.account_id]))
        if not found:
            raise _no_account(account.wallet)
        current = found[0]
        available = current.credits_posted - current.debits_posted - current.debits_pending
        if available >= transfer.amount:
            return
        if await self._tb(self._client.lookup_transfers([transfer.id])):
            return
        raise InsufficientFundsError(
            f"insufficient funds: wallet {account.wallet} does not allow an overdraft",
            field="amount",
        )

    async def _create_transfer(
        self, transfer: tb.Transfer, account: AccountRecord, *, context: str
    ) -> tuple[int, bool]:
        """Create one transfer; (timestamp of the applied or original transfer, replayed)."""
        results = await self._tb(self._client.create_transfers([transfer]))
        assert len(results) == 1
        status = results[0].status
        if status is tb.CreateTransferStatus.EXISTS_WITH_DIFFERENT_USER_DATA_128:
            # TigerBeetle compares user_data_128 only after accounts and amount matched, so the
            # same wallet, type and amount were applied under another reference_id. A
            # transaction's identity is (wallet, type, amount[, original]): this is a replay.
            return await self._original_timestamp(transfer.id), True
        rule = transfer_rule(status)
        if rule.outcome is Outcome.FAILED:
            if status in (
                tb.CreateTransferStatus.DEBIT_ACCOUNT_NOT_FOUND,
                tb.CreateTransferStatus.CREDIT_ACCOUNT_NOT_FOUND,
            ):
                self._forget_accounts(transfer.ledger, account.account_id)
            raise status_error(rule, status, context)
        # EXISTS echoes the original transfer's timestamp; CREATED gives the new one.
        assert results[0].timestamp > 0
        return results[0].timestamp, rule.outcome is Outcome.EXISTS

    async def _original_timestamp(self, tid: int) -> int:
        found = await self._tb(self._client.lookup_transfers([tid]))
        assert len(found) == 1, "TigerBeetle reported the transfer exists"
        return found[0].timestamp

    async def _balance_at(self, account: AccountRecord, timestamp: int) -> MinorBalance:
        """The balance right after the transfer at `timestamp`.

        Customer accounts have the HISTORY flag, so TigerBeetle keeps one balance row per
        transfer: the same answer for the first call and every replay, even with other
        writes in between. An account without history (not created by this store) falls back
        to its current balance.
        """
        rows = await self._tb(
            self._client.get_account_balances(
                tb.AccountFilter(
                    account_id=account.account_id,
                    user_data_128=0,
                    user_data_64=0,
                    user_data_32=0,
                    code=0,
                    timestamp_min=timestamp,
                    timestamp_max=timestamp,
                    limit=1,
                    flags=tb.AccountFilterFlags.DEBITS | tb.AccountFilterFlags.CREDITS,
                )
            )
        )
        if rows:
            return balance_of(rows[0])
        found = await self._tb(self._client.lookup_accounts([account.account_id]))
        if not found:
            raise _no_account(account.wallet)
        return balance_of(found[0])

    # ---- reads -----------------------------------------------------------------------------

    async def get_balance(self, wallet: WalletKey) -> WalletBalance:
        async def lookup(account_id: int) -> tb.Account | None:
            found = await self._tb(self._client.lookup_accounts([account_id]))
            return found[0] if found else None

        # One TigerBeetle round trip, no registry trip once the wallet was read here
        # (AccountRegistry.read_account: the registry's id, collisions included).
        read = await self._accounts.read_account(wallet, lookup)
        if not read.registered:
            raise NotFoundError(f"wallet {wallet} does not exist", field="wallet")
        if read.found is None:
            raise _no_account(wallet)
        return WalletBalance.from_minor(wallet, balance_of(read.found), STORE_NAME)

    async def get_multi_balance(self, client_id: str) -> list[WalletBalance]:
        """Every wallet of a client: one registry query and ONE lookup_accounts batch (cut in
        requests of lookup_batch_max ids by the client)."""
        records = await self._accounts.list_by_client(client_id, limit=MULTI_BALANCE_WALLETS_MAX)
        if not records:
            return []
        found = await self._tb(self._client.lookup_accounts([r.account_id for r in records]))
        by_id = {account.id: account for account in found}
        balances = [
            WalletBalance.from_minor(r.wallet, balance_of(by_id[r.account_id]), STORE_NAME)
            for r in records
            if r.account_id in by_id  # a registry entry whose account creation never finished
        ]
        return sorted(balances, key=lambda b: b.wallet.canonical)

    async def history(self, wallet: WalletKey, limit: int) -> list[HistoryEntry]:
        """Newest first; transaction ids and voided flags from ONE Transfer Registry query.
        An unknown wallet has no history (an empty list, as in the legacy store)."""
        if not 1 <= limit <= HISTORY_LIMIT_MAX:
            raise InvalidInputError(f"must be 1..{HISTORY_LIMIT_MAX}, got {limit}", field="limit")
        account = await self._accounts.get(wallet)
        if account is None:
            return []
        transfers = await self._tb(
            self._client.get_account_transfers(
                tb.AccountFilter(
                    account_id=account.account_id,
                    user_data_128=0,
                    user_data_64=0,
                    user_data_32=0,
                    code=0,
                    timestamp_min=0,
                    timestamp_max=0,
                    limit=limit,
                    flags=tb.AccountFilterFlags.DEBITS
                    | tb.AccountFilterFlags.CREDITS
                    | tb.AccountFilterFlags.REVERSED,
                )
            )
        )
        records = await self._transfers.by_transfer_ids([t.id for t in transfers])
        currency = wallet.currency
        entries: list[HistoryEntry] = []
        for transfer in transfers:
            record = records.get(transfer.id)
            entries.append(
                HistoryEntry(
                    transaction_id=record.transaction_id if record else None,
                    type=HISTORY_TYPE_BY_CODE.get(transfer.code, f"code_{transfer.code}"),
                    amount=from_minor(transfer.amount, currency),
                    reference_id=record.reference_id if record else None,
                    created_at=timestamp_to_datetime(transfer.timestamp),
                    voided=record.voided if record else False,
                )
            )
        return entries

    # ---- plumbing --------------------------------------------------------------------------

    async def _tb(self, call: Awaitable[T]) -> T:
        """Await a client call; transport failures become the one retryable domain error."""
        try:
            return await call
        except TRANSPORT_ERRORS as exc:
            raise StoreUnavailableError(f"TigerBeetle unavailable: {exc!r}") from exc


def _check_same_movement(
    existing: TransferRecord, wallet: WalletKey, kind: OperationType, amount_minor: int, tid: int
) -> None:
    """A registered transaction id may only replay the identical operation."""
    differs: Sequence[str] = [
        name
        for name, same in (
            ("wallet", existing.wallet == wallet),
            ("type", existing.type == kind.value),
            ("amount", existing.amount_minor == amount_minor),
            ("transfer", existing.transfer_id == tid),
        )
        if not same
    ]
    if differs:
        raise DuplicateTransactionError(
            f"transaction_id {existing.transaction_id!r} was already used with a different "
            f"{', '.join(differs)} ({existing.type} of {existing.amount_minor} minor units on "
            f"{existing.wallet})",
            field="transaction_id",
        )


def _no_account(wallet: WalletKey) -> NotFoundError:
    return NotFoundError(f"wallet {wallet} has no TigerBeetle account", field="wallet")


def _check_ledger(account: AccountRecord, ledger: int) -> None:
    if account.ledger != ledger:
        raise ConflictError(
            f"wallet {account.wallet} is registered on ledger {account.ledger}, but its "
            f"currency:country maps to ledger {ledger}",
            field="wallet",
        )


def _result(
    transaction_id: str,
    kind: OperationType,
    wallet: WalletKey,
    amount_minor: int,
    balance: MinorBalance,
    replayed: bool,
    timestamp: int,
) -> OperationResult:
    currency = wallet.currency
    return OperationResult(
        transaction_id=transaction_id,
        type=kind,
        wallet=wallet,
        amount=from_minor(amount_minor, currency),
        credit=from_minor(balance.credit_minor, currency),
        debit=from_minor(balance.debit_minor, currency),
        historical_credit=from_minor(balance.historical_credit_minor, currency),
        replayed=replayed,
        created_at=timestamp_to_datetime(timestamp),
    )


instrument_wallet_store(TigerBeetleStore, STORE_NAME, {"replicate": operation_label})
