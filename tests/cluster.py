"""Helpers for workers of a group (`framelabel run --group`): their configs and processes, the group as its
heartbeats show it, and what a move cost as the records show it. Used by the tests and by `make bench`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import yaml
from aiokafka.partitioner import murmur2

from pipeline.cluster.settings import SOURCES_PARTITIONS
from pipeline.cluster.status import WorkerStatus, read_status
from pipeline.kafka import KafkaConnection, read_latest
from pipeline.records import DecodedRecord
from tests.cameras import CLIPS
from tests.faults import PipelineRun, framelabel_process

CLIP_FPS = 25


def looped_clip_args(seconds: int) -> list[str]:
    """ffmpeg's arguments (before the output file) for bikes.mp4 looped to `seconds` at 320×180: real video,
    cheap to decode and annotate, `seconds × CLIP_FPS` frames."""
    return ["-stream_loop", "-1", "-i", str(CLIPS / "bikes.mp4"), "-t", str(seconds), "-vf", "scale=320:180",
            "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-an"]  # fmt: skip


def ids_in_distinct_partitions(count: int, prefix: str) -> list[str]:
    """Source ids that Kafka's default partitioner puts in different partitions of the sources topic."""
    ids: list[str] = []
    taken: set[int] = set()
    for number in range(1000):
        source_id = f"{prefix}{number}"
        partition = (murmur2(source_id.encode()) & 0x7FFFFFFF) % SOURCES_PARTITIONS
        if partition not in taken:
            ids.append(source_id)
            taken.add(partition)
        if len(ids) == count:
            return ids
    raise AssertionError("not enough partitions")


def worker_config(folder: Path, address: str, name: str = "workers", **group: object) -> Path:
    """A worker's run config: group `name` (with `group` settings), topic `frames`, imagenet on one thread."""
    path = folder / f"{name}.yaml"
    config = {
        "group": {"name": name, "status_interval_seconds": 0.5} | group,
        "kafka": {"bootstrap_servers": address, "topic": "frames", "enable_idempotence": False},
        "annotator": {"classifier": "imagenet", "threads": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def workers(config: Path, count: int) -> Iterator[list[PipelineRun]]:
    """`count` workers; when the caller fails, what they logged is printed (pytest shows it)."""
    with contextlib.ExitStack() as stack:
        runs = [stack.enter_context(framelabel_process("run", str(config))) for _ in range(count)]
        try:
            yield runs
        except BaseException:
            for run in runs:
                print(f"--- worker pid {run.process.pid}:\n{run.log()[-6000:]}")
            raise


class Cluster:
    """The group as its heartbeats show it."""

    def __init__(self, address: str) -> None:
        self.connection = KafkaConnection(bootstrap_servers=address)
        self.workers: list[WorkerStatus] = []
        self._ended: set[str] = set()

    async def refresh(self) -> None:
        now_ms = round(time.time() * 1000)
        self.workers = [
            w for w in await read_status(self.connection, "framelabel.status") if w.health(now_ms) == "alive"
        ]
        progress = await read_latest(self.connection, "framelabel.progress")
        self._ended = {source for source, saved in progress.items() if saved.value and json.loads(saved.value)["ended"]}

    def running(self) -> dict[str, int]:
        """Source id → the pid of the worker running it (not ended)."""
        return {s.id: w.pid for w in self.workers for s in w.sources if s.state not in ("ended", "failed")}

    def ended(self) -> set[str]:
        """The replays recorded as ended in the progress topic: read to their end, every frame published (a
        worker's own view may say ended of a replay it read on while cut off, which another has taken over)."""
        return self._ended

    def spread(self, workers: int, sources: int) -> bool:
        """`workers` alive, each running its even share of the `sources` (none ended yet)."""
        shares = [sum(1 for s in w.sources if s.state not in ("ended", "failed")) for w in self.workers]
        return len(self.workers) == workers and len(self.running()) == sources and len(set(shares)) == 1

    async def until(self, condition: Callable[[Cluster], bool], what: str, within_s: float = 60.0) -> float:
        """Poll the heartbeats until `condition(self)` holds; the seconds it took."""
        started = time.monotonic()
        deadline = started + within_s
        while True:
            await self.refresh()
            if condition(self):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up after {within_s:g} s waiting for {what}: {self.summary()}")
            await asyncio.sleep(0.25)

    def summary(self) -> str:
        return "; ".join(f"{w.worker}: {[(s.id, s.state) for s in w.sources]}" for w in self.workers)


def by_source(records: list[DecodedRecord]) -> dict[str, list[DecodedRecord]]:
    grouped: dict[str, list[DecodedRecord]] = {}
    for record in records:
        grouped.setdefault(record.source_id, []).append(record)
    return grouped


def seconds_to_move(
    records: dict[str, list[DecodedRecord]], moved: Collection[str], dead_worker: str, killed_at_ms: int
) -> dict[str, float]:
    """For each source of a killed worker: seconds from the kill to its first record captured by another."""

    def first_elsewhere_ms(source: str) -> int:
        return min(
            r.capture_time_ms for r in records[source] if r.worker != dead_worker and r.capture_time_ms > killed_at_ms
        )

    return {source: (first_elsewhere_ms(source) - killed_at_ms) / 1000 for source in moved}
