"""Scale-out figures: workers of a group (`framelabel run --group`) sharing replays through Kafka.

Real workers, one process each, with in-process imagenet on one onnxruntime thread; SOURCES replays
(not realtime) of a real clip at 320×180 (bikes.mp4 twice over, 500 frames), each source in its own
partition of the sources topic; a fresh broker for every run.

- `throughput`: the replays on 1 worker, then on 2 (Tansu). Frames/s published by the group over the
  window in which every source runs where the group put it: from the heartbeat showing the sources
  spread evenly over the workers to the last record of the first source to end, counted on the records'
  capture times (a replay's reader is held to the pipeline's pace, so a frame is captured about when it
  is published). Bounded by this machine's cores: one worker already keeps more than one core busy
  (decoding, JPEG, Kafka beside the inference thread); a second host would add its own.
- `transactions`: the same replays on one worker on noida-db (the broker here with transactions; it
  cannot hold a group of two members), `delivery: exactly-once` (each batch's records and progress in one
  transaction) against `at-least-once`.
- `failover`: 2 workers on Tansu with the default session timeout, every 5th frame annotated; one is
  SIGKILLed mid-replay. Seconds from the kill to the first record of each of its sources captured by the
  other worker (capture times and the `worker` header; the slowest source), and the frames published
  twice (at least once: what was published after the last recorded progress goes again).

    .venv/bin/python -m bench.cluster [--pairs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.peer_roboflow import CACHE, cached_clip
from bench.timing import paired, summarise
from pipeline.broker import EmbeddedBroker
from pipeline.cluster.catalog import ensure_compacted_topic, put_sources
from pipeline.cluster.settings import SOURCES_PARTITIONS, SOURCES_TOPIC
from pipeline.config import SourceConfig
from tests.cluster import (
    CLIP_FPS,
    Cluster,
    by_source,
    ids_in_distinct_partitions,
    looped_clip_args,
    seconds_to_move,
    worker_config,
    workers,
)
from tests.faults import PipelineRun, delivery_figures, noida_broker
from tests.kafka import read_topic

SOURCES = 4
CLIP_SECONDS = 20
CLIP_FRAMES = CLIP_SECONDS * CLIP_FPS
FAILOVER_EVERY_NTH = 5  # the failover run annotates every 5th frame: the survivor finishes the replays sooner
KILL_AFTER = 20  # records published by every source before the kill: mid-replay
SETTLE_S = 90.0  # workers started → the sources spread (model loads, a group join, maybe a rebalance)
REPLAY_S = 240.0  # the longest a run of the replays may take
MIN_WINDOW_S = 3.0  # a shorter measuring window says nothing


def clip() -> Path:
    return cached_clip(CACHE / "bikes_320x180_500.mp4", looped_clip_args(CLIP_SECONDS))


async def add_sources(address: str, sources: list[SourceConfig]) -> None:
    cluster = Cluster(address)
    await ensure_compacted_topic(cluster.connection, SOURCES_TOPIC, SOURCES_PARTITIONS)
    await put_sources(cluster.connection, SOURCES_TOPIC, sources)


def stop_all(runs: list[PipelineRun]) -> None:
    for run in runs:
        if run.process.poll() is None and run.finish(signal.SIGTERM) != 0:
            raise RuntimeError(f"a worker did not stop cleanly: {run.log()[-600:]}")


async def group_rate(address: str, folder: Path, count: int, **group: object) -> dict[str, float]:
    """SOURCES replays on `count` workers: frames/s published while every source runs where the group put it."""
    ids = ids_in_distinct_partitions(SOURCES, "replay-")
    await add_sources(address, [SourceConfig(id=source_id, uri=str(clip())) for source_id in ids])
    cluster = Cluster(address)
    with workers(worker_config(folder, address, **group), count) as runs:
        await cluster.until(lambda c: c.spread(count, SOURCES), f"{SOURCES} sources on {count} workers", SETTLE_S)
        started_ms = round(time.time() * 1000)
        await cluster.until(lambda c: bool(c.ended()), "a replay's end", REPLAY_S)
        stop_all(runs)
    records = by_source(await read_topic(address, "frames"))
    if missing := set(ids) - set(records):
        raise RuntimeError(f"no records of {sorted(missing)} in the topic")
    ended_ms = min(max(r.capture_time_ms for r in records[source_id]) for source_id in ids)
    window_s = (ended_ms - started_ms) / 1000
    if window_s < MIN_WINDOW_S:
        raise RuntimeError(f"the sources ran side by side for {window_s:.1f} s only: use a longer clip")
    frames = sum(1 for rs in records.values() for r in rs if started_ms <= r.capture_time_ms <= ended_ms)
    return {"fps": frames / window_s, "frames": frames, "window_s": window_s}


def on_tansu(count: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="framelabel-cluster-") as folder, EmbeddedBroker() as broker:
        return asyncio.run(group_rate(broker.address, Path(folder), count))


def on_noida(delivery: str) -> dict[str, float]:
    with (
        tempfile.TemporaryDirectory(prefix="framelabel-cluster-") as folder,
        noida_broker(Path(folder) / "noida") as broker,
    ):
        return asyncio.run(group_rate(broker.address, Path(folder), 1, delivery=delivery))


async def failover(address: str, folder: Path) -> dict[str, Any]:
    """2 workers, one SIGKILLed mid-replay: how long its sources took to move, and what was published twice."""
    ids = ids_in_distinct_partitions(SOURCES, "replay-")
    sources = [SourceConfig(id=source_id, uri=str(clip()), every_nth=FAILOVER_EVERY_NTH) for source_id in ids]
    await add_sources(address, sources)
    cluster = Cluster(address)

    def under_way(c: Cluster) -> bool:
        return c.spread(2, SOURCES) and all(s.published >= KILL_AFTER for w in c.workers for s in w.sources)

    with workers(worker_config(folder, address), 2) as runs:
        await cluster.until(under_way, f"{SOURCES} sources under way on 2 workers", SETTLE_S)
        victim = runs[0]
        pid = victim.process.pid
        dead_worker = next(w.worker for w in cluster.workers if w.pid == pid)
        moved = sorted(source for source, worker in cluster.running().items() if worker == pid)
        killed_at_ms = round(time.time() * 1000)
        victim.process.kill()
        victim.finish()
        await cluster.until(lambda c: set(ids) <= c.ended(), "every replay's end on the surviving worker", REPLAY_S)
        stop_all(runs[1:])
    records = by_source(await read_topic(address, "frames"))
    expected = list(range(0, CLIP_FRAMES, FAILOVER_EVERY_NTH))
    delivered = {source: delivery_figures(records[source], expected) for source in moved}
    lost = sum(figures.lost for figures in delivered.values())
    if lost:
        raise RuntimeError(f"{lost} frames of the moved sources were never published: {delivered}")
    duplicates = sum(figures.duplicates for figures in delivered.values())
    return {
        "seconds_to_move": max(seconds_to_move(records, moved, dead_worker, killed_at_ms).values()),
        "sources_moved": len(moved),
        "frames_published_twice": duplicates,
        "published_twice_per_moved_source": duplicates / len(moved),
    }


def measure_failover() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="framelabel-cluster-") as folder, EmbeddedBroker() as broker:
        return asyncio.run(failover(broker.address, Path(folder)))


def measure_scaling(pairs: int) -> dict[str, Any]:
    """2 workers (`ours`) against 1 on Tansu, `pairs` interleaved runs; the ratio pair by pair."""
    figures = summarise(paired(lambda: on_tansu(2), lambda: on_tansu(1), pairs), "fps", 2)
    return figures | {"note": f"bounded by this machine's {psutil.cpu_count()} cores: a second host adds its own"}


def measure_transactions(pairs: int) -> dict[str, Any]:
    """Exactly once (`ours`) against at least once on noida-db, one worker, `pairs` interleaved runs."""
    return summarise(paired(lambda: on_noida("exactly-once"), lambda: on_noida("at-least-once"), pairs), "fps", 2)


def measure_cluster(pairs: int) -> dict[str, Any]:
    return {
        "clip": f"{clip().name}: 320x180 H.264, {CLIP_FRAMES} frames; {SOURCES} replays, not realtime",
        "load_average_at_start": psutil.getloadavg(),
        "two_workers_to_one": measure_scaling(pairs),
        "exactly_once_to_at_least_once": measure_transactions(pairs),
        "failover": measure_failover(),
        "load_average_at_end": psutil.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Scale-out figures: workers of a group sharing replays.")
    parser.add_argument("--pairs", type=int, default=1, help="interleaved runs per ratio")
    args = parser.parse_args()
    print(json.dumps(measure_cluster(args.pairs), indent=1))


if __name__ == "__main__":
    main()
