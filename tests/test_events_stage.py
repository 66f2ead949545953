"""The events stage against real brokers: `framelabel events` on Tansu (at least once), and on noida-db
(exactly once) killed with SIGKILL five times."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.consumer import consume
from pipeline.events.record import decode_event, is_event_record
from pipeline.events.settings import EventsConfig
from pipeline.events.tracker import EventTracker, Observation
from pipeline.frames import AnnotatedFrame, FrameInfo
from pipeline.kafka import KafkaSettings, ensure_topic
from pipeline.records import KafkaRecord, encode_record
from services.api.event_pb2 import AnnotationEvent
from services.api.image_classifier_pb2 import AnnotationResponse, ClassAnnotation, ClassifierSpecification, Label
from tests.cameras import CLIPS, free_port
from tests.faults import PipelineRun, eventually, framelabel_process, noida_broker, pipeline_run, write_run_config
from tests.helpers import http_get
from tests.kafka import QUIET_S, connection, kafka_broker, read_topic
from tests.test_run import BUNNY

START, END = AnnotationEvent.START, AnnotationEvent.END
FRAME_MS = 40  # 25 fps of capture time
EPOCH_MS = int(time.time() * 1000)  # recent: a broker's retention deletes records stamped a week ago
RULES = {
    "rules": [{"match": "*", "enter_threshold": 0.5, "exit_threshold": 0.3, "window_frames": 3, "grace_seconds": 0.2}],
    "batch_records": 40,
    "offline_after_seconds": 1.0,  # a source silent this long (on the stage's clock) is offline
}


def scored_frame(source_id: str, index: int, scores: dict[str, float]) -> AnnotatedFrame:
    response = AnnotationResponse(
        request_id=f"{source_id}/{index}",
        classifier_specification=ClassifierSpecification(classification_type=ClassifierSpecification.MULTI_CLASS),
        annotations=[ClassAnnotation(label=Label(name=name), confidence=score) for name, score in scores.items()],
    )
    info = FrameInfo(source_id, index, EPOCH_MS + index * FRAME_MS, 0.0)
    return AnnotatedFrame(info, response, width=64, height=48)


def scene_changes(source_id: str, first: int, count: int, period: int) -> list[AnnotatedFrame]:
    """`dog` and `cat` taking turns every `period` frames."""
    return [
        scored_frame(source_id, i, {"dog": 0.8, "cat": 0.1} if (i // period) % 2 == 0 else {"cat": 0.7, "dog": 0.2})
        for i in range(first, first + count)
    ]


async def publish(address: str, topic: str, frames: Sequence[AnnotatedFrame]) -> None:
    await publish_records(address, topic, [encode_record(frame, "protobuf") for frame in frames])


async def publish_records(address: str, topic: str, records: Sequence[KafkaRecord]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=address, enable_idempotence=False, acks="all")
    await producer.start()
    try:
        deliveries = []
        for record in records:
            deliveries.append(
                await producer.send(
                    topic, record.value, key=record.key, timestamp_ms=record.timestamp_ms, headers=record.headers
                )
            )
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()


class EventReader:
    """Reads the events topic from the start, in the background (read_committed)."""

    def __init__(self, address: str, topic: str) -> None:
        self._events: list[AnnotationEvent] = []
        self._consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=address, auto_offset_reset="earliest", isolation_level="read_committed"
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventReader:
        await self._consumer.start()
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._consumer.stop()

    @property
    def events(self) -> list[AnnotationEvent]:
        """The events read so far; raises what stopped the reading, if anything did (not a count frozen)."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            self._task.result()
        return self._events

    async def _read(self) -> None:
        while True:
            for records in (await self._consumer.getmany(timeout_ms=100)).values():
                for record in records:
                    assert is_event_record(record.headers)
                    self._events.append(decode_event(record.key, record.value, record.headers))


def expected_events(config: EventsConfig, frames: Sequence[AnnotatedFrame]) -> list[AnnotationEvent]:
    """What an unkilled stage publishes for these frames, ending each source as offline once they stop."""
    tracker = EventTracker(config, config.classifier_name)
    messages = []
    for frame in frames:
        scores = {a.label.name: a.confidence for a in frame.response.annotations}
        messages += tracker.observe(
            Observation(frame.info.source_id, frame.info.index, frame.info.capture_time_ms, True, scores)
        )
    for source_id in sorted({frame.info.source_id for frame in frames}):
        messages += tracker.close_silent(source_id, 60_000)
    return messages


