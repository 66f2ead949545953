"""Worker heartbeats: each worker's state, and its sources', on a compacted status topic (key = worker id).

A worker sends its status every `interval_s` while it runs and once more, marked stopped, when
it ends. A reader tells a live worker from a silent one by the age of its last heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Literal

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ValidationError

from pipeline.cluster.catalog import ensure_compacted_topic
from pipeline.kafka import KafkaConnection, read_latest, started_producer

log = logging.getLogger("framelabel.status")

DEFAULT_INTERVAL_S = 2.0
SILENT_AFTER_INTERVALS = 3  # heartbeats a worker may miss before it reads as silent
MIN_REQUEST_TIMEOUT_MS = 5000  # the status producer's requests, however short the interval

# Wire models: fields a newer worker adds are ignored, not refused, so that an older `framelabel status` reads it.


class SourceStatus(BaseModel):
    id: str
    state: str  # as the run's summary says it: starting, live, reconnecting, replaying, ended, failed
    fps: float
    published: int
    dropped: int
    failed: int
    last_frame: int | None = None  # index of the last frame published
    latency_ms: float | None = None  # capture → published, median of the recent frames
    error: str | None = None  # the last one, as the run's log says it


class WorkerStatus(BaseModel):
    worker: str
    group: str
    host: str
    pid: int
    started_ms: int
    at_ms: int  # when this heartbeat was sent (set by the publisher)
    interval_s: float  # how often the worker sends one (set by the publisher)
    sources: list[SourceStatus]
    stopped: bool = False

    def health(self, now_ms: int) -> Literal["alive", "silent", "stopped"]:
        """stopped: it said so; silent: no heartbeat for SILENT_AFTER_INTERVALS intervals (it may have died)."""
        if self.stopped:
            return "stopped"
        return "alive" if now_ms - self.at_ms <= SILENT_AFTER_INTERVALS * self.interval_s * 1000 else "silent"


def worker_id() -> str:
    """host-pid: unique among the workers running at once, readable in `framelabel status`."""
    return f"{socket.gethostname()}-{os.getpid()}"


class StatusPublisher:
    """`async with StatusPublisher(...)`: sends `snapshot()` every `interval_s` and, on exit, a last one marked
    stopped. A heartbeat that cannot be sent is reported and the next one tried: never fatal to the worker."""

    def __init__(
        self,
        connection: KafkaConnection,
        topic: str,
        snapshot: Callable[[], WorkerStatus],
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self._connection, self._topic, self._snapshot, self._interval_s = connection, topic, snapshot, interval_s
        self._producer: AIOKafkaProducer | None = None
        self._beats: asyncio.Task[None] | None = None
        self._failing = False

    async def __aenter__(self) -> StatusPublisher:
        await ensure_compacted_topic(self._connection, self._topic, 1)
        # a heartbeat delivered after it would read as silent is not worth the wait, nor is the worker's exit
        expires_ms = max(int(SILENT_AFTER_INTERVALS * self._interval_s * 1000), MIN_REQUEST_TIMEOUT_MS)
        self._producer = await started_producer(
            self._connection, acks="all", enable_idempotence=False, request_timeout_ms=expires_ms
        )
        try:
            await self._send(self._snapshot())  # started: the worker shows in `framelabel status`
        except BaseException:
            await self._producer.stop()
            raise
        self._beats = asyncio.create_task(self._beat(), name=f"status heartbeats to {self._topic}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        producer, beats = self._producer, self._beats
        if producer is None or beats is None:
            return
        try:
            beats.cancel()
            await asyncio.wait([beats])
            if not beats.cancelled() and (error := beats.exception()) is not None:
                raise error  # what ended the heartbeats early: a snapshot that failed
            await self._send(self._snapshot().model_copy(update={"stopped": True}))
        finally:
            await producer.stop()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self._send(self._snapshot())

    async def _send(self, status: WorkerStatus) -> None:
        if self._producer is None:
            raise RuntimeError("StatusPublisher used outside `async with`")
        at_ms = int(time.time() * 1000)
        status = status.model_copy(update={"at_ms": at_ms, "interval_s": self._interval_s})
        timeout_s = SILENT_AFTER_INTERVALS * self._interval_s
        try:
            async with asyncio.timeout(timeout_s):
                await self._producer.send_and_wait(
                    self._topic, status.model_dump_json().encode(), key=status.worker.encode(), timestamp_ms=at_ms
                )
        except (KafkaError, TimeoutError) as exc:
            if not self._failing:  # once per outage, not every interval
                reason = f"no acknowledgement in {timeout_s:g} s" if isinstance(exc, TimeoutError) else repr(exc)
                log.warning(
                    "status: heartbeat to %s not sent (%s); trying again every %g s",
                    self._topic,
                    reason,
                    self._interval_s,
                )
            self._failing = True
            return
        if self._failing:
            log.info("status: heartbeats to %s sent again", self._topic)
        self._failing = False


async def read_status(connection: KafkaConnection, topic: str) -> list[WorkerStatus]:
    """The last heartbeat of every worker that sent one, by worker id; a record that is not one is logged."""
    workers = []
    for key, record in sorted((await read_latest(connection, topic)).items()):
        if record.value is None:
            continue
        try:
            workers.append(WorkerStatus.model_validate_json(record.value))
        except ValidationError as exc:
            log.warning("status: record %r in %s is not a worker status: %s", key, topic, exc.errors()[0]["msg"])
    return workers
