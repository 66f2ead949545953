"""Faults while `framelabel run` works: links cut, brokers and services restarted, cameras lost or stalled, SIGTERM.

Real parts only, on 127.0.0.1: a Kafka-protocol broker (Tansu; noida-db where data must
survive a restart), the gRPC service as its own process, real clips and cameras. Each
test measures what it promises (frames lost, duplicates, order, time to recover) and
records the figures for docs/reliability.md (see tests/figures.py).
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import cv2
import pytest

from pipeline.broker import EmbeddedBroker
from tests.cameras import CLIPS, free_port, http_mjpeg_camera, rtsp_camera
from tests.faults import (
    TcpProxy,
    TopicWatcher,
    delivery_figures,
    eventually,
    noida_broker,
    pipeline_run,
    tcp_proxy,
    write_run_config,
)
from tests.helpers import ServiceProcess
from tests.kafka import kafka_broker, read_topic
from tests.test_run import frame_count

REQUEST_TIMEOUT_MS = 6000  # the producer's, in these runs: the long cut outlasts it
BROKER_OUTAGE_S = 5.0
SERVICE_OUTAGE_S = 5.0
CAMERA_OUTAGE_S = 5.0
BACKOFF_CAP_S = 2.0
STALL_S = 3.0
SILENT_OPEN_TIMEOUT_MS = 15_000
RESUME_HINT = re.compile(r"frame (?P<index>\d+) @ (?P<ms>[\d.]+) ms")
RECONNECTING = re.compile(r"camera (?P<source>\S+) \(.*\): .*; reconnecting in (?P<delay>[\d.]+) s")


def bikes_at_320(folder: Path, seconds: int) -> Path:
    """bikes.mp4 (10 s) looped and cut to `seconds` at 320 px: 25 frames a second, a keyframe every second."""
    clip = folder / f"bikes-{seconds}s.mp4"
    command = ["ffmpeg", "-v", "error", "-stream_loop", "-1", "-i", str(CLIPS / "bikes.mp4"), "-an", "-t", str(seconds)]
    command += ["-vf", "scale=320:-2", "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", str(clip)]
    subprocess.run(command, check=True, timeout=120)
    return clip


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 s: cameras that stay up through a fault and the wait to see them back."""
    return bikes_at_320(tmp_path_factory.mktemp("clips"), 20)


@pytest.fixture(scope="module")
def medium_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """15 s: a replay still going when the second of two link cuts (3 s, then 10 s) begins, ~5 s in."""
    return bikes_at_320(tmp_path_factory.mktemp("clips"), 15)


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 s: a replay still going when one outage (5 s down, then a restart) is over. A realtime replay held up
    by an outage resumes its pace rather than catching up, so its run lasts the clip plus the outage."""
    return bikes_at_320(tmp_path_factory.mktemp("clips"), 10)


@pytest.fixture
async def proxied_broker() -> AsyncIterator[tuple[EmbeddedBroker, TcpProxy]]:
    """Tansu, reachable only through a proxy: it advertises the proxy's port, so every client goes through it."""
    proxy_port = free_port()
    async with EmbeddedBroker(advertised_port=proxy_port) as broker:
        broker_port = int(broker.address.rsplit(":", 1)[1])
        async with tcp_proxy(broker_port, proxy_port) as proxy:
            yield broker, proxy


async def cut_for(proxy: TcpProxy, seconds: float) -> float:
    """Cut the link for `seconds` (the length of the outage is the fault itself); the wall time of the restore."""
    await proxy.cut()
    await asyncio.sleep(seconds)
    await proxy.restore()
    return time.time()