def in_order(events: Sequence[AnnotationEvent]) -> list[AnnotationEvent]:
    return sorted(events, key=lambda e: (e.source_id, e.start_time_ms, e.label, e.sequence))


def write_config(folder: Path, address: str, topic: str, **events: object) -> Path:
    path = folder / "events.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap_servers": address, "topic": topic, "enable_idempotence": False},
                "events": RULES | {"topic": f"{topic}.events"} | events,
            }
        )
    )
    return path


async def wait_for_line(process: PipelineRun, text: str) -> None:
    try:
        await eventually(lambda: text in process.log() or process.process.poll() is not None, f"log line {text!r}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; the log:\n{process.log()}") from None
    assert text in process.log(), process.log()


async def test_events_on_tansu_are_at_least_once_and_a_restart_resumes(tmp_path: Path) -> None:
    async with kafka_broker() as broker:
        config_file = write_config(tmp_path, broker.address, "frames")
        config = EventsConfig.model_validate(RULES | {"input_topic": "frames"})
        first_part = scene_changes("gate", 0, 60, period=25) + scene_changes("yard", 0, 30, period=40)
        second_part = scene_changes("gate", 60, 40, period=25)
        async with EventReader(broker.address, "frames.events") as reader:
            with framelabel_process("events", str(config_file)) as stage:
                await wait_for_line(stage, "waiting for topic frames")  # started before the run that publishes
                await ensure_topic(KafkaSettings(bootstrap_servers=broker.address, topic="frames", partitions=2))
                await wait_for_line(stage, "at least once")
                await publish(broker.address, "frames", first_part)
                # both sources then fall silent: their open events end as offline after the grace time
                first_expected = expected_events(config, first_part)
                await eventually(lambda: len(reader.events) >= len(first_expected), f"{len(first_expected)} events")
                assert stage.finish(signal.SIGTERM) == 0
            with framelabel_process("events", str(config_file)) as stage:
                await publish(broker.address, "frames", second_part)
                expected = first_expected + expected_events(config, second_part)
                await eventually(lambda: len(reader.events) >= len(expected), f"{len(expected)} events")
                assert stage.finish(signal.SIGTERM) == 0
        # nothing read twice after the restart: it went on from the committed offsets
        assert in_order(reader.events) == in_order(expected)
        consumed = consume(connection(broker.address, "frames.events"), from_beginning=True, idle_timeout_s=QUIET_S)
        assert in_order([event async for event in consumed]) == in_order(reader.events)  # the API decodes events too
        offline = [(e.source_id, e.label) for e in reader.events if e.end_reason == AnnotationEvent.SOURCE_OFFLINE]
        assert sorted(offline) == [("gate", "cat"), ("gate", "dog"), ("yard", "dog")]
        gate = [(e.label, AnnotationEvent.State.Name(e.state)) for e in reader.events if e.source_id == "gate"]
        assert gate[:3] == [("dog", "START"), ("cat", "START"), ("dog", "END")]  # the grace time overlaps the change


async def test_events_on_tansu_killed_three_times_repeat_only_with_the_same_ids(tmp_path: Path) -> None:
    """At least once: SIGKILLed mid-work and restarted, the stage may send a batch's messages again, each the
    same message with the same (event_id, sequence); none is lost."""
    frames = [frame for source in ("a", "b") for frame in scene_changes(source, 0, 400, period=30)]
    frames.sort(key=lambda frame: frame.info.index)
    async with kafka_broker() as broker:
        await ensure_topic(KafkaSettings(bootstrap_servers=broker.address, topic="frames", partitions=2))
        await publish(broker.address, "frames", frames)
        config_file = write_config(tmp_path, broker.address, "frames", batch_records=10, offline_after_seconds=5)
        expected = expected_events(EventsConfig.model_validate(RULES | {"input_topic": "frames"}), frames)
        kills = random.Random()
        seen_at_kills = []
        async with EventReader(broker.address, "frames.events") as reader:

            def distinct() -> dict[tuple[str, int], AnnotationEvent]:
                return {(event.event_id, event.sequence): event for event in reader.events}

            for _ in range(3):
                before = len(distinct())
                with framelabel_process("events", str(config_file)) as stage:
                    await wait_for_line(stage, "at least once")
                    # awaited within this iteration, so the lambda's `before` is this iteration's
                    await eventually(lambda: len(distinct()) > before, "new events from this start")  # noqa: B023
                    await asyncio.sleep(kills.uniform(0.0, 0.2))  # a random point of its work, not a synchronisation
                    stage.process.kill()
                    stage.finish()
                seen_at_kills.append(len(distinct()))
                if seen_at_kills[-1] == len(expected):
                    break
            with framelabel_process("events", str(config_file)) as stage:
                await wait_for_line(stage, "at least once")
                await eventually(lambda: len(distinct()) >= len(expected), f"{len(expected)} events")
                assert stage.finish(signal.SIGTERM) == 0
    assert any(0 < seen < len(expected) for seen in seen_at_kills), seen_at_kills  # killed mid-work
    once = distinct()
    assert in_order(list(once.values())) == in_order(expected)
    assert all(event == once[event.event_id, event.sequence] for event in reader.events)  # a repeat is the same


