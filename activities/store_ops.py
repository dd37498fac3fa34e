"""One operation against either wallet store: the dispatch every write path shares."""

from __future__ import annotations

from walletcore.operations import AddCredit, OperationResult, SubtractCredit, WalletOperation
from walletcore.ports import WalletStore
from walletcore.write_facts import OriginalFacts


async def apply_to(
    store: WalletStore, op: WalletOperation, *, opening_original: OriginalFacts | None = None
) -> OperationResult:
    """`opening_original` (TigerBeetle voids only): see TigerBeetleStore.void."""
    # SubtractCredit subclasses AddCredit: test it first.
    if isinstance(op, SubtractCredit):
        return await store.subtract_credit(op)
    if isinstance(op, AddCredit):
        return await store.add_credit(op)
    if opening_original is not None:
        from stores.tigerbeetle_store import TigerBeetleStore

        assert isinstance(store, TigerBeetleStore), "only TigerBeetle voids take an original"
        return await store.void(op, opening_original=opening_original)
    return await store.void(op)
