"""The Publish stage: one Kafka record per AnnotatedFrame, in each source's frame order, never silently lost.

`publish()` puts the frame's record in its source's line and returns. A task
per source hands the waiting records to aiokafka, which batches per partition
(`linger_ms`, `max_batch_bytes`) and retries retriable errors until
`request_timeout_ms`, waits until each of them is acknowledged or failed, and
only then hands over the next ones. A failed record is sent again, ahead of any
later record of its source, with capped exponential backoff and jitter, until
it is acknowledged or `delivery_timeout_ms` has passed since `publish()` (or
after `delivery_retries` re-sends, when set). Only then does it count as
failed: it is logged with its source and frame, and the next `flush()` raises.

Why one batch at a time per source: aiokafka fails a batch that outlived
`request_timeout_ms` while younger batches of the same partition may still get
through, so a re-send would land after newer records. Holding a source's next
records back until the previous ones are settled keeps every record's first
copy in frame order. A re-sent record may have been stored already (only its
acknowledgement was lost): delivery is at least once, and a duplicate repeats
a record stored earlier. With the idempotent producer (the default against real
Kafka) aiokafka retries without expiry and the broker drops duplicates.

Backpressure: at most `max_in_flight_records` records are unsettled at a time;
`publish()` waits for room, up to `max_block_ms` when set, then raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.codec import has_gzip, has_lz4, has_snappy, has_zstd
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, TopicAlreadyExistsError, for_code
from aiokafka.helpers import create_ssl_context
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from pipeline.frames import AnnotatedFrame
from pipeline.records import KafkaRecord, ValueFormat, encode_record
from services.errors import ConfigError, FramelabelError

log = logging.getLogger("framelabel.publish")

MiB = 1024 * 1024
DEFAULT_TOPIC = "framelabel.annotations"
CLIENT_ID = "framelabel"
MAX_RETRY_BACKOFF_S = 10.0
DEFAULT_DELIVERY_TIMEOUT_MS = 300_000  # a broker outage this long loses nothing

Compression = Literal["gzip", "snappy", "lz4", "zstd"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

CODEC_AVAILABLE: dict[str, Callable[[], bool]] = {
    "gzip": has_gzip,
    "snappy": has_snappy,
    "lz4": has_lz4,
    "zstd": has_zstd,
}


class PublishError(FramelabelError):
    """Records could not be handed to Kafka or were not acknowledged; the message says how many and where."""


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str  # "host:port[,host:port…]"
    topic: str = DEFAULT_TOPIC
    partitions: int = 3  # used only when the topic has to be created
    replication_factor: int = 1
    acks: Literal["all", 1] = "all"
    linger_ms: int = 20
    max_batch_bytes: int = 1 * MiB  # per partition
    compression: Compression | None = None
    enable_idempotence: bool = True  # needs a real Kafka: Tansu rejects the idempotent producer
    value_format: ValueFormat = "protobuf"
    request_timeout_ms: int = 30_000  # also how long aiokafka keeps retrying a batch
    connect_timeout_ms: int = 10_000  # bound on start(): bootstrap and topic creation
    max_request_bytes: int = 4 * MiB  # the largest record; brokers default to ~1 MiB (message.max.bytes)
    max_in_flight_records: int = 1000  # unsettled records before publish() waits
    max_block_ms: int | None = None  # how long publish() waits for room; None: until a record settles
    delivery_timeout_ms: int = DEFAULT_DELIVERY_TIMEOUT_MS  # from publish() to acknowledged, re-sends included
    delivery_retries: int | None = None  # a cap on our re-sends of a record, after aiokafka's own; None: no cap
    retry_backoff_ms: int = 500  # first backoff; doubles per failed attempt up to MAX_RETRY_BACKOFF_S
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    def __post_init__(self) -> None:
        if not self.bootstrap_servers.strip():
            raise ConfigError("kafka.bootstrap_servers is empty")
        if not self.topic.strip():
            raise ConfigError("kafka.topic is empty")
        for name in (
            "partitions",
            "replication_factor",
            "max_batch_bytes",
            "request_timeout_ms",
            "connect_timeout_ms",
            "max_request_bytes",
            "max_in_flight_records",
            "max_block_ms",
            "delivery_timeout_ms",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"kafka.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("linger_ms", "delivery_retries", "retry_backoff_ms"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"kafka.{name} must not be negative, got {getattr(self, name)}")
        if self.compression is not None and not CODEC_AVAILABLE[self.compression]():
            raise ConfigError(f"kafka.compression {self.compression!r} needs cramjam: pip install 'aiokafka[all]'")
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ConfigError(f"kafka.security_protocol {self.security_protocol} needs sasl_username and sasl_password")


@dataclass(slots=True)
class PublishStats:
    published: int = 0  # acknowledged by Kafka
    failed: int = 0  # given up: past the delivery deadline, or not retriable
    retried: int = 0  # deliveries attempted again after a failure


@dataclass(slots=True)
class _Delivery:
    frame: AnnotatedFrame
    record: KafkaRecord
    give_up_at: float  # time.monotonic() past which a failure is final
    attempts: int = 0  # times handed to aiokafka


@dataclass
class _SourceLine:
    """One source's records not yet handed to aiokafka, and the task that hands them over in order."""

    waiting: deque[_Delivery] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Publisher:
    def __init__(self, settings: KafkaSettings, on_published: Callable[[AnnotatedFrame], None] | None = None) -> None:
        self.settings = settings
        self.stats = PublishStats()
        self._on_published = on_published
        self._producer: AIOKafkaProducer | None = None
        self._lines: dict[str, _SourceLine] = {}
        self._slots = asyncio.Semaphore(settings.max_in_flight_records)
        self._unsettled = 0
        self._settled = asyncio.Event()  # set while nothing is unsettled
        self._settled.set()
        self._failed_since_flush = 0
        self._stopped = False

    async def start(self) -> None:
        """Connect and create the topic if it is missing, within `connect_timeout_ms`."""
        if self._producer is not None or self._stopped:
            raise PublishError("a publisher starts once")
        settings = self.settings
        options = _client_options(settings)
        producer = AIOKafkaProducer(
            **options,
            acks=settings.acks,
            linger_ms=settings.linger_ms,
            max_batch_size=settings.max_batch_bytes,
            max_request_size=settings.max_request_bytes,
            compression_type=settings.compression,
            enable_idempotence=settings.enable_idempotence,
        )
        try:
            async with asyncio.timeout(settings.connect_timeout_ms / 1000):
                await _ensure_topic(options, settings)
                await producer.start()
        except BaseException as exc:
            await producer.stop()
            if isinstance(exc, KafkaConnectionError | OSError | TimeoutError):
                reason = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
                raise PublishError(f"cannot reach Kafka at {settings.bootstrap_servers}: {reason}") from exc
            if isinstance(exc, KafkaError):
                hint = (
                    " (brokers without the idempotent producer, such as the embedded Tansu, "
                    "need kafka.enable_idempotence: false)"
                    if settings.enable_idempotence
                    else ""
                )
                raise PublishError(f"Kafka at {settings.bootstrap_servers} refused the producer: {exc}{hint}") from exc
            raise
        self._producer = producer
        log.info("publishing to Kafka topic %s at %s", settings.topic, settings.bootstrap_servers)

    async def publish(self, frame: AnnotatedFrame) -> None:
        """Queue the frame's record; wait (bounded) while too many records are unsettled."""
        if self._producer is None or self._stopped:
            raise PublishError("the publisher is not running: call start() first, and not after stop()")
        record = encode_record(frame, self.settings.value_format)
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(record.key, record.value, record.headers)
        if size > self.settings.max_request_bytes:  # checked here: aiokafka would only refuse it in the line's task
            info = frame.info
            raise PublishError(
                f"cannot queue the record of {info.source_id} frame {info.index}: it is {size} bytes, more than "
                f"kafka.max_request_bytes (aiokafka's max_request_size) {self.settings.max_request_bytes}"
            )
        give_up_at = time.monotonic() + self.settings.delivery_timeout_ms / 1000
        await self._take_slot()
        line = self._line(self._producer, frame.info.source_id)
        line.waiting.append(_Delivery(frame, record, give_up_at))
        line.wake.set()

    async def flush(self) -> None:
        """Wait until every record published so far is acknowledged or given up; raise if any was given up."""
        await self._settled.wait()
        failed, self._failed_since_flush = self._failed_since_flush, 0
        if failed:
            settings = self.settings
            records = "record was" if failed == 1 else "records were"
            raise PublishError(
                f"{failed} {records} not delivered to topic {settings.topic} at {settings.bootstrap_servers} "
                "(see the log for which)"
            )

    async def stop(self) -> None:
        """Flush, then close; raises like flush() when records were lost. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        try:
            await self.flush()
        finally:
            for line in self._lines.values():
                if line.task is not None:
                    line.task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await line.task
            if self._producer is not None:
                await self._producer.stop()

    def _line(self, producer: AIOKafkaProducer, source_id: str) -> _SourceLine:
        line = self._lines.get(source_id)
        if line is None:
            line = self._lines[source_id] = _SourceLine()
            line.task = asyncio.create_task(
                self._deliver_in_order(producer, source_id, line), name=f"framelabel-publish-{source_id}"
            )
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

    def _free_slot(self) -> None:
        self._unsettled -= 1
        self._slots.release()
        if self._unsettled == 0:
            self._settled.set()

    async def _deliver_in_order(self, producer: AIOKafkaProducer, source_id: str, line: _SourceLine) -> None:
        """Hand the line's records to aiokafka a batch at a time; re-send failures before anything newer."""
        failed: list[_Delivery] = []
        failures_in_a_row = 0
        while True:
            if not failed:
                await line.wake.wait()
            line.wake.clear()
            batch = [*failed, *line.waiting]
            line.waiting.clear()
            outcomes = await self._send_batch(producer, batch)
            failed = [
                delivery for delivery, error in zip(batch, outcomes, strict=True) if self._settle(delivery, error)
            ]
            if not failed:
                failures_in_a_row = 0
                continue
            failures_in_a_row += 1
            backoff_s = min(MAX_RETRY_BACKOFF_S, self.settings.retry_backoff_ms / 1000 * 2 ** (failures_in_a_row - 1))
            backoff_s *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter
            log.warning(
                "%d records of %s not acknowledged (%s); re-sending from frame %d in %.1f s",
                len(failed),
                source_id,
                next(error for error in outcomes if error is not None),
                failed[0].frame.info.index,
                backoff_s,
            )
            await asyncio.sleep(backoff_s)

    async def _send_batch(self, producer: AIOKafkaProducer, batch: list[_Delivery]) -> list[BaseException | None]:
        """Hand each record to aiokafka in order and wait for all; per record, its error or None."""
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
        return errors + [refused] * (len(batch) - len(futures))

    def _settle(self, delivery: _Delivery, error: BaseException | None) -> bool:
        """Count the outcome of one attempt; True if the record is to be sent again."""
        if error is None:
            self.stats.published += 1
            self._free_slot()
            if self._on_published is not None:
                try:
                    self._on_published(delivery.frame)
                except Exception:
                    log.exception("on_published failed for %s frame %d", *_frame_id(delivery))
            return False
        retries = self.settings.delivery_retries
        if (
            _retryable(error)
            and time.monotonic() < delivery.give_up_at
            and (retries is None or delivery.attempts <= retries)
        ):
            self.stats.retried += 1
            return True
        self.stats.failed += 1
        self._failed_since_flush += 1
        self._free_slot()
        source_id, index = _frame_id(delivery)
        log.error(
            "record of %s frame %d not delivered after %d attempts: %r", source_id, index, delivery.attempts, error
        )
        return False


