"""Helpers for tests that publish: a real Tansu broker, annotated frames, reading a topic back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord

from pipeline.broker import EmbeddedBroker
from pipeline.consumer import consume
from pipeline.frames import AnnotatedFrame, FrameInfo
from pipeline.kafka import KafkaConnection, KafkaSettings
from pipeline.records import DecodedRecord
from services.api.image_classifier_pb2 import (
    AnnotationResponse,
    ClassAnnotation,
    ClassifierSpecification,
    Label,
)

QUIET_S = 1.0  # a topic that stays quiet this long has been read to its end
COUNTED_QUIET_S = 0.3  # the same once the records expected are in
DEADLINE_S = 10.0
EPOCH_MS = 1_760_000_000_000


@contextlib.asynccontextmanager
async def kafka_broker() -> AsyncIterator[EmbeddedBroker]:
    """A Tansu broker on a free loopback port for one test, always stopped."""
    async with EmbeddedBroker() as broker:
        yield broker


@contextlib.contextmanager
def paused(broker: EmbeddedBroker) -> Iterator[None]:
    """Freeze the broker (SIGSTOP): requests go unanswered, yet nothing it stores is lost."""
    pid = broker.pid
    if pid is None:
        raise RuntimeError("the broker is not running")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def settings_for(broker: EmbeddedBroker, **overrides: Any) -> KafkaSettings:
    """Publisher settings for Tansu, which rejects aiokafka's idempotent producer."""
    return KafkaSettings.model_validate({"bootstrap_servers": broker.address, "enable_idempotence": False} | overrides)


def connection(address: str, topic: str) -> KafkaConnection:
    return KafkaConnection(bootstrap_servers=address, topic=topic)


class Deliveries:
    """A publisher's `DeliveryReport` that keeps what it is told."""

    def __init__(self) -> None:
        self.acknowledged: list[AnnotatedFrame] = []
        self.given_up: list[AnnotatedFrame] = []
        self.reasons: list[str] = []

    def published(self, frame: AnnotatedFrame, acked_in_s: float) -> None:
        self.acknowledged.append(frame)

    def lost(self, frames: Sequence[AnnotatedFrame], reason: str) -> None:
        self.given_up.extend(frames)
        self.reasons.append(reason)


def annotated_frame(
    source_id: str,
    index: int,
    *,
    media_position_ms: float | None = None,
    description: str = "",
) -> AnnotatedFrame:
    """A frame with a made-up MULTI_CLASS response whose request_id names the frame."""
    response = AnnotationResponse(
        request_id=f"{source_id}/{index}",
        classifier_specification=ClassifierSpecification(
            labels=[Label(name="cat", description=description), Label(name="dog")],
            classification_type=ClassifierSpecification.MULTI_CLASS,
        ),
        annotations=[
            ClassAnnotation(label=Label(name="cat"), confidence=0.75),
            ClassAnnotation(label=Label(name="dog"), confidence=0.25),
        ],
    )
    capture_time_ms = EPOCH_MS + index * 40
    info = FrameInfo(source_id, index, capture_time_ms, time.monotonic(), media_position_ms)
    return AnnotatedFrame(info, response, width=640, height=480)


async def read_topic(
    address: str, topic: str, *, max_records: int | None = None, expected: int | None = None
) -> list[DecodedRecord]:
    """Every record of the topic from the start, read until it has been quiet for QUIET_S.

    Given the count `expected` of a topic whose writers have finished, quiet for COUNTED_QUIET_S is enough once
    that many have come: whatever follows them is stored already and arrives with the next fetch.
    """
    records: list[DecodedRecord] = []
    stream = consume(connection(address, topic), from_beginning=True, max_records=max_records, idle_timeout_s=QUIET_S)
    async with contextlib.aclosing(stream):
        while True:
            try:
                async with asyncio.timeout(
                    COUNTED_QUIET_S if expected is not None and len(records) >= expected else None
                ):
                    record = await anext(stream)
            except (StopAsyncIteration, TimeoutError):
                return records
            assert isinstance(record, DecodedRecord), record
            records.append(record)


async def raw_records(address: str, topic: str, count: int) -> list[ConsumerRecord[bytes, bytes]]:
    """The first `count` records of the topic as aiokafka gives them, for checks below the decoder."""
    consumer = AIOKafkaConsumer(bootstrap_servers=address, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.subscribe([topic])
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + DEADLINE_S
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=100)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def partition_count(address: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=address)
    await consumer.start()
    try:
        await consumer.topics()
        return len(consumer.partitions_for_topic(topic) or ())
    finally:
        await consumer.stop()
