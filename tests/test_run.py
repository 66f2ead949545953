"""`framelabel run` end to end, as a user runs it: real video, real cameras, a real broker, real models."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import cast

import cv2
import pytest
import yaml

from pipeline.broker import EmbeddedBroker
from pipeline.consumer import ConsumeError, consume
from pipeline.records import JSON_CONTENT_TYPE, PROTOBUF_CONTENT_TYPE, DecodedRecord
from tests.cameras import CLIPS, http_mjpeg_camera, rtsp_camera
from tests.faults import pipeline_run
from tests.helpers import FRAMELABEL, ServiceProcess, within
from tests.kafka import connection, read_topic

BUNNY = CLIPS / "bigbuckbunny.mp4"  # 132 frames, 1280×720, 25 fps
BIKES = CLIPS / "bikes.mp4"
RUN_TIMEOUT = 180
GIVE_UP_S = 60  # a liveness bound: `run` gives up on a broker it cannot reach (connect_timeout_ms is 10 s)


def frame_count(clip: Path) -> int:
    capture = cv2.VideoCapture(str(clip))
    count = 0
    while capture.grab():
        count += 1
    capture.release()
    return count


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as running:
        yield running


def write_config(folder: Path, broker: EmbeddedBroker, sources: list[dict[str, object]], **sections: object) -> Path:
    config = {
        "sources": sources,
        "kafka": {"bootstrap_servers": broker.address, "enable_idempotence": False, "topic": "frames"}
        | dict(sections.pop("kafka", {})),  # type: ignore[call-overload]
        **sections,
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FRAMELABEL, "run", *args], capture_output=True, text=True, timeout=timeout)


def now_ms() -> int:
    """The wall clock in ms since the epoch, as capture_time_ms counts it."""
    return time.time_ns() // 1_000_000


def by_source(records: list[DecodedRecord]) -> dict[str, list[DecodedRecord]]:
    grouped: dict[str, list[DecodedRecord]] = {}
    for record in records:
        grouped.setdefault(record.source_id, []).append(record)
    return grouped


async def test_file_replay_in_process_publishes_every_frame_in_order(broker: EmbeddedBroker, tmp_path: Path) -> None:
    config = write_config(tmp_path, broker, [{"id": "bunny", "uri": str(BUNNY)}])
    started_ms = now_ms()
    result = run(str(config))
    ended_ms = now_ms()
    assert result.returncode == 0, result.stderr
    expected = frame_count(BUNNY)
    records = await read_topic(broker.address, "frames", expected=expected)
    assert len(records) == expected
    assert [r.frame_index for r in records] == list(range(expected))
    positions = [r.media_position_ms for r in records]
    assert positions[0] == 0.0
    assert all(b is not None and a is not None and b > a for a, b in itertools.pairwise(positions))
    first = records[0]
    assert (first.source_id, first.image_width, first.image_height) == ("bunny", 455, 256)  # imagenet's own size
    assert first.content_type == PROTOBUF_CONTENT_TYPE
    assert first.timestamp_ms == first.capture_time_ms
    assert started_ms <= first.capture_time_ms <= ended_ms  # the wall clock when this run read it
    assert len(first.response.annotations) == 5  # the run default: top 5, specification of those labels
    assert [label.name for label in first.response.classifier_specification.labels] == [
        a.label.name for a in first.response.annotations
    ]
    assert "bunny" in result.stdout
    assert str(expected) in result.stdout


async def test_two_sources_through_the_grpc_service_as_json(
    broker: EmbeddedBroker, imagenet_service: ServiceProcess, tmp_path: Path
) -> None:
    sources = [
        {"id": "bunny", "uri": str(BUNNY), "every_nth": 4},
        {"id": "bikes", "uri": str(BIKES), "every_nth": 10, "max_side": None},
    ]
    config = write_config(tmp_path, broker, sources, kafka={"value_format": "json"})
    result = run(str(config), "--target", imagenet_service.address)
    assert result.returncode == 0, result.stderr
    sampled = {"bunny": range(0, frame_count(BUNNY), 4), "bikes": range(0, frame_count(BIKES), 10)}
    grouped = by_source(await read_topic(broker.address, "frames", expected=sum(map(len, sampled.values()))))
    for source_id, clip, every_nth in (("bunny", BUNNY, 4), ("bikes", BIKES, 10)):
        indexes = [r.frame_index for r in grouped[source_id]]
        assert indexes == list(range(0, frame_count(clip), every_nth)), source_id
    bikes = grouped["bikes"][0]
    assert bikes.content_type == JSON_CONTENT_TYPE
    assert (bikes.image_width, bikes.image_height) == tuple(
        int(cv2.VideoCapture(str(BIKES)).get(p)) for p in (cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT)
    )
    assert len(bikes.response.classifier_specification.labels) == 1000  # the service answers uncapped


async def test_a_failing_source_leaves_the_others_alone(broker: EmbeddedBroker, tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_text("not a video")
    sources = [
        {"id": "missing", "uri": str(tmp_path / "missing.mp4")},
        {"id": "broken", "uri": str(bad)},
        {"id": "bunny", "uri": str(BUNNY), "every_nth": 11},
    ]
    result = run(str(write_config(tmp_path, broker, sources)))
    assert result.returncode == 3, result.stderr  # some sources failed, the others completed
    assert "missing.mp4" in result.stderr
    assert "broken.mp4" in result.stderr
    sampled = range(0, frame_count(BUNNY), 11)
    grouped = by_source(await read_topic(broker.address, "frames", expected=len(sampled)))
    assert set(grouped) == {"bunny"}
    assert len(grouped["bunny"]) == len(sampled)


def test_nothing_can_run_exits_non_zero(broker: EmbeddedBroker, tmp_path: Path) -> None:
    result = run(str(write_config(tmp_path, broker, [{"id": "missing", "uri": str(tmp_path / "missing.mp4")}])))
    assert result.returncode == 1
    assert "missing.mp4" in result.stderr


def test_unreachable_broker_is_one_clear_line(tmp_path: Path) -> None:
    try:
        result = run("--source", f"bunny={BUNNY}", "--bootstrap", "127.0.0.1:1", timeout=GIVE_UP_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"framelabel run still trying an unreachable broker after {GIVE_UP_S:g} s")
    assert result.returncode == 2
    assert "framelabel: error:" in result.stderr
    assert "127.0.0.1:1" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("sources: [{id: a, uri: x.mp4, fps: 0}]\n", "sources.0.fps: Input should be greater than 0"),
        ("sources: [{id: a, uri: x.mp4}]\nannotator: {classifier: resnet}\n", "unknown classifier 'resnet'"),
        ("sources: [{id: a, uri: x.mp4}]\nkafka: {value_format: xml}\n", "kafka.value_format"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path: Path, config: str, message: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(config)
    result = run(str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("framelabel: error: ")
    assert message in result.stderr


def start_run(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([FRAMELABEL, "run", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_run(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    return process.returncode, stdout, stderr


async def wait_for_records(broker: EmbeddedBroker, source_id: str, at_least: int, within_s: float = 60) -> int:
    """Wait until the topic holds `at_least` records of the source (a live topic is never quiet)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            records = consume(
                connection(broker.address, "frames"),
                from_beginning=True,
                max_records=at_least,
                source_id=source_id,
                idle_timeout_s=2,
            )
            if len([record async for record in records]) == at_least:
                return at_least
        except ConsumeError:  # the run has not created the topic yet
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{source_id}: fewer than {at_least} records after {within_s:g} s")