async def test_kafka_link_cut_mid_replay_loses_nothing_and_keeps_order(
    proxied_broker: tuple[EmbeddedBroker, TcpProxy], medium_clip: Path, tmp_path: Path, figures: dict[str, object]
) -> None:
    _broker, proxy = proxied_broker
    bootstrap = f"127.0.0.1:{proxy.port}"
    source = {"id": "clip", "uri": str(medium_clip), "realtime": True, "every_nth": 2}
    config = write_run_config(tmp_path, bootstrap, [source], kafka={"request_timeout_ms": REQUEST_TIMEOUT_MS})
    recoveries = []
    async with TopicWatcher(bootstrap) as watcher:
        with pipeline_run(config) as run:
            await eventually(lambda: watcher.count("clip") >= 10, "the first records")
            for seconds in (REQUEST_TIMEOUT_MS / 2000, 10.0):  # within the request timeout, then well past it
                cut_at = time.time()
                restored_at = await cut_for(proxy, seconds)
                recoveries.append(await watcher.seconds_to_recover("clip", cut_at, restored_at))
            code = await run.end(wait_s=120)
    assert code == 0, run.log()
    expected = list(range(0, frame_count(medium_clip), 2))
    records = await read_topic(bootstrap, "frames", expected=len(expected))
    found = delivery_figures([r for r in records if r.source_id == "clip"], expected)
    summary = run.summary("clip")
    figures["kafka link cut (3 s, 10 s): frames lost"] = found.lost
    figures["kafka link cut (3 s, 10 s): duplicates"] = found.duplicates
    figures["kafka link cut (3 s, 10 s): records expected"] = found.expected
    figures["kafka link cut: seconds from restore to records flowing (3 s cut)"] = recoveries[0]
    figures["kafka link cut: seconds from restore to records flowing (10 s cut)"] = recoveries[1]
    assert found.lost == 0
    assert found.in_order
    assert summary["published"] == summary["annotated"] == len(expected)
    assert summary["failed"] == 0
    assert "re-sending from frame" in run.log()  # the long cut did expire batches: the re-send path ran


async def test_broker_restarted_mid_replay_with_idempotence_loses_nothing_and_stores_no_duplicate(
    short_clip: Path, tmp_path: Path, figures: dict[str, object]
) -> None:
    source = {"id": "clip", "uri": str(short_clip), "realtime": True, "every_nth": 2}
    expected = list(range(0, frame_count(short_clip), 2))
    with noida_broker(tmp_path / "noida") as broker:
        config = write_run_config(tmp_path, broker.address, [source], idempotent=True)
        async with TopicWatcher(broker.address) as watcher:
            with pipeline_run(config) as run:
                await eventually(lambda: watcher.count("clip") >= 10, "the first records")
                stopped_at = time.time()
                await asyncio.to_thread(broker.stop)
                await asyncio.sleep(BROKER_OUTAGE_S)  # the outage itself
                await asyncio.to_thread(broker.start)
                recovery = await watcher.seconds_to_recover("clip", stopped_at, time.time())
                code = await run.end(wait_s=120)
        assert code == 0, run.log()
        records = [
            r for r in await read_topic(broker.address, "frames", expected=len(expected)) if r.source_id == "clip"
        ]
    found = delivery_figures(records, expected)
    figures[f"broker restart ({BROKER_OUTAGE_S:g} s down, idempotent): frames lost"] = found.lost
    figures[f"broker restart ({BROKER_OUTAGE_S:g} s down, idempotent): duplicates"] = found.duplicates
    figures["broker restart: seconds from broker back to records flowing"] = recovery
    assert (found.lost, found.duplicates) == (0, 0)
    assert found.in_order
    summary = run.summary("clip")
    assert summary["published"] == summary["annotated"] == len(expected)


async def test_annotate_service_killed_and_restarted_replay_loses_nothing_and_the_camera_goes_on(
    service_factory: Callable[..., ServiceProcess], short_clip: Path, tmp_path: Path, figures: dict[str, object]
) -> None:
    service = service_factory("--classifier", "imagenet")
    expected_clip = list(range(0, frame_count(short_clip), 4))
    sources = [
        {"id": "clip", "uri": str(short_clip), "realtime": True, "every_nth": 4},
        {"id": "cam", "uri": "", "fps": 5},
    ]
    async with kafka_broker() as broker:
        with http_mjpeg_camera(CLIPS / "bikes.mp4") as camera:
            sources[1]["uri"] = camera.url
            annotator = {"kind": "grpc", "targets": [service.address]}
            config = write_run_config(tmp_path, broker.address, sources, annotator=annotator)
            async with TopicWatcher(broker.address) as watcher:
                with pipeline_run(config) as run:
                    await eventually(lambda: min(watcher.count("clip"), watcher.count("cam")) >= 3, "both sources")
                    killed_at = time.time()
                    await asyncio.to_thread(service.process.kill)
                    await asyncio.to_thread(service.process.wait)
                    await asyncio.sleep(SERVICE_OUTAGE_S)  # the outage itself
                    await asyncio.to_thread(service_factory, "--classifier", "imagenet", "--port", str(service.port))
                    back_at = time.time()
                    replay_recovery = await watcher.seconds_to_recover("clip", killed_at, back_at)
                    camera_recovery = await watcher.seconds_to_recover("cam", back_at, back_at)
                    await eventually(lambda: watcher.count("clip") == len(expected_clip), "the whole replay", 90)
                    code = await run.end(signal.SIGTERM)
        assert code == 0, run.log()
        camera_summary = run.summary("cam")
        records = await read_topic(
            broker.address, "frames", expected=len(expected_clip) + int(camera_summary["published"])
        )
    found = delivery_figures([r for r in records if r.source_id == "clip"], expected_clip)
    figures[f"annotate service down {SERVICE_OUTAGE_S:g} s: replay frames lost"] = found.lost
    figures["annotate service down: seconds from service back to replay records flowing"] = replay_recovery
    figures["annotate service down: seconds from service back to fresh camera records"] = camera_recovery
    figures["annotate service down: camera frames dropped, failed"] = (
        camera_summary["dropped"],
        camera_summary["failed"],
    )
    assert (found.lost, found.duplicates) == (0, 0)
    assert found.in_order
    camera_indexes = [r.frame_index for r in records if r.source_id == "cam"]
    assert camera_indexes == sorted(camera_indexes)
    assert int(camera_summary["dropped"]) + int(camera_summary["failed"]) > 0  # the outage is counted, not hidden


