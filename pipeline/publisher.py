"""The Publish stage: one Kafka record per AnnotatedFrame, in each source's frame order, never silently lost.

`publish()` puts the frame's record in its source's line and returns. A task
per source hands the waiting records to the producer (aiokafka batches per
partition, `linger_ms`, and retries retriable errors until
`request_timeout_ms`), waits until each of them is acknowledged or failed, and
only then hands over the next ones. A failed record is sent again, ahead of any
later record of its source, under the re-send policy (`retry_backoff_ms`
doubling up to 10 s) until it is acknowledged or `delivery_timeout_ms` has
passed since `publish()` (or after `delivery_retries` re-sends, when set).
Only then is it lost: one log line per batch names the source and the frames,
`DeliveryReport.lost` is told, and the next `flush()` raises.

Why one batch at a time per source: aiokafka fails a batch that outlived
`request_timeout_ms` while younger batches of the same partition may still get
through, so a re-send would land after newer records. Holding a source's next
records back until the previous ones are settled keeps every record's first
copy in frame order. A re-sent record may have been stored already (only its
acknowledgement was lost): delivery is at least once, and a duplicate repeats
a record stored earlier. With the idempotent producer (the default against real
Kafka) the broker drops such duplicates.

Backpressure: at most `max_in_flight_records` records are unsettled at a time;
`publish()` waits for room, up to `max_block_ms` when set, then raises.

Workers of a group (`pipeline.cluster`) add three things per source. An
`Ownership` is asked before each batch: while the worker's hold on the source
is in doubt (its group session may have lapsed) the batch waits, and once the
source has moved to another worker its records are dropped, counted as moved.
A `ProgressLog` records the source's last published frame after each batch
(a replay resumes after it). `claim()` gives a source a transactional producer
of its own: its batch and its progress then commit together, and the claim
fences an older worker (a zombie) holding the same transactional id.

Lifetime: `async with Publisher(...)` connects (and creates the topic), and on
exit flushes and closes. The per-source tasks are the publisher's own: one that
fails unexpectedly settles its records as lost and makes `publish()` for its
source raise, so nobody waits on a task that died. `abandon()` gives up on
whatever is still unsettled (a second Ctrl-C), within a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError, ProducerFenced
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from pipeline.frames import AnnotatedFrame
from pipeline.kafka import (
    KafkaSettings,
    KafkaUnreachable,
    client_options,
    ensure_topic,
    started_producer,
    unreachable,
    wait_for_broker,
)
from pipeline.records import KafkaRecord, encode_record
from pipeline.retry import RetryPolicy, saying_while_waiting
from services.errors import FramelabelError

log = logging.getLogger("framelabel.publish")

MAX_RETRY_BACKOFF_S = 10.0
CLOSE_TIMEOUT_S = 3.0
IDEMPOTENCE_HINT = (
    " (kafka.enable_idempotence: true asks for the idempotent producer; brokers without it, such as Tansu "
    "(`framelabel broker`), need --no-idempotence or kafka.enable_idempotence: false)"
)  # how long closing the producer may take once we have given up on its records


class PublishError(FramelabelError):
    """A record could not be published, or records were lost; the message says which and where."""


class Producer(Protocol):
    """The part of AIOKafkaProducer the publisher uses; tests inject one that fails chosen calls."""

    async def start(self) -> None: ...

    async def send(
        self, topic: str, value: bytes, *, key: bytes, timestamp_ms: int, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[Any]:
        """Queue a record; the future resolves when the broker acknowledges it."""
        ...

    async def stop(self) -> None: ...


class DeliveryReport(Protocol):
    """Who is told what became of each record."""

    def published(self, frame: AnnotatedFrame, acked_in_s: float) -> None:
        """Kafka acknowledged the frame's record, `acked_in_s` after it was handed to the publisher."""

    def lost(self, frames: Sequence[AnnotatedFrame], reason: str) -> None: ...

    def moved(self, frames: Sequence[AnnotatedFrame]) -> None:
        """Not published here: their source moved to another worker, which publishes them (replays) or fresher ones."""


class Ownership(Protocol):
    async def holds(self, source_id: str) -> bool:
        """True when this worker may publish for the source now (after waiting while that is in doubt); False once
        the source has moved to another worker."""
        ...


