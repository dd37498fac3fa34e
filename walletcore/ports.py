"""The interface both wallet stores implement, so workflows and the read path treat them alike."""

from __future__ import annotations

from typing import Protocol

from walletcore.balances import WalletBalance
from walletcore.keys import WalletKey
from walletcore.operations import (
    AddCredit,
    HistoryEntry,
    OperationResult,
    SubtractCredit,
    Void,
)
from walletcore.write_facts import OriginalFacts


class WalletStore(Protocol):
    """Each write is atomic and idempotent by `transaction_id`; a replay returns the first
    result with `replayed=True`; the same id with different content raises
    DuplicateTransactionError. Errors are walletcore.errors types."""

    name: str  # "mongodb" | "tigerbeetle"

    async def add_credit(self, op: AddCredit) -> OperationResult: ...

    async def subtract_credit(self, op: SubtractCredit) -> OperationResult: ...

    async def void(
        self, op: Void, *, opening_original: OriginalFacts | None = None
    ) -> OperationResult:
        """`opening_original`: the legacy record of an original inside the wallet's imported
        opening balance, for a store that may not hold that original itself (TigerBeetle)."""
        ...

    async def get_balance(self, wallet: WalletKey) -> WalletBalance:
        """NotFoundError if the wallet does not exist."""
        ...

    async def get_multi_balance(self, client_id: str) -> list[WalletBalance]: ...

    async def history(self, wallet: WalletKey, limit: int) -> list[HistoryEntry]: ...
