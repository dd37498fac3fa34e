"""The one rule from a wallet operation to its TigerBeetle transfer's accounts and code (its id
is `walletcore.ids.transfer_id` of the transaction, or `void_transfer_id` of the original).

Every writer and checker uses it: the live write path (stores/tigerbeetle_store.py), the history
import (activities/history_import.py) and reconciliation's transfer check. A credit moves money
RESERVE -> customer, a debit customer -> SPEND; a void moves the original's amount back along the
same pair, with an id derived from the original transaction (so it can happen once).
"""

from __future__ import annotations

from dataclasses import dataclass

from walletcore.codes import SystemAccount, TransferCode
from walletcore.ids import system_account_id


@dataclass(frozen=True, slots=True)
class TransferLeg:
    debit_account_id: int
    credit_account_id: int
    code: TransferCode


def operation_leg(ledger: int, customer_account_id: int, code: TransferCode) -> TransferLeg:
    """The accounts a customer transfer of `code` moves money between on `ledger`."""
    reserve = system_account_id(ledger, SystemAccount.RESERVE)
    spend = system_account_id(ledger, SystemAccount.SPEND)
    if code is TransferCode.CREDIT:
        return TransferLeg(reserve, customer_account_id, code)
    if code is TransferCode.DEBIT:
        return TransferLeg(customer_account_id, spend, code)
    if code is TransferCode.CREDIT_VOID:  # give the credit back: customer -> RESERVE
        return TransferLeg(customer_account_id, reserve, code)
    if code is TransferCode.DEBIT_VOID:  # return the spent amount: SPEND -> customer
        return TransferLeg(spend, customer_account_id, code)
    raise AssertionError(f"not a wallet operation's code: {code!r}")


def void_code(voids_credit: bool) -> TransferCode:
    return TransferCode.CREDIT_VOID if voids_credit else TransferCode.DEBIT_VOID

