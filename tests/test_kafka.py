"""The Kafka side against a real broker: the record format, publishing, consuming, the broker itself."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from pipeline.broker import BrokerError, EmbeddedBroker
from pipeline.consumer import ConsumeError, consume
from pipeline.frames import AnnotatedFrame
from pipeline.kafka import KafkaSettings, KafkaUnreachable
from pipeline.metrics import PipelineMetrics
from pipeline.publisher import Publisher, PublishError
from pipeline.records import (
    JSON_CONTENT_TYPE,
    PROTOBUF_CONTENT_TYPE,
    RecordFormatError,
    decode_record,
    encode_record,
    record_json,
)
from services.api.image_classifier_pb2 import AnnotationResponse
from tests.cameras import free_port
from tests.helpers import parse_metrics, within
from tests.kafka import (
    DEADLINE_S,
    Deliveries,
    annotated_frame,
    connection,
    kafka_broker,
    partition_count,
    paused,
    raw_records,
    read_topic,
    settings_for,
)

HANG_S = 30.0  # a liveness bound well past the timeouts at play (connect_timeout_ms is 10 s): only a hang takes longer
CLOCK_RESOLUTION_S = 0.001  # float rounding between time.monotonic() readings and asyncio's timers
MAX_BLOCK_MS = 300


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    async with kafka_broker() as running:
        yield running


@contextlib.asynccontextmanager
async def started(publisher: Publisher) -> AsyncIterator[Publisher]:
    await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.stop()


def interleaved(count: int) -> list[AnnotatedFrame]:
    """Two sources taking turns: a video file (with media positions) and a camera (without)."""
    return [
        annotated_frame("file-a", index // 2, media_position_ms=index // 2 * 40.0)
        if index % 2 == 0
        else annotated_frame("cam-b", index // 2)
        for index in range(count)
    ]


async def wait_for(condition: str, check: Callable[[], bool]) -> None:
    """Poll `check()` until true, failing after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        await asyncio.sleep(0.01)


def test_record_carries_frame_metadata_in_headers() -> None:
    file_frame = annotated_frame("file-a", 7, media_position_ms=280.0)
    record = encode_record(file_frame, "protobuf")
    assert record.key == b"file-a"
    assert record.timestamp_ms == file_frame.info.capture_time_ms
    assert dict(record.headers) == {
        "source_id": b"file-a",
        "frame_index": b"7",
        "media_position_ms": b"280.000",
        "capture_time_ms": str(file_frame.info.capture_time_ms).encode(),
        "content_type": PROTOBUF_CONTENT_TYPE.encode(),
        "image_width": b"640",
        "image_height": b"480",
    }
    assert AnnotationResponse.FromString(record.value) == file_frame.response

    image = annotated_frame("folder", 0)
    image = dataclasses.replace(image, info=dataclasses.replace(image.info, file_name="frames/0001.jpg"))
    image_record = encode_record(image, "protobuf")
    assert dict(image_record.headers)["file_name"] == b"frames/0001.jpg"
    decoded_image = decode_record(image_record.key, image_record.value, image_record.headers, 0)
    assert decoded_image.file_name == "frames/0001.jpg"

    named_record = encode_record(annotated_frame("cam-a", 1), "protobuf", classifier="objects")
    assert dict(named_record.headers)["classifier"] == b"objects"
    decoded_named = decode_record(named_record.key, named_record.value, named_record.headers, 0)
    assert (decoded_named.classifier, record_json(decoded_named)["classifier"]) == ("objects", "objects")
    assert decode_record(record.key, record.value, record.headers, 0).classifier is None  # not known: no header

    camera_record = encode_record(annotated_frame("cam-b", 3), "json")
    assert "media_position_ms" not in dict(camera_record.headers)
    assert dict(camera_record.headers)["content_type"] == JSON_CONTENT_TYPE.encode()
    value = json.loads(camera_record.value)
    assert value["request_id"] == "cam-b/3"
    assert value["classifier_specification"]["classification_type"] == "MULTI_CLASS"


def test_decode_record_reads_both_formats_and_names_what_is_wrong() -> None:
    frame = annotated_frame("file-a", 7, media_position_ms=280.0)
    for value_format in ("protobuf", "json"):
        record = encode_record(frame, value_format)
        decoded = decode_record(record.key, record.value, record.headers, record.timestamp_ms)
        assert (decoded.source_id, decoded.frame_index, decoded.media_position_ms) == ("file-a", 7, 280.0)
        assert (decoded.image_width, decoded.image_height) == (640, 480)
        assert decoded.capture_time_ms == decoded.timestamp_ms == frame.info.capture_time_ms
        assert decoded.response == frame.response

    printed = record_json(decoded)
    assert printed["file_name"] is None  # a video file's frame
    assert printed["response"]["classifier_specification"]["classification_type"] == "MULTI_CLASS"
    assert printed["response"]["request_id"] == "file-a/7"
    json.dumps(printed)

    headers = [header for header in record.headers if header[0] != "frame_index"]
    with pytest.raises(RecordFormatError, match="'frame_index'"):
        decode_record(record.key, record.value, headers, record.timestamp_ms)
    with pytest.raises(RecordFormatError, match="application/json"):
        decode_record(record.key, b"{not json", record.headers, record.timestamp_ms)