async def test_rtsp_camera_stopped_and_started_again_is_reconnected(broker: EmbeddedBroker, tmp_path: Path) -> None:
    with rtsp_camera(BUNNY) as camera:
        port = int(camera.url.rsplit(":", 1)[1].split("/")[0])
        source = {"id": "gate", "uri": camera.url, "fps": 5, "backoff_max_seconds": 1.0}
        process = start_run(write_config(tmp_path, broker, [source]))
        try:
            before = await wait_for_records(broker, "gate", 3)
            camera.stop()  # the clip ends too: either way the camera goes away
            with rtsp_camera(BUNNY, port=port):
                await wait_for_records(broker, "gate", before + 3)
        finally:
            code, _stdout, stderr = stop_run(process)
    assert code == 0, stderr
    assert "reconnect" in stderr.lower()
    records = [r for r in await read_topic(broker.address, "frames") if r.source_id == "gate"]
    indexes = [r.frame_index for r in records]
    assert indexes == sorted(indexes)  # frame order holds across the reconnect
    # sampled with fps, so read by PyAV: positions on the stream's own clock, but for a first frame without one
    assert sum(r.media_position_ms is None for r in records) <= 2  # one per connection at most


async def wait_for_a_record_captured_after(broker: EmbeddedBroker, source_id: str, after_ms: int) -> None:
    """Wait, while the run goes on, until the topic holds a record of the source captured after `after_ms`."""
    reading = consume(connection(broker.address, "frames"), from_beginning=True, source_id=source_id)
    async with (
        within(60, f"a record of {source_id} captured after {after_ms} ms since the epoch"),
        aclosing(cast("AsyncGenerator[DecodedRecord, None]", reading)) as records,  # an async generator: closed here
    ):
        async for record in records:
            if record.capture_time_ms > after_ms:
                return
    raise AssertionError("consume() without max_records or idle_timeout_s ended")


