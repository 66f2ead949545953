"""The Publish stage: one Kafka record per AnnotatedFrame, batched, acknowledged, never silently lost.

`publish()` only queues the record in aiokafka, which batches per partition
(`linger_ms`, `max_batch_bytes`) and retries retriable errors until
`request_timeout_ms`. A record whose delivery still fails is sent again by a
retry task, in the order the failures came, with capped exponential backoff and
jitter, `delivery_retries` times; after that it counts as failed, is logged, and
the next `flush()` raises. Delivery is at least once: a retried record may be
stored twice.

Backpressure: at most `max_in_flight_records` records are unacknowledged at a
time; `publish()` waits for room up to `max_block_ms`, then raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.codec import has_gzip, has_lz4, has_snappy, has_zstd
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, TopicAlreadyExistsError, for_code
from aiokafka.helpers import create_ssl_context

from pipeline.frames import AnnotatedFrame
from pipeline.records import KafkaRecord, ValueFormat, encode_record
from services.errors import ConfigError, FramelabelError

log = logging.getLogger("framelabel.publish")

MiB = 1024 * 1024
DEFAULT_TOPIC = "framelabel.annotations"
CLIENT_ID = "framelabel"
MAX_RETRY_BACKOFF_S = 10.0

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
    max_in_flight_records: int = 1000  # unacknowledged records before publish() waits
    max_block_ms: int = 60_000  # how long publish() waits for room before it raises
    delivery_retries: int = 3  # our re-sends of a record whose delivery failed, after aiokafka's own
    retry_backoff_ms: int = 500  # first backoff; doubles per retry up to MAX_RETRY_BACKOFF_S
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
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"kafka.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("linger_ms", "delivery_retries", "retry_backoff_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"kafka.{name} must not be negative, got {getattr(self, name)}")
        if self.compression is not None and not CODEC_AVAILABLE[self.compression]():
            raise ConfigError(f"kafka.compression {self.compression!r} needs cramjam: pip install 'aiokafka[all]'")
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ConfigError(f"kafka.security_protocol {self.security_protocol} needs sasl_username and sasl_password")


@dataclass(slots=True)
class PublishStats:
    published: int = 0  # acknowledged by Kafka
    failed: int = 0  # given up after every retry
    retried: int = 0  # deliveries attempted again after a failure


@dataclass(slots=True)
class _Delivery:
    frame: AnnotatedFrame
    record: KafkaRecord
    attempts: int = 1
    retry_at: float = 0.0  # time.monotonic() when the next attempt may start


class Publisher:
    def __init__(self, settings: KafkaSettings, on_published: Callable[[AnnotatedFrame], None] | None = None) -> None:
        self.settings = settings
        self.stats = PublishStats()
        self._on_published = on_published
        self._producer: AIOKafkaProducer | None = None
        self._retry_task: asyncio.Task[None] | None = None
        self._retries: asyncio.Queue[_Delivery] = asyncio.Queue()  # bounded by the in-flight slots
        self._slots = asyncio.Semaphore(settings.max_in_flight_records)
        self._send_lock = asyncio.Lock()  # FIFO, so concurrent callers are queued in call order
        self._unacknowledged = 0
        self._settled = asyncio.Event()  # set while nothing is unacknowledged
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
        self._retry_task = asyncio.create_task(self._resend_failed(producer), name="framelabel-publish-retry")
        log.info("publishing to Kafka topic %s at %s", settings.topic, settings.bootstrap_servers)

    async def publish(self, frame: AnnotatedFrame) -> None:
        """Queue the frame's record; wait (bounded) while too many records are unacknowledged."""
        if self._producer is None or self._stopped:
            raise PublishError("the publisher is not running: call start() first, and not after stop()")
        delivery = _Delivery(frame, encode_record(frame, self.settings.value_format))
        await self._take_slot()
        try:
            await self._send(self._producer, delivery)
        except KafkaError as exc:
            self._free_slot()
            info = frame.info
            raise PublishError(f"cannot queue the record of {info.source_id} frame {info.index}: {exc}") from exc
        except BaseException:
            self._free_slot()
            raise

    async def flush(self) -> None:
        """Wait until every record published so far is acknowledged or given up; raise if any was given up."""
        await self._settled.wait()
        failed, self._failed_since_flush = self._failed_since_flush, 0
        if failed:
            settings = self.settings
            records = "record was" if failed == 1 else "records were"
            raise PublishError(
                f"{failed} {records} not delivered to topic {settings.topic} at {settings.bootstrap_servers} "
                f"after {settings.delivery_retries} retries (see the log for which)"
            )

    async def stop(self) -> None:
        """Flush, then close; raises like flush() when records were lost. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        try:
            await self.flush()
        finally:
            if self._retry_task is not None:
                self._retry_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._retry_task
            if self._producer is not None:
                await self._producer.stop()

    async def _take_slot(self) -> None:
        timeout_s = self.settings.max_block_ms / 1000
        try:
            async with asyncio.timeout(timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise PublishError(
                f"{self._unacknowledged} records still unacknowledged by Kafka at {self.settings.bootstrap_servers} "
                f"after waiting {timeout_s:g} s for room"
            ) from None
        self._unacknowledged += 1
        self._settled.clear()

    def _free_slot(self) -> None:
        self._unacknowledged -= 1
        self._slots.release()
        if self._unacknowledged == 0:
            self._settled.set()

    async def _send(self, producer: AIOKafkaProducer, delivery: _Delivery) -> None:
        record = delivery.record
        async with self._send_lock:
            future: asyncio.Future[Any] = await producer.send(
                self.settings.topic,
                record.value,
                key=record.key,
                timestamp_ms=record.timestamp_ms,
                headers=record.headers,
            )
        future.add_done_callback(functools.partial(self._delivery_done, delivery))

    def _delivery_done(self, delivery: _Delivery, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self._delivery_failed(delivery, KafkaError("delivery cancelled"))
        elif (exc := future.exception()) is not None:
            self._delivery_failed(delivery, exc)
        else:
            self.stats.published += 1
            self._free_slot()
            if self._on_published is not None:
                try:
                    self._on_published(delivery.frame)
                except Exception:
                    log.exception("on_published failed for %s frame %d", *_frame_id(delivery))

    def _delivery_failed(self, delivery: _Delivery, exc: BaseException) -> None:
        if _retryable(exc) and delivery.attempts <= self.settings.delivery_retries and not self._retry_task_done():
            backoff_s = min(MAX_RETRY_BACKOFF_S, self.settings.retry_backoff_ms / 1000 * 2 ** (delivery.attempts - 1))
            delivery.retry_at = time.monotonic() + backoff_s * random.uniform(0.5, 1.0)  # noqa: S311 - jitter
            delivery.attempts += 1
            self.stats.retried += 1
            self._retries.put_nowait(delivery)
            return
        self.stats.failed += 1
        self._failed_since_flush += 1
        self._free_slot()
        source_id, index = _frame_id(delivery)
        log.error("record of %s frame %d not delivered after %d attempts: %r", source_id, index, delivery.attempts, exc)

    def _retry_task_done(self) -> bool:
        return self._retry_task is None or self._retry_task.done()

    async def _resend_failed(self, producer: AIOKafkaProducer) -> None:
        while True:
            delivery = await self._retries.get()
            delay_s = delivery.retry_at - time.monotonic()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            try:
                await self._send(producer, delivery)
            except KafkaError as exc:
                self._delivery_failed(delivery, exc)


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
