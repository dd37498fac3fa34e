"""The credit terminal's TigerBeetle objects: the GL mirror accounts and the clearing transfers,
built from walletcore's plain specs (walletcore stays free of the client library).

One home for both conversions, so the clearing pipeline, the sync and the rebuild create
byte-identical accounts and transfers (TigerBeetle answers EXISTS only for identical content).
"""

from __future__ import annotations

import tigerbeetle as tb

from stores.history_import import create_accounts_allowing_imported
from stores.tb_errors import account_rule, status_error
from stores.tigerbeetle_client import TigerBeetleClient
from walletcore.clearing import TransferSpec
from walletcore.gl_chart import ChartOfAccounts, MirrorAccount

__all__ = ["ensure_mirrors", "mirror_account", "transfer_of"]


def mirror_account(mirror: MirrorAccount) -> tb.Account:
    return tb.Account(id=mirror.id, ledger=mirror.ledger, code=mirror.code,
                      flags=tb.AccountFlags(mirror.flags))


def transfer_of(spec: TransferSpec) -> tb.Transfer:
    return tb.Transfer(
        id=spec.id, debit_account_id=spec.debit_account_id,
        credit_account_id=spec.credit_account_id, amount=spec.amount, pending_id=spec.pending_id,
        user_data_128=spec.user_data_128, timeout=spec.timeout_s, ledger=spec.ledger,
        code=spec.code, flags=tb.TransferFlags(spec.flags),
    )


async def ensure_mirrors(client: TigerBeetleClient, chart: ChartOfAccounts) -> int:
    """Create every mirror of `chart` (idempotent: EXISTS is success). Returns how many were
    created now; an id taken with other content raises the mapped ConflictError (the chart
    changed under existing accounts)."""
    mirrors = chart.mirrors()
    # A cluster rebuilt from the ledger holds the mirrors `imported` (the same accounts).
    statuses = await create_accounts_allowing_imported(
        client, [mirror_account(m) for m in mirrors])
    assert len(statuses) == len(mirrors)
    created = 0
    for mirror, status in zip(mirrors, statuses, strict=True):
        rule = account_rule(status)
        if rule.error is not None:
            raise status_error(rule, status, f"GL mirror {mirror.gl_number} {mirror.currency}")
        created += status is tb.CreateAccountStatus.CREATED
    return created
