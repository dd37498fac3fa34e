"""walletcore.tb_limits: TigerBeetle's batch sizes from the cluster's request limit (pure; no
servers). The numbers are issue 13's measurements on a real TigerBeetle 0.17.9."""

from __future__ import annotations

import pydantic
import pytest

from walletconfig.settings import ENVIRONMENT, Settings
from walletcore import tb_limits
from walletcore.tb_limits import (
    REQUEST_LIMIT_BYTES_DEFAULT,
    REQUEST_LIMIT_BYTES_DEVELOPMENT,
    REQUEST_LIMIT_BYTES_MAX,
    REQUEST_LIMIT_BYTES_MIN,
    TB_EVENTS_MAX,
    BatchLimits,
    create_batch_max,
    events_max,
    lookup_batch_max,
)


def test_constants() -> None:
    assert REQUEST_LIMIT_BYTES_DEFAULT == REQUEST_LIMIT_BYTES_MAX == 1024 * 1024
    assert REQUEST_LIMIT_BYTES_DEVELOPMENT == 32 * 1024
    assert REQUEST_LIMIT_BYTES_MIN == 4 * 1024
    assert TB_EVENTS_MAX == 8189 == create_batch_max(REQUEST_LIMIT_BYTES_DEFAULT)
    assert tb_limits.QUERY_LIMIT_MAX == TB_EVENTS_MAX


@pytest.mark.parametrize(("limit_bytes", "creates", "lookups"), [
    (1024 * 1024, 8189, 8189),  # Measured: 8190 of either raises.
    (32 * 1024, 253, 2031),  # Measured with --development.
    (4 * 1024, 29, 239),  # The rule at the smallest limit.
])
def test_measured_boundaries(limit_bytes: int, creates: int, lookups: int) -> None:
    assert create_batch_max(limit_bytes) == creates
    assert lookup_batch_max(limit_bytes) == lookups
    limits = BatchLimits(request_limit_bytes=limit_bytes)
    assert (limits.create_batch_max, limits.lookup_batch_max) == (creates, lookups)
    assert limits.query_limit_max == 8189  # Replies are not bound by the request limit.


def test_events_max_is_header_then_elements_less_the_trailer_slot() -> None:
    assert events_max(32 * 1024, 128) == (32 * 1024 - 256) // 128 - 1
    assert events_max(32 * 1024, 16) == (32 * 1024 - 256) // 16 - 1
    # One byte short of the next whole event: the same count; the full event: one more.
    assert events_max(256 + 128 * 31 - 1, 128) == 29
    assert events_max(256 + 128 * 31, 128) == 30
    # Lookups are bound by the reply's 128-byte rows at large limits, by their ids below.
    assert lookup_batch_max(1024 * 1024) == events_max(1024 * 1024, 128)
    assert lookup_batch_max(64 * 1024) == events_max(64 * 1024, 16) == 4079
    with pytest.raises(AssertionError):
        events_max(REQUEST_LIMIT_BYTES_MIN - 1, 128)
    with pytest.raises(AssertionError):
        events_max(REQUEST_LIMIT_BYTES_MAX + 1, 16)


def test_batch_limits_relationships_hold_at_every_limit() -> None:
    previous = BatchLimits(request_limit_bytes=REQUEST_LIMIT_BYTES_MIN)
    for limit_bytes in range(REQUEST_LIMIT_BYTES_MIN, REQUEST_LIMIT_BYTES_MAX + 1, 61):
        limits = BatchLimits(request_limit_bytes=limit_bytes)  # Its validator asserts them.
        assert 1 <= limits.create_batch_max <= limits.lookup_batch_max <= TB_EVENTS_MAX
        assert limits.create_batch_max >= previous.create_batch_max  # Monotonic.
        assert limits.lookup_batch_max >= previous.lookup_batch_max
        previous = limits


def test_batch_limits_pages() -> None:
    development = BatchLimits(request_limit_bytes=REQUEST_LIMIT_BYTES_DEVELOPMENT)
    assert development.backfill_wallets_per_page_max == 126  # Two openings each: 252 <= 253.
    assert development.history_events_per_page_max == 253
    assert development.reconcile_wallets_per_page_max == 2031
    assert development.reconcile_transfers_per_page_max == 1015
    default = BatchLimits()
    assert default.request_limit_bytes == REQUEST_LIMIT_BYTES_DEFAULT
    assert default.backfill_wallets_per_page_max == 4094  # As before issue 13.
    assert default.reconcile_wallets_per_page_max == 8189
    smallest = BatchLimits(request_limit_bytes=REQUEST_LIMIT_BYTES_MIN)
    assert smallest.backfill_wallets_per_page_max == 14


def test_batch_limits_is_a_frozen_validated_model() -> None:
    limits = BatchLimits(request_limit_bytes=32768)
    with pytest.raises(pydantic.ValidationError):
        limits.request_limit_bytes = 4096  # type: ignore[misc]
    for wrong in (REQUEST_LIMIT_BYTES_MIN - 1, REQUEST_LIMIT_BYTES_MAX + 1, 0):
        with pytest.raises(pydantic.ValidationError):
            BatchLimits(request_limit_bytes=wrong)
    dumped = limits.model_dump()
    assert dumped["create_batch_max"] == 253 and dumped["lookup_batch_max"] == 2031
    assert BatchLimits.model_validate(dumped) == limits  # Round-trips (computed fields ignored).


def test_too_much_data_message_names_the_setting() -> None:
    message = tb_limits.too_much_data_message(1048576, "create_transfers", 8189)
    assert "TB_REQUEST_LIMIT_BYTES=1048576" in message and "32768" in message
    assert "create_transfers of 8189 events" in message
    assert "\n" not in message


def test_settings_bounds_and_default_match_the_domain() -> None:
    name = tb_limits.REQUEST_LIMIT_SETTING
    field, default = ENVIRONMENT[name]
    assert int(default) == REQUEST_LIMIT_BYTES_DEFAULT
    assert Settings.from_env({}).tb_request_limit_bytes == REQUEST_LIMIT_BYTES_DEFAULT
    development = Settings.from_env({name: str(REQUEST_LIMIT_BYTES_DEVELOPMENT)})
    assert getattr(development, field) == 32768
    for edge in (REQUEST_LIMIT_BYTES_MIN, REQUEST_LIMIT_BYTES_MAX):
        assert Settings.from_env({name: str(edge)}).tb_request_limit_bytes == edge
    for wrong in (REQUEST_LIMIT_BYTES_MIN - 1, REQUEST_LIMIT_BYTES_MAX + 1):
        with pytest.raises(pydantic.ValidationError, match="tb_request_limit_bytes"):
            Settings.from_env({name: str(wrong)})
