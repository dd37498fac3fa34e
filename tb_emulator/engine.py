"""In-process TigerBeetle 0.17.9 state machine (accounts, transfers, two-phase, queries).

The engine follows the validation order and result rules of the real server (see the
conformance README next to the traces) and the argument checks of the official Python
client.  It is single-threaded and deterministic: given the same calls and the same
``clock_ns()`` values it produces the same results and state, which lets the server replay its
write-ahead log after a crash.

Representation (chosen for throughput and memory):

* accounts: one mutable ``list`` per account (``A_*`` slots, the first 12 mirror
  ``tb.Account``), in a dict keyed by id plus a creation-ordered list.  Creation order is
  timestamp order because imported timestamps must not regress.
* transfers: a column store (``list`` for u128 fields, ``array`` for narrow ones), one row per
  transfer; ``_tx_index`` maps id -> row, or ``ID_ORPHAN`` for an id burnt by a transient
  failure.  Row order is timestamp order, so time ranges are bisections.
* per account: ``array('I')`` of the rows that touch it, and for HISTORY accounts the balances
  after each of those rows, flattened 4 per row into an ``array('Q')`` (``get_account_balances``;
  turned into a list the first time a balance exceeds 64 bits).
* linked chains: rows and accounts appended by a chain are truncated on rollback; in-place
  changes (balances, flags, pending status) are undone from a small undo log.
* fast path: plain transfers (flags 0, outside chains) are checked with one folded condition
  and buffered; their columns are written in bulk (C-level ``extend``) when the batch ends or
  before the general path needs the columns.

Besides the ``tigerbeetle.ClientSync`` surface, ``lookup_*_raw`` return plain field rows (in
dataclass field order) so a wire encoder can skip building dataclasses.
"""

from __future__ import annotations

import heapq
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat, starmap
from operator import itemgetter
from typing import Any

import tigerbeetle as tb

from tb_emulator.engine_defs import (
    A_CODE,
    A_CP,
    A_CPO,
    A_DP,
    A_DPO,
    A_FLAGS,
    A_FLAGS_ENUM,
    A_ID,
    A_LEDGER,
    A_MUTABLE,
    A_PUBLIC,
    A_ROWS,
    A_SNAPS,
    A_TS,
    A_UD32,
    A_UD64,
    A_UD128,
    ACCOUNT_FLAGS,
    AF_CLOSED,
    AF_CREDITS_MUST_NOT_EXCEED_DEBITS,
    AF_DEBITS_MUST_NOT_EXCEED_CREDITS,
    AF_HISTORY,
    AF_IMPORTED,
    AF_KNOWN,
    AF_LINKED,
    BATCH_EVENTS_MAX,
    CAS,
    CTS,
    FF_CREDITS,
    FF_DEBITS,
    FF_KNOWN,
    FF_REVERSED,
    ID_ORPHAN,
    NS_PER_S,
    P_EXPIRED,
    P_PENDING,
    P_POSTED,
    P_VOIDED,
    QF_KNOWN,
    QF_REVERSED,
    T_AMOUNT,
    T_CODE,
    T_FLAGS,
    T_ID,
    T_LEDGER,
    T_TIMESTAMP,
    T_UD32,
    T_UD64,
    T_UD128,
    TF_BALANCING,
    TF_BALANCING_CREDIT,
    TF_BALANCING_DEBIT,
    TF_CLOSING,
    TF_CLOSING_CREDIT,
    TF_CLOSING_DEBIT,
    TF_EXCLUSIVE_WITH_POST_OR_VOID,
    TF_IMPORTED,
    TF_KNOWN,
    TF_LINKED,
    TF_PENDING,
    TF_POST,
    TF_POST_OR_VOID,
    TF_VOID,
    TIMESTAMP_MAX,
    TRANSFER_FLAGS,
    TRANSIENT_TRANSFER_STATUSES,
    U128_MAX,
    U_ACCOUNT,
    U_PENDING,
    account_tuple,
    check_batch_size,
    lookup_keys,
    sorted_contains,
    timestamp_bounds,
    transfer_tuple,
    validate_account_filter,
    validate_account_rows,
    validate_query_filter,
    validate_transfers,
)
from tb_emulator.gc_pause import build_without_gc
from tb_emulator.layout import pack_account_row

_get_id = itemgetter(T_ID)
_get_amount = itemgetter(T_AMOUNT)
_get_ud128 = itemgetter(T_UD128)
_get_ud64 = itemgetter(T_UD64)
_get_ud32 = itemgetter(T_UD32)
_get_ledger = itemgetter(T_LEDGER)
_get_code = itemgetter(T_CODE)

AccountRow = Sequence[Any]  # tb.Account fields in declaration order
TransferRow = Sequence[Any]  # tb.Transfer fields in declaration order


