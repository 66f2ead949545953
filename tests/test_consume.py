"""`framelabel consume` as a user runs it: a group that resumes, a topic waited for, filtered records, events,
bad values."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pipeline.broker import EmbeddedBroker
from pipeline.events.record import EVENT_PROTOBUF_CONTENT_TYPE, encode_event, event_json
from pipeline.events.settings import EventsConfig
from pipeline.kafka import KafkaSettings, ensure_topic
from pipeline.records import header_texts
from services.api.event_pb2 import AnnotationEvent
from tests.cameras import free_port
from tests.faults import eventually, framelabel_process
from tests.helpers import FRAMELABEL
from tests.kafka import kafka_broker, raw_records
from tests.test_events_stage import (
    RULES,
    expected_events,
    publish,
    publish_records,
    scene_changes,
    scored_frame,
    wait_for_line,
)


def consumed(stdout: list[str]) -> list[tuple[str, int, list[str]]]:
    lines = [json.loads(line) for line in stdout]
    return [
        (r["source_id"], r["frame_index"], [a["label"]["name"] for a in r["response"]["annotations"]]) for r in lines
    ]


def test_impossible_values_are_refused() -> None:
    for flag, value in (("--min-confidence", "2"), ("--max", "-1"), ("--idle-timeout", "0")):
        done = subprocess.run([FRAMELABEL, "consume", flag, value], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert f"argument {flag}: {value} is out of range" in done.stderr


async def test_consume_waits_for_its_topic_filters_records_and_resumes_in_a_group(tmp_path: Path) -> None:
    async with kafka_broker() as broker:
        command = ["consume", "--bootstrap", broker.address, "--topic", "frames", "--group", "readers"]
        command += ["--from-beginning", "--min-confidence", "0.5", "--idle-timeout", "2"]
        sure = [scored_frame("cam", i, {"dog": 0.8, "cat": 0.2}) for i in range(0, 6, 2)]
        unsure = [scored_frame("cam", i, {"dog": 0.3, "cat": 0.2}) for i in range(1, 6, 2)]
        # each run stops at the count it should print (the idle timeout is only its bound), not 2 s after it
        with framelabel_process(*command, "--max", "3") as reader:
            await eventually(lambda: "waiting for topic frames" in reader.log(), "the waiting line")
            await ensure_topic(KafkaSettings(bootstrap_servers=broker.address, topic="frames", partitions=1))
            await publish(broker.address, "frames", sorted(sure + unsure, key=lambda f: f.info.index))
            assert await reader.end() == 0
        # the unsure frames are left out, not printed empty; the sure ones keep their sure labels only
        assert consumed(reader.stdout) == [("cam", 0, ["dog"]), ("cam", 2, ["dog"]), ("cam", 4, ["dog"])], reader.log()
        await publish(broker.address, "frames", [scored_frame("cam", 6, {"cat": 0.9})])
        with framelabel_process(*command, "--max", "1") as again:
            assert await again.end() == 0
        assert consumed(again.stdout) == [("cam", 6, ["cat"])]  # the group resumed after what it had read


async def test_consume_prints_events_in_either_value_format_filtered_by_their_peak() -> None:
    # dog (0.8) and cat (0.7) take turns: their events, START and END, the last ones ended as offline
    events = expected_events(EventsConfig.model_validate(RULES), scene_changes("gate", 0, 80, period=25))
    assert {e.label for e in events} == {"dog", "cat"}
    async with kafka_broker() as broker:
        await ensure_topic(KafkaSettings(bootstrap_servers=broker.address, topic="frames.events", partitions=1))
        formats = ("protobuf", "json")
        await publish_records(
            broker.address, "frames.events", [encode_event(e, formats[i % 2]) for i, e in enumerate(events)]
        )
        raw = (await raw_records(broker.address, "frames.events", 2))[:2]
        command = ["consume", "--bootstrap", broker.address, "--topic", "frames.events", "--from-beginning"]
        with framelabel_process(*command, "--max", str(len(events)), "--idle-timeout", "10") as every:
            assert await every.end() == 0
        dogs = [e for e in events if e.label == "dog"]
        with framelabel_process(*command, "--min-confidence", "0.75", "--idle-timeout", "2") as sure:
            assert await sure.end() == 0
    # the headers say what each value holds, and which event and frame it is about, as on the annotation records
    content_types = (EVENT_PROTOBUF_CONTENT_TYPE, "application/json")
    for record, event, content_type in zip(raw, events[:2], content_types, strict=True):
        assert (record.key, record.timestamp) == (b"gate", event.at_time_ms)
        assert header_texts(record.headers) == {
            "source_id": "gate",
            "frame_index": str(event.at_frame_index),
            "capture_time_ms": str(event.at_time_ms),
            "content_type": content_type,
            "event_id": event.event_id,
            "event_state": "START",
        }
    assert [json.loads(line) for line in every.stdout] == as_printed(events), every.log()
    assert [json.loads(line) for line in sure.stdout] == as_printed(dogs), sure.log()


def as_printed(events: list[AnnotationEvent]) -> list[dict[str, object]]:
    return [json.loads(json.dumps(event_json(event))) for event in events]


async def test_consume_and_run_started_before_their_broker_wait_for_it_saying_so() -> None:
    """Started together in the background (as the quickstarts do), a client may call the broker a moment before it
    listens: it waits for `kafka.connect_timeout_ms` instead of failing at the first refused connection."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    reader_command = ["consume", "--bootstrap", address, "--topic", "early", "--from-beginning", "--max", "3"]
    with framelabel_process(*reader_command) as reader, framelabel_process(*early_run(address)) as run:
        for process in (reader, run):
            await wait_for_line(process, f"waiting for Kafka at {address} to answer")
        with EmbeddedBroker(port):
            assert run.finish(timeout=120) == 0, run.log()
            assert reader.finish(timeout=60) == 0, reader.log()
    assert [index for _, index, _ in consumed(reader.stdout)] == [0, 50, 100]  # every 50th frame of the clip


def early_run(address: str) -> list[str]:
    """A short replay of the sample clip into topic `early` at `address`."""
    return ["run", "--bootstrap", address, "--topic", "early", "--no-idempotence", "--every-nth", "50"]
