"""The gateway's audit records: every money-moving request that runs (not replays, not requests
refused before they run) is appended to the `api` chain (stores/audit_chain.py) before the
operation starts, naming the API key (name, id, owner; never the secret).

One AuditAppender per process (group commit: requests arriving together share one append),
created at the first write, sharing the Idempotency-Key store's MongoDB lane (one batch of
either in flight: gateway.coalesce.CoalescedIdempotency); its task is cancelled with the
app's other tasks. An audit log that cannot be written answers 503 naming MongoDB (the
Idempotency-Key is released: the retry runs), so nothing moves money unaudited.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from gateway.auth import Caller
from gateway.state import state_of
from stores.audit_chain import CHAIN_API, AuditAppender, AuditChain
from walletcore.keys import WalletKey
from walletcore.wallet_ids import wallet_ref

SOURCE_API = "api"


def caller_fields(caller: Caller) -> dict[str, str]:
    """Who sent the request, as the audit names it (the key's name is the `actor`)."""
    return {"key_id": caller.key_id, "owner": caller.owner}


def _appender(request: Request) -> AuditAppender:
    app_state = request.app.state
    appender = getattr(app_state, "audit_appender", None)
    if appender is None:
        state = state_of(request)
        # One MongoDB batch in flight with the Idempotency-Key's (gateway.coalesce): fewer,
        # larger batches of each kind under load.
        appender = AuditAppender(AuditChain(state.stores.db), CHAIN_API, shared=state.mongo_lane)
        state.tasks.append(appender.start())
        app_state.audit_appender = appender
    assert isinstance(appender, AuditAppender)
    return appender


def wallet_ref_of(request: Request, wallet: WalletKey) -> str:
    """The wallet's keyed pseudonym (the one its workflow id carries), with the id key the
    process's WalletClient was built with (read once, at the first write)."""
    app_state = request.app.state
    key = getattr(app_state, "audit_id_key", None)
    if key is None:
        key = state_of(request).settings.platform.id_key()
        app_state.audit_id_key = key
    assert isinstance(key, bytes)
    return wallet_ref(key, wallet)


async def audit(request: Request, record: dict[str, Any]) -> int:
    """Append `record` and wait for its batch's commit; its chain_seq."""
    return await _appender(request).append(record)
