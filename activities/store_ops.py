"""One operation against either wallet store: the dispatch every write path shares, and the
outcome of a backlog item the other store refused."""

from __future__ import annotations

import logging

from messages.wallet import BacklogItem, TigerBeetleItemOutcome
from walletcore.errors import WalletError
from walletcore.operations import AddCredit, OperationResult, SubtractCredit, WalletOperation
from walletcore.ports import WalletStore
from walletcore.write_facts import OriginalFacts

log = logging.getLogger(__name__)


async def apply_to(
    store: WalletStore, op: WalletOperation, *, opening_original: OriginalFacts | None = None
) -> OperationResult:
    """`opening_original` (TigerBeetle voids only): see TigerBeetleStore.void."""
    # SubtractCredit subclasses AddCredit: test it first.
    if isinstance(op, SubtractCredit):
        return await store.subtract_credit(op)
    if isinstance(op, AddCredit):
        return await store.add_credit(op)
    return await store.void(op, opening_original=opening_original)


def refused_outcome(item: BacklogItem, err: WalletError, store: str) -> TigerBeetleItemOutcome:
    """A backlog item `store` refused for good (a domain error retrying cannot fix): the
    workflow records it as a divergence and reconciliation finds it."""
    assert not err.retryable
    # No wallet key in logs (issue 12: it carries the client id); the transaction id is enough.
    log.warning("%s refused %s %s (pair %s): %s", store, item.command.kind.value,
                item.command.transaction_id, item.command.wallet.ledger_pair, err)
    return TigerBeetleItemOutcome(seq=item.seq, transaction_id=item.command.transaction_id,
                                  error_type=err.type_name, error_message=str(err))
