"""Figures 3, 4 and 5: file replay through `framelabel run`, the naive loop, and replay through gRPC.

A replay is the real CLI in a child process (`framelabel run CONFIG`) against a
broker started apart (so its CPU is not counted as the pipeline's). Frames/s
is published frames over the run's own processing time (first capture to last
acknowledgement, printed in its summary title), start-up included; the steady
rate leaves the first STEADY_SKIP of the frames out and is measured on the
records' capture times read back from the topic (a replay's reader is held to
the pipeline's pace by backpressure, so frames are captured as fast as they are
published); CPU utilisation is the child's
CPU time over its wall time and the machine's cores; peak RSS is sampled.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime
import psutil
import yaml
from aiokafka import AIOKafkaProducer

from bench.peer_roboflow import MODEL
from pipeline.broker import EmbeddedBroker
from pipeline.consumer import consume
from pipeline.kafka import KafkaConnection
from services.classifier import load_classifier
from services.model_families import FAMILIES

FRAMELABEL = str(Path(sys.executable).with_name("framelabel"))
SUMMARY = re.compile(r"framelabel run: (\d+) frames in ([\d.]+)s")
RSS_POLL_S = 0.05
STEADY_SKIP = 0.2  # of the frames: model warm-up, the first Kafka batches, the read-ahead filling
READ_BACK_IDLE_S = 3.0


@dataclass(frozen=True)
class ReplayResult:
    frames: int
    fps: float
    cpu_utilisation: float  # of all cores, over the child's wall time
    peak_rss_mb: float
    cpu_seconds: float  # the child's, over its whole life
    steady_fps: float | None  # without the first STEADY_SKIP of the frames; None when too few were read back

    def as_json(self) -> dict[str, float | None]:
        return {
            "frames": self.frames,
            "fps": round(self.fps, 2),
            "steady_fps": None if self.steady_fps is None else round(self.steady_fps, 2),
            "cpu_utilisation": round(self.cpu_utilisation, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }


def run_replay(broker: EmbeddedBroker, clip: Path, cores: int, *extra_args: str, **source: Any) -> ReplayResult:
    """One `framelabel run` of `clip` into a fresh topic; `source` adds keys to the source's config."""
    topic = f"bench.replay.{time.monotonic_ns()}"
    config = {
        "sources": [{"id": "clip", "uri": str(clip), **source}],
        "kafka": {"bootstrap_servers": broker.address, "enable_idempotence": False, "topic": topic},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(config, file)
        file.flush()
        child = psutil.Popen(
            [FRAMELABEL, "run", file.name, *extra_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        started, peak_rss = time.monotonic(), 0
        cpu_seconds = 0.0
        while child.poll() is None:
            try:
                peak_rss = max(peak_rss, child.memory_info().rss)
                times = child.cpu_times()
                cpu_seconds = times.user + times.system
            except psutil.NoSuchProcess:
                break
            time.sleep(RSS_POLL_S)
        wall = time.monotonic() - started
        stdout, stderr = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"framelabel run failed ({child.returncode}): {stderr.decode()[-800:]}")
    match = SUMMARY.search(stdout.decode())
    if match is None:
        raise RuntimeError(f"no summary in the output: {stdout.decode()[-400:]}")
    frames, seconds = int(match.group(1)), float(match.group(2))
    steady = asyncio.run(steady_rate(broker, topic, frames))
    return ReplayResult(frames, frames / seconds, cpu_seconds / wall / cores, peak_rss / 2**20, cpu_seconds, steady)


async def steady_rate(broker: EmbeddedBroker, topic: str, frames: int) -> float | None:
    """Frames per second after the first STEADY_SKIP of them, from the capture times of the records published."""
    connection = KafkaConnection(bootstrap_servers=broker.address, topic=topic)
    captured = sorted(
        [
            record.capture_time_ms
            async for record in consume(
                connection, from_beginning=True, max_records=frames, idle_timeout_s=READ_BACK_IDLE_S
            )
        ]
    )
    first = int(len(captured) * STEADY_SKIP)
    if len(captured) < frames or len(captured) - first < 2 or captured[-1] == captured[first]:
        return None
    return (len(captured) - 1 - first) * 1000 / (captured[-1] - captured[first])


async def naive_loop(broker: EmbeddedBroker, clip: Path, max_frames: int) -> float:
    """The loop a user would write first; returns frames/s.

    for each frame: cv2 read → cv2.imencode → cv2.imdecode → preprocess →
    session.run (default options) → JSON → await producer.send_and_wait.
    """
    labels = load_classifier("imagenet").labels
    session = onnxruntime.InferenceSession(str(MODEL))
    preprocess = FAMILIES["efficientnet"].preprocess
    producer = AIOKafkaProducer(bootstrap_servers=broker.address, enable_idempotence=False)
    await producer.start()
    capture = cv2.VideoCapture(str(clip))
    frames = 0
    started = time.perf_counter()
    try:
        while frames < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            _, jpeg = cv2.imencode(".jpg", frame)
            decoded = cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            (logits,) = session.run(None, {"input": preprocess(decoded)[np.newaxis]})
            probabilities = np.exp(logits[0] - logits[0].max())
            probabilities /= probabilities.sum()
            best = np.argsort(-probabilities)[:5]
            value = json.dumps([{"label": labels[i].name, "confidence": float(probabilities[i])} for i in best])
            await producer.send_and_wait("bench.naive", value.encode(), key=b"clip")
            frames += 1
    finally:
        capture.release()
        await producer.stop()
    return frames / (time.perf_counter() - started)


def run_naive(broker: EmbeddedBroker, clip: Path, max_frames: int) -> float:
    return asyncio.run(naive_loop(broker, clip, max_frames))
