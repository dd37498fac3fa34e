"""TigerBeetle ledger per `currency:country`, from a configurable table."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from walletcore.errors import UnknownLedgerError

DEFAULT_LEDGERS: Mapping[str, int] = MappingProxyType(
    {
        "USD:USA": 1,
        "MXN:MEX": 3,
        "EUR:ESP": 4,
        "GTQ:GTM": 5,
        "HNL:HND": 6,
        "NIO:NIC": 7,
        "CRC:CRI": 8,
        "PEN:PER": 9,
        "USD:SLV": 10,
    }
)

LEDGER_MAX = 2**32 - 1


class LedgerTable:
    """Maps `currency:country` to a ledger id; ids must be unique and non-zero."""

    def __init__(self, ledgers: Mapping[str, int] = DEFAULT_LEDGERS) -> None:
        seen: dict[int, str] = {}
        for pair, ledger in ledgers.items():
            currency, sep, country = pair.partition(":")
            assert sep and currency and country, f"ledger key {pair!r} must be CURRENCY:COUNTRY"
            assert 0 < ledger <= LEDGER_MAX, f"ledger {ledger} out of range"
            assert ledger not in seen, f"ledger {ledger} used by {seen[ledger]} and {pair}"
            seen[ledger] = pair
        self._ledgers = dict(ledgers)
        self._pairs = seen

    @staticmethod
    def pair(currency: str, country: str) -> str:
        return f"{currency}:{country}"

    def ledger_of(self, currency: str, country: str) -> int:
        pair = self.pair(currency, country)
        try:
            return self._ledgers[pair]
        except KeyError:
            # Name the field that is wrong: a known currency with an unknown country is the
            # country's fault; otherwise the currency is the first thing to check.
            known_currency = any(p.startswith(f"{currency}:") for p in self._ledgers)
            raise UnknownLedgerError(
                f"no ledger for {pair}; configured: {', '.join(sorted(self._ledgers))}",
                field="country" if known_currency else "currency",
            ) from None

    def pair_of(self, ledger: int) -> str:
        try:
            return self._pairs[ledger]
        except KeyError:
            raise UnknownLedgerError(f"unknown ledger id {ledger}", field="ledger") from None

    def ledgers(self) -> dict[str, int]:
        return dict(self._ledgers)

    def parse_scope(self, pairs: list[str] | None) -> dict[str, int]:
        """`["USD:USA", ...]` (or None for all) to {pair: ledger}; unknown pairs rejected."""
        if not pairs:
            return self.ledgers()
        scope: dict[str, int] = {}
        for pair in pairs:
            currency, _, country = pair.partition(":")
            scope[pair] = self.ledger_of(currency, country)
        return scope


DEFAULT_LEDGER_TABLE = LedgerTable()
