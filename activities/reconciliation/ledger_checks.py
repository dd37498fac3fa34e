"""The TigerBeetle side on its own: every customer account of this deployment registered, and
every Transfer Registry record's transfer in TigerBeetle exactly as registered.

Changes when the account layout or the operation -> transfer rule (walletcore.transfer_map)
changes.
"""

from __future__ import annotations

from collections import Counter

import tigerbeetle as tb

from messages.reconciliation import (
    AccountPageInput,
    AccountPageOutput,
    TransferPageInput,
    TransferPageOutput,
)
from mongobase.mongo import u128_to_hex
from registries.transfer_registry import TransferRecord
from stores.reports import MismatchDoc, ReportStore
from stores.tigerbeetle_store import (
    TYPE_CREDIT,
    TYPE_CREDIT_IN_OPENING,
    TYPE_DEBIT,
    TYPE_DEBIT_IN_OPENING,
    TigerBeetleStore,
)
from walletcore.codes import CUSTOMER_ACCOUNT_CODE, TransferCode
from walletcore.reconcile import (
    ExpectedTransfer,
    IssueKind,
    TransferView,
    check_absent_transfer,
    check_transfer,
)
from walletcore.transfer_map import operation_leg, void_code

IN_OPENING_TYPES = frozenset({TYPE_CREDIT_IN_OPENING, TYPE_DEBIT_IN_OPENING})
CHECKED_TYPES = frozenset({TYPE_CREDIT, TYPE_DEBIT, *IN_OPENING_TYPES})  # voids: via originals


def _expected(
    rec: TransferRecord, ledger: int
) -> tuple[ExpectedTransfer, ExpectedTransfer | None]:
    """The record's own transfer as it must be, and its void's when it was voided."""
    is_credit = rec.type in (TYPE_CREDIT, TYPE_CREDIT_IN_OPENING)
    leg = operation_leg(ledger, rec.account_id,
                        TransferCode.CREDIT if is_credit else TransferCode.DEBIT)
    own = ExpectedTransfer(
        transaction_id=rec.transaction_id, id=rec.transfer_id,
        debit_account_id=leg.debit_account_id, credit_account_id=leg.credit_account_id,
        amount=rec.amount_minor, code=int(leg.code))
    if not rec.voided or rec.void_transfer_id is None:
        return own, None
    vleg = operation_leg(ledger, rec.account_id, void_code(is_credit))
    return own, ExpectedTransfer(
        transaction_id=f"{rec.void_transaction_id} (void of {rec.transaction_id})",
        id=rec.void_transfer_id, debit_account_id=vleg.debit_account_id,
        credit_account_id=vleg.credit_account_id, amount=rec.amount_minor,
        code=int(vleg.code))


class LedgerCheck:
    def __init__(self, tigerbeetle: TigerBeetleStore, reports: ReportStore) -> None:
        self._client = tigerbeetle.client
        self._limits = tigerbeetle.limits
        self._accounts = tigerbeetle.accounts
        self._transfers = tigerbeetle.transfers
        self._ledgers = tigerbeetle.ledgers
        self._tag = tigerbeetle.deployment_tag
        self._reports = reports

    async def account_page(self, inp: AccountPageInput) -> AccountPageOutput:
        """Customer accounts of one ledger in the run's scope. Only this deployment's (its tag
        in user_data_64, see TigerBeetleStore) must be in its Account Registry: deployments
        sharing a cluster (tests, demo runs, staging) own the others. The net sums every
        customer account, because the ledger's system accounts are shared by all of them.
        Untagged deployments (tag 0) on one cluster cannot be told apart."""
        accounts = await self._client.query_accounts(tb.QueryFilter(
            user_data_128=0, user_data_64=0, user_data_32=0, ledger=inp.ledger,
            code=CUSTOMER_ACCOUNT_CODE, timestamp_min=inp.timestamp_after + 1, timestamp_max=0,
            limit=inp.limit, flags=tb.QueryFilterFlags(0)))
        ours = [a.id for a in accounts if a.user_data_64 == self._tag]
        registered = await self._accounts.registered_ids(ours)
        docs = [
            MismatchDoc(run_id=inp.run_id, kind=IssueKind.UNREGISTERED_TB_ACCOUNT,
                        subject=u128_to_hex(a), detail=f"customer account on ledger "
                        f"{inp.ledger} (deployment tag {self._tag}) missing from the Account "
                        "Registry")
            for a in ours if a not in registered
        ]
        await self._reports.add_mismatches(docs)
        return AccountPageOutput(
            scanned=len(ours),
            foreign=len(accounts) - len(ours),
            net_minor=sum(a.credits_posted - a.debits_posted for a in accounts),
            last_timestamp=accounts[-1].timestamp if accounts else inp.timestamp_after,
            exhausted=len(accounts) < inp.limit,
            findings={IssueKind.UNREGISTERED_TB_ACCOUNT: len(docs)} if docs else {})

    async def transfer_page(self, inp: TransferPageInput) -> TransferPageOutput:
        scope = self._ledgers.parse_scope(inp.pairs)
        # The workflow's size (recorded histories keep theirs), cut so that every record's
        # transfer and its void fit one lookup_transfers request of the cluster.
        limit = min(inp.limit, self._limits.reconcile_transfers_per_page_max)
        page = await self._transfers.page(after=inp.after, limit=limit)
        expected: list[ExpectedTransfer] = []
        # `<type>_in_opening`: a pre-migration original the opening balance holds, registered
        # when it was voided. Its own transfer must NOT exist (it would count it twice).
        absent: list[ExpectedTransfer] = []
        for rec in page.records:
            ledger = scope.get(rec.wallet.ledger_pair)
            if ledger is None or rec.type not in CHECKED_TYPES:
                continue  # other scope, or a void: checked through its original below
            own, void = _expected(rec, ledger)
            (absent if rec.type in IN_OPENING_TYPES else expected).append(own)
            if void is not None:
                expected.append(void)
        assert len(expected) + len(absent) <= 2 * limit <= self._limits.lookup_batch_max
        wanted = [e.id for e in (*expected, *absent)]
        actual = {t.id: t for t in await self._client.lookup_transfers(wanted)} if wanted else {}
        findings: Counter[str] = Counter()
        docs = []
        for txn, why in page.malformed:
            findings[IssueKind.MALFORMED_REGISTRY] += 1
            docs.append(MismatchDoc(
                run_id=inp.run_id, kind=IssueKind.MALFORMED_REGISTRY, subject=txn,
                detail=f"Transfer Registry document is not a valid record ({why})"))
        checks = [(e, check_transfer) for e in expected]
        checks += [(e, check_absent_transfer) for e in absent]
        for e, check in checks:
            t = actual.get(e.id)
            view = None if t is None else TransferView(
                id=t.id, debit_account_id=t.debit_account_id,
                credit_account_id=t.credit_account_id, amount=t.amount, code=t.code)
            for f in check(e, view):
                findings[f.kind] += 1
                docs.append(MismatchDoc(run_id=inp.run_id, kind=f.kind, subject=f.subject,
                                        detail=f.detail))
        await self._reports.add_mismatches(docs)
        return TransferPageOutput(
            scanned=page.scanned, checked=len(expected) + len(absent),
            last_key=page.last_key if page.last_key is not None else inp.after,
            exhausted=page.scanned < limit, findings=dict(findings))
