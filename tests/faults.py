"""Fault injection for the reliability tests, all on 127.0.0.1.

- `TcpProxy`: forwards a port to a broker; `cut()` resets every connection and
  refuses new ones until `restore()`.
- `NoidaBroker`: a Kafka-protocol broker that keeps its data on disk across a
  restart (the noida-db binary, run directly so SIGTERM reaches it).
- `PipelineRun`: a `framelabel run` child process whose log can be watched while it runs.
- `TopicWatcher`: reads a topic in the background and notes when each record arrived.
- `delivery_figures`: what a topic holds of a source, against what it should hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from pipeline.consumer import ConsumeError, consume
from pipeline.processes import stop_process
from pipeline.records import DecodedRecord
from tests.cameras import free_port, wait_until
from tests.helpers import FRAMELABEL
from tests.kafka import connection

POLL_S = 0.05
STOP_TIMEOUT_S = 60.0
CLEANUP_TIMEOUT_S = 10.0
BROKER_START_TIMEOUT_S = 20.0
WEDGE_PROBE_MS = 5000
SEPARATOR = "│"  # between the summary table's cells, as rich draws them ("┃" in the header)


async def eventually(condition: Callable[[], bool], what: str, within_s: float = 60.0) -> None:
    """Poll `condition` on the event loop until it holds, or fail after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {within_s:g} s waiting for {what}")
        await asyncio.sleep(POLL_S)


