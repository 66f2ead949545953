"""A soak of the whole pipeline: a looping clip and a live camera for minutes on end; memory and latency over time.

    python tools/soak.py [--minutes 10] [--sample-seconds 30]

Runs `framelabel run` (in-process imagenet) against a real broker (Tansu) with two
sources: bigbuckbunny.mp4 replayed in real time in a loop, and an HTTP MJPEG camera
(ffmpeg), both sampled at 5 fps. Every sample period it prints the run's RSS and the
capture→Kafka latency of the records that arrived in that period (read back by a
consumer); at the end, the first and last periods side by side. Exit code 1 if the
run failed, lost records or grew by more than RSS_GROWTH_LIMIT_MB after its first period.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from pipeline.broker import EmbeddedBroker
from tests.cameras import CLIPS, http_mjpeg_camera
from tests.faults import TopicWatcher, pipeline_run, write_run_config
from tests.helpers import rss_mb

RSS_GROWTH_LIMIT_MB = 50.0


async def soak(minutes: float, sample_s: float) -> int:
    rows: list[tuple[float, float, int, float, float]] = []  # minute, RSS MB, records, p50 ms, p95 ms
    with tempfile.TemporaryDirectory() as folder:
        async with EmbeddedBroker() as broker:
            with http_mjpeg_camera(CLIPS / "bikes.mp4") as camera:
                sources = [
                    {"id": "clip", "uri": str(CLIPS / "bigbuckbunny.mp4"), "realtime": True, "loop": True, "fps": 5},
                    {"id": "cam", "uri": camera.url, "fps": 5},
                ]
                config = write_run_config(Path(folder), broker.address, sources)
                async with TopicWatcher(broker.address) as watcher:
                    with pipeline_run(config) as run:
                        started = time.time()
                        print("minute  RSS_MB  records  p50_ms  p95_ms", flush=True)
                        while time.time() - started < minutes * 60:
                            window_start = time.time()
                            await asyncio.sleep(sample_s)  # the sampling period
                            latencies = [
                                (arrival.at * 1000 - arrival.record.capture_time_ms)
                                for arrival in watcher.arrivals
                                if arrival.at >= window_start
                            ]
                            p50, p95 = np.percentile(latencies, [50, 95]) if latencies else (np.nan, np.nan)
                            row = ((time.time() - started) / 60, rss_mb(run.process.pid), len(latencies), p50, p95)
                            rows.append(row)
                            print("{:6.1f}  {:6.1f}  {:7d}  {:6.0f}  {:6.0f}".format(*row), flush=True)
                        code = await run.end(signal.SIGTERM)
    print("".join(run.stdout))
    first, last = rows[0], rows[-1]
    growth = last[1] - first[1]
    print(f"RSS {first[1]:.1f} MB after the first period, {last[1]:.1f} MB at the end ({growth:+.1f} MB)")
    print(f"latency p50/p95 ms: first period {first[3]:.0f}/{first[4]:.0f}, last {last[3]:.0f}/{last[4]:.0f}")
    failed = any(int(run.summary(source)["failed"]) for source in ("clip", "cam"))
    return 1 if code != 0 or failed or growth > RSS_GROWTH_LIMIT_MB else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample-seconds", type=float, default=30.0)
    args = parser.parse_args()
    return asyncio.run(soak(args.minutes, args.sample_seconds))


if __name__ == "__main__":
    sys.exit(main())