def _frame_id(delivery: _Delivery) -> tuple[str, int]:
    return delivery.frame.info.source_id, delivery.frame.info.index


def _retryable(exc: BaseException) -> bool:
    # A batch that outlived request_timeout_ms fails with KafkaTimeoutError, which aiokafka marks final;
    # for us it is the typical outage, worth another attempt.
    return isinstance(exc, KafkaTimeoutError) or (isinstance(exc, KafkaError) and exc.retriable)


def _client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection options shared by the producer and the admin client."""
    return {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": CLIENT_ID,
        "request_timeout_ms": settings.request_timeout_ms,
        "security_protocol": settings.security_protocol,
        "ssl_context": _ssl_context(settings),
        "sasl_mechanism": settings.sasl_mechanism,
        "sasl_plain_username": settings.sasl_username,
        "sasl_plain_password": settings.sasl_password,
    }


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext | None:
    if not settings.security_protocol.endswith("SSL"):
        return None
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=settings.ssl_cafile and str(settings.ssl_cafile),
            certfile=settings.ssl_certfile and str(settings.ssl_certfile),
            keyfile=settings.ssl_keyfile and str(settings.ssl_keyfile),
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"kafka TLS files cannot be loaded: {exc}") from exc
    return context


async def _ensure_topic(options: dict[str, Any], settings: KafkaSettings) -> None:
    """Create the topic unless it exists; listing first, since a metadata lookup of one topic may auto-create it."""
    admin = AIOKafkaAdminClient(**options)
    try:
        await admin.start()
        if settings.topic in await admin.list_topics():
            return
        response = await admin.create_topics(
            [NewTopic(settings.topic, settings.partitions, settings.replication_factor)]
        )
        for topic, error_code, *message in response.topic_errors:  # v1+ responses add a message
            error = for_code(error_code)
            if error_code and error is not TopicAlreadyExistsError:
                reason = message[0] if message and message[0] else error.__name__
                raise PublishError(f"cannot create topic {topic} at {settings.bootstrap_servers}: {reason}")
        log.info("created topic %s with %d partitions", settings.topic, settings.partitions)
    finally:
        await admin.close()
