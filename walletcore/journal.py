"""Journal entries of the general ledger, their hash chain and the trial balance. Pure.

An entry is immutable and balanced: per currency, its lines' debits equal their credits
(corrections are new entries, never edits). Every entry the terminal writes mirrors one posted
TigerBeetle transfer: its id is that transfer's id (32 hex digits, the encoding mongobase's
u128_to_hex uses) and it records the transfer's timestamp, so an entry can exist only once.

The chain makes the books tamper-evident: entry n carries `prev_hash` (entry n-1's hash) and
`hash = sha256("prev_hash:seq:content_hash")`, where `content_hash` is sha256 over a canonical
encoding of everything the entry says (sorted-key compact JSON, amounts as integers, times as
TigerBeetle nanoseconds). Changing any stored field of any entry breaks its own hash or the
link of the entry after it.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from walletcore.gl_chart import CURRENCY_PATTERN, GL_NUMBER_MAX
from walletcore.ids import U128_MAX

INT64_MAX = 2**63 - 1  # amounts and balances are stored as BSON int64 minor units
JOURNAL_LINES_MAX = 64
MEMO_MAX = 256
HASH_HEX_CHARS = 64
GENESIS_HASH = "0" * HASH_HEX_CHARS  # prev_hash of the first entry (seq 1)
CHAIN_VERSION = 1  # part of every content hash: a new encoding must change it
NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Minor = Annotated[int, Field(ge=0, le=INT64_MAX)]
HashHex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class JournalLine(BaseModel):
    """One side of an entry: exactly one of debit_minor / credit_minor is positive."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    account: int = Field(ge=1, le=GL_NUMBER_MAX)
    currency: str = Field(pattern=CURRENCY_PATTERN)
    debit_minor: Minor = 0
    credit_minor: Minor = 0

    @model_validator(mode="after")
    def _one_side(self) -> JournalLine:
        if (self.debit_minor > 0) == (self.credit_minor > 0):
            raise ValueError("a line debits or credits a positive amount, not both or neither")
        return self


class JournalEntry(BaseModel):
    """A balanced, immutable entry mirroring the posted TigerBeetle transfer `transfer_id`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transfer_id: int = Field(gt=0, lt=U128_MAX)
    tb_timestamp: int = Field(gt=0, le=INT64_MAX, description="TigerBeetle ns since epoch")
    code: int = Field(default=0, ge=0, le=2**16 - 1, description="the transfer's code")
    kind: str | None = Field(default=None, max_length=64)
    external_id: str | None = Field(default=None, max_length=128)
    lines: tuple[JournalLine, ...] = Field(min_length=2, max_length=JOURNAL_LINES_MAX)
    memo: str | None = Field(default=None, max_length=MEMO_MAX)

    @model_validator(mode="after")
    def _balanced(self) -> JournalEntry:
        unbalanced = unbalanced_currencies(self.lines)
        if unbalanced:
            raise ValueError(f"debits differ from credits in {unbalanced}")
        return self

    @property
    def entry_id(self) -> str:
        return entry_id_of(self.transfer_id)

    @property
    def posted_at(self) -> datetime:
        return posted_at_of(self.tb_timestamp)

    @cached_property
    def content_hash(self) -> str:
        return hashlib.sha256(canonical_bytes(self)).hexdigest()

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy is validated again (balanced) and hashes its own content: pydantic's copy
        would keep the cached hash of the original."""
        del deep  # immutable all the way down
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return self.model_validate({**fields, **(update or {})})

    @property
    def postings(self) -> list[str]:
        """`account:currency` keys the entry touches (what a statement looks up)."""
        return sorted({posting_key(line.account, line.currency) for line in self.lines})


