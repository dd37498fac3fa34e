"""The credit terminal's chart of accounts and the TigerBeetle accounts that mirror it.

The general ledger (MongoDB, the books' central truth) holds one account per GL number; every
account exists in TigerBeetle once per currency it carries, on that currency's *terminal*
ledger, with `code` = the GL number. Pure: no I/O, configurable, validated.

Balance-limit flags (TigerBeetle refuses a transfer that would break them, counting pending
amounts pessimistically, which is what makes the pending phase a funds reservation):
- assets are debit-normal: CREDITS_MUST_NOT_EXCEED_DEBITS, so cash and settlement accounts
  can never be drawn below zero (a vault withdrawal cannot reserve more than the vault holds);
- liabilities and equity are credit-normal: DEBITS_MUST_NOT_EXCEED_CREDITS, so the terminal
  cannot pay out more than it owes (direct-deposit balances, the ACH clearing it originated);
- income and expenses carry no limit: a gain/loss account moves both ways by nature, and a
  refund credits an expense; a limit there would refuse legitimate corrections.
An account may override its type's default (`balance_limit`).

Where external money comes from: every debit to cash has its credit inside the books. Customer
money is owed back (2180 Direct-Deposit-Liabilities), company money is equity (3000
Paid-In-Capital, added to the plan's chart for exactly this), earnings are income (4000). So no
unlimited "world" account is needed: each limited account is funded by a transfer whose other
side is an account whose normal side grows (a liability or equity credited, an asset debited).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from walletcore.currencies import precision_of
from walletcore.errors import InvalidInputError, UnknownCurrencyError
from walletcore.ids import hash_u128
from walletcore.ledgers import LEDGER_MAX
from walletcore.reconcile import FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS, FLAG_HISTORY

# TigerBeetle 0.17.9 AccountFlags value walletcore needs beside the two reconcile.py holds
# (walletcore stays free of the client library; tests compare it with the client's enum).
FLAG_CREDITS_MUST_NOT_EXCEED_DEBITS = 4

GL_NUMBER_MAX = 2**16 - 1  # the GL number is the TigerBeetle account `code` (u16)
GL_ACCOUNTS_MAX = 1024
GL_NAME_MAX = 64
# Terminal ledgers live at or above 100; the wallet ledgers (walletcore.ledgers) stay below, so
# a wallet transfer can never reach a terminal account (TigerBeetle refuses cross-ledger moves).
TERMINAL_LEDGER_MIN = 100
TERMINAL_CURRENCIES_MAX = 64
CURRENCY_PATTERN = r"^[A-Z]{3,5}$"
# Mirrors keep HISTORY: reconciliation compares GL balances with the mirrors' balances *as of*
# the sync cursor's timestamp while transfers keep flowing (get_account_balances needs it).
MIRROR_HISTORY_DEFAULT = True


class AccountType(StrEnum):
    ASSET = "asset"
    LIABILITY = "liability"
    EQUITY = "equity"
    INCOME = "income"
    EXPENSE = "expense"


class NormalBalance(StrEnum):
    DEBIT = "debit"
    CREDIT = "credit"


NORMAL_BALANCE: Mapping[AccountType, NormalBalance] = MappingProxyType({
    AccountType.ASSET: NormalBalance.DEBIT,
    AccountType.EXPENSE: NormalBalance.DEBIT,
    AccountType.LIABILITY: NormalBalance.CREDIT,
    AccountType.EQUITY: NormalBalance.CREDIT,
    AccountType.INCOME: NormalBalance.CREDIT,
})

# The limit each type gets unless the account overrides it (see the module docstring).
TYPE_LIMIT_FLAGS: Mapping[AccountType, int] = MappingProxyType({
    AccountType.ASSET: FLAG_CREDITS_MUST_NOT_EXCEED_DEBITS,
    AccountType.LIABILITY: FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS,
    AccountType.EQUITY: FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS,
    AccountType.INCOME: 0,
    AccountType.EXPENSE: 0,
})


class AccountStatus(StrEnum):
    """open: everything allowed; frozen: new clearing refused, may reopen; closed: final."""

    OPEN = "open"
    FROZEN = "frozen"
    CLOSED = "closed"


GLNumber = Annotated[int, Field(ge=1, le=GL_NUMBER_MAX)]
Currency = Annotated[str, Field(pattern=CURRENCY_PATTERN)]


class GLAccount(BaseModel):
    """One general-ledger account. `currencies`: the currencies it carries (one mirror each)."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    number: GLNumber
    name: str = Field(min_length=1, max_length=GL_NAME_MAX)
    type: AccountType
    currencies: tuple[Currency, ...] = Field(min_length=1, max_length=TERMINAL_CURRENCIES_MAX)
    status: AccountStatus = AccountStatus.OPEN
    balance_limit: bool | None = Field(
        default=None, description="None: the type's default limit; True/False overrides it"
    )

    @property
    def normal_balance(self) -> NormalBalance:
        return NORMAL_BALANCE[self.type]

    @property
    def limit_flags(self) -> int:
        """The TigerBeetle balance-limit flag of this account (0 for none)."""
        by_type = TYPE_LIMIT_FLAGS[self.type]
        if self.balance_limit is False:
            return 0
        if self.balance_limit is True and by_type == 0:
            # A limited income/expense account follows its normal side.
            debit_normal = self.normal_balance is NormalBalance.DEBIT
            return (
                FLAG_CREDITS_MUST_NOT_EXCEED_DEBITS
                if debit_normal
                else FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS
            )
        return by_type


