"""The gateway's per-request savings keep behaviour: gateway.coalesce.CoalescedLookups against
the real TigerBeetle and MongoDB servers of the test stack (concurrent lookups go as one
request, each caller gets its own rows in its own order, a cancelled caller leaves the
others' answer intact; concurrent legacy balance reads go as one find, same answers), and
the access log's second-cached time stamp (the same text as logging's), and uvicorn with the
gateway's HeadHoldingHttpToolsProtocol (head and body in one write) answering the same bytes,
a streamed body's head still sent before its body exists."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import tigerbeetle as tb

from gateway.app import LOG_FORMAT, SecondCachedFormatter
from gateway.coalesce import CoalescedLegacyReads, CoalescedLookups
from gateway.http_protocol import HeadHoldingHttpToolsProtocol
from stores.legacy_store import LegacyStore
from walletcore.keys import WalletKey
from walletcore.operations import AddCredit
from walletmig.processes import free_port

LEDGER = 9_017  # a ledger of this test's own
CODE = 17


async def _accounts(tb_client: Any, count: int) -> list[int]:
    ids = [random.getrandbits(120) + 1 for _ in range(count)]
    results = await tb_client.create_accounts(
        [tb.Account(id=i, ledger=LEDGER, code=CODE) for i in ids])
    assert [r.status for r in results] == [tb.CreateAccountStatus.CREATED] * count, results
    return ids


async def test_concurrent_lookups_share_one_request(tb_client: Any) -> None:
    ids = await _accounts(tb_client, 6)
    missing = random.getrandbits(120) + 1
    client = CoalescedLookups(tb_client.client, tb_client.limits)
    asks = [[ids[0]], [ids[1], ids[2]], [ids[3], missing, ids[4]], [ids[2], ids[0]], [missing]]
    answers = await asyncio.gather(*(client.lookup_accounts(ask) for ask in asks))
    assert client.batcher.requests == 1 and client.batcher.reads == len(asks)
    for ask, rows in zip(asks, answers, strict=True):
        assert [row.id for row in rows] == [i for i in ask if i != missing]
        assert all(row.ledger == LEDGER for row in rows)
    # The same answers as the plain client's, one request each.
    for ask, rows in zip(asks, answers, strict=True):
        assert await tb_client.lookup_accounts(ask) == rows
    assert await client.lookup_accounts([]) == []
    # Lookups of later loop passes go in later batches.
    assert [r.id for r in await client.lookup_accounts([ids[5]])] == [ids[5]]
    assert client.batcher.requests == 2


async def test_a_cancelled_caller_leaves_the_batch_to_the_others(tb_client: Any) -> None:
    ids = await _accounts(tb_client, 2)
    client = CoalescedLookups(tb_client.client, tb_client.limits)
    first = asyncio.ensure_future(client.lookup_accounts([ids[0]]))
    second = asyncio.ensure_future(client.lookup_accounts([ids[1]]))
    await asyncio.sleep(0)  # both joined the batch
    first.cancel()
    rows = await second
    assert [row.id for row in rows] == [ids[1]]
    with pytest.raises(asyncio.CancelledError):
        await first
    assert client.batcher.requests == 1



def test_second_cached_log_time_is_loggings_text() -> None:
    plain, cached = logging.Formatter(LOG_FORMAT), SecondCachedFormatter(LOG_FORMAT)
    base = 1_796_574_599.0
    for offset in (0.0, 0.001, 0.5, 0.999, 1.0, 1.25, 61.75, 86_400.5, 0.1):  # back in time too
        record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "GET %s", ("/x",),
                                   None)  # fmt: skip
        record.created = base + offset
        record.msecs = int((record.created - int(record.created)) * 1000)
        assert cached.format(record) == plain.format(record)
    record.created = base
    assert cached.formatTime(record, "%H") == plain.formatTime(record, "%H")


async def test_concurrent_legacy_reads_share_one_find(
    mongo_db: Any, wallet: Callable[..., WalletKey]
) -> None:
    plain, coalesced = LegacyStore(mongo_db), CoalescedLegacyReads(mongo_db)
    keys = [wallet("USD", "USA") for _ in range(4)]
    for n, key in enumerate(keys[:3]):
        await plain.add_credit(AddCredit(wallet=key, transaction_id=f"{key.client_id}-seed",
                                         amount=Decimal(n + 1)))  # fmt: skip
    asks = [keys[0], keys[1], keys[2], keys[0], keys[3]]  # keys[3]: no such wallet
    answers = await asyncio.gather(*(coalesced.get_wallet_version(k) for k in asks))
    assert coalesced.batcher.requests == 1 and coalesced.batcher.reads == len(asks)
    assert answers == [await plain.get_wallet_version(k) for k in asks]
    assert answers[-1] is None and answers[0] is not None
    balances = await asyncio.gather(*(coalesced.get_balance(k) for k in keys[:3]))
    assert balances == [await plain.get_balance(k) for k in keys[:3]]
    assert coalesced.batcher.requests == 2


SERVER_START_S = 10.0
ANSWER_S = 5.0  # a held head would hang the stream below: bounded, a failure instead


async def test_head_holding_protocol_answers_the_same_bytes() -> None:
    import uvicorn

    head_seen = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        if path == "/plain":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"5")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b"hello"})
        elif path == "/empty":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        else:  # /stream: chunked; its body exists only once the client has read the head
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await head_seen.wait()
            await send({"type": "http.response.body", "body": b"ab", "more_body": True})
            await send({"type": "http.response.body", "body": b"cd"})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, http=HeadHoldingHttpToolsProtocol, lifespan="off",
        log_config=None, access_log=False, server_header=False, date_header=False,
    ))  # fmt: skip
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(SERVER_START_S):
            while not server.started:
                await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(ANSWER_S):
            for path, answer in (
                ("/plain", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"),
                ("/empty", b"HTTP/1.1 204 No Content\r\n\r\n"),
                ("/plain", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"),
            ):  # one keep-alive connection
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert await reader.readexactly(len(answer)) == answer
            writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            head_seen.set()
            body = b"2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"
            assert await reader.readexactly(len(body)) == body
        writer.close()
    finally:
        server.should_exit = True
        await serving


def test_bench_api_judges_the_median_of_the_rounds_ratios() -> None:
    from walletmig.bench_api import ApiBenchConfig, PathFigures, _report

    config = ApiBenchConfig(api_url="http://x", rounds=3)
    pairs = {"USD:USA": "mongodb", "EUR:ESP": "tigerbeetle"}
    # Per round: (API reads/s, direct reads/s); the host's load moves both between rounds.
    by_round = [(800.0, 1000.0), (200.0, 800.0), (450.0, 500.0)]  # 80 %, 25 %, 90 %
    runs = [
        PathFigures(kind=kind, path=path, pair=pair, source=source, round=n, requests=100,
                    seconds=1.0, requests_per_s=rates[path == "direct"], p50_ms=1.0, p99_ms=2.0)
        for n, rates in enumerate(by_round)
        for pair, source in pairs.items()
        for kind in ("read", "credit")
        for path in ("api", "direct")
        if kind == "read" or pair == "USD:USA"
    ]  # fmt: skip
    report = _report(config, pairs, runs)
    assert report.round_ratios["read via tigerbeetle"] == [0.8, 0.25, 0.9]
    assert report.read_ratios == {"mongodb": 0.8, "tigerbeetle": 0.8}
    assert report.credit_ratio == 0.8  # not the ratio of medians (450 / 800 = 56 %)
    assert report.api_reads_per_s["tigerbeetle"] == 450.0


def test_bench_api_names_scheduled_workflows_that_overlapped_a_timed_run() -> None:
    from datetime import UTC, datetime, timedelta

    from walletmig.bench_api import PathFigures, ScheduledRun, _overlaps, _scheduled_line

    t0 = datetime(2026, 12, 7, 4, 10, tzinfo=UTC)
    run = PathFigures(kind="read", path="api", pair="EUR:ESP", source="tigerbeetle", round=2,
                      requests=1, seconds=10.0, requests_per_s=0.1, p50_ms=1.0, p99_ms=1.0,
                      started_at=t0, ended_at=t0 + timedelta(seconds=10))  # fmt: skip
    assert _overlaps(run, t0 - timedelta(seconds=5), t0 + timedelta(seconds=1))
    assert _overlaps(run, t0 + timedelta(seconds=9), None)  # still running
    assert not _overlaps(run, t0 - timedelta(seconds=5), t0)  # closed as the run started
    assert not _overlaps(run, t0 + timedelta(seconds=10), None)  # started as it ended
    line = _scheduled_line([ScheduledRun(
        workflow_id="reconcile/x", workflow_type="ReconciliationWorkflow", started_at=t0,
        closed_at=t0 + timedelta(seconds=5), runs=["round 3 read EUR:ESP api"])])  # fmt: skip
    assert "ReconciliationWorkflow 04:10:00-04:10:05 UTC: round 3 read EUR:ESP api" in line
    assert _scheduled_line([]).endswith(": none")
    assert "unknown" in _scheduled_line(None)
