"""Exact conversion between Decimal amounts (API, legacy documents) and integer minor units.

Nothing is ever rounded: an amount that does not fit the currency's precision is rejected.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from walletcore.currencies import precision_of
from walletcore.errors import InvalidAmountError

U64_MAX = 2**64 - 1
U128_MAX = 2**128 - 1


def parse_decimal(value: object, *, field: str = "amount") -> Decimal:
    """Accepts Decimal, int or str (never float: binary floats cannot hold money exactly)."""
    if isinstance(value, (bool, float)):
        raise InvalidAmountError(
            f"must be a decimal string or integer, not {type(value).__name__}", field=field
        )
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, int | str):
        try:
            amount = Decimal(value)
        except InvalidOperation:
            raise InvalidAmountError(f"{value!r} is not a decimal number", field=field) from None
    else:
        raise InvalidAmountError(f"unsupported type {type(value).__name__}", field=field)
    if not amount.is_finite():
        raise InvalidAmountError(f"{value!r} is not a finite number", field=field)
    return amount


def to_minor(value: object, currency: str, *, field: str = "amount") -> int:
    """Positive amount in `currency` as integer minor units; rejects 0, <0, NaN, excess digits."""
    amount = parse_decimal(value, field=field)
    if amount <= 0:
        raise InvalidAmountError(f"must be greater than zero, got {amount}", field=field)
    precision = precision_of(currency)
    minor = _scale_exact(amount, precision)
    if minor is None:
        raise InvalidAmountError(
            f"{amount} has more than {precision} decimals allowed for {currency}", field=field
        )
    if minor > U64_MAX:
        raise InvalidAmountError(f"{amount} {currency} exceeds the u64 range", field=field)
    assert minor > 0
    return minor


def from_minor(minor: int, currency: str) -> Decimal:
    """Integer minor units as a Decimal with exactly the currency's decimals (e.g. 150 -> 1.50)."""
    precision = precision_of(currency)
    return Decimal(minor).scaleb(-precision).quantize(Decimal(1).scaleb(-precision))


def signed_from_minor(minor: int, currency: str) -> Decimal:
    """Like from_minor for signed values (net balances)."""
    sign = -1 if minor < 0 else 1
    return from_minor(abs(minor), currency) * sign


def _scale_exact(amount: Decimal, precision: int) -> int | None:
    """amount * 10**precision as an int, or None if that is not an integer.

    Works on the digit tuple, not Decimal arithmetic, so the context precision can never round.
    """
    _sign, digit_tuple, exponent = amount.as_tuple()
    assert isinstance(exponent, int)
    digits = list(digit_tuple)
    while len(digits) > 1 and digits[-1] == 0:  # 1.500 is 1.5: trailing zeros carry no value
        digits.pop()
        exponent += 1
    shift = exponent + precision
    if len(digits) > 64 or shift > 40:  # far beyond u64: answer "too large" without big powers
        return U64_MAX + 1 if shift >= 0 or len(digits) + shift > 20 else None
    coefficient: int = int("".join(map(str, digits)) or "0")
    if shift >= 0:
        return int(coefficient * 10**shift)
    divisor: int = 10**-shift
    if coefficient % divisor:
        return None
    return coefficient // divisor