@dataclass(frozen=True, slots=True)
class MirrorAccount:
    """The TigerBeetle account mirroring one (GL account, currency)."""

    id: int
    ledger: int
    code: int  # = gl_number
    gl_number: int
    currency: str
    flags: int


def mirror_account_id(ledger: int, gl_number: int) -> int:
    """Deterministic id of a GL mirror: its own hash prefix, so it can never equal a wallet
    account ("account:") or a wallet system account ("system:")."""
    assert 0 < ledger <= LEDGER_MAX and 0 < gl_number <= GL_NUMBER_MAX
    return hash_u128(f"gl-mirror:{ledger}:{gl_number}")


DEFAULT_TERMINAL_LEDGERS: Mapping[str, int] = MappingProxyType({"USD": 100, "USDC": 101})

_BOTH = ("USD", "USDC")
DEFAULT_GL_ACCOUNTS: tuple[GLAccount, ...] = tuple(
    GLAccount(number=number, name=name, type=kind, currencies=currencies)
    for number, name, kind, currencies in (
        (1000, "Cash-ODFI-LLC", AccountType.ASSET, ("USD",)),
        (1010, "Cash-Vault-USDC", AccountType.ASSET, ("USDC",)),
        (1050, "ACH-Settlement-Account", AccountType.ASSET, ("USD",)),
        (1060, "Stripe-Clearing-Account", AccountType.ASSET, ("USD",)),
        (2100, "ACH-Clearing-LLC", AccountType.LIABILITY, ("USD",)),
        (2180, "Direct-Deposit-Liabilities", AccountType.LIABILITY, _BOTH),
        (2300, "AP", AccountType.LIABILITY, _BOTH),
        (3000, "Paid-In-Capital", AccountType.EQUITY, _BOTH),
        (4000, "Token-Realization-Gain/Loss", AccountType.INCOME, _BOTH),
        (6000, "Payroll-Expense", AccountType.EXPENSE, ("USD",)),
        (6100, "Ops-Expense", AccountType.EXPENSE, _BOTH),
    )
)


