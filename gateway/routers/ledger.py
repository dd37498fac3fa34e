"""The credit terminal's general ledger, read-only: the trial balance and an account's
statement (stores.general_ledger.GeneralLedger over the gateway's database). Needs
`ledger:read`.

Amounts are decimal strings in the currency's major units (the store keeps minor units). An
account the chart does not know, a currency it does not know or the account does not carry
-> 422 naming `account` or `currency`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from gateway.auth import Caller, guard
from gateway.models import STATEMENT_PAGE_MAX, StatementOut, TrialBalanceOut
from gateway.operations import GET_STATEMENT, GET_TRIAL_BALANCE
from gateway.state import state_of
from walletcore.gl_chart import CURRENCY_PATTERN, GL_NUMBER_MAX
from walletcore.journal import INT64_MAX

router = APIRouter(prefix="/v1/ledger", tags=["ledger"])

STATEMENT_LIMIT_DEFAULT = 100

AccountNumber = Annotated[
    int, Path(ge=1, le=GL_NUMBER_MAX, description="GL account number", examples=[1050])
]
LedgerCurrency = Annotated[
    str, Path(pattern=CURRENCY_PATTERN, description="e.g. USD or USDC", examples=["USD"])
]


@router.get(
    "/trial-balance", operation_id=GET_TRIAL_BALANCE.operation_id,
    response_model=TrialBalanceOut, summary="Debits against credits per currency",
)  # fmt: skip
async def get_trial_balance(
    request: Request, caller: Annotated[Caller, guard(GET_TRIAL_BALANCE)]
) -> TrialBalanceOut:
    return TrialBalanceOut.of(await state_of(request).ledger.trial_balance())


@router.get(
    "/accounts/{account}/{currency}/statement", operation_id=GET_STATEMENT.operation_id,
    response_model=StatementOut, summary="An account's entries in one currency, chain order",
)  # fmt: skip
async def get_statement(
    request: Request, account: AccountNumber, currency: LedgerCurrency,
    caller: Annotated[Caller, guard(GET_STATEMENT)],
    after_seq: Annotated[int, Query(ge=0, le=INT64_MAX, description="continue after this entry "
                                    "(a page's `next_after_seq`)")] = 0,
    limit: Annotated[int, Query(ge=1, le=STATEMENT_PAGE_MAX)] = STATEMENT_LIMIT_DEFAULT,
) -> StatementOut:  # fmt: skip
    statement = await state_of(request).ledger.statement(
        account, currency, after_seq=after_seq, limit=limit
    )
    return StatementOut.of(statement)