class TcpProxy:
    """127.0.0.1:`port` forwarded to 127.0.0.1:`target_port`, with a switch to cut the link."""

    def __init__(self, target_port: int, port: int) -> None:
        self.target_port = target_port
        self.port = port
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    async def restore(self) -> None:
        """Listen (again): new connections are forwarded."""
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port, reuse_address=True)

    async def cut(self) -> None:
        """Stop listening (connects are refused) and reset every open connection at both ends."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for client, upstream in self._links:
            _reset(client)
            _reset(upstream)
        self._links.clear()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _forward(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _reset(client)
            return
        self._links.add((client, upstream))
        for reader, writer in ((client_reader, upstream), (upstream_reader, client)):
            pump = asyncio.create_task(_pump(reader, writer))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN, as a dropped link or a dead peer would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextlib.asynccontextmanager
async def tcp_proxy(target_port: int, port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(target_port, port)
    await proxy.restore()
    try:
        yield proxy
    finally:
        await proxy.cut()


class NoidaBroker:
    """noida-db with only Kafka on, storing in `data_dir`: `stop()` then `start()` keeps every record."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = Path(str(importlib.resources.files("noida_db").joinpath("noida-db")))
        binary.chmod(0o755)  # the wheel's own launcher does this too
        command = [str(binary), "start", "--data-dir", str(self.data_dir), "--host", "127.0.0.1"]
        self._log = self._log or (self.data_dir.parent / f"{self.data_dir.name}.log").open("ab")
        self._process = subprocess.Popen(
            [*command, "--only", "kafka", "--kafka-port", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        process = self._process
        wait_until(lambda: _accepts(self.port) or process.poll() is not None, "noida-db", BROKER_START_TIMEOUT_S)
        if process.poll() is not None:
            raise RuntimeError(f"noida-db exited with code {process.returncode}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, STOP_TIMEOUT_S)

    async def skip_if_wedged(self, topic: str) -> None:
        """Skip the test when noida-db no longer answers for the topic's partitions.

        noida-db 0.2.3 sometimes stops answering ListOffsets and fetches for the partitions of a transaction
        whose producer was SIGKILLed at an unlucky moment (about one run in ten of the five-kill tests here),
        for good: no client can make progress then, so the test has nothing left to judge."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.address, request_timeout_ms=WEDGE_PROBE_MS)
        await consumer.start()
        try:
            await consumer.topics()
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or {0})]
            await consumer.end_offsets(partitions)
        except KafkaTimeoutError:
            pytest.skip(f"noida-db stopped answering for topic {topic} after a producer was killed mid-transaction")
        finally:
            await consumer.stop()

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
        return True
    return False


@contextlib.contextmanager
def noida_broker(data_dir: Path) -> Iterator[NoidaBroker]:
    data_dir.mkdir(parents=True, exist_ok=True)
    broker = NoidaBroker(data_dir)
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


def write_run_config(
    folder: Path, bootstrap: str, sources: list[dict[str, Any]], *, idempotent: bool = False, **sections: Any
) -> Path:
    """A run YAML publishing to topic `frames` at `bootstrap`; `sections` are merged over the defaults."""
    kafka = {"bootstrap_servers": bootstrap, "enable_idempotence": idempotent, "topic": "frames"}
    config = {"sources": sources, **sections, "kafka": kafka | sections.get("kafka", {})}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class PipelineRun:
    """`framelabel run CONFIG` in a child process; stdout and stderr are collected line by line as it runs."""

    process: subprocess.Popen[str]
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    _readers: list[threading.Thread] = field(default_factory=list)

    def log(self) -> str:
        return "".join(self.stderr)

    def finish(self, sig: signal.Signals | None = None, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send `sig` (if any), wait for the exit code and for the output to be read to its end."""
        if sig is not None and self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.process.args} still running after {timeout:g} s; its log:\n{self.log()}"
            ) from None
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            for reader in self._readers:
                reader.join(timeout)
        return code

    async def end(self, sig: signal.Signals | None = None, wait_s: float = STOP_TIMEOUT_S) -> int:
        """finish() off the event loop, which may be serving a proxy the run still needs."""
        return await asyncio.to_thread(self.finish, sig, wait_s)

    def summary(self, source_id: str) -> dict[str, int | str]:
        """The source's row of the summary table, by column name (counts as ints)."""
        lines = (line.replace("┃", SEPARATOR).strip().strip(SEPARATOR) for line in self.stdout)
        rows = [[cell.strip() for cell in line.split(SEPARATOR)] for line in lines]
        header = next((row for row in rows if row[0] == "source"), None)
        for row in rows:
            if header is not None and row[0] == source_id and len(row) == len(header):
                return {name: int(cell) if cell.isdigit() else cell for name, cell in zip(header, row, strict=True)}
        raise AssertionError(f"no summary row for {source_id} in:\n{''.join(self.stdout)}")


@contextlib.contextmanager
def pipeline_run(config: Path, env: dict[str, str] | None = None) -> Iterator[PipelineRun]:
    """Start the run; at the end it is stopped (SIGTERM, then SIGKILL) if the test has not finished it."""
    with framelabel_process("run", str(config), env=env) as run:
        yield run


@contextlib.contextmanager
def framelabel_process(
    *args: str, env: dict[str, str] | None = None, prefix: Sequence[str] = ()
) -> Iterator[PipelineRun]:
    """`framelabel ARGS` in a child process, its output collected; stopped at the end if still running.

    `prefix`: a command that runs it, such as `ip netns exec NAME` (one that execs, so the pid is framelabel's)."""
    process = subprocess.Popen(
        [*prefix, FRAMELABEL, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    run = PipelineRun(process)
    for stream, lines in ((process.stdout, run.stdout), (process.stderr, run.stderr)):
        reader = threading.Thread(target=_collect, args=(stream, lines), daemon=True)
        reader.start()
        run._readers.append(reader)
    try:
        yield run
    finally:
        if process.poll() is None:  # the test failed before it finished the run: do not wait long
            with contextlib.suppress(AssertionError):  # the test's own failure is the one to report
                run.finish(signal.SIGTERM, timeout=CLEANUP_TIMEOUT_S)


def _collect(stream: IO[str] | None, lines: list[str]) -> None:
    if stream is not None:
        lines.extend(stream)


@dataclass(frozen=True)
class Arrival:
    at: float  # time.time() when the watcher read it
    record: DecodedRecord


class TopicWatcher:
    """Reads a topic from the beginning in the background, noting when each record arrived (wall clock).

    If a read fails (no topic yet, the broker went away) it reads again from the
    beginning and keeps only the records it had not seen: the n-th copy of a frame is
    the n-th copy whatever the read.
    """

    def __init__(self, bootstrap: str, topic: str = "frames") -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.arrivals: list[Arrival] = []
        self._copies: Counter[tuple[str, int]] = Counter()
        self._task: asyncio.Task[None] | None = None

    def records(self, source_id: str) -> list[DecodedRecord]:
        return [arrival.record for arrival in self.arrivals if arrival.record.source_id == source_id]

    def count(self, source_id: str) -> int:
        return sum(1 for arrival in self.arrivals if arrival.record.source_id == source_id)

    def first_arrival(self, source_id: str, captured_after: float) -> float | None:
        """When the first record of the source captured after `captured_after` (time.time()) arrived."""
        return next(
            (
                arrival.at
                for arrival in self.arrivals
                if arrival.record.source_id == source_id and arrival.record.capture_time_ms / 1000 > captured_after
            ),
            None,
        )

    async def seconds_to_recover(self, source_id: str, outage_began: float, outage_ended: float) -> float:
        """From the end of an outage (time.time()) until the first record captured since it began arrived."""
        await eventually(lambda: self.first_arrival(source_id, outage_began) is not None, f"{source_id} to recover")
        return (self.first_arrival(source_id, outage_began) or outage_ended) - outage_ended

    async def _watch(self) -> None:
        while True:
            copies: Counter[tuple[str, int]] = Counter()
            try:
                async for record in consume(connection(self.bootstrap, self.topic), from_beginning=True):
                    frame = (record.source_id, record.frame_index)
                    copies[frame] += 1
                    if copies[frame] > self._copies[frame]:
                        self._copies[frame] += 1
                        self.arrivals.append(Arrival(time.time(), record))
            except ConsumeError:
                await asyncio.sleep(POLL_S)

    async def __aenter__(self) -> TopicWatcher:
        self._task = asyncio.create_task(self._watch(), name="topic-watcher")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass(frozen=True)
class DeliveryFigures:
    expected: int
    stored: int  # records of the source in the topic, duplicates included
    lost: int  # expected frames with no record
    duplicates: int  # records repeating a frame stored before them
    in_order: bool  # each frame's first record comes after the first records of every earlier frame


def delivery_figures(records: list[DecodedRecord], expected: list[int]) -> DeliveryFigures:
    """`records` of one source in topic order, against the frame indexes that should be there."""
    first_seen: list[int] = []
    seen: set[int] = set()
    for record in records:
        if record.frame_index not in seen:
            seen.add(record.frame_index)
            first_seen.append(record.frame_index)
    return DeliveryFigures(
        expected=len(expected),
        stored=len(records),
        lost=len(set(expected) - seen),
        duplicates=len(records) - len(first_seen),
        in_order=first_seen == sorted(first_seen),
    )