@dataclass(frozen=True)
class ProgressLog:
    """Where each source's last published frame is recorded (a compacted topic, key = source id)."""

    topic: str
    worker: str

    def record(self, frame: AnnotatedFrame, ended: bool = False) -> tuple[bytes, bytes]:
        """The progress record's key and value after `frame` was published (the last one, if `ended`)."""
        info = frame.info
        value = {
            "source": info.source_id,
            "frame": info.index,
            "position_ms": info.media_position_ms,
            "capture_time_ms": info.capture_time_ms,
            "worker": self.worker,
            "at_ms": round(time.time() * 1000),
            "ended": ended,
        }
        return info.source_id.encode(), json.dumps(value, separators=(",", ":")).encode()


@dataclass(slots=True)
class PublishStats:
    published: int = 0  # acknowledged by Kafka
    lost: int = 0  # given up: past the delivery deadline, not retriable, or abandoned
    retried: int = 0  # deliveries attempted again after a failure
    moved: int = 0  # dropped because their source moved to another worker


@dataclass(slots=True)
class _Delivery:
    frame: AnnotatedFrame
    record: KafkaRecord
    queued_at: float  # time.monotonic() when it was handed to the publisher
    give_up_at: float  # time.monotonic() past which a failure is final
    attempts: int = 0  # times handed to the producer


@dataclass
class _SourceLine:
    """One source's unsettled records, and the task that hands them to the producer in order."""

    waiting: deque[_Delivery] = field(default_factory=deque)  # not yet handed over
    sending: list[_Delivery] = field(default_factory=list)  # handed over (or to be re-sent), not settled
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while nothing of the line is unsettled
    task: asyncio.Task[None] | None = None
    broken: str | None = None  # why this line's task ended early
    producer: AIOKafkaProducer | None = None  # the source's own transactional producer, once claimed
    last: AnnotatedFrame | None = None  # the newest frame published through this line