async def test_exactly_once_on_a_broker_with_transactions_through_five_kills(tmp_path: Path) -> None:
    frames = [frame for source in ("a", "b", "c") for frame in scene_changes(source, 0, 400, period=30)]
    frames.sort(key=lambda frame: frame.info.index)  # the sources interleaved, each in its own order
    with noida_broker(tmp_path / "noida") as broker:
        await ensure_topic(KafkaSettings(bootstrap_servers=broker.address, topic="frames", partitions=3))
        await publish(broker.address, "frames", frames)
        # small transactions, so that the kills land in the middle of the work; a restarted stage must not take
        # a source whose partition it has not read yet for an offline one, however loaded the machine
        config_file = write_config(
            tmp_path, broker.address, "frames", delivery="exactly-once", batch_records=10, offline_after_seconds=5
        )
        config = EventsConfig.model_validate(RULES | {"input_topic": "frames"})
        expected = expected_events(config, frames)
        kills = random.Random()
        seen_at_kills = []
        async with EventReader(broker.address, "frames.events") as reader:
            for _ in range(5):
                with framelabel_process("events", str(config_file)) as stage:
                    await wait_for_line(stage, "exactly once (Kafka transactions)")
                    await asyncio.sleep(kills.uniform(0.0, 1.0))  # a random point of its work, not a synchronisation
                    stage.process.kill()
                    stage.finish()
                seen_at_kills.append(len(reader.events))
            with framelabel_process("events", str(config_file)) as stage:
                await wait_for_line(stage, "exactly once (Kafka transactions)")
                try:
                    await eventually(lambda: len(reader.events) >= len(expected), f"{len(expected)} events")
                except TimeoutError:
                    await broker.skip_if_wedged("frames.events")
                    raise
                assert stage.finish(signal.SIGTERM) == 0
        assert len(expected) > 60
        assert any(0 < seen < len(expected) for seen in seen_at_kills), seen_at_kills  # killed mid-work
        assert in_order(reader.events) == in_order(expected)


async def test_events_inside_a_run_end_with_the_replay(tmp_path: Path) -> None:
    """`framelabel run` with an `events:` section, on a real clip through imagenet: the events are what the
    rules make of the published annotations, and those open when the clip ends end with SOURCE_ENDED."""
    rules = {"rules": [{"match": "*", "enter_threshold": 0.2, "exit_threshold": 0.1, "grace_seconds": 0.1}]}
    async with kafka_broker() as broker:
        sources = [{"id": "bunny", "uri": str(BUNNY), "every_nth": 2}]
        config_file = write_run_config(tmp_path, broker.address, sources, events=rules)
        with pipeline_run(config_file) as run:
            assert await run.end() == 0, run.log()
        assert "at least once" in run.log()
        annotations = await read_topic(broker.address, "frames")
        events = [
            e
            async for e in consume(
                connection(broker.address, "framelabel.events"), from_beginning=True, idle_timeout_s=QUIET_S
            )
        ]
    config = EventsConfig.model_validate(rules | {"input_topic": "frames"})
    tracker = EventTracker(config, config.classifier_name)
    expected = []
    for record in annotations:
        scores = {a.label.name: a.confidence for a in record.response.annotations}
        expected += tracker.observe(
            Observation(record.source_id, record.frame_index, record.capture_time_ms, True, scores, record.classifier)
        )
    expected += tracker.close_source("bunny", AnnotationEvent.SOURCE_ENDED)
    assert len(annotations) == 66
    assert {record.classifier for record in annotations} == {"imagenet"}  # the run names it in a header
    assert {event.classifier for event in events} == {"imagenet"}  # and the events take the name from there
    assert any(e.end_reason == AnnotationEvent.SOURCE_ENDED for e in expected)
    assert in_order(events) == in_order(expected)