async def test_rtsp_camera_killed_and_back_flows_again_within_the_backoff_cap_and_others_never_stall(
    long_clip: Path, tmp_path: Path, figures: dict[str, object]
) -> None:
    port = free_port()
    async with kafka_broker() as broker:
        with rtsp_camera(long_clip, port) as camera:
            sources = [
                {"id": "cam", "uri": camera.url, "fps": 5, "backoff_max_seconds": BACKOFF_CAP_S},
                {"id": "clip", "uri": str(long_clip), "realtime": True, "loop": True, "every_nth": 5},
            ]
            config = write_run_config(tmp_path, broker.address, sources)
            async with TopicWatcher(broker.address) as watcher:
                with pipeline_run(config) as run:
                    await eventually(lambda: min(watcher.count("cam"), watcher.count("clip")) >= 3, "both sources")
                    killed_at = time.time()
                    await asyncio.to_thread(camera.stop)
                    await asyncio.sleep(CAMERA_OUTAGE_S)  # the outage itself
                    with rtsp_camera(long_clip, port):
                        back_at = time.time()
                        await watcher.seconds_to_recover("cam", back_at, back_at)
                    code = await run.end(signal.SIGTERM)
    assert code == 0, run.log()
    first_fresh = min(r.capture_time_ms for r in watcher.records("cam") if r.capture_time_ms / 1000 > back_at)
    recovery = first_fresh / 1000 - back_at
    others = [r.capture_time_ms / 1000 for r in watcher.records("clip") if killed_at - 1 < r.capture_time_ms / 1000]
    longest_gap = max(later - earlier for earlier, later in itertools.pairwise(others))
    figures[f"rtsp camera down {CAMERA_OUTAGE_S:g} s: seconds from camera back to its first frame"] = recovery
    figures["rtsp camera down: longest gap between the other source's frames, s"] = longest_gap
    # Flows again (seconds_to_recover waited for it) within the cap: no wait between reopens was longer than it.
    delays = [
        float(found["delay"]) for found in map(RECONNECTING.search, run.stderr) if found and found["source"] == "cam"
    ]
    assert delays, run.log()
    assert max(delays) <= BACKOFF_CAP_S, delays
    assert any(killed_at < captured < back_at for captured in others)  # the other source went on during the outage …
    assert others[-1] > back_at  # … and after it
    assert int(run.summary("cam")["reconnects"]) >= 1