class Publisher:
    def __init__(
        self,
        settings: KafkaSettings,
        report: DeliveryReport | None = None,
        *,
        producer: Producer | None = None,
        ownership: Ownership | None = None,
        progress: ProgressLog | None = None,
        classifier: str | None = None,
    ) -> None:
        """`producer`: by default an AIOKafkaProducer from `settings`, whose topic is created if it is missing;
        `classifier`: the name of the classifier that annotates, put in each record's header."""
        self.settings = settings
        self._classifier = classifier
        self._ownership = ownership
        self._progress = progress
        self.stats = PublishStats()
        self._report = report
        self._own_producer = producer is None
        self._producer: Producer = producer or _kafka_producer(settings)
        self._resend = RetryPolicy(settings.retry_backoff_ms / 1000, MAX_RETRY_BACKOFF_S)
        self._lines: dict[str, _SourceLine] = {}
        self._slots = asyncio.Semaphore(settings.max_in_flight_records)
        self._unsettled = 0
        self._settled = asyncio.Event()  # set while nothing is unsettled
        self._settled.set()
        self._lost_since_flush = 0
        self._state = "new"  # → running → stopped

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None:
            await self.stop()
        else:  # the owner is failing or cancelled: do not wait out delivery deadlines
            await self.abandon(f"the run ended early ({exc_type.__name__})")

    async def start(self) -> None:
        """Connect (and create the topic if it is missing) within `connect_timeout_ms`; `KafkaUnreachable` if not.

        Idempotence that was on by default (not asked for) is dropped, with a warning, against a broker
        that refuses it, such as Tansu (`framelabel broker`): records reach it all the same."""
        if self._state != "new":
            raise PublishError("a publisher starts once")
        self._state = "running"
        log.info("connecting to Kafka at %s", self.settings.bootstrap_servers)
        try:
            if self._own_producer:
                await wait_for_broker(self.settings)
            try:
                await self._connect()
            except KafkaError as exc:
                if not (self._own_producer and self.settings.enable_idempotence is None and self.settings.idempotent):
                    raise
                log.warning(
                    "Kafka at %s refused the idempotent producer (%s): publishing without it, so a re-send after a "
                    "lost acknowledgement may store a record twice; kafka.enable_idempotence: false skips this try, "
                    "true makes it an error",
                    self.settings.bootstrap_servers,
                    type(exc).__name__,
                )
                with contextlib.suppress(Exception):
                    await self._producer.stop()
                self.settings = self.settings.model_copy(update={"enable_idempotence": False})
                self._producer = _kafka_producer(self.settings)
                await self._connect()
        except BaseException as exc:
            self._state = "stopped"
            with contextlib.suppress(Exception):
                await self._producer.stop()
            if isinstance(exc, KafkaError | OSError | TimeoutError):
                refused_idempotence = isinstance(exc, KafkaError) and self.settings.idempotent
                hint = IDEMPOTENCE_HINT if refused_idempotence else ""
                raise unreachable(self.settings, exc, hint) from exc
            raise
        log.info("publishing to Kafka topic %s at %s", self.settings.topic, self.settings.bootstrap_servers)

    async def _connect(self) -> None:
        within_s = self.settings.connect_timeout_ms / 1000
        async with (
            saying_while_waiting(log, f"Kafka at {self.settings.bootstrap_servers}", within_s),
            asyncio.timeout(within_s),
        ):
            if self._own_producer:
                await ensure_topic(self.settings)
            await self._producer.start()

    @property
    def unsettled(self) -> int:
        return self._unsettled

    async def claim(self, source_id: str, transactional_id: str) -> None:
        """Give the source a transactional producer of its own; starting it fences any older holder of the id.

        Raises `PublishError` when the broker has no transactions."""
        try:
            producer = await started_producer(
                self.settings, **_batching(self.settings), transactional_id=transactional_id
            )
        except KafkaUnreachable as exc:
            raise PublishError(f"no transactional producer for {source_id}: {exc}") from exc
        self._line(source_id).producer = producer

    async def release(self, source_id: str, *, ended: bool = False) -> bool:
        """Wait until the source's records are settled (acknowledged, lost or moved), then forget its line.

        `ended`: the source read to its end; its progress is recorded as ended (with its own producer, in a
        transaction if it has one), unless a record of it was not published here or the source has moved.
        Whether that was recorded."""
        line = self._lines.get(source_id)
        if line is None:
            return False
        if line.broken is None:
            await line.idle.wait()
        recorded = False
        last = line.last
        if ended and line.broken is None and last is not None and await self._still_holds(source_id):
            recorded = await self._record_end(line, last)
        line.broken = line.broken or "released"
        if line.task is not None:
            line.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await line.task
        del self._lines[source_id]
        await _stop_own_producer(line)
        return recorded

    async def _still_holds(self, source_id: str) -> bool:
        return self._ownership is None or await self._ownership.holds(source_id)

    async def _record_end(self, line: _SourceLine, last: AnnotatedFrame) -> bool:
        if self._progress is None:
            return False
        try:
            async with line.producer.transaction() if line.producer else contextlib.nullcontext():
                return await self._record_progress(line.producer or self._producer, last, ended=True)
        except KafkaError as exc:
            log.warning("source %s: its end not recorded: %r", last.info.source_id, exc)
            return False

    async def publish(self, frame: AnnotatedFrame) -> None:
        """Queue the frame's record; wait (bounded) while too many records are unsettled.

        Raises `PublishError` for a record that can never be sent (larger than `max_request_bytes`),
        and when the publisher, or its source's line, has stopped."""
        if self._state != "running":
            raise PublishError("the publisher is not running: start it first, and not after stop()")
        info = frame.info
        line = self._line(info.source_id)
        if line.broken is not None:
            raise PublishError(f"cannot publish {info.source_id} frame {info.index}: {line.broken}")
        worker = None if self._progress is None else self._progress.worker
        record = encode_record(frame, self.settings.value_format, worker, self._classifier)
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(record.key, record.value, record.headers)
        if size > self.settings.max_request_bytes:  # aiokafka would only refuse it later, in the line's task
            raise PublishError(
                f"the record of {info.source_id} frame {info.index} is {size} bytes, more than "
                f"kafka.max_request_bytes {self.settings.max_request_bytes}"
            )
        now = time.monotonic()
        await self._take_slot()
        line.waiting.append(_Delivery(frame, record, now, now + self.settings.delivery_timeout_ms / 1000))
        line.idle.clear()
        line.wake.set()

    async def flush(self) -> None:
        """Wait until every record published so far is acknowledged or lost; raise if any was lost."""
        await self._settled.wait()
        lost, self._lost_since_flush = self._lost_since_flush, 0
        if lost:
            records = "record was" if lost == 1 else "records were"
            raise PublishError(
                f"{lost} {records} not delivered to topic {self.settings.topic} at {self.settings.bootstrap_servers}"
            )

    async def stop(self) -> None:
        """Flush, then close; raises like flush() when records were lost. Safe to call twice."""
        if self._state == "stopped":
            return
        try:
            await self.flush()
        finally:
            await self._close()

    async def abandon(self, reason: str) -> None:
        """Give up on every unsettled record (each is reported lost, one log line per source), then close."""
        if self._state == "stopped":
            return
        await self._cancel_lines()
        for source_id, line in self._lines.items():
            self._lose(source_id, [*line.sending, *line.waiting], f"given up: {reason}")
            line.sending, line.waiting = [], deque()
        await self._close()

    async def _close(self) -> None:
        self._state = "stopped"
        await self._cancel_lines()
        for line in self._lines.values():
            await _stop_own_producer(line)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):  # aiokafka's stop() waits for batches still queued
                await self._producer.stop()
        except TimeoutError:
            log.warning("the Kafka producer did not close within %.0f s; leaving it", CLOSE_TIMEOUT_S)

    async def _cancel_lines(self) -> None:
        for line in self._lines.values():
            if line.task is not None:
                line.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await line.task

    def _line(self, source_id: str) -> _SourceLine:
        line = self._lines.get(source_id)
        if line is None:
            line = self._lines[source_id] = _SourceLine()
            line.task = asyncio.create_task(self._supervise(source_id, line), name=f"framelabel-publish-{source_id}")
        return line

    async def _take_slot(self) -> None:
        if self.settings.max_block_ms is None:
            await self._slots.acquire()
        else:
            timeout_s = self.settings.max_block_ms / 1000
            try:
                async with asyncio.timeout(timeout_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise PublishError(
                    f"{self._unsettled} records still unacknowledged by Kafka at {self.settings.bootstrap_servers} "
                    f"after waiting {timeout_s:g} s for room"
                ) from None
        self._unsettled += 1
        self._settled.clear()

    def _free_slots(self, count: int) -> None:
        self._unsettled -= count
        for _ in range(count):
            self._slots.release()
        if self._unsettled == 0:
            self._settled.set()

    async def _supervise(self, source_id: str, line: _SourceLine) -> None:
        """Run the line; if it fails, settle its records as lost so that nobody waits for them."""
        try:
            await self._deliver_in_order(source_id, line)
        except Exception as exc:
            line.broken = f"its delivery stopped on an internal error: {exc!r}"
            log.error("source %s: %s", source_id, line.broken, exc_info=exc)
            self._lose(source_id, [*line.sending, *line.waiting], line.broken)
            line.sending, line.waiting = [], deque()

    async def _deliver_in_order(self, source_id: str, line: _SourceLine) -> None:
        """Hand the line's records over a batch at a time; re-send failures before anything newer."""
        attempts = self._resend.start()
        while True:
            if not line.sending:
                if not line.waiting:
                    line.idle.set()
                await line.wake.wait()
            line.wake.clear()
            line.sending.extend(line.waiting)
            line.waiting.clear()
            if self._ownership is not None and not await self._ownership.holds(source_id):
                self._drop_moved(source_id, line)
                return
            try:
                outcomes = await self._send_batch(line)
            except ProducerFenced:
                log.warning("source %s: another worker claimed it (this one is fenced)", source_id)
                self._drop_moved(source_id, line)
                return
            self._settle(source_id, line, outcomes)
            if not line.sending:
                attempts.succeeded()
                continue
            delay = attempts.failed()  # the re-send policy has no deadline: each record has its own
            error = next(error for error in outcomes if error is not None)
            log.warning(
                "%d records of %s not acknowledged (%s); re-sending from frame %d in %.1f s, for up to %.0f s more "
                "(kafka.delivery_timeout_ms)",
                len(line.sending),
                source_id,
                error,
                line.sending[0].frame.info.index,
                delay,
                max(0.0, line.sending[0].give_up_at - time.monotonic()),
            )
            await asyncio.sleep(delay)

    async def _send_batch(self, line: _SourceLine) -> list[BaseException | None]:
        """Hand the line's batch over in order and wait for all (with its progress record, if kept); per record,
        its error or None. A claimed source's batch and progress go in one transaction: all or nothing."""
        batch = line.sending
        if line.producer is None:
            outcomes = await self._send_records(self._producer, batch)
            if self._progress is not None and all(outcome is None for outcome in outcomes):
                await self._record_progress(self._producer, batch[-1].frame)
            return outcomes
        try:
            async with line.producer.transaction():
                outcomes = await self._send_records(line.producer, batch)
                failed = next((outcome for outcome in outcomes if outcome is not None), None)
                if failed is not None:
                    raise failed  # aborts the transaction: the whole batch is sent again
                if self._progress is not None:
                    await self._record_progress(line.producer, batch[-1].frame)
        except ProducerFenced:
            raise
        except KafkaError as exc:
            return [exc] * len(batch)
        return [None] * len(batch)

    async def _record_progress(self, producer: Producer, frame: AnnotatedFrame, ended: bool = False) -> bool:
        """Whether the progress was recorded; fenced is raised."""
        assert self._progress is not None
        key, value = self._progress.record(frame, ended)
        try:
            now_ms = round(time.time() * 1000)
            await (await producer.send(self._progress.topic, value, key=key, timestamp_ms=now_ms, headers=[]))
        except ProducerFenced:
            raise
        except KafkaError as exc:  # the next batch records newer progress; a resume repeats at most this batch
            log.warning("source %s: progress not recorded: %r", frame.info.source_id, exc)
            return False
        return True

    async def _send_records(self, producer: Producer, batch: list[_Delivery]) -> list[BaseException | None]:
        """Hand each record over in order and wait for all; per record, its error or None."""
        futures: list[asyncio.Future[Any]] = []
        refused: KafkaError | None = None
        for delivery in batch:
            record = delivery.record
            try:
                future = await producer.send(
                    self.settings.topic,
                    record.value,
                    key=record.key,
                    timestamp_ms=record.timestamp_ms,
                    headers=record.headers,
                )
            except KafkaError as exc:  # not queued; nor are the records after it, to keep the order
                refused = exc
                break
            delivery.attempts += 1
            futures.append(future)
        results = await asyncio.gather(*futures, return_exceptions=True)
        errors: list[BaseException | None] = [r if isinstance(r, BaseException) else None for r in results]
        if refused is None:
            return errors
        # the refused record carries its error; those after it were not handed over: a retriable error
        # makes them wait their turn behind it, not count as lost
        held_back = KafkaTimeoutError("held back behind a record the producer refused")
        return [*errors, refused] + [held_back] * (len(batch) - len(futures) - 1)

    def _drop_moved(self, source_id: str, line: _SourceLine) -> None:
        """The source moved to another worker: its unsettled records are that worker's to publish now."""
        line.broken = f"source {source_id} moved to another worker"
        dropped = [*line.sending, *line.waiting]
        line.sending, line.waiting = [], deque()
        self.stats.moved += len(dropped)
        self._free_slots(len(dropped))
        if dropped:
            log.info("source %s moved to another worker: %d records not published here", source_id, len(dropped))
        if self._report is not None:
            self._report.moved([delivery.frame for delivery in dropped])
        line.idle.set()

    def _settle(self, source_id: str, line: _SourceLine, outcomes: list[BaseException | None]) -> None:
        """Count the outcome of one batch; keep in `line.sending` what is to be sent again."""
        again: list[_Delivery] = []
        lost: dict[str, list[_Delivery]] = {}
        now = time.monotonic()
        retries = self.settings.delivery_retries
        for delivery, error in zip(line.sending, outcomes, strict=True):
            if error is None:
                self.stats.published += 1
                line.last = delivery.frame
                self._free_slots(1)
                if self._report is not None:
                    self._report.published(delivery.frame, now - delivery.queued_at)
            elif _retryable(error) and now < delivery.give_up_at and (retries is None or delivery.attempts <= retries):
                self.stats.retried += 1
                again.append(delivery)
            else:
                lost.setdefault(f"not delivered after {delivery.attempts} attempts: {error!r}", []).append(delivery)
        line.sending = again
        for reason, deliveries in lost.items():
            self._lose(source_id, deliveries, reason)

    def _lose(self, source_id: str, deliveries: list[_Delivery], reason: str) -> None:
        if not deliveries:
            return
        self.stats.lost += len(deliveries)
        self._lost_since_flush += len(deliveries)
        self._free_slots(len(deliveries))
        first, last = deliveries[0].frame.info.index, deliveries[-1].frame.info.index
        frames = f"frame {first}" if first == last else f"frames {first}–{last}"
        log.error("%d records of %s lost (%s): %s", len(deliveries), source_id, frames, reason)
        if self._report is not None:
            self._report.lost([delivery.frame for delivery in deliveries], reason)


async def _stop_own_producer(line: _SourceLine) -> None:
    producer, line.producer = line.producer, None
    if producer is not None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await producer.stop()


def _retryable(exc: BaseException) -> bool:
    # A batch that outlived request_timeout_ms fails with KafkaTimeoutError, which aiokafka marks final;
    # for us it is the typical outage, worth another attempt.
    return isinstance(exc, KafkaTimeoutError) or (isinstance(exc, KafkaError) and exc.retriable)


def _batching(settings: KafkaSettings) -> dict[str, Any]:
    return {
        "linger_ms": settings.linger_ms,
        "max_batch_size": settings.max_batch_bytes,
        "max_request_size": settings.max_request_bytes,
        "compression_type": settings.compression,
    }


def _kafka_producer(settings: KafkaSettings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **client_options(settings), **_batching(settings), acks=settings.acks, enable_idempotence=settings.idempotent
    )
