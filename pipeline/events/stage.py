"""The events stage: annotations topic → EventTracker → events topic, in a consumer group.

Each batch of annotation records is turned into event messages; the messages, the new state of
every source the batch touched (the changelog topic `<events topic>.state`, one record per source,
in the partition of the source's annotations) and the batch's input offsets are then written:

- exactly once, where the broker has transactions: all three in one transaction
  (`send_offsets_to_transaction`), so a crash at any point leaves either all of a batch or none;
  a `read_committed` consumer sees every event once;
- at least once otherwise (Tansu): messages, then state, then offsets, each waited for, so a crash
  repeats at most the last batch's messages, with the same event ids.

A restarted stage (or one given partitions by a rebalance) reads the state of its partitions back
from the changelog before it goes on. In exactly-once mode one instance reads every partition (the
transactional id is the group's, so a second instance fences the first); in at-least-once mode the
group's members share the partitions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Self, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.events.record import encode_event
from pipeline.events.settings import EventsConfig
from pipeline.events.tracker import EndReason, EventTracker, Observation
from pipeline.kafka import (
    GROUP_HEARTBEAT_INTERVAL_MS,
    GROUP_SESSION_TIMEOUT_MS,
    KafkaConnection,
    KafkaSettings,
    client_options,
    ensure_topic,
    partitions_of,
    read_latest,
    started_producer,
    unreachable,
    wait_for_broker,
)
from pipeline.records import RecordFormatError, decode_record
from services.api.event_pb2 import AnnotationEvent
from services.api.image_classifier_pb2 import ClassifierSpecification
from services.config import LabelRule, load_catalog
from services.errors import FramelabelError

log = logging.getLogger("framelabel.events")

POLL_TIMEOUT_MS = 200
TOPIC_WAIT_S = 1.0
FETCH_MAX_WAIT_MS = 50  # a fetch returns within this when there is little to read: part of every event's lag

Client = TypeVar("Client", AIOKafkaConsumer, AIOKafkaProducer)


RECENT_EVENTS = 5  # per source, kept for the live view


class EventsError(FramelabelError):
    """The events stage cannot go on: Kafka refused it, or exactly once was asked of a broker without it."""


class EventsStage:
    """`async with` it, then `await run()` until `stop()`."""

    def __init__(self, connection: KafkaConnection, config: EventsConfig, *, sole_reader: bool = False) -> None:
        """`sole_reader`: read every partition without joining the group (as exactly-once mode always does)."""
        self._connection = connection
        self._config = config
        self._sole_reader = sole_reader
        self._tracker = EventTracker(
            config, config.classifier_name, fixed_name=config.classifier, event_defaults=event_defaults(config)
        )
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._transactional = False
        self._stopping = asyncio.Event()
        self._partition_of: dict[str, int] = {}  # source → the input partition its records (and state) live in
        self._heard_at: dict[str, float] = {}  # source → time.monotonic() of its last record, for "offline"
        self.last_frame: dict[str, int] = {}  # source → the index of the newest frame read
        self.published = 0  # event messages written (in exactly-once mode: committed)
        self._recent: dict[str, dict[str, AnnotationEvent]] = {}  # source → event id → its latest message
        self.processed = 0  # annotation records read

    @property
    def topic(self) -> str:
        return self._config.topic

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        config = self._config
        await wait_for_broker(self._connection)
        await self._wait_for_topic(config.input_topic)
        input_partitions = len(await partitions_of(self._connection, config.input_topic))
        await ensure_topic(self._settings(config.topic, config.partitions))
        await ensure_topic(self._settings(config.state_topic, input_partitions), {"cleanup.policy": "compact"})
        state_partitions = len(await partitions_of(self._connection, config.state_topic))
        if state_partitions != input_partitions:
            raise EventsError(
                f"topic {config.state_topic} has {state_partitions} partitions, {config.input_topic} has "
                f"{input_partitions}: they must match (delete {config.state_topic} to start afresh)"
            )
        self._producer = await self._start_producer()
        self._consumer = AIOKafkaConsumer(
            **client_options(self._connection),
            group_id=config.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # the annotations are not written in transactions, so read_committed would add nothing (and
            # noida-db 0.2.3 hides records written without a transaction from read_committed readers)
            isolation_level="read_uncommitted",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            session_timeout_ms=GROUP_SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=GROUP_HEARTBEAT_INTERVAL_MS,
        )
        try:
            await self._consumer.start()
        except KafkaError as exc:
            raise unreachable(self._connection, exc) from exc
        if self._transactional or self._sole_reader:
            # One member owns every partition: the transactional id fences an older instance (a zombie), and
            # the group only keeps the offsets the transactions commit. No group membership, so a restart
            # after a crash need not wait out the dead member's session (noida-db never settles that).
            partitions = {TopicPartition(config.input_topic, partition) for partition in range(input_partitions)}
            self._consumer.assign(sorted(partitions))
            await self.restore(set(range(input_partitions)))
        else:
            self._consumer.subscribe([config.input_topic], listener=_Rebalance(self))
        if self._transactional:
            log.info("events: exactly once (Kafka transactions): input offsets commit with the events they produce")
        else:
            log.info(
                "events: at least once (the broker at %s has no transactions): after a crash the last batch's "
                "events may repeat, with the same event_id and sequence",
                self._connection.bootstrap_servers,
            )
        log.info("events: %s → %s, group %s", config.input_topic, config.topic, config.group)

    def stop(self) -> None:
        """End `run()` after the batch under way is written."""
        self._stopping.set()

    async def run(self) -> None:
        consumer = self._require(self._consumer)
        while not self._stopping.is_set():
            try:
                fetched = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=self._config.batch_records)
            except KafkaError as exc:
                raise EventsError(f"reading {self._config.input_topic} failed: {exc}") from exc
            messages: list[AnnotationEvent] = []
            touched: set[str] = set()
            offsets: dict[TopicPartition, int] = {}
            for partition, records in fetched.items():
                for record in records:
                    messages += self._observe(record, touched)
                offsets[partition] = records[-1].offset + 1
                self.processed += len(records)
            messages += self._close_silent(touched)
            if messages or touched or offsets:
                await self._write(messages, touched, offsets)

    async def close_sources(self, source_ids: Iterable[str], reason: EndReason) -> None:
        """End the open events of sources known to have ended (a replay's end, a stopped run)."""
        touched = set(source_ids) & set(self._tracker.sources)
        messages = [
            message for source_id in sorted(touched) for message in self._tracker.close_source(source_id, reason)
        ]
        if touched:
            await self._write(messages, touched, {})

    async def close(self) -> None:
        consumer, producer, self._consumer, self._producer = self._consumer, self._producer, None, None
        if consumer is not None:
            await consumer.stop()
        if producer is not None:
            await producer.stop()

    def _observe(self, record: ConsumerRecord[bytes, bytes], touched: set[str]) -> list[AnnotationEvent]:
        try:
            decoded = decode_record(record.key, record.value, record.headers, record.timestamp)
        except RecordFormatError as exc:
            log.warning("skipped %s partition %d offset %d: %s", record.topic, record.partition, record.offset, exc)
            return []
        source_id = decoded.source_id
        touched.add(source_id)
        self._partition_of[source_id] = record.partition
        self._heard_at[source_id] = time.monotonic()
        self.last_frame[source_id] = max(decoded.frame_index, self.last_frame.get(source_id, decoded.frame_index))
        response = decoded.response
        return self._tracker.observe(
            Observation(
                source_id,
                decoded.frame_index,
                decoded.capture_time_ms,
                response.classifier_specification.classification_type == ClassifierSpecification.MULTI_CLASS,
                {annotation.label.name: annotation.confidence for annotation in response.annotations},
                decoded.classifier,
            )
        )

    def _close_silent(self, touched: set[str]) -> list[AnnotationEvent]:
        now, messages = time.monotonic(), []
        for source_id in self._tracker.sources:
            silent_s = now - self._heard_at.get(source_id, now)
            if silent_s < self._config.offline_after_seconds:
                continue
            if closed := self._tracker.close_silent(source_id, round(silent_s * 1000)):
                messages += closed
                touched.add(source_id)
        return messages

    async def _write(
        self, messages: Sequence[AnnotationEvent], touched: set[str], offsets: dict[TopicPartition, int]
    ) -> None:
        producer = self._require(self._producer)
        try:
            if self._transactional:
                async with producer.transaction():
                    await self._send(producer, messages, touched)
                    if offsets:
                        await producer.send_offsets_to_transaction(offsets, self._config.group)
            else:
                await self._send(producer, messages, touched)
                if offsets:
                    await self._require(self._consumer).commit(offsets)
        except KafkaError as exc:
            raise EventsError(f"writing events to {self._config.topic} failed: {exc}") from exc
        self.published += len(messages)
        for message in messages:
            recent = self._recent.setdefault(message.source_id, {})
            recent.pop(message.event_id, None)  # the latest message of an event moves to the end
            recent[message.event_id] = message
            while len(recent) > RECENT_EVENTS:
                del recent[next(iter(recent))]

    def recent_events(self, source_id: str) -> list[AnnotationEvent]:
        """The source's last few events, each as its latest message says (for the live view), newest first."""
        return list(reversed(self._recent.get(source_id, {}).values()))

    async def _send(self, producer: AIOKafkaProducer, messages: Sequence[AnnotationEvent], touched: set[str]) -> None:
        """Send the messages, then the sources' state, and wait until Kafka has them all."""
        deliveries = []
        for message in messages:
            record = encode_event(message, self._config.value_format)
            deliveries.append(
                await producer.send(
                    self._config.topic,
                    record.value,
                    key=record.key,
                    timestamp_ms=record.timestamp_ms,
                    headers=record.headers,
                )
            )
        for source_id in sorted(touched):
            snapshot = self._tracker.snapshot(source_id)
            value = None if snapshot is None else json.dumps(snapshot, separators=(",", ":")).encode()
            partition = self._partition_of.get(source_id)
            deliveries.append(
                await producer.send(self._config.state_topic, value, key=source_id.encode(), partition=partition)
            )
        await asyncio.gather(*deliveries)

    async def _start_producer(self) -> AIOKafkaProducer:
        options = client_options(self._connection)
        if self._config.delivery != "at-least-once":
            producer = AIOKafkaProducer(**options, transactional_id=f"framelabel-events.{self._config.group}")
            sender_log = logging.getLogger("aiokafka.producer.sender")
            level = sender_log.level
            sender_log.setLevel(logging.CRITICAL)  # a refusal is an answer here, which aiokafka logs as an ERROR
            try:
                await producer.start()
            except KafkaError as exc:
                await producer.stop()
                if self._config.delivery == "exactly-once":
                    raise EventsError(
                        f"exactly once needs Kafka transactions, which the broker at "
                        f"{self._connection.bootstrap_servers} refused: {exc}"
                    ) from exc
            else:
                self._transactional = True
                return producer
            finally:
                sender_log.setLevel(level)
        return await started_producer(self._connection, acks="all", enable_idempotence=False)

    async def restore(self, partitions: set[int]) -> None:
        """Read the state of the sources in `partitions` back from the changelog, to its end."""
        self.revoke(partitions)
        if not partitions:
            return
        state = await read_latest(
            self._connection, self._config.state_topic, partitions, read_committed=self._transactional
        )
        now = time.monotonic()
        for source_id, saved in state.items():
            snapshot = None if saved.value is None else json.loads(saved.value)
            self._tracker.restore(source_id, snapshot)
            if snapshot is not None:
                self._partition_of[source_id] = saved.partition
                self._heard_at[source_id] = now  # silence is counted from our start, not from before it
        open_events = sum(self._tracker.open_events(source_id) for source_id in self._tracker.sources)
        log.info("events: state of %d sources restored (%d events open)", len(self._tracker.sources), open_events)

    async def take_over(self, assigned: set[TopicPartition]) -> None:
        """Restore the state of newly assigned partitions before any of their records is observed.

        aiokafka fetches for a new assignment while its rebalance callback runs, so a record read meanwhile
        would meet a tracker without its source's state and start the source's events afresh."""
        consumer = self._require(self._consumer)
        consumer.pause(*assigned)
        try:
            await self.restore({tp.partition for tp in assigned})
        finally:
            consumer.resume(*assigned)

    def revoke(self, partitions: set[int]) -> None:
        """Forget the sources of partitions another member now owns: their state lives on in the changelog."""
        for source_id, partition in list(self._partition_of.items()):
            if partition in partitions:
                self._tracker.restore(source_id, None)
                del self._partition_of[source_id]

    async def _wait_for_topic(self, topic: str) -> None:
        said = False
        while not await partitions_of(self._connection, topic):
            if not said:
                log.info("events: waiting for topic %s at %s", topic, self._connection.bootstrap_servers)
                said = True
            await asyncio.sleep(TOPIC_WAIT_S)

    def _settings(self, topic: str, partitions: int) -> KafkaSettings:
        return KafkaSettings.model_validate(
            self._connection.model_dump()
            | {"sasl_password": self._connection.sasl_password}
            | {"topic": topic, "partitions": partitions}
        )

    @staticmethod
    def _require(client: Client | None) -> Client:
        if client is None:
            raise EventsError("the events stage is not started")
        return client


def event_defaults(config: EventsConfig) -> dict[str, tuple[LabelRule, ...]]:
    """The `event_defaults` the known classifiers declare: built in, and those of `config.classifiers_file`."""
    catalog = load_catalog(config.classifiers_file)
    return {name: declared.event_defaults for name, declared in catalog.classifiers.items() if declared.event_defaults}


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, stage: EventsStage) -> None:
        self._stage = stage

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._stage.revoke({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._stage.take_over(assigned)
