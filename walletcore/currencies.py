"""Currency precision table: how many minor-unit decimals each currency has."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from walletcore.errors import UnknownCurrencyError

# ISO 4217 exponents plus the crypto units the platform carries.
CURRENCY_PRECISION: Mapping[str, int] = MappingProxyType(
    {
        "JPY": 0, "KRW": 0, "CLP": 0, "PYG": 0,
        "USD": 2, "EUR": 2, "MXN": 2, "GTQ": 2, "HNL": 2, "NIO": 2, "CRC": 2, "PEN": 2,
        "GBP": 2, "COP": 2, "BRL": 2, "CAD": 2,
        "BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3, "TND": 3,
        "USDC": 6, "USDT": 6,
        "BTC": 8,
    }
)  # fmt: skip

PRECISION_MAX = 18  # 10**18 still leaves u64 room for amounts above one major unit


def precision_of(currency: str) -> int:
    """Minor-unit decimals of `currency`; an unknown currency is a clear, non-retryable error."""
    try:
        precision = CURRENCY_PRECISION[currency]
    except KeyError:
        raise UnknownCurrencyError(
            f"unknown currency {currency!r}; known: {', '.join(sorted(CURRENCY_PRECISION))}",
            field="currency",
        ) from None
    assert 0 <= precision <= PRECISION_MAX
    return precision