class Engine:
    """TigerBeetle 0.17.9 state machine with the method surface of ``tigerbeetle.ClientSync``."""

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.clock_ns: Callable[[], int] = clock_ns
        # False sends every transfer through the general path (tests compare both paths).
        self.fast_path = True
        self._closed = False
        self._last_timestamp = 0  # the last timestamp slot handed out

        # Accounts.
        self._accounts: dict[int, list[Any]] = {}
        self._account_order: list[list[Any]] = []  # creation order == timestamp order
        self._account_ts: array[int] = array("Q")

        # Transfers: one row per transfer, row order == timestamp order.
        self._tx_index: dict[int, int] = {}
        self._t_id: list[int] = []
        self._t_dr: list[int] = []
        self._t_cr: list[int] = []
        self._t_amount: list[int] = []
        self._t_pending_id: list[int] = []
        self._t_ud128: list[int] = []
        self._t_ud64: array[int] = array("Q")
        self._t_ud32: array[int] = array("I")
        self._t_timeout: array[int] = array("I")
        self._t_ledger: array[int] = array("I")
        self._t_code: array[int] = array("H")
        self._t_flags: array[int] = array("H")
        self._t_ts: array[int] = array("Q")
        self._columns: tuple[list[int] | array[int], ...] = (
            self._t_id, self._t_dr, self._t_cr, self._t_amount, self._t_pending_id,
            self._t_ud128, self._t_ud64, self._t_ud32, self._t_timeout, self._t_ledger,
            self._t_code, self._t_flags, self._t_ts,
        )
        # Fast-path rows accepted but not yet written to the columns other than t_dr / t_cr.
        self._staged: list[TransferRow] = []
        self._staged_ts: list[int] = []

        # Two-phase state: row of a pending transfer -> P_* status; expiry heap of
        # (expires_at, timestamp, row) with lazy deletion.
        self._pending_status: dict[int, int] = {}
        self._expiry_heap: list[tuple[int, int, int]] = []

        # Linked-chain undo log; None while no chain is open.
        self._undo: list[tuple[Any, ...]] | None = None

        # Accounts as TigerBeetle's 128-byte rows (tb_emulator.layout), for the server's
        # lookups: a full lookup is then one join of ready rows. Profiling showed lookups bound
        # by touching ~10 objects per account (dict key, record, each field) on this machine's
        # memory; a row is one object. A request that changes accounts only marks them stale
        # (packing them all at once cost the write path ~20 %); a lookup packs the stale ones
        # it reads.
        self._rows: dict[int, bytes] = {}
        self._stale_rows: set[int] = set()  # account ids whose row is missing or out of date

    # -----------------------------------------------------------------------------------------
    # Clock, timestamps and expiry
    # -----------------------------------------------------------------------------------------

    def _begin(self, count: int) -> int:
        """Reserve ``count`` consecutive timestamp slots (strictly after all earlier ones),
        expire what timed out before them, and return the first slot."""
        assert 0 < count <= BATCH_EVENTS_MAX
        first = max(self.clock_ns(), self._last_timestamp + 1)
        self._last_timestamp = first + count - 1
        assert self._last_timestamp <= TIMESTAMP_MAX
        self._expire_pending(first)
        return first

    def _begin_read(self) -> None:
        if self._closed:
            raise tb.ClientClosedError()
        self._expire_pending(self.clock_ns())

    def _expire_pending(self, now: int) -> None:
        """Release every pending transfer whose timeout elapsed at or before ``now``.

        A pure function of ``now`` and the state, so replaying the same clock values gives the
        same balances.  Expiry creates no transfer and no balance row (like the server).
        """
        heap = self._expiry_heap
        if not heap or heap[0][0] > now:
            return
        status = self._pending_status
        t_ts = self._t_ts
        t_timeout = self._t_timeout
        changed: list[int] = []
        while heap and heap[0][0] <= now:
            expires_at, ts, row = heapq.heappop(heap)
            if (
                row >= len(t_ts)
                or t_ts[row] != ts
                # A rolled-back pending frees its row and timestamp; an imported pending (no
                # timeout, never expires) may take both, so the timeout must match too.
                or ts + t_timeout[row] * NS_PER_S != expires_at
                or status.get(row) != P_PENDING
            ):
                continue  # posted, voided, or rolled back with its chain
            status[row] = P_EXPIRED
            amount = self._t_amount[row]
            flags = self._t_flags[row]
            dr = self._accounts[self._t_dr[row]]
            cr = self._accounts[self._t_cr[row]]
            dr[A_DP] -= amount
            cr[A_CP] -= amount
            if flags & TF_CLOSING_DEBIT:
                _set_account_flags(dr, dr[A_FLAGS] & ~AF_CLOSED)
            if flags & TF_CLOSING_CREDIT:
                _set_account_flags(cr, cr[A_FLAGS] & ~AF_CLOSED)
            changed += (dr[A_ID], cr[A_ID])
        self._stale_rows.update(changed)

    def _pack_rows(self, account_ids: Iterable[int]) -> None:
        accounts_get = self._accounts.get
        rows = self._rows
        for account_id in account_ids:
            record = accounts_get(account_id)
            if record is None:
                rows.pop(account_id, None)
            else:
                rows[account_id] = pack_account_row(*record)

    def pack_stale_rows(self, limit: int) -> int:
        """Pack up to ``limit`` stale rows (the server calls this between requests); returns
        how many stay stale."""
        assert 0 < limit <= BATCH_EVENTS_MAX
        stale = self._stale_rows
        self._pack_rows([stale.pop() for _ in range(min(limit, len(stale)))])
        return len(stale)

    def rows_are_current(self) -> bool:
        """Self-check for tests: every row not marked stale equals its account's record, and
        every account without a row is marked stale."""
        accounts = self._accounts
        stale = self._stale_rows
        return all(k in accounts and (k in stale or row == pack_account_row(*accounts[k]))
                   for k, row in self._rows.items()) and stale.issuperset(
            accounts.keys() - self._rows.keys())

    # -----------------------------------------------------------------------------------------
    # create_accounts
    # -----------------------------------------------------------------------------------------

    def create_accounts(self, accounts: list[tb.Account]) -> list[tb.CreateAccountResult]:
        rows = list(map(account_tuple, accounts))
        validate_account_rows(rows)
        timestamps, statuses = self._create_accounts(rows)
        return list(map(tb.CreateAccountResult, timestamps, statuses))

    def create_accounts_raw(self, rows: Sequence[AccountRow]) -> tuple[list[int], list[CAS]]:
        """Like ``create_accounts`` for rows of tb.Account's 12 field values in declaration
        order (flags as an int), returning (timestamps, statuses) instead of result objects.
        The caller guarantees every field is an int within its width (a wire decoder's rows
        are by construction): unlike ``create_accounts`` nothing is range-checked here."""
        return self._create_accounts(rows)

    def _create_accounts(self, rows: Sequence[AccountRow]) -> tuple[list[int], list[CAS]]:
        if self._closed:
            raise tb.ClientClosedError()
        count = len(rows)
        if count > BATCH_EVENTS_MAX:
            raise tb.TooMuchDataError()
        if count == 0:
            return [], []
        first = self._begin(count)
        batch_ts = first + count - 1
        imported_batch = bool(int(rows[0][10]) & AF_IMPORTED)
        first_account = len(self._account_order)

        res_ts: list[int] = []
        res_status: list[CAS] = []
        chain_start = -1
        chain_broken = False
        chain_mark = 0
        for index, a in enumerate(rows):
            flags = int(a[10]) & 0xFFFF
            ts_in = a[11]
            slot = first + index
            ts = slot
            status: CAS
            if flags & AF_LINKED and chain_start < 0:
                chain_start = index
                chain_mark = len(self._account_order)
            precheck = _batch_precheck(
                linked=bool(flags & AF_LINKED), imported=bool(flags & AF_IMPORTED),
                last=index == count - 1, chain_broken=chain_broken,
                imported_batch=imported_batch, ts_in=ts_in, batch_ts=batch_ts,
            )
            if precheck is not None:
                status = CAS.__members__[precheck]
            else:
                if imported_batch:
                    ts = ts_in
                status, ts = self._create_account(a, flags, ts)

            if status is not CAS.CREATED:
                if status is not CAS.EXISTS:
                    ts = slot
                if chain_start >= 0 and not chain_broken:
                    chain_broken = True
                    self._rollback_accounts(chain_mark)
                    for j in range(chain_start, index):
                        res_status[j] = CAS.LINKED_EVENT_FAILED
            res_ts.append(ts)
            res_status.append(status)
            if chain_start >= 0 and (
                not flags & AF_LINKED or status is CAS.LINKED_EVENT_CHAIN_OPEN
            ):
                chain_start = -1
                chain_broken = False
        self._stale_rows.update(r[A_ID] for r in self._account_order[first_account:])
        return res_ts, res_status

    def _create_account(self, a: AccountRow, flags: int, ts: int) -> tuple[CAS, int]:
        a_id, dp, dpo, cp, cpo, ud128, ud64, ud32, ledger, code, _, _ = a
        if flags & ~AF_KNOWN:
            return CAS.RESERVED_FLAG, 0
        if a_id == 0:
            return CAS.ID_MUST_NOT_BE_ZERO, 0
        if a_id == U128_MAX:
            return CAS.ID_MUST_NOT_BE_INT_MAX, 0
        e = self._accounts.get(a_id)
        if e is not None:
            if flags != e[A_FLAGS]:
                status = CAS.EXISTS_WITH_DIFFERENT_FLAGS
            elif ud128 != e[A_UD128]:
                status = CAS.EXISTS_WITH_DIFFERENT_USER_DATA_128
            elif ud64 != e[A_UD64]:
                status = CAS.EXISTS_WITH_DIFFERENT_USER_DATA_64
            elif ud32 != e[A_UD32]:
                status = CAS.EXISTS_WITH_DIFFERENT_USER_DATA_32
            elif ledger != e[A_LEDGER]:
                status = CAS.EXISTS_WITH_DIFFERENT_LEDGER
            elif code != e[A_CODE]:
                status = CAS.EXISTS_WITH_DIFFERENT_CODE
            else:
                status = CAS.EXISTS
            return status, e[A_TS]
        if flags & AF_DEBITS_MUST_NOT_EXCEED_CREDITS and flags & AF_CREDITS_MUST_NOT_EXCEED_DEBITS:
            return CAS.FLAGS_ARE_MUTUALLY_EXCLUSIVE, 0
        if dp != 0:
            return CAS.DEBITS_PENDING_MUST_BE_ZERO, 0
        if dpo != 0:
            return CAS.DEBITS_POSTED_MUST_BE_ZERO, 0
        if cp != 0:
            return CAS.CREDITS_PENDING_MUST_BE_ZERO, 0
        if cpo != 0:
            return CAS.CREDITS_POSTED_MUST_BE_ZERO, 0
        if ledger == 0:
            return CAS.LEDGER_MUST_NOT_BE_ZERO, 0
        if code == 0:
            return CAS.CODE_MUST_NOT_BE_ZERO, 0
        if flags & AF_IMPORTED:
            self._flush_staged()  # the regress check reads transfer timestamps
            account_ts = self._account_ts
            if (account_ts and ts <= account_ts[-1]) or sorted_contains(self._t_ts, ts):
                return CAS.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS, 0

        record: list[Any] = [
            int(a_id), 0, 0, 0, 0, int(ud128), int(ud64), int(ud32), int(ledger), int(code),
            ACCOUNT_FLAGS.get(flags), ts, flags, array("I"),
            array("Q") if flags & AF_HISTORY else None,
        ]
        assert len(record) == A_SNAPS + 1
        self._accounts[record[A_ID]] = record
        self._account_order.append(record)
        self._account_ts.append(ts)
        return CAS.CREATED, ts

    def _rollback_accounts(self, mark: int) -> None:
        """Undo the accounts a broken chain created (they are the newest ones)."""
        for record in self._account_order[mark:]:
            del self._accounts[record[A_ID]]
        del self._account_order[mark:]
        del self._account_ts[mark:]

    # -----------------------------------------------------------------------------------------
    # create_transfers
    # -----------------------------------------------------------------------------------------

    def create_transfers(self, transfers: list[tb.Transfer]) -> list[tb.CreateTransferResult]:
        validate_transfers(transfers)
        timestamps, statuses = self._create_transfers(list(map(transfer_tuple, transfers)))
        return list(map(tb.CreateTransferResult, timestamps, statuses))

    def create_transfers_raw(self, rows: Sequence[TransferRow]) -> tuple[list[int], list[CTS]]:
        """Like ``create_transfers`` for rows of tb.Transfer's 13 field values in declaration
        order (flags as an int), returning (timestamps, statuses) instead of result objects.
        The caller guarantees every field is an int within its width (a wire decoder's rows
        are by construction): unlike ``create_transfers`` nothing is range-checked here."""
        return self._create_transfers(rows)

    def _create_transfers(self, rows: Sequence[TransferRow]) -> tuple[list[int], list[CTS]]:
        if self._closed:
            raise tb.ClientClosedError()
        count = len(rows)
        if count > BATCH_EVENTS_MAX:
            raise tb.TooMuchDataError()
        if count == 0:
            return [], []
        first = self._begin(count)
        batch_ts = first + count - 1
        imported_batch = bool(int(rows[0][T_FLAGS]) & TF_IMPORTED)
        fast = self.fast_path and not imported_batch

        created = CTS.CREATED
        res_ts: list[int] = []
        res_status: list[CTS] = []
        res_ts_append = res_ts.append
        res_status_append = res_status.append

        # Locals for the fast path.
        accounts_get = self._accounts.get
        tx_index = self._tx_index
        staged_append = self._staged.append
        staged_ts_append = self._staged_ts.append
        t_dr_append = self._t_dr.append
        t_cr_append = self._t_cr.append
        row = len(self._t_dr)  # t_dr / t_cr are never staged
        first_row = row
        u128_max = U128_MAX

        chain_start = -1
        chain_broken = False
        chain_mark = 0
        for index, t in enumerate(rows):
            slot = first + index
            if fast and chain_start < 0 and t[11] == 0:  # T_FLAGS
                # Plain posted transfer: every check of the general path folded into one test
                # (account existence implies valid, distinct ids and a non-zero ledger); any
                # surprise falls through to the general path, which finds the exact status.
                tid, dr_id, cr_id, amount, pending_id, _, _, _, timeout, ledger, code, _, ts_in = t
                dr = accounts_get(dr_id)
                cr = accounts_get(cr_id)
                if (
                    dr is not None
                    and cr is not None
                    and dr is not cr
                    and 0 < tid < u128_max
                    and tid not in tx_index
                    and ts_in == 0
                    and pending_id == 0
                    and timeout == 0
                    and code != 0
                    and ledger == dr[8] == cr[8]  # A_LEDGER
                    and not (dr[12] | cr[12]) & 0x20  # A_FLAGS & AF_CLOSED
                ):
                    dr_pending = dr[1]  # A_DP
                    cr_pending = cr[3]  # A_CP
                    dr_posted = dr[2] + amount  # A_DPO
                    cr_posted = cr[4] + amount  # A_CPO
                    if (
                        dr_pending + dr_posted <= u128_max
                        and cr_pending + cr_posted <= u128_max
                        # AF_DEBITS_MUST_NOT_EXCEED_CREDITS: debits <= credits_posted
                        and (not dr[12] & 0x2 or dr_pending + dr_posted <= dr[4])
                        # AF_CREDITS_MUST_NOT_EXCEED_DEBITS: credits <= debits_posted
                        and (not cr[12] & 0x4 or cr_pending + cr_posted <= cr[2])
                    ):
                        tx_index[tid] = row
                        staged_append(t)
                        staged_ts_append(slot)
                        t_dr_append(dr[0])  # the account's own id object: shared, not copied
                        t_cr_append(cr[0])
                        dr[2] = dr_posted
                        cr[4] = cr_posted
                        dr[13].append(row)  # A_ROWS
                        cr[13].append(row)
                        if dr[14] is not None:  # A_SNAPS
                            _snapshot(dr)
                        if cr[14] is not None:
                            _snapshot(cr)
                        row += 1
                        res_ts_append(slot)
                        res_status_append(created)
                        continue

            self._flush_staged()
            v = t
            tid = v[T_ID]
            ts_in = v[T_TIMESTAMP]
            flags = int(v[T_FLAGS]) & 0xFFFF
            ts = slot
            status: CTS
            if flags & TF_LINKED and chain_start < 0:
                chain_start = index
                chain_mark = len(self._t_id)
                self._undo = []
            precheck = _batch_precheck(
                linked=bool(flags & TF_LINKED), imported=bool(flags & TF_IMPORTED),
                last=index == count - 1, chain_broken=chain_broken,
                imported_batch=imported_batch, ts_in=ts_in, batch_ts=batch_ts,
            )
            if precheck is not None:
                status = CTS.__members__[precheck]
            else:
                if imported_batch:
                    ts = ts_in
                status, ts = self._create_transfer(v, flags, ts)

            if status is not created:
                if status is not CTS.EXISTS:
                    ts = slot
                if chain_start >= 0 and not chain_broken:
                    chain_broken = True
                    self._rollback_transfers(chain_mark)
                    for j in range(chain_start, index):
                        res_status[j] = CTS.LINKED_EVENT_FAILED
                if status in TRANSIENT_TRANSFER_STATUSES:
                    # A transient failure burns the id, even if its chain was rolled back.
                    tx_index[int(tid)] = ID_ORPHAN
            res_ts_append(ts)
            res_status_append(status)
            if chain_start >= 0 and (
                not flags & TF_LINKED or status is CTS.LINKED_EVENT_CHAIN_OPEN
            ):
                chain_start = -1
                chain_broken = False
                self._undo = None
            row = len(self._t_dr)
        self._flush_staged()
        assert self._undo is None
        # The accounts of the transfers that stayed. One changed only by a rolled-back chain is
        # back to its state at the batch start, which its row (or staleness) still describes.
        stale = self._stale_rows
        stale.update(self._t_dr[first_row:])
        stale.update(self._t_cr[first_row:])
        return res_ts, res_status

    def _flush_staged(self) -> None:
        """Write the staged fast-path rows to the columns (bulk C-level extends)."""
        staged = self._staged
        if not staged:
            return
        count = len(staged)
        self._t_id.extend(map(_get_id, staged))
        self._t_amount.extend(map(_get_amount, staged))
        self._t_pending_id.extend(repeat(0, count))
        self._t_ud128.extend(map(_get_ud128, staged))
        self._t_ud64.extend(map(_get_ud64, staged))
        self._t_ud32.extend(map(_get_ud32, staged))
        self._t_timeout.extend(repeat(0, count))
        self._t_ledger.extend(map(_get_ledger, staged))
        self._t_code.extend(map(_get_code, staged))
        self._t_flags.extend(repeat(0, count))
        self._t_ts.extend(self._staged_ts)
        staged.clear()
        self._staged_ts.clear()
        assert len(self._t_id) == len(self._t_dr) == len(self._t_ts)

    def _create_transfer(self, v: TransferRow, flags: int, ts: int) -> tuple[CTS, int]:
        """General path: validate one transfer in server order, apply it if valid."""
        tid, dr_id, cr_id, amount, pending_id, ud128, ud64, ud32, timeout, ledger, code, _, _ = v
        if flags & ~TF_KNOWN:
            return CTS.RESERVED_FLAG, 0
        if tid == 0:
            return CTS.ID_MUST_NOT_BE_ZERO, 0
        if tid == U128_MAX:
            return CTS.ID_MUST_NOT_BE_INT_MAX, 0
        existing = self._tx_index.get(tid)
        if existing is not None:
            if existing == ID_ORPHAN:
                return CTS.ID_ALREADY_FAILED, 0
            return self._transfer_exists(v, flags, existing), self._t_ts[existing]
        if flags & TF_POST_OR_VOID:
            return self._post_or_void(v, flags, ts), ts

        if dr_id == 0:
            return CTS.DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO, 0
        if dr_id == U128_MAX:
            return CTS.DEBIT_ACCOUNT_ID_MUST_NOT_BE_INT_MAX, 0
        if cr_id == 0:
            return CTS.CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO, 0
        if cr_id == U128_MAX:
            return CTS.CREDIT_ACCOUNT_ID_MUST_NOT_BE_INT_MAX, 0
        if dr_id == cr_id:
            return CTS.ACCOUNTS_MUST_BE_DIFFERENT, 0
        if pending_id != 0:
            return CTS.PENDING_ID_MUST_BE_ZERO, 0
        if not flags & TF_PENDING:
            if timeout != 0:
                return CTS.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER, 0
            if flags & TF_CLOSING:
                return CTS.CLOSING_TRANSFER_MUST_BE_PENDING, 0
        if ledger == 0:
            return CTS.LEDGER_MUST_NOT_BE_ZERO, 0
        if code == 0:
            return CTS.CODE_MUST_NOT_BE_ZERO, 0
        dr = self._accounts.get(dr_id)
        if dr is None:
            return CTS.DEBIT_ACCOUNT_NOT_FOUND, 0
        cr = self._accounts.get(cr_id)
        if cr is None:
            return CTS.CREDIT_ACCOUNT_NOT_FOUND, 0
        if dr[A_LEDGER] != cr[A_LEDGER]:
            return CTS.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER, 0
        if ledger != dr[A_LEDGER]:
            return CTS.TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS, 0
        if flags & TF_IMPORTED:
            if self._imported_regresses(ts):
                return CTS.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS, 0
            if ts <= dr[A_TS]:
                return CTS.IMPORTED_EVENT_TIMESTAMP_MUST_POSTDATE_DEBIT_ACCOUNT, 0
            if ts <= cr[A_TS]:
                return CTS.IMPORTED_EVENT_TIMESTAMP_MUST_POSTDATE_CREDIT_ACCOUNT, 0
            if timeout != 0:
                return CTS.IMPORTED_EVENT_TIMEOUT_MUST_BE_ZERO, 0
        if dr[A_FLAGS] & AF_CLOSED:
            return CTS.DEBIT_ACCOUNT_ALREADY_CLOSED, 0
        if cr[A_FLAGS] & AF_CLOSED:
            return CTS.CREDIT_ACCOUNT_ALREADY_CLOSED, 0

        # Balancing transfers move at most what balances the account (saturating at zero).
        if flags & TF_BALANCING_DEBIT:
            amount = min(amount, max(dr[A_CPO] - dr[A_DPO] - dr[A_DP], 0))
        if flags & TF_BALANCING_CREDIT:
            amount = min(amount, max(cr[A_DPO] - cr[A_CPO] - cr[A_CP], 0))

        pending = bool(flags & TF_PENDING)
        if pending:
            if amount + dr[A_DP] > U128_MAX:
                return CTS.OVERFLOWS_DEBITS_PENDING, 0
            if amount + cr[A_CP] > U128_MAX:
                return CTS.OVERFLOWS_CREDITS_PENDING, 0
        if amount + dr[A_DPO] > U128_MAX:
            return CTS.OVERFLOWS_DEBITS_POSTED, 0
        if amount + cr[A_CPO] > U128_MAX:
            return CTS.OVERFLOWS_CREDITS_POSTED, 0
        if amount + dr[A_DP] + dr[A_DPO] > U128_MAX:
            return CTS.OVERFLOWS_DEBITS, 0
        if amount + cr[A_CP] + cr[A_CPO] > U128_MAX:
            return CTS.OVERFLOWS_CREDITS, 0
        if ts + timeout * NS_PER_S > TIMESTAMP_MAX:
            return CTS.OVERFLOWS_TIMEOUT, 0
        if (
            dr[A_FLAGS] & AF_DEBITS_MUST_NOT_EXCEED_CREDITS
            and dr[A_DP] + dr[A_DPO] + amount > dr[A_CPO]
        ):
            return CTS.EXCEEDS_CREDITS, 0
        if (
            cr[A_FLAGS] & AF_CREDITS_MUST_NOT_EXCEED_DEBITS
            and cr[A_CP] + cr[A_CPO] + amount > cr[A_DPO]
        ):
            return CTS.EXCEEDS_DEBITS, 0

        # Valid: apply.
        undo = self._undo
        if undo is not None:
            undo.append((U_ACCOUNT, dr, tuple(dr[:A_MUTABLE])))
            undo.append((U_ACCOUNT, cr, tuple(cr[:A_MUTABLE])))
        if pending:
            dr[A_DP] += amount
            cr[A_CP] += amount
        else:
            dr[A_DPO] += amount
            cr[A_CPO] += amount
        if flags & TF_CLOSING_DEBIT:
            _set_account_flags(dr, dr[A_FLAGS] | AF_CLOSED)
        if flags & TF_CLOSING_CREDIT:
            _set_account_flags(cr, cr[A_FLAGS] | AF_CLOSED)
        row = self._append_transfer(
            tid, dr, cr, amount, 0, ud128, ud64, ud32, timeout, ledger, code, flags, ts
        )
        if pending:
            self._pending_status[row] = P_PENDING
            if undo is not None:
                undo.append((U_PENDING, row, None))
            if timeout:
                heapq.heappush(self._expiry_heap, (ts + timeout * NS_PER_S, ts, row))
        return CTS.CREATED, ts

    def _imported_regresses(self, ts: int) -> bool:
        """An imported transfer must be newer than every transfer and not share an account's
        timestamp."""
        t_ts = self._t_ts
        return bool(t_ts and ts <= t_ts[-1]) or sorted_contains(self._account_ts, ts)

    def _post_or_void(self, v: TransferRow, flags: int, ts: int) -> CTS:
        tid, dr_id, cr_id, amount, pending_id, ud128, ud64, ud32, timeout, ledger, code, _, _ = v
        if flags & TF_POST and flags & TF_VOID:
            return CTS.FLAGS_ARE_MUTUALLY_EXCLUSIVE
        if flags & TF_EXCLUSIVE_WITH_POST_OR_VOID:
            return CTS.FLAGS_ARE_MUTUALLY_EXCLUSIVE
        if pending_id == 0:
            return CTS.PENDING_ID_MUST_NOT_BE_ZERO
        if pending_id == U128_MAX:
            return CTS.PENDING_ID_MUST_NOT_BE_INT_MAX
        if pending_id == tid:
            return CTS.PENDING_ID_MUST_BE_DIFFERENT
        if timeout != 0:
            return CTS.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
        p_row = self._tx_index.get(pending_id)
        if p_row is None or p_row == ID_ORPHAN:
            return CTS.PENDING_TRANSFER_NOT_FOUND
        p_flags = self._t_flags[p_row]
        if not p_flags & TF_PENDING:
            return CTS.PENDING_TRANSFER_NOT_PENDING
        p_dr_id = self._t_dr[p_row]
        p_cr_id = self._t_cr[p_row]
        p_ledger = self._t_ledger[p_row]
        p_code = self._t_code[p_row]
        p_amount = self._t_amount[p_row]
        if dr_id != 0 and dr_id != p_dr_id:
            return CTS.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID
        if cr_id != 0 and cr_id != p_cr_id:
            return CTS.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID
        if ledger != 0 and ledger != p_ledger:
            return CTS.PENDING_TRANSFER_HAS_DIFFERENT_LEDGER
        if code != 0 and code != p_code:
            return CTS.PENDING_TRANSFER_HAS_DIFFERENT_CODE

        void = bool(flags & TF_VOID)
        if void:
            amount = amount or p_amount
        elif amount == U128_MAX:
            amount = p_amount
        if amount > p_amount:
            return CTS.EXCEEDS_PENDING_TRANSFER_AMOUNT
        if void and amount < p_amount:
            return CTS.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT

        p_status = self._pending_status[p_row]
        if p_status == P_POSTED:
            return CTS.PENDING_TRANSFER_ALREADY_POSTED
        if p_status == P_VOIDED:
            return CTS.PENDING_TRANSFER_ALREADY_VOIDED
        if p_status == P_EXPIRED:
            return CTS.PENDING_TRANSFER_EXPIRED
        p_timeout = self._t_timeout[p_row]
        if p_timeout != 0 and self._t_ts[p_row] + p_timeout * NS_PER_S <= ts:
            return CTS.PENDING_TRANSFER_EXPIRED
        if flags & TF_IMPORTED and self._imported_regresses(ts):
            return CTS.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS
        dr = self._accounts[p_dr_id]
        cr = self._accounts[p_cr_id]
        if not void:
            # The only movement allowed on a closed account is voiding a pending transfer.
            if dr[A_FLAGS] & AF_CLOSED:
                return CTS.DEBIT_ACCOUNT_ALREADY_CLOSED
            if cr[A_FLAGS] & AF_CLOSED:
                return CTS.CREDIT_ACCOUNT_ALREADY_CLOSED

        undo = self._undo
        if undo is not None:
            undo.append((U_ACCOUNT, dr, tuple(dr[:A_MUTABLE])))
            undo.append((U_ACCOUNT, cr, tuple(cr[:A_MUTABLE])))
            undo.append((U_PENDING, p_row, p_status))
        self._pending_status[p_row] = P_VOIDED if void else P_POSTED
        dr[A_DP] -= p_amount
        cr[A_CP] -= p_amount
        if void:
            if p_flags & TF_CLOSING_DEBIT:
                _set_account_flags(dr, dr[A_FLAGS] & ~AF_CLOSED)
            if p_flags & TF_CLOSING_CREDIT:
                _set_account_flags(cr, cr[A_FLAGS] & ~AF_CLOSED)
        else:
            dr[A_DPO] += amount
            cr[A_CPO] += amount
        # Zero user data is inherited from the pending transfer.
        self._append_transfer(
            tid, dr, cr, amount, pending_id,
            ud128 or self._t_ud128[p_row], ud64 or self._t_ud64[p_row],
            ud32 or self._t_ud32[p_row], 0, p_ledger, p_code, flags, ts,
        )
        return CTS.CREATED

    def _append_transfer(
        self, tid: int, dr: list[Any], cr: list[Any], amount: int, pending_id: int,
        ud128: int, ud64: int, ud32: int, timeout: int, ledger: int, code: int, flags: int,
        ts: int,
    ) -> int:
        assert not self._staged
        row = len(self._t_id)
        tid = int(tid)
        self._tx_index[tid] = row
        self._t_id.append(tid)
        self._t_dr.append(dr[A_ID])
        self._t_cr.append(cr[A_ID])
        self._t_amount.append(int(amount))
        self._t_pending_id.append(int(pending_id))
        self._t_ud128.append(int(ud128))
        self._t_ud64.append(ud64)
        self._t_ud32.append(ud32)
        self._t_timeout.append(timeout)
        self._t_ledger.append(ledger)
        self._t_code.append(code)
        self._t_flags.append(flags)
        self._t_ts.append(ts)
        dr[A_ROWS].append(row)
        cr[A_ROWS].append(row)
        if dr[A_SNAPS] is not None:
            _snapshot(dr)
        if cr[A_SNAPS] is not None:
            _snapshot(cr)
        return row

    def _transfer_exists(self, v: TransferRow, flags: int, row: int) -> CTS:
        _, dr_id, cr_id, amount, pending_id, ud128, ud64, ud32, timeout, ledger, code, _, _ = v
        if flags != self._t_flags[row]:
            return CTS.EXISTS_WITH_DIFFERENT_FLAGS
        if pending_id != self._t_pending_id[row]:
            return CTS.EXISTS_WITH_DIFFERENT_PENDING_ID
        if timeout != self._t_timeout[row]:
            return CTS.EXISTS_WITH_DIFFERENT_TIMEOUT
        if flags & TF_POST_OR_VOID:
            return self._post_or_void_exists(v, flags, row, self._tx_index[pending_id])
        if dr_id != self._t_dr[row]:
            return CTS.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID
        if cr_id != self._t_cr[row]:
            return CTS.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID
        e_amount = self._t_amount[row]
        if flags & TF_BALANCING:
            # A re-sent balancing transfer may ask for more than was actually moved.
            if amount < e_amount:
                return CTS.EXISTS_WITH_DIFFERENT_AMOUNT
        elif amount != e_amount:
            return CTS.EXISTS_WITH_DIFFERENT_AMOUNT
        if ud128 != self._t_ud128[row]:
            return CTS.EXISTS_WITH_DIFFERENT_USER_DATA_128
        if ud64 != self._t_ud64[row]:
            return CTS.EXISTS_WITH_DIFFERENT_USER_DATA_64
        if ud32 != self._t_ud32[row]:
            return CTS.EXISTS_WITH_DIFFERENT_USER_DATA_32
        if ledger != self._t_ledger[row]:
            return CTS.EXISTS_WITH_DIFFERENT_LEDGER
        if code != self._t_code[row]:
            return CTS.EXISTS_WITH_DIFFERENT_CODE
        return CTS.EXISTS

    def _post_or_void_exists(self, v: TransferRow, flags: int, row: int, p_row: int) -> CTS:
        """Exists check of a post/void: zero fields mean "inherited from the pending"."""
        assert p_row >= 0
        _, dr_id, cr_id, amount, _, ud128, ud64, ud32, _, ledger, code, _, _ = v
        if dr_id != 0 and dr_id != self._t_dr[row]:
            return CTS.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID
        if cr_id != 0 and cr_id != self._t_cr[row]:
            return CTS.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID
        e_amount = self._t_amount[row]
        p_amount = self._t_amount[p_row]
        inherits_amount = amount == 0 if flags & TF_VOID else amount == U128_MAX
        if (e_amount != p_amount) if inherits_amount else (amount != e_amount):
            return CTS.EXISTS_WITH_DIFFERENT_AMOUNT
        for given, column, status in (
            (ud128, self._t_ud128, CTS.EXISTS_WITH_DIFFERENT_USER_DATA_128),
            (ud64, self._t_ud64, CTS.EXISTS_WITH_DIFFERENT_USER_DATA_64),
            (ud32, self._t_ud32, CTS.EXISTS_WITH_DIFFERENT_USER_DATA_32),
        ):
            stored = column[row]
            if (stored != column[p_row]) if given == 0 else (given != stored):
                return status
        if ledger != 0 and ledger != self._t_ledger[row]:
            return CTS.EXISTS_WITH_DIFFERENT_LEDGER
        if code != 0 and code != self._t_code[row]:
            return CTS.EXISTS_WITH_DIFFERENT_CODE
        return CTS.EXISTS

    def _rollback_transfers(self, mark: int) -> None:
        """Undo everything a broken chain did since ``mark`` (the row count at its start)."""
        assert not self._staged
        undo = self._undo
        assert undo is not None
        for entry in reversed(undo):
            if entry[0] == U_ACCOUNT:
                entry[1][:A_MUTABLE] = entry[2]
            elif entry[2] is None:
                del self._pending_status[entry[1]]
            else:
                self._pending_status[entry[1]] = entry[2]
        undo.clear()
        for row in range(len(self._t_id) - 1, mark - 1, -1):
            for account_id in (self._t_dr[row], self._t_cr[row]):
                record = self._accounts[account_id]
                assert record[A_ROWS][-1] == row
                record[A_ROWS].pop()
                if record[A_SNAPS] is not None:
                    del record[A_SNAPS][-4:]
            del self._tx_index[self._t_id[row]]
        for column in self._columns:
            del column[mark:]

    # -----------------------------------------------------------------------------------------
    # Lookups
    # -----------------------------------------------------------------------------------------

    def lookup_accounts(self, ids: list[int]) -> list[tb.Account]:
        # The raw rows are GC-tracked lists too: pause for both steps.
        return build_without_gc(
            len(ids), lambda: list(starmap(tb.Account, self.lookup_accounts_raw(ids))))

    def lookup_accounts_raw(self, ids: list[int]) -> list[list[Any]]:
        """Like ``lookup_accounts``, each row a fresh list of tb.Account's 12 field values in
        declaration order (flags as ``tb.AccountFlags``)."""
        keys = lookup_keys(ids)
        self._begin_read()
        check_batch_size(len(keys))
        get = self._accounts.get
        return [a[:A_PUBLIC] for a in map(get, keys) if a is not None]

    def lookup_accounts_rows(self, ids: Sequence[int]) -> tuple[bytes, int]:
        """(the found accounts as TigerBeetle's 128-byte rows in request order, how many),
        for the server. ``ids`` must be u128 ints (a wire decoder's are by construction):
        they are not wrapped or type-checked like ``lookup_accounts`` does."""
        self._begin_read()
        check_batch_size(len(ids))
        stale = self._stale_rows
        if stale:
            wanted = stale.intersection(ids)
            self._pack_rows(wanted)
            stale -= wanted
        # Rows are non-empty bytes (truthy), so filter(None) drops exactly the misses.
        found = list(filter(None, map(self._rows.get, ids)))
        return b"".join(found), len(found)

    def lookup_transfers(self, ids: list[int]) -> list[tb.Transfer]:
        return build_without_gc(
            len(ids), lambda: list(starmap(tb.Transfer, self.lookup_transfers_raw(ids))))

    def lookup_transfers_raw(self, ids: list[int]) -> list[tuple[Any, ...]]:
        """Like ``lookup_transfers``, each row a tuple of tb.Transfer's 13 field values in
        declaration order (flags as ``tb.TransferFlags``)."""
        keys = lookup_keys(ids)
        self._begin_read()
        check_batch_size(len(keys))
        get = self._tx_index.get
        return self._transfer_rows([r for r in map(get, keys) if r is not None and r >= 0])

    def _transfer_rows(self, rows: Iterable[int]) -> list[tuple[Any, ...]]:
        t_id, t_dr, t_cr, t_amount = self._t_id, self._t_dr, self._t_cr, self._t_amount
        t_pid, t_ud128, t_ud64, t_ud32 = (
            self._t_pending_id, self._t_ud128, self._t_ud64, self._t_ud32,
        )
        t_timeout, t_ledger, t_code, t_flags, t_ts = (
            self._t_timeout, self._t_ledger, self._t_code, self._t_flags, self._t_ts,
        )
        flag = TRANSFER_FLAGS.get
        return [
            (
                t_id[r], t_dr[r], t_cr[r], t_amount[r], t_pid[r], t_ud128[r], t_ud64[r],
                t_ud32[r], t_timeout[r], t_ledger[r], t_code[r], flag(t_flags[r]), t_ts[r],
            )
            for r in rows
        ]

    # -----------------------------------------------------------------------------------------
    # Account history
    # -----------------------------------------------------------------------------------------

    def get_account_transfers(self, f: tb.AccountFilter) -> list[tb.Transfer]:
        positions = self._scan_account(f, need_history=False)
        if not positions:
            return []
        account_rows = self._accounts[f.account_id][A_ROWS]
        return build_without_gc(len(positions), lambda: list(starmap(
            tb.Transfer, self._transfer_rows(account_rows[p] for p in positions))))

    def get_account_balances(self, f: tb.AccountFilter) -> list[tb.AccountBalance]:
        positions = self._scan_account(f, need_history=True)
        if not positions:
            return []
        record = self._accounts[f.account_id]
        rows: array[int] = record[A_ROWS]
        snaps: array[int] | list[int] = record[A_SNAPS]
        t_ts = self._t_ts
        out: list[tb.AccountBalance] = []
        for p in positions:
            dp, dpo, cp, cpo = snaps[4 * p : 4 * p + 4]
            out.append(tb.AccountBalance(dp, dpo, cp, cpo, t_ts[rows[p]]))
        return out

    def _scan_account(self, f: tb.AccountFilter, need_history: bool) -> list[int]:
        """Positions in the account's row list matching the filter, in result order."""
        validate_account_filter(f)
        self._begin_read()
        check_batch_size(f.limit)
        flags = int(f.flags) & 0xFFFF_FFFF
        account_id = f.account_id
        if (
            account_id == 0
            or account_id == U128_MAX
            or f.limit == 0
            or not flags & (FF_DEBITS | FF_CREDITS)
            or flags & ~FF_KNOWN
        ):
            return []
        bounds = timestamp_bounds(f.timestamp_min, f.timestamp_max)
        if bounds is None:
            return []
        record = self._accounts.get(account_id)
        if record is None or (need_history and not record[A_FLAGS] & AF_HISTORY):
            return []
        rows: array[int] = record[A_ROWS]
        t_ts = self._t_ts
        pos_lo = bisect_left(rows, bisect_left(t_ts, bounds[0]))
        pos_hi = bisect_left(rows, bisect_right(t_ts, bounds[1]))
        span = range(pos_hi - 1, pos_lo - 1, -1) if flags & FF_REVERSED else range(pos_lo, pos_hi)

        want_debits = bool(flags & FF_DEBITS)
        want_credits = bool(flags & FF_CREDITS)
        ud128, ud64, ud32, code = f.user_data_128, f.user_data_64, f.user_data_32, f.code
        t_dr, t_ud128, t_ud64, t_ud32, t_code = (
            self._t_dr, self._t_ud128, self._t_ud64, self._t_ud32, self._t_code,
        )
        limit = f.limit
        out: list[int] = []
        for p in span:
            r = rows[p]
            if not (want_debits if t_dr[r] == account_id else want_credits):
                continue
            if (
                (ud128 and t_ud128[r] != ud128)
                or (ud64 and t_ud64[r] != ud64)
                or (ud32 and t_ud32[r] != ud32)
                or (code and t_code[r] != code)
            ):
                continue
            out.append(p)
            if len(out) >= limit:
                break
        return out

    # -----------------------------------------------------------------------------------------
    # Queries
    # -----------------------------------------------------------------------------------------

    def query_accounts(self, f: tb.QueryFilter) -> list[tb.Account]:
        bounds = self._query_bounds(f)
        if bounds is None:
            return []
        order = self._account_order
        lo = bisect_left(self._account_ts, bounds[0])
        hi = bisect_right(self._account_ts, bounds[1])
        span = range(hi - 1, lo - 1, -1) if int(f.flags) & QF_REVERSED else range(lo, hi)
        ud128, ud64, ud32, ledger, code = (
            f.user_data_128, f.user_data_64, f.user_data_32, f.ledger, f.code,
        )
        limit = f.limit
        out: list[tb.Account] = []
        for i in span:
            a = order[i]
            if (
                (ud128 and a[A_UD128] != ud128)
                or (ud64 and a[A_UD64] != ud64)
                or (ud32 and a[A_UD32] != ud32)
                or (ledger and a[A_LEDGER] != ledger)
                or (code and a[A_CODE] != code)
            ):
                continue
            out.append(tb.Account(*a[:A_PUBLIC]))
            if len(out) >= limit:
                break
        return out

    def query_transfers(self, f: tb.QueryFilter) -> list[tb.Transfer]:
        bounds = self._query_bounds(f)
        if bounds is None:
            return []
        t_ts = self._t_ts
        lo = bisect_left(t_ts, bounds[0])
        hi = bisect_right(t_ts, bounds[1])
        span = range(hi - 1, lo - 1, -1) if int(f.flags) & QF_REVERSED else range(lo, hi)
        ud128, ud64, ud32, ledger, code = (
            f.user_data_128, f.user_data_64, f.user_data_32, f.ledger, f.code,
        )
        t_ud128, t_ud64, t_ud32, t_ledger, t_code = (
            self._t_ud128, self._t_ud64, self._t_ud32, self._t_ledger, self._t_code,
        )
        limit = f.limit
        rows: list[int] = []
        for r in span:
            if (
                (ud128 and t_ud128[r] != ud128)
                or (ud64 and t_ud64[r] != ud64)
                or (ud32 and t_ud32[r] != ud32)
                or (ledger and t_ledger[r] != ledger)
                or (code and t_code[r] != code)
            ):
                continue
            rows.append(r)
            if len(rows) >= limit:
                break
        return build_without_gc(
            len(rows), lambda: list(starmap(tb.Transfer, self._transfer_rows(rows))))

    def _query_bounds(self, f: tb.QueryFilter) -> tuple[int, int] | None:
        validate_query_filter(f)
        self._begin_read()
        check_batch_size(f.limit)
        flags = int(f.flags) & 0xFFFF_FFFF
        if f.limit == 0 or flags & ~QF_KNOWN:
            return None
        return timestamp_bounds(f.timestamp_min, f.timestamp_max)

    # -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Like the real client: later calls raise ``tb.ClientClosedError``."""
        self._closed = True


