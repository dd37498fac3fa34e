"""The credit terminal's pure domain: chart of accounts, routing, ids, checks, journal, chain.

No servers: walletcore only (plus the tigerbeetle package's enums, to pin the copied flags).
Property tests cover the double-entry invariant (any set of balanced entries leaves a zero
trial balance) and the hash chain (it verifies, and any change to any entry is detected).
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from tigerbeetle import AccountFlags, TransferFlags

from walletcore import ids as wallet_ids
from walletcore.clearing import (
    DEFAULT_CLEARING_TABLE,
    FINAL_STATES,
    TRANSFER_FLAG_PENDING,
    TRANSFER_FLAG_POST_PENDING,
    TRANSFER_FLAG_VOID_PENDING,
    TRANSITIONS,
    CheckName,
    ClearingState,
    ClearingTable,
    DefaultKind,
    ExternalTransaction,
    KindLimits,
    Route,
    ancestors_of,
    check_transition,
    external_ref,
    parse_external,
    pending_spec,
    pending_transfer_id,
    post_spec,
    post_transfer_id,
    settlement_entry,
    sources_of,
    void_spec,
    void_transfer_id,
)
from walletcore.clearing_checks import (
    CheckContext,
    CheckReason,
    VelocityWindow,
    check_account_status,
    check_amount_limits,
    check_blocked_counterparty,
    check_duplicate_reference,
    check_velocity,
    needs_of,
    normalized_party,
    reference_key,
    run_checks,
    velocity_key,
)
from walletcore.codes import SystemAccount
from walletcore.errors import (
    ConflictError,
    InvalidAmountError,
    InvalidInputError,
    UnknownCurrencyError,
)
from walletcore.gl_chart import (
    DEFAULT_CHART,
    FLAG_CREDITS_MUST_NOT_EXCEED_DEBITS,
    AccountStatus,
    AccountType,
    ChartOfAccounts,
    GLAccount,
    NormalBalance,
)
from walletcore.journal import (
    GENESIS_HASH,
    INT64_MAX,
    AccountBalance,
    ChainHead,
    JournalEntry,
    JournalLine,
    balance_deltas,
    extend_chain,
    trial_balance,
    verify_segment,
)
from walletcore.keys import WalletKey
from walletcore.ledgers import DEFAULT_LEDGERS
from walletcore.reconcile import FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS, FLAG_HISTORY

TABLE = DEFAULT_CLEARING_TABLE
CHART = DEFAULT_CHART
TS = 1_700_000_000_123_456_789  # a TigerBeetle timestamp (ns)


def txn(external_id: str = "ext-1", **overrides: Any) -> ExternalTransaction:
    fields: dict[str, Any] = {
        "external_id": external_id, "kind": "ach_credit_in", "amount": Decimal("100.00"),
        "currency": "USD", "counterparty": "bank-1", "reference": None,
    }
    fields.update(overrides)
    return ExternalTransaction(**fields)


# ---- chart of accounts ----------------------------------------------------------------------


def test_default_chart_has_the_plans_accounts() -> None:
    names = {a.number: a.name for a in CHART.accounts}
    assert names[1000] == "Cash-ODFI-LLC" and names[1010] == "Cash-Vault-USDC"
    assert names[1050] == "ACH-Settlement-Account" and names[1060] == "Stripe-Clearing-Account"
    assert names[2100] == "ACH-Clearing-LLC" and names[2180] == "Direct-Deposit-Liabilities"
    assert names[2300] == "AP" and names[4000] == "Token-Realization-Gain/Loss"
    assert names[6000] == "Payroll-Expense" and names[6100] == "Ops-Expense"
    assert CHART.account(1000).normal_balance is NormalBalance.DEBIT
    assert CHART.account(2180).normal_balance is NormalBalance.CREDIT
    assert CHART.account(4000).type is AccountType.INCOME
    assert CHART.account(6000).normal_balance is NormalBalance.DEBIT


def test_mirror_accounts_are_distinct_valid_and_carry_the_gl_number() -> None:
    mirrors = CHART.mirrors()
    assert len(mirrors) == sum(len(a.currencies) for a in CHART.accounts)
    assert len({m.id for m in mirrors}) == len(mirrors)
    wallet_like = {
        wallet_ids.system_account_id(ledger, account)
        for ledger in [*DEFAULT_LEDGERS.values(), 100, 101]
        for account in SystemAccount
    }
    wallet_like.add(wallet_ids.account_id(WalletKey(client_id="c", country="USA",
                                                    currency="USD")))
    for mirror in mirrors:
        assert 0 < mirror.id < 2**128 - 1
        assert mirror.id not in wallet_like
        assert mirror.code == mirror.gl_number
        assert mirror.ledger == CHART.ledger_of(mirror.currency) >= 100
        assert CHART.mirror_by_id(mirror.id) == mirror
        assert mirror.flags & FLAG_HISTORY
    assert CHART.mirror(1000, "USD").id == CHART.mirror(1000, "USD").id  # deterministic


def test_limit_flags_follow_the_account_type() -> None:
    assert CHART.mirror(1000, "USD").flags & FLAG_CREDITS_MUST_NOT_EXCEED_DEBITS
    assert CHART.mirror(2180, "USDC").flags & FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS
    assert CHART.mirror(3000, "USD").flags & FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS
    for number in (4000, 6000, 6100):
        flags = CHART.mirror(number, "USD").flags
        limits = FLAG_CREDITS_MUST_NOT_EXCEED_DEBITS | FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS
        assert not flags & limits
    limited = GLAccount(number=6200, name="x", type=AccountType.EXPENSE, currencies=("USD",),
                        balance_limit=True)
    assert limited.limit_flags == FLAG_CREDITS_MUST_NOT_EXCEED_DEBITS
    unlimited = GLAccount(number=1999, name="y", type=AccountType.ASSET, currencies=("USD",),
                          balance_limit=False)
    assert unlimited.limit_flags == 0


def test_copied_flag_values_equal_the_clients_enums() -> None:
    assert AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS == FLAG_CREDITS_MUST_NOT_EXCEED_DEBITS
    assert TransferFlags.PENDING == TRANSFER_FLAG_PENDING
    assert TransferFlags.POST_PENDING_TRANSFER == TRANSFER_FLAG_POST_PENDING
    assert TransferFlags.VOID_PENDING_TRANSFER == TRANSFER_FLAG_VOID_PENDING


def test_chart_lookups_name_the_field_at_fault() -> None:
    with pytest.raises(InvalidInputError) as unknown:
        CHART.account(9999)
    assert unknown.value.field == "account"
    with pytest.raises(UnknownCurrencyError) as currency:
        CHART.ledger_of("EUR")
    assert currency.value.field == "currency"
    with pytest.raises(InvalidInputError) as not_carried:
        CHART.mirror(1010, "USD")  # the USDC vault carries no dollars
    assert not_carried.value.field == "currency"


@pytest.mark.parametrize("change", ["duplicate_number", "duplicate_name", "low_ledger",
                                    "no_ledger", "same_ledger"])
def test_chart_validation(change: str) -> None:
    accounts = list(CHART.accounts)
    ledgers = dict(CHART.ledgers)
    if change == "duplicate_number":
        accounts.append(accounts[0].model_copy(update={"name": "Other"}))
    elif change == "duplicate_name":
        accounts.append(accounts[0].model_copy(update={"number": 1999}))
    elif change == "low_ledger":
        ledgers["USD"] = 5
    elif change == "no_ledger":
        accounts.append(GLAccount(number=1999, name="Euro", type=AccountType.ASSET,
                                  currencies=("EUR",)))
    else:
        ledgers["USDC"] = ledgers["USD"]
    with pytest.raises(ValidationError):
        ChartOfAccounts(accounts=tuple(accounts), ledgers=ledgers)


def test_with_status_changes_one_account() -> None:
    frozen = CHART.with_status(2180, AccountStatus.FROZEN)
    assert frozen.account(2180).status is AccountStatus.FROZEN
    assert CHART.account(2180).status is AccountStatus.OPEN
    assert frozen.mirrors() == CHART.mirrors()


# ---- routing and external transactions -------------------------------------------------------


def test_every_default_kind_routes_between_two_chart_accounts() -> None:
    for kind in DefaultKind:
        route = TABLE.route(kind.value)
        for currency in route.currencies:
            sample = txn(kind=kind.value, currency=currency, amount=Decimal("1"))
            spec = pending_spec(sample, TABLE)
            assert spec.debit_account_id == CHART.mirror(route.debit_account, currency).id
            assert spec.credit_account_id == CHART.mirror(route.credit_account, currency).id
            assert spec.code == route.code >= 2000
            assert spec.timeout_s == route.pending_timeout_s > 0
    assert len({r.code for r in TABLE.routes}) == len(TABLE.routes)


def test_unknown_kind_currency_and_bad_amounts_name_their_field() -> None:
    with pytest.raises(InvalidInputError) as kind:
        TABLE.route_for(txn(kind="wire_in"))
    assert kind.value.field == "kind"
    with pytest.raises(InvalidInputError) as wrong_currency:
        TABLE.route_for(txn(currency="USDC", amount=Decimal("1")))
    assert wrong_currency.value.field == "currency"
    with pytest.raises(UnknownCurrencyError) as unknown_currency:
        txn(currency="XYZ")
    assert unknown_currency.value.field == "currency"
    with pytest.raises(UnknownCurrencyError) as no_ledger:
        TABLE.route_for(txn(currency="EUR"))
    assert no_ledger.value.field == "currency"
    with pytest.raises(InvalidAmountError) as decimals:
        txn(amount=Decimal("1.001"))
    assert decimals.value.field == "amount"
    for bad in ("0", "-1"):
        with pytest.raises(InvalidAmountError):
            txn(amount=Decimal(bad))
    with pytest.raises(InvalidAmountError) as nan:
        parse_external({"external_id": "e", "kind": "ach_credit_in", "amount": "NaN",
                        "currency": "USD", "counterparty": "b"})
    assert nan.value.field == "amount"
    with pytest.raises(InvalidAmountError) as too_big:
        txn(amount=Decimal(INT64_MAX + 1) / 100)
    assert too_big.value.field == "amount"


def test_parse_external_reports_the_field() -> None:
    with pytest.raises(InvalidInputError) as missing:
        parse_external({"external_id": "e", "kind": "ach_credit_in", "amount": "1",
                        "currency": "USD"})
    assert missing.value.field == "counterparty"
    with pytest.raises(InvalidAmountError) as floating:
        parse_external({"external_id": "e", "kind": "ach_credit_in", "amount": 0.1,
                        "currency": "USD", "counterparty": "b"})
    assert floating.value.field == "amount"
    parsed = parse_external({"external_id": "e", "kind": "ach_credit_in", "amount": "1.5",
                             "currency": "USD", "counterparty": "b"})
    assert parsed.amount_minor == 150


def test_fingerprint_is_about_content() -> None:
    base = txn()
    assert base.fingerprint == txn(amount=Decimal("100")).fingerprint  # 100 == 100.00
    assert base.fingerprint != txn(counterparty="bank-2").fingerprint
    assert base.fingerprint != txn(amount=Decimal("100.01")).fingerprint
    assert base.fingerprint != txn(reference="r").fingerprint
    micro = datetime(2024, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)
    stored = txn(occurred_at=micro)
    assert stored.occurred_at == micro.replace(microsecond=678_000)  # BSON keeps ms
    naive = txn(occurred_at=micro.replace(tzinfo=None))
    assert naive.fingerprint == stored.fingerprint


def test_transfer_ids_are_derived_and_distinct() -> None:
    derived = [pending_transfer_id("x"), post_transfer_id("x"), void_transfer_id("x"),
               external_ref("x"), wallet_ids.transfer_id("x"), wallet_ids.void_transfer_id("x")]
    assert len(set(derived)) == len(derived)
    assert pending_transfer_id("x") == pending_transfer_id("x") != pending_transfer_id("y")
    sample = txn("x")
    pending, post, void = (f(sample, TABLE) for f in (pending_spec, post_spec, void_spec))
    assert pending.flags == TRANSFER_FLAG_PENDING and pending.pending_id == 0
    assert post.flags == TRANSFER_FLAG_POST_PENDING and post.pending_id == pending.id
    assert void.flags == TRANSFER_FLAG_VOID_PENDING and void.pending_id == pending.id
    assert post.id == post_transfer_id("x") and void.id == void_transfer_id("x")
    assert pending.amount == post.amount == void.amount == 10_000
    assert post.timeout_s == void.timeout_s == 0


def test_settlement_entry_mirrors_the_post_transfer() -> None:
    sample = txn("x", kind="usdc_vault_withdrawal", currency="USDC", amount=Decimal("2.5"))
    entry = settlement_entry(sample, TABLE, TS)
    route = TABLE.route("usdc_vault_withdrawal")
    assert entry.transfer_id == post_transfer_id("x")
    assert entry.entry_id == f"{post_transfer_id('x'):032x}"
    assert entry.code == route.code and entry.kind == route.kind and entry.external_id == "x"
    assert [(ln.account, ln.debit_minor, ln.credit_minor) for ln in entry.lines] == [
        (2180, 2_500_000, 0), (1010, 0, 2_500_000)]
    assert entry.posted_at == datetime(2023, 11, 14, 22, 13, 20, 123_000, tzinfo=UTC)


def test_route_validation() -> None:
    limits = {"USD": KindLimits(amount_min=Decimal("1"), amount_max=Decimal("2"),
                                velocity_count_max=1, velocity_amount_max=Decimal("2"))}
    ok = Route(kind="k", code=3000, debit_account=1000, credit_account=3000,
               pending_timeout_s=1, limits=limits)
    ClearingTable(routes=(ok,))
    for bad in (
        ok.model_copy(update={"credit_account": 1000}),  # same account twice
        ok.model_copy(update={"debit_account": 1010}),  # USDC vault has no USD
        ok.model_copy(update={"limits": {"USD": limits["USD"].model_copy(
            update={"amount_min": Decimal("3")})}}),
        ok.model_copy(update={"limits": {"USD": limits["USD"].model_copy(
            update={"amount_max": Decimal("2.001")})}}),
    ):
        with pytest.raises((ValidationError, InvalidInputError, InvalidAmountError)):
            ClearingTable(routes=(bad,))
    with pytest.raises(ValidationError):
        ClearingTable(routes=(ok, ok.model_copy(update={"kind": "k2"})))  # same code


# ---- states ---------------------------------------------------------------------------------


def test_states_only_move_forward() -> None:
    order = [ClearingState.RECEIVED, ClearingState.PENDING, ClearingState.POSTED,
             ClearingState.SETTLED]
    for earlier, later in itertools.pairwise(order):
        check_transition("e", earlier, later)
        with pytest.raises(ConflictError) as back:
            check_transition("e", later, earlier)
        assert back.value.field == "external_id"
    for final in FINAL_STATES:
        assert not TRANSITIONS[final]
    assert sources_of(ClearingState.REJECTED) == {
        ClearingState.RECEIVED, ClearingState.VOIDED, ClearingState.EXPIRED}
    with pytest.raises(ConflictError):
        check_transition("e", ClearingState.VOIDED, ClearingState.POSTED)
    # Forward jumps along a path are allowed, across branches they are not.
    check_transition("e", ClearingState.RECEIVED, ClearingState.SETTLED)
    assert ancestors_of(ClearingState.SETTLED) == {
        ClearingState.RECEIVED, ClearingState.PENDING, ClearingState.POSTED}
    for other_branch in (ClearingState.VOIDED, ClearingState.EXPIRED, ClearingState.REJECTED):
        with pytest.raises(ConflictError):
            check_transition("e", other_branch, ClearingState.SETTLED)
    with pytest.raises(ConflictError):
        check_transition("e", ClearingState.SETTLED, ClearingState.SETTLED)


# ---- checks ---------------------------------------------------------------------------------


def test_single_checks() -> None:
    limits = TABLE.limits("ach_credit_in", "USD")
    assert check_amount_limits(1, limits) is None  # 0.01 USD is the minimum
    assert check_amount_limits(limits.amount_max + 1, limits) is CheckReason.AMOUNT_ABOVE_MAX
    full = VelocityWindow(count=limits.velocity_count_max, amount_minor=0)
    assert check_velocity(1, full, limits) is CheckReason.VELOCITY_COUNT
    rich = VelocityWindow(count=0, amount_minor=limits.velocity_amount_max)
    assert check_velocity(1, rich, limits) is CheckReason.VELOCITY_AMOUNT
    assert check_velocity(1, VelocityWindow(), limits) is None
    blocked = {normalized_party(" Mallory ")}
    assert check_blocked_counterparty("MALLORY", blocked) is CheckReason.BLOCKED_COUNTERPARTY
    assert check_blocked_counterparty("alice", blocked) is None
    route = TABLE.route("ach_credit_in")
    assert check_account_status(route, {}) is None
    assert check_account_status(route, {2180: AccountStatus.FROZEN}) is CheckReason.ACCOUNT_FROZEN
    assert check_account_status(
        route, {1050: AccountStatus.FROZEN, 2180: AccountStatus.CLOSED}
    ) is CheckReason.ACCOUNT_CLOSED
    assert check_duplicate_reference("b", ["a", "b"], set()) is CheckReason.DUPLICATE_REFERENCE
    assert check_duplicate_reference("b", ["a", "b"], {"a"}) is None
    assert check_duplicate_reference("a", ["a", "b"], set()) is None


def test_run_checks_over_a_batch_in_order() -> None:
    limits = TABLE.limits("ach_credit_in", "USD")
    near = VelocityWindow(count=limits.velocity_count_max - 1, amount_minor=0)
    batch = [
        txn("a1", counterparty="busy"),  # takes the last velocity slot
        txn("a2", counterparty="busy"),  # over the count
        txn("b1", counterparty="mallory"),
        txn("c1", counterparty="c", reference="R1"),
        txn("c2", counterparty="c", reference="R1"),  # duplicate of c1
        txn("d1", counterparty="d", amount=Decimal("25000.01")),
        txn("e1", counterparty="e", kind="payroll_run"),  # 6000 frozen
    ]
    context = CheckContext(
        blocked_counterparties=frozenset({"mallory"}),
        account_statuses={6000: AccountStatus.FROZEN},
        velocity={velocity_key("ach_credit_in", "busy", "USD"): near},
        reference_holders={reference_key("c", "R1"): ["c1", "c2"]},
    )
    outcomes = run_checks(batch, context, TABLE)
    got = {o.external_id: o.reason for o in outcomes}
    assert got == {
        "a1": None, "a2": CheckReason.VELOCITY_COUNT, "b1": CheckReason.BLOCKED_COUNTERPARTY,
        "c1": None, "c2": CheckReason.DUPLICATE_REFERENCE, "d1": CheckReason.AMOUNT_ABOVE_MAX,
        "e1": CheckReason.ACCOUNT_FROZEN,
    }
    assert [o.external_id for o in outcomes] == [t.external_id for t in batch]
    assert {o.check for o in outcomes if not o.passed} == {
        CheckName.VELOCITY, CheckName.BLOCKED_COUNTERPARTY, CheckName.DUPLICATE_REFERENCE,
        CheckName.AMOUNT_LIMITS, CheckName.ACCOUNT_STATUS}


def test_a_refused_holder_frees_its_reference() -> None:
    batch = [txn("c1", counterparty="mallory", reference="R"),
             txn("c2", counterparty="mallory", reference="R", amount=Decimal("1"))]
    context = CheckContext(blocked_counterparties=frozenset(),
                           reference_holders={reference_key("mallory", "R"): ["c1", "c2"]})
    over = [txn("c1", counterparty="mallory", reference="R", amount=Decimal("99999")),
            batch[1]]
    assert [o.passed for o in run_checks(batch, context, TABLE)] == [True, False]
    assert [o.passed for o in run_checks(over, context, TABLE)] == [False, True]


def test_needs_of_lists_each_read_once() -> None:
    batch = [txn("a", reference="R"), txn("b", reference="R"),
             txn("c", kind="payroll_run", counterparty="acme")]
    needs = needs_of(batch, TABLE)
    assert [q.key for q in needs.velocity] == [
        velocity_key("ach_credit_in", "bank-1", "USD"), velocity_key("payroll_run", "acme", "USD")]
    assert needs.references == (("bank-1", "R"),)
    assert set(needs.accounts) == {1050, 2180, 6000, 1000}
    assert needs.counterparties == ("bank-1", "acme")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["p1", "p2", "p3"]),
                          st.integers(min_value=1, max_value=3_000_000)),
                min_size=1, max_size=80))
def test_accepted_transactions_never_exceed_velocity(rows: list[tuple[str, int]]) -> None:
    batch = [txn(f"t{i}", counterparty=party, amount=Decimal(cents) / 100)
             for i, (party, cents) in enumerate(rows)]
    outcomes = run_checks(batch, CheckContext(), TABLE)
    limits = TABLE.limits("ach_credit_in", "USD")
    for party in ("p1", "p2", "p3"):
        accepted = [t for t, o in zip(batch, outcomes, strict=True)
                    if o.passed and t.counterparty == party]
        assert len(accepted) <= limits.velocity_count_max
        assert sum(t.amount_minor for t in accepted) <= limits.velocity_amount_max
        assert all(limits.amount_min <= t.amount_minor <= limits.amount_max for t in accepted)


# ---- journal, chain, trial balance ----------------------------------------------------------


def test_entries_must_balance_per_currency() -> None:
    usd_debit = JournalLine(account=1000, currency="USD", debit_minor=5)
    with pytest.raises(ValidationError):
        JournalEntry(transfer_id=1, tb_timestamp=TS, lines=(
            usd_debit, JournalLine(account=2180, currency="USD", credit_minor=4)))
    with pytest.raises(ValidationError):  # balanced in sum, not per currency
        JournalEntry(transfer_id=1, tb_timestamp=TS, lines=(
            usd_debit, JournalLine(account=2180, currency="USDC", credit_minor=5)))
    with pytest.raises(ValidationError):
        JournalLine(account=1000, currency="USD", debit_minor=1, credit_minor=1)
    with pytest.raises(ValidationError):
        JournalLine(account=1000, currency="USD")
    entry = JournalEntry(transfer_id=1, tb_timestamp=TS, lines=(
        usd_debit, JournalLine(account=2180, currency="USD", credit_minor=5)))
    with pytest.raises(ValidationError):
        entry.memo = "changed"  # type: ignore[misc]


@st.composite
def balanced_entries(draw: st.DrawFn) -> list[JournalEntry]:
    """Random balanced entries over the chart: each currency's debits split across accounts
    and matched by credits split another way."""
    count = draw(st.integers(min_value=1, max_value=12))
    entries: list[JournalEntry] = []
    for index in range(count):
        lines: list[JournalLine] = []
        for currency in draw(st.lists(st.sampled_from(["USD", "USDC"]), min_size=1,
                                      max_size=2, unique=True)):
            accounts = [a.number for a in CHART.accounts if currency in a.currencies]
            debits = draw(st.lists(st.integers(1, 10**12), min_size=1, max_size=3))
            total = sum(debits)
            cut = draw(st.integers(min_value=1, max_value=total))
            credits = [cut, total - cut] if total - cut else [cut]
            lines += [JournalLine(account=draw(st.sampled_from(accounts)), currency=currency,
                                  debit_minor=d) for d in debits]
            lines += [JournalLine(account=draw(st.sampled_from(accounts)), currency=currency,
                                  credit_minor=c) for c in credits]
        entries.append(JournalEntry(transfer_id=index + 1, tb_timestamp=TS + index,
                                    lines=tuple(lines)))
    return entries


@settings(max_examples=80, deadline=None)
@given(balanced_entries())
def test_balanced_entries_leave_a_zero_trial_balance(entries: list[JournalEntry]) -> None:
    balances = [AccountBalance(account=a, currency=c, debits_minor=d, credits_minor=cr)
                for (a, c), (d, cr) in balance_deltas(entries).items()]
    result = trial_balance(balances)
    assert result.zero
    assert {t.currency for t in result.currencies} == {
        ln.currency for e in entries for ln in e.lines}
    lopsided = [*balances[1:], AccountBalance(
        account=balances[0].account, currency=balances[0].currency,
        debits_minor=balances[0].debits_minor + 1, credits_minor=balances[0].credits_minor)]
    assert not trial_balance(lopsided).zero


@settings(max_examples=80, deadline=None)
@given(balanced_entries(), st.data())
def test_the_chain_verifies_and_detects_any_change(
    entries: list[JournalEntry], data: st.DataObject
) -> None:
    chain = extend_chain(ChainHead(), entries)
    assert chain[0].prev_hash == GENESIS_HASH and [c.seq for c in chain] == list(
        range(1, len(entries) + 1))
    result = verify_segment(ChainHead(), chain)
    assert result.ok and result.checked == len(chain) and result.last == chain[-1].head
    # Continuing from the middle gives the same end.
    middle = len(chain) // 2
    start = chain[middle - 1].head if middle else ChainHead()
    assert verify_segment(start, chain[middle:]).last == chain[-1].head
    # Tamper with one entry's amount (kept balanced) or memo: detected at that entry.
    victim = data.draw(st.integers(min_value=0, max_value=len(chain) - 1))
    entry = chain[victim].entry
    doubled = tuple(ln.model_copy(update={"debit_minor": ln.debit_minor * 2,
                                          "credit_minor": ln.credit_minor * 2})
                    for ln in entry.lines)
    for changed in (entry.model_copy(update={"lines": doubled}),
                    entry.model_copy(update={"memo": "edited"}),
                    entry.model_copy(update={"tb_timestamp": entry.tb_timestamp + 1})):
        forged = list(chain)
        forged[victim] = chain[victim].model_copy(update={"entry": changed})
        broken = verify_segment(ChainHead(), forged)
        assert not broken.ok and broken.first_bad_seq == victim + 1
    if victim < len(chain) - 1:  # a removed entry is a gap (a cut-off end is not: the store
        # compares the last link with its head document for that)
        gap = verify_segment(ChainHead(), chain[:victim] + chain[victim + 1:])
        assert not gap.ok and gap.first_bad_seq == victim + 2


def test_rehashing_a_forged_entry_breaks_the_next_link() -> None:
    entries = [settlement_entry(txn(f"e{i}"), TABLE, TS + i) for i in range(3)]
    chain = extend_chain(ChainHead(), entries)
    forged_entry = settlement_entry(txn("e1", amount=Decimal("1")), TABLE, TS + 1)
    relinked = extend_chain(chain[0].head, [forged_entry])[0]  # forger recomputes its hash
    result = verify_segment(ChainHead(), [chain[0], relinked, chain[2]])
    assert not result.ok and result.first_bad_seq == 3