class ChartOfAccounts(BaseModel):
    """The GL accounts and the terminal ledger of each currency (`currency -> ledger`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    accounts: tuple[GLAccount, ...] = Field(min_length=1, max_length=GL_ACCOUNTS_MAX)
    ledgers: dict[Currency, int] = Field(min_length=1, max_length=TERMINAL_CURRENCIES_MAX)
    history: bool = MIRROR_HISTORY_DEFAULT

    _by_number: dict[int, GLAccount] = PrivateAttr(default_factory=dict)
    _currency_of: dict[int, str] = PrivateAttr(default_factory=dict)
    _mirrors: dict[int, MirrorAccount] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ChartOfAccounts:
        _check_ledgers(self.ledgers)
        _check_accounts(self.accounts, self.ledgers)
        self._index()
        return self

    def _index(self) -> None:
        """Lookup tables (private attributes), built once the model is valid."""
        self._by_number = {a.number: a for a in self.accounts}
        self._currency_of = {ledger: cur for cur, ledger in self.ledgers.items()}
        for account in self.accounts:
            for currency in account.currencies:
                mirror = self._make_mirror(account, currency)
                self._mirrors[mirror.id] = mirror

    def account(self, number: int, *, field: str = "account") -> GLAccount:
        try:
            return self._by_number[number]
        except KeyError:
            raise InvalidInputError(
                f"unknown GL account {number}; chart: {sorted(self._by_number)}", field=field
            ) from None

    def ledger_of(self, currency: str, *, field: str = "currency") -> int:
        try:
            return self.ledgers[currency]
        except KeyError:
            raise UnknownCurrencyError(
                f"no terminal ledger for {currency!r}; configured: {sorted(self.ledgers)}",
                field=field,
            ) from None

    def currency_of(self, ledger: int) -> str:
        try:
            return self._currency_of[ledger]
        except KeyError:
            raise InvalidInputError(f"unknown terminal ledger {ledger}", field="ledger") from None

    def mirror(self, number: int, currency: str, *, field: str = "account") -> MirrorAccount:
        """The TigerBeetle mirror of GL `number` in `currency`; refuses a currency the account
        does not carry (naming `field`)."""
        account = self.account(number, field=field)
        self.ledger_of(currency)
        if currency not in account.currencies:
            raise InvalidInputError(
                f"GL account {number} carries {list(account.currencies)}, not {currency}",
                field="currency",
            )
        return self._mirrors[mirror_account_id(self.ledgers[currency], number)]

    def mirrors(self) -> list[MirrorAccount]:
        """Every mirror account, ordered by (ledger, GL number): what to create in TigerBeetle."""
        return sorted(self._mirrors.values(), key=lambda m: (m.ledger, m.gl_number))

    def mirror_by_id(self, account_id: int) -> MirrorAccount | None:
        return self._mirrors.get(account_id)

    def with_status(self, number: int, status: AccountStatus) -> ChartOfAccounts:
        """A copy with one account's status changed (statuses live in the GL store; this is
        for callers that hold a chart, e.g. tests and the demo)."""
        account = self.account(number)
        changed = account.model_copy(update={"status": status})
        accounts = tuple(changed if a.number == number else a for a in self.accounts)
        return ChartOfAccounts(accounts=accounts, ledgers=self.ledgers, history=self.history)

    def _make_mirror(self, account: GLAccount, currency: str) -> MirrorAccount:
        ledger = self.ledgers[currency]
        flags = account.limit_flags | (FLAG_HISTORY if self.history else 0)
        return MirrorAccount(
            id=mirror_account_id(ledger, account.number), ledger=ledger, code=account.number,
            gl_number=account.number, currency=currency, flags=flags,
        )


def _check_ledgers(ledgers: Mapping[str, int]) -> None:
    seen: dict[int, str] = {}
    for currency, ledger in ledgers.items():
        precision_of(currency)  # an unknown currency is refused, naming `currency`
        if not TERMINAL_LEDGER_MIN <= ledger <= LEDGER_MAX:
            raise ValueError(
                f"ledger {ledger} of {currency} outside {TERMINAL_LEDGER_MIN}..{LEDGER_MAX}"
            )
        if ledger in seen:
            raise ValueError(f"ledger {ledger} used by {seen[ledger]} and {currency}")
        seen[ledger] = currency


def _check_accounts(accounts: tuple[GLAccount, ...], ledgers: Mapping[str, int]) -> None:
    numbers: set[int] = set()
    names: set[str] = set()
    for account in accounts:
        if account.number in numbers:
            raise ValueError(f"GL account number {account.number} appears twice")
        if account.name.casefold() in names:
            raise ValueError(f"GL account name {account.name!r} appears twice")
        numbers.add(account.number)
        names.add(account.name.casefold())
        for currency in account.currencies:
            if currency not in ledgers:
                raise ValueError(f"account {account.number}: no terminal ledger for {currency}")
        if len(set(account.currencies)) != len(account.currencies):
            raise ValueError(f"account {account.number}: a currency appears twice")


DEFAULT_CHART = ChartOfAccounts(
    accounts=DEFAULT_GL_ACCOUNTS, ledgers=dict(DEFAULT_TERMINAL_LEDGERS)
)
