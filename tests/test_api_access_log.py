"""The access log's cheaper record and buffered writes (gateway.middleware.access_record,
gateway.app.PassBufferedStreamHandler): the same records and the same text as
`access_log.info` through a StreamHandler, every line written, none held past a loop pass,
LINES_MAX or the process's exit. Real logging, a real stream, a real child process."""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.app import LOG_FORMAT, PassBufferedStreamHandler, SecondCachedFormatter
from gateway.middleware import access_log, access_record

CLOCK_FIELDS = ("created", "msecs", "relativeCreated")
REPO = Path(__file__).resolve().parent.parent


class _Kept(logging.Handler):
    """Keeps the records it is given (a handler a user could configure)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def plain_records() -> Iterator[None]:
    """The API process's logging settings (gateway.app.configure_logging's), restored after."""
    saved = (logging._srcfile, logging.logThreads, logging.logProcesses,
             logging.logMultiprocessing, access_log.level)  # fmt: skip
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    access_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        (logging._srcfile, logging.logThreads, logging.logProcesses,
         logging.logMultiprocessing) = saved[:4]  # fmt: skip
        access_log.setLevel(saved[4])


def _kept_records(emit: object, line: str) -> logging.LogRecord:
    kept = _Kept()
    access_log.addHandler(kept)
    try:
        assert callable(emit)
        emit(line)
    finally:
        access_log.removeHandler(kept)
    assert len(kept.records) == 1
    return kept.records[0]


@pytest.mark.usefixtures("plain_records")
def test_access_record_is_the_record_logger_info_makes() -> None:
    line = "GET /v1/wallets/c-***42/USA/USD/balance op=get_balance status=200 ms=0.4 key=k(id)"
    made = _kept_records(lambda text: access_log.info("%s", text), line)
    built = _kept_records(access_record, line)
    assert type(built) is type(made)
    made_fields, built_fields = vars(made), vars(built)
    assert set(built_fields) == set(made_fields)
    for name in made_fields:
        if name not in CLOCK_FIELDS:
            assert built_fields[name] == made_fields[name], name
    # The clock fields as LogRecord.__init__ derives them from `created`.
    created = built.created
    assert 0 <= created - made.created < 60
    assert built.msecs == int((created - int(created)) * 1000) + 0.0
    assert built.relativeCreated == (created - logging._startTime) * 1000  # type: ignore[attr-defined]
    formatter = SecondCachedFormatter(LOG_FORMAT)
    made.created, made.msecs, made.relativeCreated = created, built.msecs, built.relativeCreated
    assert formatter.format(built) == formatter.format(made)


def test_access_record_falls_back_to_logger_info_when_records_vary() -> None:
    """Thread fields on (logging's default): Logger.info itself makes the record."""
    assert logging.logThreads
    saved = access_log.level
    access_log.setLevel(logging.INFO)
    try:
        record = _kept_records(access_record, "a line")
    finally:
        access_log.setLevel(saved)
    assert record.thread is not None and record.getMessage() == "a line"


def _handlers(stream: io.StringIO) -> tuple[PassBufferedStreamHandler, logging.StreamHandler]:  # type: ignore[type-arg]
    buffered = PassBufferedStreamHandler()
    buffered.setStream(stream)
    plain = logging.StreamHandler(io.StringIO())
    for handler in (buffered, plain):
        handler.setFormatter(SecondCachedFormatter(LOG_FORMAT))
    return buffered, plain


def _record(n: int) -> logging.LogRecord:
    return logging.LogRecord("gateway.access", logging.INFO, "(unknown file)", 0, "%s",
                             (f"line {n}",), None)  # fmt: skip


def test_buffered_lines_are_written_at_the_end_of_the_loop_pass() -> None:
    stream = io.StringIO()
    buffered, plain = _handlers(stream)
    records = [_record(n) for n in range(10)]

    async def log_then_yield() -> tuple[str, str]:
        for record in records:
            buffered.handle(record)
            plain.handle(record)
        held = stream.getvalue()
        await asyncio.sleep(0)  # one pass: the flush scheduled by the first line runs
        await asyncio.sleep(0)
        return held, stream.getvalue()

    held, written = asyncio.run(log_then_yield())
    assert held == ""  # nothing written during the pass that logged the lines
    plain_stream = plain.stream
    assert isinstance(plain_stream, io.StringIO)
    assert written == plain_stream.getvalue()  # same text, same order, every line
    assert written.count("\n") == len(records)


def test_closing_the_handler_writes_the_held_lines() -> None:
    stream = io.StringIO()
    buffered, _ = _handlers(stream)

    async def log_then_close() -> tuple[str, str]:
        buffered.handle(_record(1))
        held = stream.getvalue()
        buffered.close()  # within the pass that logged the line
        return held, stream.getvalue()

    held, written = asyncio.run(log_then_close())
    assert held == "" and written.count("\n") == 1


def test_buffered_lines_are_bounded_and_written_outside_a_loop_at_once() -> None:
    stream = io.StringIO()
    buffered, _ = _handlers(stream)
    limit = PassBufferedStreamHandler.LINES_MAX

    async def log_many() -> str:
        for n in range(limit + 3):
            buffered.handle(_record(n))
        return stream.getvalue()

    within_pass = asyncio.run(log_many())
    assert within_pass.count("\n") == limit  # LINES_MAX reached: written without a pass
    buffered.handle(_record(-1))  # no running loop here: written at once, the tail first
    text = stream.getvalue()
    assert text.count("\n") == limit + 4
    assert text.splitlines()[-1].endswith("line -1")


def test_lines_held_at_exit_are_written(tmp_path: Path) -> None:
    """A process that logs inside its loop and exits before another pass (SystemExit leaves
    run_until_complete at once; the loop never runs again, so the scheduled flush never
    does): logging.shutdown (atexit) writes the held lines."""
    script = (
        "import asyncio, logging\n"
        "from gateway.app import configure_logging\n"
        "configure_logging('INFO')\n"
        "log = logging.getLogger('gateway.access')\n"
        "async def main():\n"
        "    for n in range(5):\n"
        "        log.info('%s', f'line {n}')\n"
        "    raise SystemExit(0)\n"
        "asyncio.new_event_loop().run_until_complete(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if " INFO gateway.access: " in line]
    assert [line.rsplit(": ", 1)[1] for line in lines] == [f"line {n}" for n in range(5)]
