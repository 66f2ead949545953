"""Read framelabel's records back from Kafka: annotations and events, for `framelabel consume` and applications.

    from pipeline.consumer import consume
    from pipeline.kafka import KafkaConnection

    async for item in consume(KafkaConnection(bootstrap_servers="kafka:9092", topic="framelabel.events"),
                              from_beginning=True, group_id="my-app"):
        print(item.source_id, item.label, item.state)  # an AnnotationEvent (or a DecodedRecord on an annotations topic)

Without `group_id`, every partition of the topic is assigned, from the beginning or from the end,
and nothing is committed. With it, the reader joins that consumer group and commits what it has
yielded (each batch once the next is asked for, and at the end), so a restart resumes after it:
at least once, as a crash between yield and commit repeats the uncommitted batch. A missing topic is
waited for (logged once). "Caught up" is judged by the topic staying quiet for `idle_timeout_s`, never
by end offsets, which Tansu reports wrong; for the same reason, starting from the end on Tansu may
replay the last record or so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from pipeline.events.record import decode_event, is_event_record
from pipeline.kafka import (
    EMBEDDED,
    GROUP_HEARTBEAT_INTERVAL_MS,
    GROUP_SESSION_TIMEOUT_MS,
    KafkaConnection,
    KafkaUnreachable,
    client_options,
    wait_for_broker,
)
from pipeline.records import DecodedRecord, RecordFormatError, decode_record
from services.api.event_pb2 import AnnotationEvent
from services.errors import FramelabelError

log = logging.getLogger("framelabel.consume")

CONNECT_TIMEOUT_MS = 10_000
POLL_TIMEOUT_MS = 100  # how finely the idle timeout is measured
TOPIC_WAIT_S = 0.5  # how often a missing topic is looked for
LARGEST_RECORD_BYTES = 16 * 1024 * 1024  # per-partition fetch size: records of several MiB must fit

Consumed = DecodedRecord | AnnotationEvent


class ConsumeError(FramelabelError):
    """The topic could not be read: Kafka unreachable, or it refused the reader."""


async def consume(
    connection: KafkaConnection,
    *,
    from_beginning: bool,
    max_records: int | None = None,
    source_id: str | None = None,
    idle_timeout_s: float | None = None,
    group_id: str | None = None,
    min_confidence: float | None = None,
) -> AsyncIterator[Consumed]:
    """Yield decoded annotation records and events, in order within each partition (so within each source).

    Stops after `max_records` (counted after the filters), or once nothing has arrived for
    `idle_timeout_s` (waiting for the topic included); with neither, runs until cancelled.
    `min_confidence` keeps the records with an annotation at or above it (and only those annotations),
    and the events whose peak reaches it. Records that are not framelabel's are logged and skipped.
    """
    if max_records is not None and max_records < 0:
        raise ValueError(f"max_records must not be negative, got {max_records}")
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise ValueError(f"min_confidence must lie in [0, 1], got {min_confidence}")
    if idle_timeout_s is not None and idle_timeout_s <= 0:
        raise ValueError(f"idle_timeout_s must be positive, got {idle_timeout_s}")
    if max_records == 0:
        return
    bootstrap, topic = connection.bootstrap_servers, connection.topic
    if bootstrap == EMBEDDED:
        raise ConsumeError("an embedded broker lives only as long as its run: give the address of a broker")
    consumer = AIOKafkaConsumer(
        **client_options(connection) | {"request_timeout_ms": min(connection.request_timeout_ms, CONNECT_TIMEOUT_MS)},
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
        max_partition_fetch_bytes=LARGEST_RECORD_BYTES,
        session_timeout_ms=GROUP_SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=GROUP_HEARTBEAT_INTERVAL_MS,
    )
    wanted_key = None if source_id is None else source_id.encode()
    last_record_at = time.monotonic()

    def idle() -> bool:
        return idle_timeout_s is not None and time.monotonic() - last_record_at >= idle_timeout_s

    try:
        await _wait_for_broker(connection)
        await _start(consumer, bootstrap)
        last_record_at = time.monotonic()
        if not await _wait_for_topic(consumer, connection, idle):
            return
        # without a group every partition is read, from where auto_offset_reset says; with one, a new group
        # starts there too and a known one resumes after its committed offsets
        consumer.subscribe([topic])
        yielded = 0
        while not idle():
            try:
                fetched = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
            except KafkaError as exc:
                raise ConsumeError(f"reading topic {topic} at {bootstrap} failed: {exc}") from exc
            for messages in fetched.values():
                for message in messages:
                    if wanted_key is not None and message.key != wanted_key:
                        continue
                    item = _decode(message, min_confidence)
                    if item is None:
                        continue
                    yield item
                    yielded += 1
                    if yielded == max_records:
                        await _commit(consumer, group_id, {_partition(message): message.offset + 1})
                        return
            if fetched or not await _positioned(consumer):  # joining a group, finding offsets: not idle
                last_record_at = time.monotonic()
            if fetched:
                await _commit(consumer, group_id, {tp: messages[-1].offset + 1 for tp, messages in fetched.items()})
    finally:
        await consumer.stop()


def _decode(message: ConsumerRecord[bytes, bytes], min_confidence: float | None) -> Consumed | None:
    try:
        if is_event_record(message.headers):
            event = decode_event(message.key, message.value, message.headers)
            return event if min_confidence is None or event.peak_confidence >= min_confidence else None
        record = decode_record(message.key, message.value, message.headers, message.timestamp)
    except RecordFormatError as exc:
        log.warning("skipped partition %d offset %d: %s", message.partition, message.offset, exc)
        return None
    if min_confidence is not None:
        kept = [a for a in record.response.annotations if a.confidence >= min_confidence]
        if not kept:
            return None
        del record.response.annotations[:]
        record.response.annotations.extend(kept)
    return record


def _partition(message: ConsumerRecord[bytes, bytes]) -> TopicPartition:
    return TopicPartition(message.topic, message.partition)


async def _commit(consumer: AIOKafkaConsumer, group_id: str | None, offsets: dict[TopicPartition, int]) -> None:
    if group_id is None:
        return
    try:
        await consumer.commit(offsets)
    except KafkaError as exc:
        raise ConsumeError(f"committing the offsets of group {group_id} failed: {exc}") from exc


async def _wait_for_broker(connection: KafkaConnection) -> None:
    try:
        await wait_for_broker(connection)
    except KafkaUnreachable as exc:
        raise ConsumeError(str(exc)) from exc


async def _start(consumer: AIOKafkaConsumer, bootstrap: str) -> None:
    try:
        await consumer.start()
    except (KafkaConnectionError, OSError) as exc:
        raise ConsumeError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    except KafkaError as exc:
        raise ConsumeError(f"Kafka at {bootstrap} refused the consumer: {exc}") from exc


async def _wait_for_topic(consumer: AIOKafkaConsumer, connection: KafkaConnection, idle: Callable[[], bool]) -> bool:
    """Wait until the topic exists, saying so once; False when the idle timeout passed first."""
    said = False
    while True:
        try:
            if connection.topic in await consumer.topics():
                return True
        except KafkaError as exc:
            raise ConsumeError(f"Kafka at {connection.bootstrap_servers} refused the consumer: {exc}") from exc
        if not said:
            log.info("waiting for topic %s at %s to be created", connection.topic, connection.bootstrap_servers)
            said = True
        if idle():
            return False
        await asyncio.sleep(TOPIC_WAIT_S)


async def _positioned(consumer: AIOKafkaConsumer) -> bool:
    """Whether partitions are assigned and their positions known (position() waits for the offset lookup)."""
    assigned = consumer.assignment()
    for partition in assigned:
        await consumer.position(partition)
    return bool(assigned)