def posted_at_of(tb_timestamp: int) -> datetime:
    """A TigerBeetle time (ns) as an entry's `posted_at`, at BSON's millisecond resolution."""
    return EPOCH + timedelta(milliseconds=tb_timestamp // NS_PER_MS)


def entry_id_of(transfer_id: int) -> str:
    assert 0 < transfer_id < U128_MAX
    return f"{transfer_id:032x}"


def posting_key(account: int, currency: str) -> str:
    return f"{account}:{currency}"


def unbalanced_currencies(lines: Iterable[JournalLine]) -> list[str]:
    """Currencies whose debits and credits differ (empty for a balanced set of lines)."""
    net: dict[str, int] = defaultdict(int)
    for line in lines:
        net[line.currency] += line.debit_minor - line.credit_minor
    return sorted(currency for currency, value in net.items() if value != 0)


def canonical_bytes(entry: JournalEntry) -> bytes:
    """The encoding the content hash covers. Lines keep their order (it is part of the entry)."""
    body = {
        "v": CHAIN_VERSION,
        "transfer_id": entry.entry_id,
        "tb_timestamp": entry.tb_timestamp,
        "code": entry.code,
        "kind": entry.kind,
        "external_id": entry.external_id,
        "memo": entry.memo,
        "lines": [
            [line.account, line.currency, line.debit_minor, line.credit_minor]
            for line in entry.lines
        ],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def chain_hash(prev_hash: str, seq: int, content_hash: str) -> str:
    assert seq >= 1 and len(prev_hash) == HASH_HEX_CHARS and len(content_hash) == HASH_HEX_CHARS
    return hashlib.sha256(f"{prev_hash}:{seq}:{content_hash}".encode()).hexdigest()


class ChainHead(BaseModel):
    """The chain's last link: seq 0 and the genesis hash before the first entry."""

    model_config = ConfigDict(frozen=True)

    seq: int = Field(default=0, ge=0, le=INT64_MAX)
    hash: HashHex = GENESIS_HASH


class ChainedEntry(BaseModel):
    """An entry with its place in the chain."""

    model_config = ConfigDict(frozen=True)

    entry: JournalEntry
    seq: int = Field(ge=1, le=INT64_MAX)
    prev_hash: HashHex
    hash: HashHex

    @property
    def head(self) -> ChainHead:
        return ChainHead(seq=self.seq, hash=self.hash)


def extend_chain(head: ChainHead, entries: Sequence[JournalEntry]) -> list[ChainedEntry]:
    """Link `entries` after `head`, in order."""
    chained: list[ChainedEntry] = []
    prev_hash, seq = head.hash, head.seq
    for entry in entries:
        seq += 1
        link = chain_hash(prev_hash, seq, entry.content_hash)
        chained.append(ChainedEntry(entry=entry, seq=seq, prev_hash=prev_hash, hash=link))
        prev_hash = link
    return chained


class ChainVerification(BaseModel):
    """What a walk over a chain segment found. `ok` is False at the first broken link."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    checked: int = Field(ge=0)
    last: ChainHead
    first_bad_seq: int | None = None
    reason: str | None = None


def verify_segment(start: ChainHead, segment: Sequence[ChainedEntry]) -> ChainVerification:
    """Walk `segment` (ascending seq) from `start`: contiguous seqs, each prev_hash the previous
    hash, each hash recomputed from the entry's content. Stops at the first break."""
    prev = start
    for checked, link in enumerate(segment):
        reason = _link_fault(prev, link)
        if reason is not None:
            return ChainVerification(
                ok=False, checked=checked, last=prev, first_bad_seq=link.seq, reason=reason
            )
        prev = link.head
    return ChainVerification(ok=True, checked=len(segment), last=prev)


def _link_fault(prev: ChainHead, link: ChainedEntry) -> str | None:
    if link.seq != prev.seq + 1:
        return f"sequence gap: {prev.seq} then {link.seq}"
    if link.prev_hash != prev.hash:
        return "prev_hash differs from the previous entry's hash"
    if link.hash != chain_hash(link.prev_hash, link.seq, link.entry.content_hash):
        return "hash does not match the entry's content"
    return None


# ---- balances ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccountBalance:
    """Posted totals of one (GL account, currency), like a TigerBeetle account's posted pair."""

    account: int
    currency: str
    debits_minor: int
    credits_minor: int

    def __post_init__(self) -> None:
        assert 0 <= self.debits_minor <= INT64_MAX and 0 <= self.credits_minor <= INT64_MAX

    @property
    def net_debit_minor(self) -> int:
        """debits - credits: positive for a debit-normal account holding value."""
        return self.debits_minor - self.credits_minor


def balance_deltas(entries: Iterable[JournalEntry]) -> dict[tuple[int, str], tuple[int, int]]:
    """(account, currency) -> (debits, credits) the entries add: one balance write per key."""
    deltas: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0])
    for entry in entries:
        for line in entry.lines:
            pair = deltas[(line.account, line.currency)]
            pair[0] += line.debit_minor
            pair[1] += line.credit_minor
    return {key: (debits, credits) for key, (debits, credits) in deltas.items()}


class CurrencyTotals(BaseModel):
    model_config = ConfigDict(frozen=True)

    currency: str
    debits_minor: int = Field(ge=0)
    credits_minor: int = Field(ge=0)

    @property
    def difference_minor(self) -> int:
        return self.debits_minor - self.credits_minor


class TrialBalance(BaseModel):
    """Sum of every account's debits and credits per currency; `zero` when each matches."""

    model_config = ConfigDict(frozen=True)

    currencies: tuple[CurrencyTotals, ...]
    accounts: int = Field(ge=0)

    @property
    def zero(self) -> bool:
        return all(totals.difference_minor == 0 for totals in self.currencies)

    def by_currency(self) -> Mapping[str, CurrencyTotals]:
        return {totals.currency: totals for totals in self.currencies}


def trial_balance(balances: Iterable[AccountBalance]) -> TrialBalance:
    debits: dict[str, int] = defaultdict(int)
    credits: dict[str, int] = defaultdict(int)
    accounts = 0
    for balance in balances:
        accounts += 1
        debits[balance.currency] += balance.debits_minor
        credits[balance.currency] += balance.credits_minor
    totals = tuple(
        CurrencyTotals(currency=cur, debits_minor=debits[cur], credits_minor=credits[cur])
        for cur in sorted(debits.keys() | credits.keys())
    )
    return TrialBalance(currencies=totals, accounts=accounts)