@pytest.mark.parametrize(("value_format", "compression"), [("protobuf", None), ("json", "gzip")])
async def test_published_frames_come_back_in_order(
    broker: EmbeddedBroker, value_format: str, compression: str | None
) -> None:
    frames = interleaved(200)
    deliveries = Deliveries()
    settings = settings_for(broker, partitions=5, value_format=value_format, compression=compression)
    async with Publisher(settings, deliveries) as publisher:
        for frame in frames:
            await publisher.publish(frame)
        await publisher.flush()
        assert (publisher.stats.published, publisher.stats.lost, publisher.stats.retried) == (200, 0, 0)
    assert len(deliveries.acknowledged) == 200

    assert await partition_count(broker.address, settings.topic) == 5
    records = await read_topic(broker.address, settings.topic, expected=200)
    assert len(records) == 200
    sent = {(frame.info.source_id, frame.info.index): frame for frame in frames}
    for raw in await raw_records(broker.address, settings.topic, 200):
        headers = dict(raw.headers)
        expected = encode_record(sent[raw.key.decode(), int(headers["frame_index"])], settings.value_format)
        assert (raw.key, raw.timestamp, headers) == (expected.key, expected.timestamp_ms, dict(expected.headers))
    for source_id in ("file-a", "cam-b"):
        indexes = [record.frame_index for record in records if record.source_id == source_id]
        assert indexes == list(range(100)), source_id
    for record in records:
        frame = sent[record.source_id, record.frame_index]
        assert record.timestamp_ms == record.capture_time_ms == frame.info.capture_time_ms
        assert record.media_position_ms == frame.info.media_position_ms
        assert (record.image_width, record.image_height) == (640, 480)
        assert record.content_type == (JSON_CONTENT_TYPE if value_format == "json" else PROTOBUF_CONTENT_TYPE)
        assert record.response == frame.response


async def test_existing_topic_is_used_as_it_is(broker: EmbeddedBroker) -> None:
    for partitions in (2, 6):
        async with started(Publisher(settings_for(broker, partitions=partitions))) as publisher:
            await publisher.publish(annotated_frame("cam-b", partitions))
    assert await partition_count(broker.address, publisher.settings.topic) == 2
    records = await read_topic(broker.address, publisher.settings.topic, expected=2)
    assert [record.frame_index for record in records] == [2, 6]


async def test_consumer_filters_by_source_and_stops_at_max_records(broker: EmbeddedBroker) -> None:
    async with started(Publisher(settings_for(broker))) as publisher:
        for frame in interleaved(40):
            await publisher.publish(frame)
    records = [
        record
        async for record in consume(
            connection(broker.address, publisher.settings.topic), from_beginning=True, max_records=5, source_id="cam-b"
        )
    ]
    assert [(record.source_id, record.frame_index) for record in records] == [("cam-b", index) for index in range(5)]


