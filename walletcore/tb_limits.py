"""How many events fit one TigerBeetle request: the one rule every caller chunks by (no I/O).

A TigerBeetle 0.17.9 cluster bounds every request message by its request limit: `--limit-request`
at `tigerbeetle start`, 4 KiB..1 MiB, default 1 MiB; `--development` (what its docs use for
local work) makes it 32 KiB. The client learns it when it registers and raises
`TooMuchDataError` itself, before sending, for a batch that does not fit. Measured on a real
0.17.9 server, a batch holds at most

    (limit - 256-byte message header) // element size - 1

elements (the last slot goes to the multi-batch trailer), with 128-byte events for
`create_accounts` / `create_transfers` and 16-byte ids for `lookup_accounts` /
`lookup_transfers`. Replies are bound by the 1 MiB message size whatever the request limit: a
lookup gets 128-byte rows back, so it never exceeds 8189 ids, and `query_*` / `get_account_*`
accept `limit` 8189 at any request limit (their one filter always fits).

    request limit            creates   lookups   query limit
    1 MiB (default)             8189      8189          8189
    32 KiB (--development)       253      2031          8189
    4 KiB (minimum)               29       239          8189

The platform reads the limit from configuration (`TB_REQUEST_LIMIT_BYTES`), or from the client
when it exposes what the cluster announced (the emulator's adapter does; the real Python client
does not). The emulator keeps its own copy of this rule (`tb_emulator.request_limit`: it imports
nothing of the platform); tests/test_tb_request_limit.py checks that the two agree.
"""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

KIB: Final = 1024
MIB: Final = 1024 * KIB
REQUEST_LIMIT_BYTES_MIN: Final = 4 * KIB
REQUEST_LIMIT_BYTES_MAX: Final = 1 * MIB  # TigerBeetle's message_size_max.
REQUEST_LIMIT_BYTES_DEFAULT: Final = REQUEST_LIMIT_BYTES_MAX
REQUEST_LIMIT_BYTES_DEVELOPMENT: Final = 32 * KIB  # `tigerbeetle start --development`
REQUEST_LIMIT_SETTING: Final = "TB_REQUEST_LIMIT_BYTES"  # Named in configuration errors.
MESSAGE_HEADER_SIZE_BYTES: Final = 256
EVENT_SIZE_BYTES: Final = 128  # Account, Transfer, AccountFilter, QueryFilter, reply rows.
ID_SIZE_BYTES: Final = 16  # One u128 id of a lookup.
REPLY_LIMIT_BYTES: Final = REQUEST_LIMIT_BYTES_MAX  # Replies are not bound by the request limit.


def events_max(limit_bytes: int, element_size_bytes: int) -> int:
    """Elements of `element_size_bytes` that one message of `limit_bytes` carries."""
    assert REQUEST_LIMIT_BYTES_MIN <= limit_bytes <= REQUEST_LIMIT_BYTES_MAX, limit_bytes
    assert 0 < element_size_bytes <= EVENT_SIZE_BYTES, element_size_bytes
    count = (limit_bytes - MESSAGE_HEADER_SIZE_BYTES) // element_size_bytes - 1
    assert count >= 1
    return count


def create_batch_max(limit_bytes: int) -> int:
    """Events per `create_accounts` / `create_transfers` request."""
    return events_max(limit_bytes, EVENT_SIZE_BYTES)


QUERY_LIMIT_MAX: Final = events_max(REPLY_LIMIT_BYTES, EVENT_SIZE_BYTES)  # Rows of any reply.


def lookup_batch_max(limit_bytes: int) -> int:
    """Ids per `lookup_accounts` / `lookup_transfers` request: the ids fit the request, and
    the 128-byte rows they find fit the reply."""
    return min(events_max(limit_bytes, ID_SIZE_BYTES), QUERY_LIMIT_MAX)


TB_EVENTS_MAX: Final = 8189  # The largest batch of any kind, at the default (largest) limit.
assert create_batch_max(REQUEST_LIMIT_BYTES_DEFAULT) == TB_EVENTS_MAX
assert lookup_batch_max(REQUEST_LIMIT_BYTES_DEFAULT) == TB_EVENTS_MAX == QUERY_LIMIT_MAX
assert create_batch_max(REQUEST_LIMIT_BYTES_DEVELOPMENT) == 253
assert lookup_batch_max(REQUEST_LIMIT_BYTES_DEVELOPMENT) == 2031


def too_much_data_message(limit_bytes: int, operation: str, events: int) -> str:
    """What to tell the operator when a batch sized for `limit_bytes` was still refused as too
    much data: the cluster's limit is smaller than configured. A configuration error to fix,
    not a failure to retry."""
    return (
        f"TigerBeetle refused {operation} of {events} events as too much data although "
        f"{REQUEST_LIMIT_SETTING}={limit_bytes} allows it: the cluster's request limit is "
        f"smaller. Set {REQUEST_LIMIT_SETTING} to the cluster's --limit-request in bytes "
        f"({REQUEST_LIMIT_BYTES_DEVELOPMENT} for a cluster started with --development)")


class BatchLimits(BaseModel):
    """Every batch and page size the platform may use under one request limit. Build it once
    from the limit (`BatchLimits(request_limit_bytes=...)`) and pass it down; never assume 8189."""

    model_config = ConfigDict(frozen=True)

    request_limit_bytes: int = Field(
        default=REQUEST_LIMIT_BYTES_DEFAULT, ge=REQUEST_LIMIT_BYTES_MIN,
        le=REQUEST_LIMIT_BYTES_MAX)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def create_batch_max(self) -> int:
        """Accounts or transfers per create request."""
        return create_batch_max(self.request_limit_bytes)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def lookup_batch_max(self) -> int:
        """Ids per lookup request."""
        return lookup_batch_max(self.request_limit_bytes)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def query_limit_max(self) -> int:
        """`limit` of one query_* / get_account_* request (replies are not bound by the
        request limit)."""
        return QUERY_LIMIT_MAX

    @computed_field  # type: ignore[prop-decorator]
    @property
    def backfill_wallets_per_page_max(self) -> int:
        """Wallets per backfill page: up to two opening transfers each, in one create."""
        return self.create_batch_max // 2

    @computed_field  # type: ignore[prop-decorator]
    @property
    def history_events_per_page_max(self) -> int:
        """Imported history transfers per page: one create_transfers batch."""
        return self.create_batch_max

    @computed_field  # type: ignore[prop-decorator]
    @property
    def reconcile_wallets_per_page_max(self) -> int:
        """Wallets per reconciliation page: one lookup_accounts batch."""
        return self.lookup_batch_max

    @computed_field  # type: ignore[prop-decorator]
    @property
    def reconcile_transfers_per_page_max(self) -> int:
        """Registry records per reconciliation transfer page: one lookup_transfers batch of
        each record's transfer and its void."""
        return self.lookup_batch_max // 2

    @model_validator(mode="after")
    def _relationships(self) -> BatchLimits:
        creates, lookups = self.create_batch_max, self.lookup_batch_max
        assert 1 <= creates <= lookups <= TB_EVENTS_MAX  # Ids are smaller than events.
        assert self.query_limit_max == TB_EVENTS_MAX
        assert self.backfill_wallets_per_page_max >= 1
        assert 2 * self.backfill_wallets_per_page_max <= creates
        assert self.history_events_per_page_max <= creates
        assert self.reconcile_wallets_per_page_max <= lookups
        assert self.reconcile_transfers_per_page_max >= 1
        assert 2 * self.reconcile_transfers_per_page_max <= lookups
        return self