def make_engine() -> Engine:
    """Factory for ``replay.py --engine tb_emulator.engine:make_engine``."""
    return Engine()


def _snapshot(record: list[Any]) -> None:
    """Append the account's balances to its history (HISTORY accounts only)."""
    snaps = record[A_SNAPS]
    balances = record[A_DP : A_CPO + 1]
    try:
        snaps.extend(balances)
    except OverflowError:
        # Over 64 bits: fall back to a list of ints (array.extend may have appended a prefix).
        del snaps[len(snaps) - len(snaps) % 4 :]
        record[A_SNAPS] = [*snaps, *balances]


def _set_account_flags(record: list[Any], flags: int) -> None:
    record[A_FLAGS] = flags
    record[A_FLAGS_ENUM] = ACCOUNT_FLAGS.get(flags)


def _batch_precheck(
    *, linked: bool, imported: bool, last: bool, chain_broken: bool,
    imported_batch: bool, ts_in: int, batch_ts: int,
) -> str | None:
    """The checks every create event passes first, accounts and transfers alike, in the real
    server's order; the name of the failing status (same name in both enums) or None."""
    if linked and last:
        return "LINKED_EVENT_CHAIN_OPEN"
    if chain_broken:
        return "LINKED_EVENT_FAILED"
    if imported != imported_batch:
        return "IMPORTED_EVENT_NOT_EXPECTED" if imported else "IMPORTED_EVENT_EXPECTED"
    if imported_batch and not 1 <= ts_in <= TIMESTAMP_MAX:
        return "IMPORTED_EVENT_TIMESTAMP_OUT_OF_RANGE"
    if imported_batch and ts_in >= batch_ts:
        return "IMPORTED_EVENT_TIMESTAMP_MUST_NOT_ADVANCE"
    if not imported_batch and ts_in != 0:
        return "TIMESTAMP_MUST_BE_ZERO"
    return None
