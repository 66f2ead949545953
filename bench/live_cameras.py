"""Figure 7: live cameras. 4 RTSP cameras at 10 fps each through `framelabel run`: latency, drops, growth.

What it measures, over `duration_s` of a real run on 127.0.0.1:

- capture→consumer latency per record: the wall time a live consumer received
  the record minus its `capture_time_ms` header (same clock, same machine). A
  record reaches a consumer only after Kafka acknowledged it, so this bounds
  capture→ack from above (by the fetch wait, FETCH_WAIT_MS, and a loopback hop):
  p50, p99 and max per camera and overall;
- capture→ack as the run itself measures it on each acknowledgement: p50 and p95
  per camera from the summary table it prints (over the whole run: it prints no
  p99, and cannot leave the warm-up out);
- drops per camera: in the window, from gaps in the published frame indices (every
  frame read is published unless dropped or failed: no sampling is set; with
  sampling, see `follow_run`); over the whole run, the summary's `dropped`
  column; also frames read and published, the published rate, and failures and
  reconnects;
- latency growth: p50 (and p99) of the first third of the window against the last
  third; for cameras read with PyAV, also how much further behind the camera's
  own clock the reader got (`camera_backlog_ms`), which capture times cannot show;
- CPU in cores over the window: the run's own, the set-up's (cameras, broker, the
  consumer), and every other process's (≈ 0 on a quiet machine: more shows a
  window disturbed by other work), from /proc; and the load average.

How: the clip is transcoded once (bench/.cache/) to 1280×720 H.264 at 10 fps
(every frame of bigbuckbunny.mp4 kept and retimed to 10 fps, no B-frames, a
keyframe every 2 s, looped long enough for the run) and served by one
tools/rtsp_camera.py (GStreamer, Debian's python3) per camera. An embedded Tansu
broker gets the topic created up front so that the consumer follows it from the
first record; `.venv/bin/framelabel run` runs the cameras into it with the
in-process `imagenet` classifier and the run's defaults otherwise (frames
downscaled to 640 px before JPEG encoding, top 5 labels, idempotence off for
Tansu). The window opens `warmup_s` after the first record — the first frames
wait for the model's first runs, Kafka's first batch, and the burst a camera
sends as it is opened; the warm-up's records are reported apart — and closes with
SIGINT; the consumer reads on until the topic is quiet. Every process started
here is stopped on the way out. Call it from synchronous code (it runs its own
event loop). bench.sampled follows its runs of sampled cameras with `follow_run`.

    .venv/bin/python -m bench.live_cameras --duration 60   # prints the figure as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.peer_roboflow import CACHE, cached_clip, count_frames, source_clip
from pipeline.broker import EmbeddedBroker
from pipeline.processes import stop_process
from pipeline.records import decode_record

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

FRAMELABEL = ROOT / ".venv" / "bin" / "framelabel"
RTSP_CAMERA = ROOT / "tools" / "rtsp_camera.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # has the GObject bindings the RTSP server needs
TOPIC = "bench.live"
PARTITIONS = 3
CAMERA_SIZE = (1280, 720)
GOP_S = 2
WARMUP_S = 5.0  # after the first record: the first frames wait for the model's first runs and Kafka's first batch
START_MARGIN_S = 40.0  # clip length beyond the window: model load, connection, and the stop
FIRST_RECORD_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
FETCH_WAIT_MS = 10  # how long a fetch waits for data: the consumer-side bound is this much looser
IDLE_TIMEOUT_S = 3.0  # the consumer has caught up once no record came for this long after the run stopped
CAMERA_START_TIMEOUT_S = 20.0
CAMERA_STOP_TIMEOUT_S = 10.0
OUTPUT_TAIL_CHARS = 800
TABLE_BAR = "│"  # rich's box-drawing column separators: body rows, and the header row
HEADER_BAR = "┃"


class LiveError(Exception):
    """The live run could not be set up or did not run; the message says what broke."""


def camera_clip(seconds: float, fps: int) -> Path:
    """The camera's clip: bigbuckbunny.mp4 retimed to `fps`, 1280×720 H.264, looped to last `seconds`; cached."""
    source = source_clip()
    frames = count_frames(source)
    loops = math.ceil(seconds * fps / frames)
    width, height = CAMERA_SIZE
    args = ["-stream_loop", str(loops - 1), "-i", str(source), "-an"]
    args += ["-vf", f"setpts=N/({fps}*TB),scale={width}:{height}", "-r", str(fps)]
    args += ["-c:v", "libx264", "-preset", "veryfast", "-profile:v", "main", "-bf", "0"]
    args += ["-g", str(GOP_S * fps), "-pix_fmt", "yuv420p", "-movflags", "+faststart"]
    return cached_clip(CACHE / f"camera_{height}p_{fps}fps_x{loops}.mp4", args)


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-OUTPUT_TAIL_CHARS:]


