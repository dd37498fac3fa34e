"""The balance mapping shared by both stores, so they compare field by field.

net = credits_posted - debits_posted; credit = max(net, 0); debit = max(-net, 0);
historical_credit = credits_posted.
"""

from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, ConfigDict

from walletcore.keys import WalletKey
from walletcore.money import from_minor


class MinorBalance(BaseModel):
    """A wallet's balance in integer minor units. Never both credit and debit."""

    model_config = ConfigDict(frozen=True)

    credit_minor: int
    debit_minor: int
    historical_credit_minor: int

    @classmethod
    def from_posted(cls, credits_posted: int, debits_posted: int) -> MinorBalance:
        assert credits_posted >= 0 and debits_posted >= 0
        net = credits_posted - debits_posted
        return cls(
            credit_minor=max(net, 0),
            debit_minor=max(-net, 0),
            historical_credit_minor=credits_posted,
        )

    @property
    def net_minor(self) -> int:
        return self.credit_minor - self.debit_minor

    def model_post_init(self, _context: object) -> None:
        assert self.credit_minor >= 0 and self.debit_minor >= 0
        assert self.credit_minor == 0 or self.debit_minor == 0, "credit and debit both set"
        assert self.historical_credit_minor >= self.credit_minor

    def apply_credit(self, amount_minor: int) -> MinorBalance:
        """A credit (or void of a debit): pays debt first, counts toward historical credit."""
        assert amount_minor > 0
        credits = self.historical_credit_minor + amount_minor
        return MinorBalance.from_posted(credits, credits - (self.net_minor + amount_minor))

    def apply_debit(self, amount_minor: int) -> MinorBalance:
        """A debit (or void of a credit): lowers net; historical credit is unchanged."""
        assert amount_minor > 0
        credits = self.historical_credit_minor
        return MinorBalance.from_posted(credits, credits - (self.net_minor - amount_minor))


class WalletBalance(BaseModel):
    """A wallet's balance as the API shows it (Decimals with the currency's precision)."""

    model_config = ConfigDict(frozen=True)

    wallet: WalletKey
    credit: Decimal
    debit: Decimal
    historical_credit: Decimal
    source: str  # "mongodb" or "tigerbeetle": which store answered

    @classmethod
    def from_minor(cls, wallet: WalletKey, balance: MinorBalance, source: str) -> WalletBalance:
        currency = wallet.currency
        return cls(
            wallet=wallet,
            credit=from_minor(balance.credit_minor, currency),
            debit=from_minor(balance.debit_minor, currency),
            historical_credit=from_minor(balance.historical_credit_minor, currency),
            source=source,
        )
