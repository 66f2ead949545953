"""The publisher's ordering, re-sends and supervision, with a producer that fails chosen calls: no broker.

Each test bounds its waits with `within()`, so a hang fails the test, naming it, instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError

from pipeline.kafka import KafkaSettings
from pipeline.publisher import Publisher, PublishError
from tests.helpers import within
from tests.kafka import Deliveries, annotated_frame
from tests.scripted import ScriptedProducer

HANG_GUARD_S = 10.0  # far beyond what any of these needs: reached only if something hangs


def settings(**overrides: Any) -> KafkaSettings:
    # re-sends after 1 ms: the tests count attempts, they do not wait for backoff
    return KafkaSettings.model_validate({"bootstrap_servers": "unused:9092", "retry_backoff_ms": 1} | overrides)


async def publish_all(publisher: Publisher, frames: dict[str, int]) -> None:
    """Publish `count` frames of each source, taking turns as concurrent sources do."""
    for index in range(max(frames.values())):
        for source_id, count in frames.items():
            if index < count:
                await publisher.publish(annotated_frame(source_id, index))


async def test_re_sent_records_keep_frame_order_and_are_stored_once() -> None:
    # cam-a frame 3 times out twice; cam-b frame 0 once: each is re-sent ahead of its source's later frames
    failing = {("cam-a", 3): 2, ("cam-b", 0): 1}
    producer = ScriptedProducer(
        lambda source, index, attempt: KafkaTimeoutError() if attempt <= failing.get((source, index), 0) else None
    )
    deliveries = Deliveries()
    async with within(HANG_GUARD_S, "the publisher"), Publisher(settings(), deliveries, producer=producer) as publisher:
        await publish_all(publisher, {"cam-a": 10, "cam-b": 10})
        await publisher.flush()
    assert producer.stored == {"cam-a": list(range(10)), "cam-b": list(range(10))}
    # a failed record fails the rest of its batch, and all of it is sent again: 7 + 7 of cam-a, 10 of cam-b
    assert (publisher.stats.published, publisher.stats.retried, publisher.stats.lost) == (20, 24, 0)
    assert producer.attempts["cam-a", 3] == 3
    assert len(deliveries.acknowledged) == 20
    assert producer.stopped


async def test_a_record_that_cannot_be_delivered_is_lost_loudly_and_the_next_ones_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    producer = ScriptedProducer(
        lambda source, index, attempt: TopicAuthorizationFailedError() if index == 2 and attempt == 1 else None
    )
    deliveries = Deliveries()
    with caplog.at_level(logging.ERROR, logger="framelabel.publish"):
        async with within(HANG_GUARD_S, "the publisher"):
            publisher = Publisher(settings(), deliveries, producer=producer)
            await publisher.start()
            for index in range(5):
                await publisher.publish(annotated_frame("cam", index))
            with pytest.raises(PublishError, match=r"3 records were not delivered to topic framelabel\.annotations"):
                await publisher.flush()
            for index in range(5, 7):
                await publisher.publish(annotated_frame("cam", index))
            await publisher.stop()
    assert producer.stored == {"cam": [0, 1, 5, 6]}
    assert [frame.info.index for frame in deliveries.given_up] == [2, 3, 4]
    assert [m for m in caplog.messages if "lost" in m] == [  # one line for the failed batch
        "3 records of cam lost (frames 2–4): not delivered after 1 attempts: TopicAuthorizationFailedError()"
    ]


async def test_re_sends_stop_at_the_delivery_deadline() -> None:
    producer = ScriptedProducer(lambda source, index, attempt: KafkaTimeoutError())
    deliveries = Deliveries()
    async with within(HANG_GUARD_S, "the publisher"):
        publisher = Publisher(settings(delivery_timeout_ms=50), deliveries, producer=producer)
        await publisher.start()
        await publisher.publish(annotated_frame("cam", 0))
        with pytest.raises(PublishError, match="1 record was not delivered"):
            await publisher.flush()
        await publisher.stop()
    assert producer.attempts["cam", 0] > 1  # re-sent until the deadline, then given up
    assert [frame.info.index for frame in deliveries.given_up] == [0]
    assert producer.stored == {}


async def test_a_record_over_max_request_bytes_is_refused_with_its_size_and_the_limit() -> None:
    big = annotated_frame("cam", 7, description="x" * 70_000)
    producer = ScriptedProducer()
    async with (
        within(HANG_GUARD_S, "the publisher"),
        Publisher(settings(max_request_bytes=65536), producer=producer) as publisher,
    ):
        with pytest.raises(
            PublishError, match=r"the record of cam frame 7 is \d+ bytes, more than kafka.max_request_bytes 65536"
        ):
            await publisher.publish(big)
        await publisher.publish(annotated_frame("cam", 8))  # the source's next record still goes
    assert producer.stored == {"cam": [8]}
    assert publisher.unsettled == 0


async def test_a_delivery_task_that_dies_settles_its_records_and_fails_the_next_publish() -> None:
    class BrokenProducer(ScriptedProducer):
        async def send(self, topic: str, value: bytes, **record: Any) -> asyncio.Future[Any]:
            if dict(record["headers"])["frame_index"] == b"1":
                raise RuntimeError("a bug in the producer")
            return await super().send(topic, value, **record)

    producer = BrokenProducer()
    deliveries = Deliveries()
    async with within(HANG_GUARD_S, "the publisher"):
        publisher = Publisher(settings(), deliveries, producer=producer)
        await publisher.start()
        for index in range(3):
            await publisher.publish(annotated_frame("cam", index))
        with pytest.raises(PublishError, match="not delivered"):
            await publisher.flush()  # returns: nobody waits on the task that died
        with pytest.raises(PublishError, match=r"cannot publish cam frame 3: .*internal error: RuntimeError"):
            await publisher.publish(annotated_frame("cam", 3))
        await publisher.publish(annotated_frame("other", 0))  # other sources are unaffected
        await publisher.stop()
    assert producer.stored == {"cam": [0], "other": [0]}
    # the whole batch is settled as lost: the task died before it read any acknowledgement of it
    assert [frame.info.index for frame in deliveries.given_up] == [0, 1, 2]


async def test_abandon_gives_up_on_what_is_unsettled_with_one_line_per_source(
    caplog: pytest.LogCaptureFixture,
) -> None:
    producer = ScriptedProducer(hold=True)  # a broker that never answers
    deliveries = Deliveries()
    async with within(HANG_GUARD_S, "the publisher"):
        publisher = Publisher(settings(), deliveries, producer=producer)
        await publisher.start()
        await publish_all(publisher, {"cam-a": 4, "cam-b": 2})
        await producer.sends(6)  # every record handed to the producer, none acknowledged
        with caplog.at_level(logging.ERROR, logger="framelabel.publish"):
            await publisher.abandon("a second SIGTERM")
    assert publisher.unsettled == 0
    assert publisher.stats.lost == len(deliveries.given_up) == 6
    assert sorted(m for m in caplog.messages if "lost" in m) == [
        "2 records of cam-b lost (frames 0–1): given up: a second SIGTERM",
        "4 records of cam-a lost (frames 0–3): given up: a second SIGTERM",
    ]
    assert producer.stopped


async def test_publish_waits_for_room_and_max_block_ms_bounds_the_wait() -> None:
    producer = ScriptedProducer(hold=True)
    async with within(HANG_GUARD_S, "the publisher"):
        publisher = Publisher(settings(max_in_flight_records=2, max_block_ms=20), producer=producer)
        await publisher.start()
        await publisher.publish(annotated_frame("cam", 0))
        await publisher.publish(annotated_frame("cam", 1))
        with pytest.raises(PublishError, match="2 records still unacknowledged by Kafka at unused:9092"):
            await publisher.publish(annotated_frame("cam", 2))
        await publisher.abandon("the test is over")


async def test_a_record_the_producer_refuses_at_send_holds_back_the_later_ones_without_losing_them() -> None:
    class RefusingOnce(ScriptedProducer):
        async def send(self, topic: str, value: bytes, **record: Any) -> asyncio.Future[Any]:
            if dict(record["headers"])["frame_index"] == b"1" and ("cam", 1) not in self.attempts:
                self.attempts["cam", 1] = 0
                raise KafkaTimeoutError("the producer's buffer stayed full")  # raised by send(), not queued
            return await super().send(topic, value, **record)

    producer = RefusingOnce()
    async with within(HANG_GUARD_S, "the publisher"), Publisher(settings(), producer=producer) as publisher:
        for index in range(5):
            await publisher.publish(annotated_frame("cam", index))
        await publisher.flush()
    assert producer.stored == {"cam": [0, 1, 2, 3, 4]}
    assert publisher.stats.lost == 0


async def test_each_record_names_the_classifier_the_publisher_was_given() -> None:
    class Recording(ScriptedProducer):
        def __init__(self) -> None:
            super().__init__()
            self.classifiers: list[bytes | None] = []

        async def send(self, topic: str, value: bytes, **record: Any) -> asyncio.Future[Any]:
            self.classifiers.append(dict(record["headers"]).get("classifier"))
            return await super().send(topic, value, **record)

    for classifier, header in (("objects", b"objects"), (None, None)):
        producer = Recording()
        async with (
            within(HANG_GUARD_S, "the publisher"),
            Publisher(settings(), producer=producer, classifier=classifier) as publisher,
        ):
            await publish_all(publisher, {"cam": 3})
            await publisher.flush()
        assert producer.classifiers == [header] * 3
