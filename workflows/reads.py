"""Short read workflows: a balance, or every balance of a client, through Temporal.

They exist so services with only a Temporal client can read; latency-sensitive readers use
walletclient.read_path.ReadRouter directly. One local activity each (no extra task round trip).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from messages.errors import to_application_error, wallet_error_from_failure
    from messages.wallet import (
        ACTIVITY_READ_BALANCE,
        ACTIVITY_READ_MULTI_BALANCE,
        GET_BALANCE_WORKFLOW,
        GET_MULTI_BALANCE_WORKFLOW,
        MultiBalance,
        ReadBalanceInput,
        ReadMultiBalanceInput,
    )
    from walletcore.balances import WalletBalance
    from walletcore.errors import StoreUnavailableError
    from walletcore.operations import GetBalance, GetMultiBalance

READ_START_TO_CLOSE = timedelta(seconds=10)
READ_SCHEDULE_TO_CLOSE = timedelta(seconds=30)
READ_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=100), maximum_interval=timedelta(seconds=2)
)


def _read_failure(err: ActivityError) -> BaseException:
    domain = wallet_error_from_failure(err)
    if domain is None:
        domain = StoreUnavailableError(f"balance read did not complete: {err.cause or err}")
    return to_application_error(domain)


@workflow.defn(name=GET_BALANCE_WORKFLOW)
class GetBalanceWorkflow:
    @workflow.run
    async def run(self, query: GetBalance) -> WalletBalance:
        try:
            balance: WalletBalance = await workflow.execute_local_activity(
                ACTIVITY_READ_BALANCE,
                ReadBalanceInput(query=query),
                result_type=WalletBalance,
                start_to_close_timeout=READ_START_TO_CLOSE,
                schedule_to_close_timeout=READ_SCHEDULE_TO_CLOSE,
                retry_policy=READ_RETRY,
            )
        except ActivityError as err:
            raise _read_failure(err) from None
        return balance


@workflow.defn(name=GET_MULTI_BALANCE_WORKFLOW)
class GetMultiBalanceWorkflow:
    @workflow.run
    async def run(self, query: GetMultiBalance) -> MultiBalance:
        try:
            balances: MultiBalance = await workflow.execute_local_activity(
                ACTIVITY_READ_MULTI_BALANCE,
                ReadMultiBalanceInput(query=query),
                result_type=MultiBalance,
                start_to_close_timeout=READ_START_TO_CLOSE,
                schedule_to_close_timeout=READ_SCHEDULE_TO_CLOSE,
                retry_policy=READ_RETRY,
            )
        except ActivityError as err:
            raise _read_failure(err) from None
        return balances
