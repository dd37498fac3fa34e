"""TigerBeetle 0.17.9's request size limit, as the real server and client apply it.

The server's `--limit-request SIZE` (4 KiB..1 MiB, default 1 MiB; `--development` makes the
default 32 KiB) bounds every request message. The server announces it when a client registers,
and the client refuses a batch that does not fit with `TooMuchDataError` before sending it.
Measured on a real 0.17.9 server: a batch holds at most

    (limit - 256-byte message header) // element size - 1

elements (the last slot goes to the multi-batch trailer): 128-byte events for creates (and the
one filter of a query), 16-byte ids for lookups. A reply is bound by the 1 MiB message size
whatever the request limit, so a lookup (128-byte rows back) and a query's `limit` never exceed
8189: at 32 KiB, creates take 253 events and lookups 2031 ids; at 1 MiB both take 8189.

The platform's own copy of this rule is `walletcore.tb_limits` (the emulator imports nothing of
the platform); tests/test_tb_request_limit.py checks that both agree on every limit.
"""

from __future__ import annotations

import re
from typing import Final

KIB: Final = 1024
MIB: Final = 1024 * KIB
REQUEST_LIMIT_BYTES_MIN: Final = 4 * KIB
REQUEST_LIMIT_BYTES_MAX: Final = 1 * MIB  # TigerBeetle's message_size_max.
REQUEST_LIMIT_BYTES_DEFAULT: Final = REQUEST_LIMIT_BYTES_MAX
REQUEST_LIMIT_BYTES_DEVELOPMENT: Final = 32 * KIB
MESSAGE_HEADER_SIZE_BYTES: Final = 256
EVENT_SIZE_BYTES: Final = 128  # tb Account, Transfer, AccountFilter, QueryFilter; reply rows.
ID_SIZE_BYTES: Final = 16  # A u128 id of a lookup.
REPLY_LIMIT_BYTES: Final = REQUEST_LIMIT_BYTES_MAX  # Replies are not bound by --limit-request.


def events_max(limit_bytes: int, element_size_bytes: int) -> int:
    """Elements of `element_size_bytes` that one message of `limit_bytes` carries."""
    assert REQUEST_LIMIT_BYTES_MIN <= limit_bytes <= REQUEST_LIMIT_BYTES_MAX, limit_bytes
    assert element_size_bytes in (ID_SIZE_BYTES, EVENT_SIZE_BYTES), element_size_bytes
    count = (limit_bytes - MESSAGE_HEADER_SIZE_BYTES) // element_size_bytes - 1
    assert count >= 1
    return count


ROWS_MAX: Final = events_max(REPLY_LIMIT_BYTES, EVENT_SIZE_BYTES)  # Rows of any reply.
assert ROWS_MAX == 8189


def create_batch_max(limit_bytes: int) -> int:
    """Events per create_accounts / create_transfers request."""
    return events_max(limit_bytes, EVENT_SIZE_BYTES)


def lookup_batch_max(limit_bytes: int) -> int:
    """Ids per lookup_accounts / lookup_transfers request: the request's ids, and the reply's
    128-byte rows in one 1 MiB message."""
    return min(events_max(limit_bytes, ID_SIZE_BYTES), ROWS_MAX)


_SIZE = re.compile(r"(\d[\d_]*)\s*(b|kib|mib|gib)?", re.IGNORECASE)
_UNIT_BYTES: Final = {"": 1, "b": 1, "kib": KIB, "mib": MIB, "gib": 1024 * MIB}


def parse_request_limit(text: str) -> int:
    """`--limit-request` value: bytes, or with a unit (`32KiB`, `1MiB`; case-insensitive).
    ValueError (a one-line reason) for a malformed or out-of-range size."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid size {text!r} (expected bytes, or a number with B, KiB or "
                         "MiB, such as 32KiB)")
    size = int(match.group(1).replace("_", "")) * _UNIT_BYTES[(match.group(2) or "").lower()]
    if not REQUEST_LIMIT_BYTES_MIN <= size <= REQUEST_LIMIT_BYTES_MAX:
        raise ValueError(f"{text.strip()} ({size} bytes) is outside 4KiB..1MiB "
                         f"({REQUEST_LIMIT_BYTES_MIN}..{REQUEST_LIMIT_BYTES_MAX} bytes)")
    return size
