"""The wallet key `(client_id, country, currency, issuer_type)` and its canonical forms."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@\-]*$"


class WalletKey(BaseModel):
    """Identity of one wallet. `issuer_type` is optional; an absent issuer is canonical ''."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    client_id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)
    country: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 3166-1 alpha-3")
    currency: str = Field(pattern=r"^[A-Z]{3,5}$", description="ISO 4217 or token code")
    issuer_type: str | None = Field(default=None, max_length=64, pattern=ID_PATTERN)

    @property
    def canonical(self) -> str:
        """Stable text form used for hashing and ids: fields joined by '|'."""
        return "|".join((self.client_id, self.country, self.currency, self.issuer_type or ""))

    @property
    def workflow_id(self) -> str:
        return f"wallet/{self.canonical}"

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