async def test_http_mjpeg_camera_publishes_fresh_frames(
    broker: EmbeddedBroker, tmp_path: Path, figures: dict[str, object]
) -> None:
    with http_mjpeg_camera(BUNNY) as camera:
        config = write_config(tmp_path, broker, [{"id": "lobby", "uri": camera.url, "fps": 10}])
        started_ms = now_ms()
        with pipeline_run(config) as running:
            await wait_for_records(broker, "lobby", 5)
            seen_ms = now_ms()
            # It goes on publishing what the camera sends now, not what it had at the start: a frame captured a
            # second after the first five were in Kafka is published too, while the run goes on.
            await wait_for_a_record_captured_after(broker, "lobby", seen_ms + 1000)
            code = await running.end(signal.SIGINT)
        stopped_ms = now_ms()
    assert code == 0, running.log()
    summary = running.summary("lobby")
    records = await read_topic(broker.address, "frames", expected=int(summary["published"]))

    assert {r.source_id for r in records} == {"lobby"}
    # sampled with fps, so read by PyAV: positions on the stream's own clock, but for a first frame without one
    assert sum(r.media_position_ms is None for r in records) <= 1
    assert len(records) == summary["published"]
    assert [r.frame_index for r in records] == sorted({r.frame_index for r in records})  # in capture order
    captured = [r.capture_time_ms for r in records]
    assert captured == sorted(set(captured))  # capture times advance (fps 10: ~100 ms apart)
    assert started_ms <= captured[0] <= captured[-1] <= stopped_ms  # all captured during this run
    figures["http mjpeg camera run (fps 10): capture to published latency p50, p95 ms"] = (
        summary["p50_ms"],
        summary["p95_ms"],
    )


async def test_sigint_during_a_replay_publishes_what_was_captured_and_says_where(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    source = {"id": "bunny", "uri": str(BUNNY), "realtime": True, "loop": True}
    process = start_run(write_config(tmp_path, broker, [source]))
    try:
        await wait_for_records(broker, "bunny", 10)
    finally:
        code, stdout, stderr = stop_run(process)
    assert code == 0, stderr
    records = await read_topic(broker.address, "frames")
    indexes = [r.frame_index for r in records]
    assert indexes == list(range(len(indexes)))  # no gap up to where it stopped
    assert f"frame {indexes[-1]} @" in stdout  # the summary's resume point