async def test_a_run_stopped_by_a_signal_ends_its_open_events_as_run_stopped(tmp_path: Path) -> None:
    """A looping camera-like source never ends by itself: what is open when SIGTERM stops the run ends once,
    with RUN_STOPPED (the grace time is too long for any to end on its own first)."""
    rules = {"rules": [{"match": "*", "enter_threshold": 0.05, "exit_threshold": 0.01, "grace_seconds": 600}]}
    async with kafka_broker() as broker:
        sources = [{"id": "bunny", "uri": str(BUNNY), "realtime": True, "loop": True, "every_nth": 5}]
        config_file = write_run_config(tmp_path, broker.address, sources, events=rules)
        async with EventReader(broker.address, "framelabel.events") as reader:
            with pipeline_run(config_file) as run:
                await eventually(lambda: any(e.state == START for e in reader.events), "an event to start")
                assert await run.end(signal.SIGTERM) == 0, run.log()
            started = {e.event_id for e in reader.events if e.state == START}
            await eventually(
                lambda: {e.event_id for e in reader.events if e.state == END} >= started, "every event to end"
            )
    ends = [e for e in reader.events if e.state == END]
    assert sorted(e.event_id for e in ends) == sorted(started)  # each once
    assert {e.end_reason for e in ends} == {AnnotationEvent.RUN_STOPPED}


@pytest.fixture
def scene_change(tmp_path: Path) -> Path:
    """A clip with a known change of scene: 100 frames of a man in a car, then 132 of the cartoon rabbit."""
    clip = tmp_path / "scene.mp4"
    scale = "scale=640:360,setsar=1,fps=25"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(CLIPS / "carphone_pristine.mp4"), "-i", str(BUNNY), "-filter_complex",
         f"[0:v]{scale}[a];[1:v]{scale}[b];[a][b]concat=n=2:v=1[v]", "-map", "[v]",
         "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", str(clip)],
        check=True,
    )  # fmt: skip
    return clip


async def test_a_person_leaving_a_real_clip_is_one_event_shown_in_the_live_view(
    tmp_path: Path, scene_change: Path
) -> None:
    """Through `objects` with `events: {}` (the rules `objects` declares), a `person` event starts on the clip's
    first frames and ends where the scene changes, and the live view lists it while the run goes on."""
    clip = scene_change
    metrics_port = free_port()
    async with kafka_broker() as broker:
        sources = [{"id": "scene", "uri": str(clip), "fps": 5, "realtime": True}]
        config_file = write_run_config(
            tmp_path,
            broker.address,
            sources,
            annotator={"classifier": "objects"},
            events={},
            metrics={"port": metrics_port},
        )
        with pipeline_run(config_file) as run:
            shown: list[dict[str, object]] = []

            def ended_event_shown() -> bool:
                status, body = http_get(f"http://127.0.0.1:{metrics_port}/api/sources")
                shown[:] = json.loads(body)[0]["events"] if status == 200 else []
                return any(event["state"] == "ended" for event in shown)

            await eventually(ended_event_shown, "the live view to show the person's event ended")
            assert await run.end() == 0, run.log()
        events = [
            e
            async for e in consume(
                connection(broker.address, "framelabel.events"), from_beginning=True, idle_timeout_s=QUIET_S
            )
        ]
    assert [(e.label, AnnotationEvent.State.Name(e.state)) for e in events] == [("person", "START"), ("person", "END")]
    start, end = events
    assert start.classifier == "objects"  # named by the records' header
    assert start.first_frame_index <= 10
    assert 95 <= end.last_frame_index <= 105  # the man leaves with frame 100
    assert end.end_reason == AnnotationEvent.SCORE_BELOW_EXIT
    assert shown[0]["label"] == "person"