class Camera(NamedTuple):
    url: str
    pid: int


@contextlib.contextmanager
def rtsp_camera(clip: Path) -> Iterator[Camera]:
    """tools/rtsp_camera.py serving `clip` on a free 127.0.0.1 port; yields its URL and pid, stops it on exit."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [SYSTEM_PYTHON, str(RTSP_CAMERA), str(clip), "--port", "0", "--once"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], CAMERA_START_TIMEOUT_S)
            line = process.stdout.readline() if ready else ""
            if not line.startswith("ready "):
                raise LiveError(f"an RTSP camera did not start: {_tail(log)}")
            yield Camera(line.removeprefix("ready ").strip(), process.pid)
        finally:
            stop_process(process, CAMERA_STOP_TIMEOUT_S)
            if process.stdout is not None:
                process.stdout.close()


def run_config(urls: list[str], bootstrap: str, source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`framelabel run`'s config: the cameras (each with `source`'s settings), in-process imagenet, the
    embedded broker without idempotence."""
    return {
        "sources": [{"id": f"cam{i}", "uri": url, **(source or {})} for i, url in enumerate(urls, start=1)],
        "annotator": {"kind": "in-process", "classifier": "imagenet"},
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topic": TOPIC,
            "partitions": PARTITIONS,
            "enable_idempotence": False,
        },
    }


async def create_topic(bootstrap: str) -> None:
    """Created before the run, so that the consumer can follow it from the first record."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
    finally:
        await admin.close()


def parse_summary(text: str) -> dict[str, dict[str, str]]:
    """The rows of the run's summary table (rich box drawing), by source id, cells by column name."""
    header: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if line.count(HEADER_BAR) > 2 and not header:
            header = [cell.strip() for cell in line.split(HEADER_BAR)[1:-1]]
        elif header and line.count(TABLE_BAR) == len(header) + 1:
            cells = [cell.strip() for cell in line.split(TABLE_BAR)[1:-1]]
            if cells[0]:  # not the continuation of a wrapped row
                rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def _number(cell: str | None) -> float | None:
    try:
        return None if cell in (None, "-") else float(str(cell))
    except ValueError:
        return None


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_snapshot(run_pid: int, setup_pids: list[int]) -> tuple[float, float, float]:
    """CPU seconds so far: the run's, the set-up's (cameras, broker, this process), every process's."""
    setup = sum(_cpu_seconds(pid) or 0.0 for pid in setup_pids)
    return _cpu_seconds(run_pid) or 0.0, setup, _machine_busy_seconds()


def _machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has spent busy (not idle, not waiting for I/O), from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], percent: float) -> float | None:
    return round(float(np.percentile(values, percent)), 1) if values else None


@dataclass(frozen=True, slots=True)
class Arrival:
    source_id: str
    frame_index: int
    capture_ms: int  # the record's capture_time_ms header
    arrival_ms: float  # wall clock when the consumer got it
    media_position_ms: float | None  # on the camera's own clock (PyAV cameras), else None

    @property
    def latency_ms(self) -> float:
        return self.arrival_ms - self.capture_ms


