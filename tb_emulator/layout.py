"""TigerBeetle's 128-byte Account layout, as the emulator keeps and sends lookup results.

id u128 | debits_pending u128 | debits_posted u128 | credits_pending u128 |
credits_posted u128 | user_data_128 u128 | user_data_64 u64 | user_data_32 u32 |
reserved u32 | ledger u32 | code u16 | flags u16 | timestamp u64, little endian
(docs/reference/account.md). A u128 is two u64 words, low first.
"""

from __future__ import annotations

import struct
from typing import Any, Final

from tb_emulator.engine_defs import U64_MAX

ACCOUNT_ROW: Final = struct.Struct("<12QQIIIHHQ")
ACCOUNT_ROW_SIZE: Final = 128
assert ACCOUNT_ROW.size == ACCOUNT_ROW_SIZE

# Offsets of each field in a row as a sequence of u64 words, u32 words and u16 words: what a
# decoder slices with a stride of one row (16, 32 and 64 items).
WORDS_PER_ROW: Final = ACCOUNT_ROW_SIZE // 8
U128_WORDS: Final = {"id": 0, "debits_pending": 2, "debits_posted": 4, "credits_pending": 6,
                     "credits_posted": 8, "user_data_128": 10}
USER_DATA_64_WORD: Final = 12
USER_DATA_32_U32: Final = 26
LEDGER_U32: Final = 28
CODE_U16: Final = 58
FLAGS_U16: Final = 59
TIMESTAMP_WORD: Final = 15


def pack_account_row(
    account_id: int, debits_pending: int, debits_posted: int, credits_pending: int,
    credits_posted: int, user_data_128: int, user_data_64: int, user_data_32: int,
    ledger: int, code: int, flags: int, timestamp: int, *_: Any,
) -> bytes:
    """Fields in tb.Account's declaration order (an engine record's leading slots; trailing
    slots are ignored), flags as an int."""
    m = U64_MAX
    return ACCOUNT_ROW.pack(
        account_id & m, account_id >> 64, debits_pending & m, debits_pending >> 64,
        debits_posted & m, debits_posted >> 64, credits_pending & m, credits_pending >> 64,
        credits_posted & m, credits_posted >> 64, user_data_128 & m, user_data_128 >> 64,
        user_data_64, user_data_32, 0, ledger, code, flags, timestamp)