async def test_consuming_a_missing_topic_waits_for_it_and_says_so(
    broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framelabel.consume")
    records = consume(connection(broker.address, "nowhere"), from_beginning=True, idle_timeout_s=0.5)
    assert [record async for record in records] == []
    assert f"waiting for topic nowhere at {broker.address} to be created" in caplog.text


async def test_default_idempotence_gives_way_to_a_broker_without_it(
    broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    deliveries = Deliveries()
    async with Publisher(KafkaSettings(bootstrap_servers=broker.address), deliveries) as publisher:
        await publisher.publish(annotated_frame("cam-a", 0))
        await publisher.flush()
    assert [frame.info.index for frame in deliveries.acknowledged] == [0]
    assert publisher.settings.enable_idempotence is False
    assert f"Kafka at {broker.address} refused the idempotent producer" in caplog.text

    asked_for = KafkaSettings(bootstrap_servers=broker.address, enable_idempotence=True)
    with pytest.raises(KafkaUnreachable, match=r"kafka\.enable_idempotence: true asks for the idempotent producer"):
        await Publisher(asked_for).start()


async def test_unreachable_kafka_is_reported_with_its_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    # Refused until connect_timeout_ms (a broker may start a moment after its clients), then reported as refused,
    # not as "no answer in time".
    refusing = KafkaSettings(bootstrap_servers=address, enable_idempotence=False, connect_timeout_ms=1000)
    async with within(HANG_S, "reporting a refused connection"):
        with pytest.raises(KafkaUnreachable, match=f"cannot reach Kafka at {address}: (?!no answer in time)"):
            await Publisher(refusing).start()
        with pytest.raises(ConsumeError, match=f"cannot reach Kafka at {address}: (?!no answer in time)"):
            await anext(consume(refusing, from_beginning=True))


async def test_flush_returns_once_every_record_is_acknowledged(broker: EmbeddedBroker) -> None:
    deliveries = Deliveries()
    async with Publisher(settings_for(broker), deliveries) as publisher:
        with paused(broker):
            for frame in interleaved(50):
                await publisher.publish(frame)  # queued, not acknowledged: the broker is frozen
            flushing = asyncio.create_task(publisher.flush())
            await asyncio.wait({flushing}, timeout=0.3)
            assert not flushing.done()
            assert publisher.stats.published == 0
        await flushing
        assert publisher.stats.published == len(deliveries.acknowledged) == 50


async def test_publish_waits_for_room_then_gives_up(broker: EmbeddedBroker) -> None:
    settings = settings_for(broker, max_in_flight_records=4, max_block_ms=MAX_BLOCK_MS)
    async with started(Publisher(settings)) as publisher:
        with paused(broker):
            for index in range(4):
                await publisher.publish(annotated_frame("cam-b", index))
            began = time.monotonic()
            with pytest.raises(PublishError, match="4 records still unacknowledged"):
                async with within(HANG_S, "publish() giving up after max_block_ms"):
                    await publisher.publish(annotated_frame("cam-b", 4))
            # It waited all of max_block_ms for room first; how much longer it took is the machine's doing.
            assert time.monotonic() - began >= MAX_BLOCK_MS / 1000 - CLOCK_RESOLUTION_S
        await publisher.flush()
        assert publisher.stats.published == 4


async def test_failed_deliveries_are_retried_until_the_broker_is_back(broker: EmbeddedBroker) -> None:
    frames = interleaved(20)
    settings = settings_for(broker, request_timeout_ms=1000, retry_backoff_ms=100, delivery_retries=5)
    async with started(Publisher(settings)) as publisher:
        with paused(broker):
            for frame in frames:
                await publisher.publish(frame)
            await wait_for("failed deliveries to be retried", lambda: publisher.stats.retried >= len(frames))
        await publisher.flush()
        assert (publisher.stats.published, publisher.stats.lost) == (20, 0)

    # At least once: each frame is stored, a frozen request may have been stored as well.
    records = await read_topic(broker.address, settings.topic, expected=len(frames))
    assert {(record.source_id, record.frame_index) for record in records} == {
        (frame.info.source_id, frame.info.index) for frame in frames
    }


async def test_records_given_up_make_flush_fail_loudly(
    broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(broker, request_timeout_ms=500, retry_backoff_ms=50, delivery_retries=1)
    async with started(Publisher(settings)) as publisher:
        await publisher.publish(annotated_frame("cam-b", 0))
        await publisher.flush()
        broker.stop()
        with caplog.at_level(logging.ERROR, logger="framelabel.publish"):
            for index in range(1, 4):
                await publisher.publish(annotated_frame("cam-b", index))
            with pytest.raises(PublishError, match="3 records were not delivered"):
                await publisher.flush()
        assert (publisher.stats.published, publisher.stats.lost, publisher.stats.retried) == (1, 3, 3)
        metrics = PipelineMetrics()  # what a run's /metrics shows of its publisher
        metrics.watch_publisher(publisher)
        scraped = parse_metrics(generate_latest(metrics.registry).decode())
        assert scraped[("framelabel_kafka_resends_total", ())] == 3
        assert scraped[("framelabel_kafka_delivery_failures_total", ())] == 3
        assert scraped[("framelabel_kafka_records_unsettled", ())] == 0
    lost_lines = [message for message in caplog.messages if " lost (" in message]
    assert len(lost_lines) == 1  # one line for the batch, not one per record
    assert lost_lines[0].startswith("3 records of cam-b lost (frames 1–3): not delivered after 2 attempts")


async def test_a_record_over_one_mebibyte_is_delivered(broker: EmbeddedBroker) -> None:
    big = annotated_frame("cam-b", 0, description="x" * 1_500_000)
    async with started(Publisher(settings_for(broker))) as publisher:
        await publisher.publish(big)
    records = await read_topic(broker.address, publisher.settings.topic, expected=1)
    assert [record.response for record in records] == [big.response]

    async with started(Publisher(settings_for(broker, max_request_bytes=1024 * 1024))) as publisher:
        with pytest.raises(
            PublishError, match=r"cam-b frame 0 is \d+ bytes, more than kafka.max_request_bytes 1048576"
        ):
            await publisher.publish(big)


def test_broker_stops_without_leaving_a_process() -> None:
    broker = EmbeddedBroker()
    broker.start()
    pid, port = broker.pid, int(broker.address.rsplit(":", 1)[1])
    assert pid is not None
    assert broker.running
    with pytest.raises(BrokerError, match=f"cannot listen on 127.0.0.1:{port}"), EmbeddedBroker(port):
        pass
    broker.stop()
    broker.stop()
    assert not broker.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()


def test_run_broker_serves_until_sigterm() -> None:
    command = [sys.executable, "-c", "from pipeline.broker import run_broker; run_broker(0)"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]) as process:
        assert process.stdout is not None
        try:
            address = process.stdout.readline().split(" listening on ")[1].split(";")[0]
            host, port = address.rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=1.0).close()
        finally:
            process.send_signal(signal.SIGTERM)
        assert process.wait(DEADLINE_S) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=1.0).close()


def test_a_missing_broker_binary_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "tansu"
    with pytest.raises(BrokerError, match=str(missing)):
        EmbeddedBroker(binary=missing).start()
