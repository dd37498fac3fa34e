"""Conformance factory: `replay.py --engine tb_emulator.conformance:make_client`.

Each `make_client()` starts a fresh emulator process (temp data file, free port) and returns an
`EmulatorClientSync` on it; `close()` kills the process and removes the temp dir. So the traces
exercise the whole stack: adapter, wire format, server, log and engine.
`make_client_development` does the same with the server's `--development` request limit
(32 KiB: the traces' largest request, 250 transfers, fits its create batch maximum of 253).
"""

from __future__ import annotations

import shutil
import time

from tb_emulator.client import EmulatorClientSync
from tb_emulator.server import EmulatorProcess, temp_data_file


class ConformanceClient(EmulatorClientSync):
    def __init__(self, process: EmulatorProcess, directory: str, timeout_s: float) -> None:
        super().__init__(0, process.address, timeout_s=timeout_s)
        self.process = process
        self.directory = directory

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)  # The server's clock is the wall clock.

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.process.kill()
            shutil.rmtree(self.directory, ignore_errors=True)


def make_client(
    engine: str | None = None, timeout_s: float = 30.0, development: bool = False
) -> ConformanceClient:
    directory, data_file = temp_data_file("tbemu-conformance-")
    process = EmulatorProcess(data_file, engine=engine, development=development)
    try:
        process.start()
    except BaseException:
        process.kill()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return ConformanceClient(process, directory, timeout_s)


def make_client_development() -> ConformanceClient:
    return make_client(development=True)