async def test_a_stalled_camera_is_reopened_and_a_silent_one_holds_up_nobody(
    long_clip: Path, tmp_path: Path, figures: dict[str, object]
) -> None:
    timeouts = {"open_timeout_ms": 2000, "read_timeout_ms": 2000, "stall_seconds": STALL_S, "backoff_max_seconds": 1}
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes each TCP handshake; nothing ever answers
        silent_url = f"rtsp://127.0.0.1:{silent.getsockname()[1]}/cam"
        async with kafka_broker() as broker:
            with rtsp_camera(long_clip) as camera:
                sources = [
                    {"id": "cam", "uri": camera.url, "fps": 5, **timeouts},
                    {"id": "silent", "uri": silent_url, "open_timeout_ms": SILENT_OPEN_TIMEOUT_MS, "stall_seconds": 20},
                    {"id": "clip", "uri": str(long_clip), "realtime": True, "every_nth": 5},
                ]
                config = write_run_config(tmp_path, broker.address, sources)
                async with TopicWatcher(broker.address) as watcher:
                    started = time.time()
                    with pipeline_run(config) as run:
                        await eventually(lambda: watcher.count("clip") >= 1, "the replay's first record")
                        first_replay_record = next(a.at for a in watcher.arrivals if a.record.source_id == "clip")
                        await eventually(lambda: watcher.count("cam") >= 3, "the camera's first records")
                        frozen_at = time.time()
                        camera.process.send_signal(signal.SIGSTOP)  # open, but silent
                        try:
                            await eventually(lambda: "camera cam" in run.log(), "the stall to be noticed", 30)
                        finally:
                            camera.process.send_signal(signal.SIGCONT)
                        thawed_at = time.time()
                        await watcher.seconds_to_recover("cam", thawed_at, thawed_at)
                        code = await run.end(signal.SIGTERM)
    assert code == 0, run.log()
    noticed = next(line for line in run.stderr if "camera cam" in line)
    detection = log_time(noticed) - frozen_at
    figures[f"stalled camera (stall_seconds {STALL_S:g}): seconds until noticed"] = detection
    figures["silent camera: seconds from start to the replay's first record"] = first_replay_record - started
    # The stall was noticed (the wait for it above is the liveness bound; how soon is a figure) and the camera reopened.
    # The replay was not held up by the silent camera's open: its first record was in Kafka while that open still
    # waited (its failure, if the run lasted that long, was logged after).
    silent_gave_up = [log_time(line) for line in run.stderr if "camera silent" in line]
    assert all(first_replay_record < gave_up for gave_up in silent_gave_up), (first_replay_record, silent_gave_up)
    assert watcher.count("silent") == 0
    assert int(run.summary("cam")["reconnects"]) >= 1


def log_time(line: str) -> float:
    """The wall time a `framelabel run` log line was written (its timestamp has ms, local time)."""
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


async def test_sigterm_mid_replay_publishes_what_was_annotated_and_resumes_without_gaps(
    tmp_path: Path, figures: dict[str, object]
) -> None:
    clip = CLIPS / "bigbuckbunny.mp4"
    async with kafka_broker() as broker:
        first = write_run_config(tmp_path, broker.address, [{"id": "bunny", "uri": str(clip), "realtime": True}])
        async with TopicWatcher(broker.address) as watcher:
            with pipeline_run(first) as run:
                await eventually(lambda: watcher.count("bunny") >= 20, "records before the signal")
                code = await run.end(signal.SIGTERM)
        assert code == 0, run.log()
        summary = run.summary("bunny")
        stopped = RESUME_HINT.fullmatch(str(summary["last_published"]))
        assert stopped is not None, summary
        before = await read_topic(broker.address, "frames", expected=int(summary["published"]))
        assert [r.frame_index for r in before] == list(range(int(stopped["index"]) + 1))
        assert summary["annotated"] == summary["published"] == len(before)  # nothing annotated was left behind
        assert summary["failed"] == 0

        resume = {"id": "bunny", "uri": str(clip), "start_ms": float(stopped["ms"])}
        second = write_run_config(tmp_path, broker.address, [resume])
        with pipeline_run(second) as rerun:
            assert await rerun.end() == 0, rerun.log()
        resumed = len(before) + int(rerun.summary("bunny")["published"])
        after = (await read_topic(broker.address, "frames", expected=resumed))[len(before) :]
    positions = [r.media_position_ms for r in before + after]
    figures["sigterm mid-replay: frames published before the signal"] = len(before)
    figures["sigterm mid-replay, resumed at the summary's position: frames missing, repeated"] = (
        len(set(media_positions(clip)) - set(positions)),
        len(positions) - len(set(positions)),
    )
    assert set(positions) == set(media_positions(clip))
    assert len(positions) - len(set(positions)) <= 1  # at most the frame it stopped at, published again


def media_positions(clip: Path) -> list[float]:
    """Every frame's position in ms, as the video source reads it (25 fps: whole ms)."""
    capture = cv2.VideoCapture(str(clip))
    positions = []
    while capture.grab():
        positions.append(round(capture.get(cv2.CAP_PROP_POS_MSEC), 3))
    capture.release()
    return positions
