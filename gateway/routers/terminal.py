"""The credit terminal: submit one transaction or a batch (walletclient.ClearingClient records
them in the system of reference and starts their ClearingBatchWorkflow on the migration task
queue), and read a transaction's state.

Submits need `terminal:submit` and an Idempotency-Key; reads need `terminal:read`.

Ids (the Idempotency-Key rules of gateway.idempotency): a transaction's external id is the
body's `external_id`, or derived from (owner, Idempotency-Key) when left out; a batch's items
carry their own. The batch id is always derived from (owner, Idempotency-Key), so a retry after
the key record was lost lands on the same batch and its workflow (started at most once).
Consistency: the same Idempotency-Key with another body -> 422 (`idempotency-key-reused`); an
external id recorded before with other content (under another key) -> 409 (`conflict`) for one
transaction, or listed in `refused` for a batch (its other items go on); with the same content
it is a replay: its current state.

Input errors (unknown kind or currency, inexact amount) are answered before the key is claimed
(422 naming the field: `kind`, `currency`, `amount`, or `transactions.<i>.<field>` in a batch),
so a request that never ran records nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from gateway.audit import SOURCE_API, audit, caller_fields
from gateway.auth import Caller, guard
from gateway.idempotency import (
    IdempotencyKey,
    derived_transaction_id,
    parse_key,
    run_idempotent,
    transaction_id_for,
)
from gateway.models import (
    SUBMIT_WAIT_S_MAX,
    BatchBody,
    BatchOut,
    RefusedOut,
    TransactionBody,
    TransactionOut,
)
from gateway.operations import GET_TRANSACTION, SUBMIT_TRANSACTION, SUBMIT_TRANSACTIONS
from gateway.problems import ProblemError, dependency_unavailable, domain_problem
from gateway.state import GatewayState, state_of
from messages.clearing import IntakeResult, TransactionOutcome
from stores.audit_chain import terminal_record
from walletclient.clearing_client import error_of
from walletcore.clearing import EXTERNAL_ID_MAX, ClearingTable, ExternalTransaction
from walletcore.errors import WalletError
from walletcore.keys import ID_PATTERN

router = APIRouter(prefix="/v1/terminal", tags=["terminal"])
WaitS = Annotated[
    float,
    Query(
        ge=0, le=SUBMIT_WAIT_S_MAX,
        description="wait up to this long for the outcome (settled or rejected); clipped to the "
        "gateway's write timeout. Not part of the request's identity: a replay answers the "
        "first response; read the current state with get_transaction",
    ),
]  # fmt: skip
ExternalIdPath = Annotated[
    str, Path(min_length=1, max_length=EXTERNAL_ID_MAX, pattern=ID_PATTERN,
              description="the transaction's external id", examples=["ach-2026-0001"]),
]  # fmt: skip


@router.post(
    "/transactions", operation_id=SUBMIT_TRANSACTION.operation_id, response_model=TransactionOut,
    summary="Submit one transaction to the credit terminal",
)  # fmt: skip
async def submit_transaction(
    request: Request,
    body: TransactionBody,
    idempotency_key: IdempotencyKey,
    caller: Annotated[Caller, guard(SUBMIT_TRANSACTION)],
    wait_s: WaitS = 0.0,
) -> Response:
    state = state_of(request)
    external_id = transaction_id_for(caller, idempotency_key, body.external_id,
                                     field="external_id")  # fmt: skip
    txn = body.transaction(external_id)
    _check_route(state.terminal.table, txn)
    batch_id = _batch_id(caller, idempotency_key)

    async def execute() -> TransactionOut:
        await audit(request, _record(caller, SUBMIT_TRANSACTION.operation_id, [txn], batch_id))
        result, outcomes = await _submit(state, [txn], batch_id, wait_s)
        if result.refused:  # a conflict: recorded before with other content
            raise error_of(result.refused[0])
        return TransactionOut.of(outcomes[external_id])

    return await run_idempotent(
        request, state.idempotency, caller, SUBMIT_TRANSACTION, idempotency_key, body,
        batch_id, execute,
    )  # fmt: skip


@router.post(
    "/batches", operation_id=SUBMIT_TRANSACTIONS.operation_id, response_model=BatchOut,
    summary="Submit a batch of transactions to the credit terminal",
)  # fmt: skip
async def submit_transactions(
    request: Request,
    body: BatchBody,
    idempotency_key: IdempotencyKey,
    caller: Annotated[Caller, guard(SUBMIT_TRANSACTIONS)],
    wait_s: WaitS = 0.0,
) -> Response:
    state = state_of(request)
    txns = _batch_transactions(state.terminal.table, caller, idempotency_key, body)
    batch_id = _batch_id(caller, idempotency_key)

    async def execute() -> BatchOut:
        await audit(request, _record(caller, SUBMIT_TRANSACTIONS.operation_id, txns, batch_id))
        result, outcomes = await _submit(state, txns, batch_id, wait_s)
        return BatchOut(
            batch_id=result.batch_id, accepted=result.accepted,
            replayed=[r.external_id for r in result.replayed],
            refused=[RefusedOut.of(item) for item in result.refused],
            transactions=[TransactionOut.of(o) for o in outcomes.values()],
        )  # fmt: skip

    return await run_idempotent(
        request, state.idempotency, caller, SUBMIT_TRANSACTIONS, idempotency_key, body,
        batch_id, execute,
    )  # fmt: skip


@router.get(
    "/transactions/{external_id}", operation_id=GET_TRANSACTION.operation_id,
    response_model=TransactionOut, summary="A transaction's state (settled with its entry id)",
)  # fmt: skip
async def get_transaction(
    request: Request, external_id: ExternalIdPath,
    caller: Annotated[Caller, guard(GET_TRANSACTION)],
) -> TransactionOut:  # fmt: skip
    outcome = await state_of(request).terminal.status(external_id)
    if outcome is None:
        raise ProblemError(404, "not-found", "Not found", f"no transaction {external_id!r}",
                           field="external_id")  # fmt: skip
    return TransactionOut.of(outcome)


def _record(
    caller: Caller, operation: str, txns: Sequence[ExternalTransaction], batch_id: str
) -> dict[str, object]:
    """The audit record of a submit (gateway.audit), written before the intake records it."""
    return terminal_record(txns, source=SOURCE_API, actor=caller.name, operation=operation,
                           batch_id=batch_id, caller=caller_fields(caller))  # fmt: skip


def _batch_id(caller: Caller, raw_key: str) -> str:
    """Derived from (owner, key): a retry (even after the key record was lost) is the same
    batch, whose workflow runs at most once."""
    return derived_transaction_id(caller.owner, parse_key(raw_key))


def _check_route(table: ClearingTable, txn: ExternalTransaction) -> None:
    """The routing table's refusals (unknown kind, a currency the kind does not carry), the
    same the intake makes, answered before the Idempotency-Key is claimed."""
    table.route_for(txn)
    table.limits(txn.kind, txn.currency)


def _batch_transactions(
    table: ClearingTable, caller: Caller, raw_key: str, body: BatchBody
) -> list[ExternalTransaction]:
    """Every item validated (the first refusal answers 422 naming `transactions.<i>.<field>`);
    an external id twice in one batch is refused too."""
    txns: list[ExternalTransaction] = []
    seen: set[str] = set()
    for index, item in enumerate(body.transactions):
        at = f"transactions.{index}"
        external_id = transaction_id_for(caller, raw_key, item.external_id,
                                         field=f"{at}.external_id")  # fmt: skip
        if external_id in seen:
            raise ProblemError(422, "validation-error", "Invalid request",
                               f"{at}.external_id: {external_id!r} appears twice in the batch",
                               field=f"{at}.external_id")  # fmt: skip
        seen.add(external_id)
        try:
            txn = item.transaction(external_id)
            _check_route(table, txn)
        except WalletError as err:
            raise _at_item(err, at) from None
        txns.append(txn)
    return txns


def _at_item(err: WalletError, at: str) -> ProblemError:
    """The domain's problem for one batch item, its field prefixed with the item's place."""
    problem = domain_problem(err)
    field = f"{at}.{err.field}" if err.field else at
    problem.problem = problem.problem.model_copy(
        update={"field": field, "detail": f"{at}: {problem.problem.detail}"[:500]}
    )
    return problem


async def _submit(
    state: GatewayState, txns: Sequence[ExternalTransaction], batch_id: str, wait_s: float
) -> tuple[IntakeResult, dict[str, TransactionOutcome]]:
    """Record and start the batch, then wait for the outcomes: all within the gateway's write
    timeout (the Idempotency-Key's lease is sized for it), the wait getting what is left."""
    timeout_s = state.settings.write_timeout_s
    deadline = time.monotonic() + timeout_s
    try:
        result = await asyncio.wait_for(
            state.terminal.submit_many(list(txns), batch_id=batch_id), timeout_s
        )
    except TimeoutError:
        raise dependency_unavailable(
            "temporal", f"the credit terminal's intake did not answer within {timeout_s:g} s; "
            "retry with the same Idempotency-Key",
        ) from None  # fmt: skip
    ids = [*result.accepted, *(r.external_id for r in result.replayed)]
    if not ids:
        return result, {}
    wait = max(0.0, min(wait_s, deadline - time.monotonic()))
    outcomes = await state.terminal.wait(ids, wait)
    assert set(outcomes) == set(ids), "recorded transactions have a state"
    return result, {x: outcomes[x] for x in ids}