async def _follow(bootstrap: str, arrivals: list[Arrival]) -> None:
    """Append an Arrival for every record of the topic, until cancelled.

    Its own consumer rather than pipeline.consumer.consume, for one setting: fetches
    that wait at most FETCH_WAIT_MS for data. With aiokafka's default (500 ms) a
    record reached the consumer ~150 ms after its ack, which would swamp the bound.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, fetch_max_wait_ms=FETCH_WAIT_MS)
    await consumer.start()
    try:
        partitions = [TopicPartition(TOPIC, partition) for partition in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        while True:
            fetched = await consumer.getmany(timeout_ms=FETCH_WAIT_MS)
            arrived = time.time() * 1000.0
            for messages in fetched.values():
                for message in messages:
                    record = decode_record(message.key, message.value, message.headers, message.timestamp)
                    arrivals.append(
                        Arrival(
                            record.source_id,
                            record.frame_index,
                            record.capture_time_ms,
                            arrived,
                            record.media_position_ms,
                        )
                    )
    finally:
        await consumer.stop()


async def _until_quiet(arrivals: list[Arrival], follower: asyncio.Task[None]) -> None:
    """Wait until no record has arrived for IDLE_TIMEOUT_S, then stop the follower."""
    seen = -1
    while len(arrivals) != seen and not follower.done():
        seen = len(arrivals)
        await asyncio.sleep(IDLE_TIMEOUT_S)
    follower.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await follower


@dataclass
class Window:
    """What was seen of the run between the end of the warm-up and SIGINT."""

    start_ms: float
    end_ms: float
    cpu_s: tuple[float, float, float]  # the run's, the set-up's, the machine's, over the window
    load_average: float  # the machine's 1-minute load average as the window closed

    @property
    def seconds(self) -> float:
        return (self.end_ms - self.start_ms) / 1000.0


async def follow_run(
    config: dict[str, Any],
    duration_s: float,
    setup_pids: list[int],
    workdir: Path,
    warmup_s: float = WARMUP_S,
    frames_per_sample: int = 1,
) -> dict[str, Any]:
    """`framelabel run` of `config` (a run_config) followed by a consumer record by record; its figures.

    `frames_per_sample` is the cameras' frames per sample kept (1 unsampled, 25 for 25 fps sampled at 1 fps):
    a gap of more than that between a camera's published frame indices is a sample lost.
    """
    bootstrap = config["kafka"]["bootstrap_servers"]
    await create_topic(bootstrap)
    path = workdir / "live.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    arrivals: list[Arrival] = []
    follower = asyncio.create_task(_follow(bootstrap, arrivals))
    with (workdir / "run.out").open("w+b") as out, (workdir / "run.err").open("w+b") as err:
        process = await asyncio.create_subprocess_exec(
            str(FRAMELABEL), "run", str(path), stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=ROOT
        )
        try:
            deadline = time.monotonic() + FIRST_RECORD_TIMEOUT_S
            while not arrivals:
                if process.returncode is not None:
                    raise LiveError(f"the run exited with {process.returncode} before any record: {_tail(err)}")
                if follower.done():
                    raise LiveError(f"the consumer stopped before any record: {follower.exception()!r}")
                if time.monotonic() > deadline:
                    raise LiveError(f"no record within {FIRST_RECORD_TIMEOUT_S:.0f} s of the start: {_tail(err)}")
                await asyncio.sleep(0.05)
            await asyncio.sleep(warmup_s)
            start_ms, cpu_start = time.time() * 1000.0, _cpu_snapshot(process.pid, setup_pids)
            await asyncio.sleep(duration_s)
            cpu_end = _cpu_snapshot(process.pid, setup_pids)
            used = tuple(end - start for start, end in zip(cpu_start, cpu_end, strict=True))
            window = Window(start_ms, time.time() * 1000.0, (used[0], used[1], used[2]), os.getloadavg()[0])
            process.send_signal(signal.SIGINT)
            exit_code = await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            await _until_quiet(arrivals, follower)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            if not follower.done():
                follower.cancel()
        out.seek(0)
        summary = parse_summary(out.read().decode(errors="replace"))
        if not summary:
            raise LiveError(f"the run printed no summary (exit {exit_code}): {_tail(err)}")
    return _figures(duration_s, warmup_s, window, arrivals, summary, exit_code, frames_per_sample)


def _drops(records: list[Arrival], frames_per_sample: int) -> int:
    """Frames (samples) never published between a camera's published ones: gaps in its frame_index.

    A gap of `frames_per_sample` is one sample to the next; each further `frames_per_sample` is a sample lost
    (rounded, since a sampler on the capture clock keeps the frame at or after each sample time, and a camera
    sending slowly for a while makes shorter gaps, none of which is a sample lost).
    """
    indices = sorted(record.frame_index for record in records)
    gaps = (round((later - earlier) / frames_per_sample) for earlier, later in itertools.pairwise(indices))
    return sum(max(gap - 1, 0) for gap in gaps)


def _backlog_growth_ms(first: list[Arrival], last: list[Arrival]) -> float | None:
    """How much later, against the camera's own clock, its frames were read in `last` than in `first`.

    Capture times are stamped as the reader gets a frame, so a reader falling behind its camera (the stream
    queueing in the socket) does not show in capture→consumer latency; capture time − media position does.
    The median of each, per camera; the worst camera's growth. None without media positions.
    """

    def offsets(part: list[Arrival], source: str) -> list[float]:
        mine = [record for record in part if record.source_id == source]
        return [r.capture_ms - r.media_position_ms for r in mine if r.media_position_ms is not None]

    growth: list[float] = []
    for source in {record.source_id for record in first}:
        early, late = offsets(first, source), offsets(last, source)
        if early and late:
            growth.append(float(np.median(late) - np.median(early)))
    return round(max(growth), 1) if growth else None


def _latency(records: list[Arrival]) -> dict[str, float | None]:
    latencies = [record.latency_ms for record in records]
    return {
        "p50_ms": _percentile(latencies, 50),
        "p99_ms": _percentile(latencies, 99),
        "max_ms": round(max(latencies), 1) if latencies else None,
    }


def _figures(
    duration_s: float,
    warmup_s: float,
    window: Window,
    arrivals: list[Arrival],
    summary: dict[str, dict[str, str]],
    exit_code: int,
    frames_per_sample: int,
) -> dict[str, Any]:
    run_cpu, setup_cpu, machine_cpu = window.cpu_s
    measured = [record for record in arrivals if window.start_ms <= record.capture_ms <= window.end_ms]
    warmup = [record for record in arrivals if record.capture_ms < window.start_ms]
    third = (window.end_ms - window.start_ms) / 3
    first_third = [record for record in measured if record.capture_ms < window.start_ms + third]
    last_third = [record for record in measured if record.capture_ms >= window.end_ms - third]
    first, last = _latency(first_third), _latency(last_third)
    per_camera: dict[str, dict[str, Any]] = {}
    for source, row in sorted(summary.items()):
        mine = [record for record in measured if record.source_id == source]
        per_camera[source] = {
            "published_fps": round(len(mine) / window.seconds, 2),
            "published_in_window": len(mine),
            **_latency(mine),
            "dropped_in_window": _drops(mine, frames_per_sample),
            "run_read": int(_number(row.get("read")) or 0),
            "run_published": int(_number(row.get("published")) or 0),
            "run_dropped": int(_number(row.get("dropped")) or 0),
            "run_failed": int(_number(row.get("failed")) or 0),
            "run_reconnects": int(_number(row.get("reconnects")) or 0),
            "run_ack_p50_ms": _number(row.get("p50_ms")),
            "run_ack_p95_ms": _number(row.get("p95_ms")),
            "consumed": sum(1 for record in arrivals if record.source_id == source),
        }
    return {
        "cameras": len(summary),
        "camera_clip": f"{CAMERA_SIZE[0]}x{CAMERA_SIZE[1]} H.264, bigbuckbunny.mp4 retimed, RTSP over TCP",
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "window_s": round(window.seconds, 2),
        "fps": round(len(measured) / window.seconds, 2),
        **_latency(measured),
        "latency_measured_as": "consumer arrival − capture_time_ms: an upper bound on capture→ack",
        "dropped_in_window": {source: camera["dropped_in_window"] for source, camera in per_camera.items()},
        "run_dropped": {source: camera["run_dropped"] for source, camera in per_camera.items()},
        "run_published": {source: camera["run_published"] for source, camera in per_camera.items()},
        "growth": {
            "p50_first_third_ms": first["p50_ms"],
            "p50_last_third_ms": last["p50_ms"],
            "p50_ratio": round(last["p50_ms"] / first["p50_ms"], 2) if first["p50_ms"] and last["p50_ms"] else None,
            "p99_first_third_ms": first["p99_ms"],
            "p99_last_third_ms": last["p99_ms"],
            "camera_backlog_ms": _backlog_growth_ms(first_third, last_third),
        },
        "warmup": {"records": len(warmup), **_latency(warmup)},
        "run_cpu_cores": round(run_cpu / window.seconds, 2),
        "setup_cpu_cores": round(setup_cpu / window.seconds, 2),
        "other_cpu_cores": round((machine_cpu - run_cpu - setup_cpu) / window.seconds, 2),
        "load_average": round(window.load_average, 2),
        "run_exit_code": exit_code,
        "per_camera": per_camera,
        "why": None,
    }


def measure_live(
    duration_s: float = 60.0, cameras: int = 4, fps: int = 10, warmup_s: float = WARMUP_S
) -> dict[str, Any]:
    """Figure 7: `cameras` RTSP cameras at `fps` each through `framelabel run`, measured for `duration_s`.

    The window opens `warmup_s` after the first record (0 measures from the first
    record on). Returns the figures described in the module docstring; on any
    failure fps and the latencies are None and `why` says what broke.
    """
    try:
        clip = camera_clip(warmup_s + duration_s + START_MARGIN_S, fps)
        with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="framelabel-live-") as workdir:
            started = [stack.enter_context(rtsp_camera(clip)) for _ in range(cameras)]
            broker = stack.enter_context(EmbeddedBroker())
            setup_pids = [camera.pid for camera in started] + [broker.pid or 0, os.getpid()]
            config = run_config([camera.url for camera in started], broker.address)
            result = asyncio.run(follow_run(config, duration_s, setup_pids, Path(workdir), warmup_s))
    except Exception as exc:  # a figure, not a test: say what broke and let the other figures run
        return {"fps": None, "p50_ms": None, "p99_ms": None, "why": f"{type(exc).__name__}: {exc}"}
    result["camera_fps"] = fps
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Figure 7: live RTSP cameras through framelabel run.")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds measured, after the warm-up")
    parser.add_argument("--warmup", type=float, default=WARMUP_S, help="seconds after the first record not measured")
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--fps", type=int, default=10, help="each camera's frame rate")
    args = parser.parse_args()
    print(json.dumps(measure_live(args.duration, args.cameras, args.fps, args.warmup)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
