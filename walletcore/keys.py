"""The wallet key `(client_id, country, currency, issuer_type)` and its canonical forms."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# The one rule for identifiers every entry point accepts (client ids, issuer types, transaction
# and reference ids): ASCII letters and digits first, then only `_ . : @ -`. No `$` (MongoDB
# operators), no whitespace or control characters, no non-ASCII (lone surrogates, non-UTF-8
# arguments), so an identifier can never reach a query as anything but a plain string.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@\-]*$"
ID_MAX = 128  # bytes == characters: the pattern admits ASCII only
Identifier = Annotated[str, Field(min_length=1, max_length=ID_MAX, pattern=ID_PATTERN)]
# Free text (descriptions): any printable character; control characters (NUL, newlines, ESC)
# are refused so logs and documents stay one line per value.
FREE_TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"


class WalletKey(BaseModel):
    """Identity of one wallet. `issuer_type` is optional; an absent issuer is canonical ''."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    client_id: Identifier
    country: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 3166-1 alpha-3")
    currency: str = Field(pattern=r"^[A-Z]{3,5}$", description="ISO 4217 or token code")
    issuer_type: Identifier | None = Field(default=None, max_length=64)

    @property
    def canonical(self) -> str:
        """Stable text form used for hashing and ids: fields joined by '|'. It names a customer:
        Temporal never sees it in the clear (walletcore.wallet_ids: the keyed-hash workflow id)."""
        return "|".join((self.client_id, self.country, self.currency, self.issuer_type or ""))

    @property
    def ledger_pair(self) -> str:
        return f"{self.currency}:{self.country}"

    @classmethod
    def from_canonical(cls, text: str) -> WalletKey:
        client_id, country, currency, issuer = text.split("|")
        return cls(
            client_id=client_id, country=country, currency=currency, issuer_type=issuer or None
        )

    def __str__(self) -> str:
        return self.canonical
