"""What the legacy store knows about an applied write, carried to the TigerBeetle side.

The dual-write backlog needs two facts MongoDB has and TigerBeetle may not: the wallet version
the operation produced (to skip operations already inside an imported opening balance) and,
for a void, its original (type, amount, version), because an original that predates
TigerBeetle has no Transfer Registry record: its effect lives in the opening balance.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from walletcore.operations import OperationType, TransactionId


class OriginalFacts(BaseModel):
    """The legacy record of a void's original transaction."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transaction_id: TransactionId
    type: OperationType
    amount_minor: int = Field(gt=0)
    wallet_version: int = Field(ge=1)
    voided_by: str | None = None


class LegacyFacts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    wallet_version: int = Field(ge=1, description="legacy wallet version after this operation")
    original: OriginalFacts | None = None  # voids only
