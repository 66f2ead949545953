"""Read framelabel's annotation records back from Kafka: `framelabel consume` and tests.

No consumer group: every partition of the topic is assigned, from the beginning
or from the end, and nothing is committed. "Caught up" is judged by the topic
staying quiet for `idle_timeout_s`, never by end offsets, which Tansu reports
wrong; for the same reason, starting from the end on Tansu may replay the last
record or so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from pipeline.kafka import EMBEDDED, KafkaConnection, client_options
from pipeline.records import DecodedRecord, RecordFormatError, decode_record
from services.errors import FramelabelError

log = logging.getLogger("framelabel.consume")

CONNECT_TIMEOUT_MS = 10_000
POLL_TIMEOUT_MS = 100  # how finely the idle timeout is measured
LARGEST_RECORD_BYTES = 16 * 1024 * 1024  # per-partition fetch size: records of several MiB must fit


class ConsumeError(FramelabelError):
    """The topic could not be read: Kafka unreachable, or no such topic."""


async def consume(
    connection: KafkaConnection,
    *,
    from_beginning: bool,
    max_records: int | None = None,
    source_id: str | None = None,
    idle_timeout_s: float | None = None,
) -> AsyncIterator[DecodedRecord]:
    """Yield decoded records, in order within each partition (so within each source).

    Stops after `max_records` records (counted after the `source_id` filter), or once
    no record has arrived for `idle_timeout_s`; with neither, runs until cancelled.
    Records that are not framelabel's are logged and skipped.
    """
    if max_records is not None and max_records < 0:
        raise ValueError(f"max_records must not be negative, got {max_records}")
    if max_records == 0:
        return
    wanted_key = None if source_id is None else source_id.encode()
    bootstrap, topic = connection.bootstrap_servers, connection.topic
    if bootstrap == EMBEDDED:
        raise ConsumeError("an embedded broker lives only as long as its run: give the address of a broker")
    consumer = AIOKafkaConsumer(
        **client_options(connection) | {"request_timeout_ms": min(connection.request_timeout_ms, CONNECT_TIMEOUT_MS)},
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=LARGEST_RECORD_BYTES,
    )
    try:
        await _assign_all_partitions(consumer, bootstrap, topic, from_beginning)
        yielded = 0
        last_record_at = time.monotonic()
        while idle_timeout_s is None or time.monotonic() - last_record_at < idle_timeout_s:
            try:
                fetched = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
            except KafkaError as exc:
                raise ConsumeError(f"reading topic {topic} at {bootstrap} failed: {exc}") from exc
            for messages in fetched.values():
                for message in messages:
                    if wanted_key is not None and message.key != wanted_key:
                        continue
                    try:
                        record = decode_record(message.key, message.value, message.headers, message.timestamp)
                    except RecordFormatError as exc:
                        log.warning("skipped partition %d offset %d: %s", message.partition, message.offset, exc)
                        continue
                    yield record
                    yielded += 1
                    if yielded == max_records:
                        return
            if fetched:
                last_record_at = time.monotonic()
    finally:
        await consumer.stop()


async def _assign_all_partitions(consumer: AIOKafkaConsumer, bootstrap: str, topic: str, from_beginning: bool) -> None:
    try:
        await consumer.start()
        await consumer.topics()  # refreshes the metadata partitions_for_topic reads
    except (KafkaConnectionError, OSError) as exc:
        raise ConsumeError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    except KafkaError as exc:
        raise ConsumeError(f"Kafka at {bootstrap} refused the consumer: {exc}") from exc
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise ConsumeError(f"topic {topic} does not exist at {bootstrap}")
    assigned = [TopicPartition(topic, partition) for partition in sorted(partitions)]
    consumer.assign(assigned)
    if from_beginning:
        await consumer.seek_to_beginning(*assigned)
    else:
        await consumer.seek_to_end(*assigned)
