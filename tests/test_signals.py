"""Stopping `framelabel run` and `framelabel serve` with signals, as an operator or a closed SSH session does.

The first SIGINT/SIGTERM/SIGHUP stops capturing and lets what is in flight finish (while still
connecting, it stops at once); a second gives up on what is unsettled, within 5 s, with exit status 1.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.cameras import CLIPS, free_port
from tests.faults import TopicWatcher, eventually, pipeline_run, write_run_config
from tests.helpers import FRAMELABEL, ServiceProcess
from tests.kafka import kafka_broker, paused

BUNNY = CLIPS / "bigbuckbunny.mp4"
GIVE_UP_WITHIN_S = 5.0
# the deadline for a process to exit after a signal it must act on at once: generous, for a loaded machine
PROMPT_EXIT_S = 20.0


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers: a service or broker that hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def children(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_while_connecting_stops_at_once_embedded_broker_included(
    tmp_path: Path, silent_port: int, sig: signal.Signals
) -> None:
    sources = [{"id": "bunny", "uri": str(BUNNY)}]
    annotator = {"kind": "grpc", "targets": [f"127.0.0.1:{silent_port}"], "connect_timeout_seconds": 120}
    config = write_run_config(tmp_path, "embedded", sources, annotator=annotator)
    with pipeline_run(config) as run:
        await eventually(lambda: "connecting to the Annotate service" in run.log(), "the connect to start")
        brokers = [child for child in children(run.process.pid) if "tansu" in child.name()]
        assert len(brokers) == 1  # the embedded broker is up while the run connects
        code = await run.end(sig, wait_s=PROMPT_EXIT_S)
    assert code == 0, run.log()
    assert not brokers[0].is_running()
    assert "Traceback" not in run.log()
    assert "source" not in "".join(run.stdout)  # no summary of a run that never began


async def test_sigterm_while_kafka_does_not_answer_stops_at_once(tmp_path: Path, silent_port: int) -> None:
    config = write_run_config(
        tmp_path,
        f"127.0.0.1:{silent_port}",
        [{"id": "bunny", "uri": str(BUNNY)}],
        kafka={"connect_timeout_ms": 120_000},
    )
    with pipeline_run(config) as run:
        await eventually(lambda: "connecting to Kafka at" in run.log(), "the connect to start")
        code = await run.end(signal.SIGTERM, wait_s=PROMPT_EXIT_S)
    assert code == 0, run.log()
    assert "Traceback" not in run.log()


async def test_a_second_signal_gives_up_on_unacknowledged_records_naming_them(tmp_path: Path) -> None:
    source = {"id": "bunny", "uri": str(BUNNY), "realtime": True, "loop": True}
    async with kafka_broker() as broker:
        config = write_run_config(tmp_path, broker.address, [source], kafka={"request_timeout_ms": 2000})
        with pipeline_run(config) as run:
            await eventually(lambda: "running bunny" in run.log(), "the run to start")
            with paused(broker):  # the broker stops answering: records stay unacknowledged
                await asyncio.sleep(1.0)  # a second of frames captured while the broker is frozen
                run.process.send_signal(signal.SIGTERM)
                await eventually(lambda: "SIGTERM again gives up" in run.log(), "the first signal's answer")
                assert run.process.poll() is None  # still finishing, not lost
                # a liveness bound: the product's own deadline for giving up, plus the generous allowance to exit
                code = await run.end(signal.SIGTERM, wait_s=GIVE_UP_WITHIN_S + PROMPT_EXIT_S)
    assert code == 1, run.log()
    assert "SIGTERM again: giving up on what is unsettled" in run.log()
    lost_lines = [line for line in run.stderr if "records of bunny lost (frames" in line]
    assert len(lost_lines) == 1, run.log()  # one line with the range, not one per record
    assert "given up" in lost_lines[0]
    assert int(run.summary("bunny")["lost"]) > 0


async def test_sighup_ends_a_run_like_sigterm_with_a_summary_and_a_resume_point(tmp_path: Path) -> None:
    source = {"id": "bunny", "uri": str(BUNNY), "realtime": True, "loop": True}
    async with kafka_broker() as broker:
        config = write_run_config(tmp_path, broker.address, [source])
        async with TopicWatcher(broker.address) as watcher:
            with pipeline_run(config) as run:
                await eventually(lambda: watcher.count("bunny") >= 3, "records to flow")
                code = await run.end(signal.SIGHUP)
    assert code == 0, run.log()
    assert "SIGHUP: stopping capture" in run.log()
    assert str(run.summary("bunny")["last_published"]).startswith("frame ")


def test_serve_on_a_port_in_use_is_one_clear_error(imagenet_service: ServiceProcess) -> None:
    result = subprocess.run(
        [FRAMELABEL, "serve", "--classifier", "moderation", "--port", str(imagenet_service.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"framelabel: error: cannot listen on 127.0.0.1:{imagenet_service.port}: Address already in use"
    )
    assert "add_port" not in result.stderr  # no raw gRPC log line before it


async def test_a_camera_that_refuses_is_reported_in_framelabels_words_only(tmp_path: Path) -> None:
    sources = [{"id": "gate", "uri": f"rtsp://127.0.0.1:{free_port()}/cam", "backoff_max_seconds": 0.5}]
    with pipeline_run(write_run_config(tmp_path, "embedded", sources)) as run:
        await eventually(lambda: run.log().count("reconnecting in") >= 2, "two reconnect attempts")
        assert await run.end(signal.SIGTERM) == 0, run.log()
    assert "camera gate (rtsp://127.0.0.1:" in run.log()
    assert "tcp @" not in run.log()  # FFmpeg's own line for each attempt ("[tcp @ 0x…] Connection to … failed")
