"""Workers of a group sharing sources through Kafka: real workers (`framelabel run --group`), a real broker,
real clips and a real RTSP camera; workers killed, frozen and cut off from the broker."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.cluster.catalog import put_sources, remove_sources
from pipeline.config import SourceConfig
from tests.cameras import rtsp_camera
from tests.cluster import (
    CLIP_FRAMES,
    LONG_CLIP_ARGS,
    Cluster,
    by_source,
    ids_in_distinct_partitions,
    seconds_to_move,
    worker_config,
    workers,
)
from tests.faults import delivery_figures, framelabel_process
from tests.kafka import kafka_broker, read_topic

SESSION_S = 6.0  # the workers' default session timeout
EVERY_NTH = 5


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    clip = tmp_path_factory.mktemp("clips") / "bikes20.mp4"
    subprocess.run(["ffmpeg", "-v", "error", *LONG_CLIP_ARGS, str(clip)], check=True)
    return clip


def replay(source_id: str, clip: Path) -> SourceConfig:
    return SourceConfig(id=source_id, uri=str(clip), realtime=True, every_nth=EVERY_NTH)


EXPECTED = list(range(0, CLIP_FRAMES, EVERY_NTH))


@pytest.mark.timeout(300)
async def test_three_workers_share_six_sources_and_one_killed_hands_its_sources_over(
    tmp_path: Path, long_clip: Path, figures: dict[str, object]
) -> None:
    ids = ids_in_distinct_partitions(7, "clip-")
    replays, added = ids[:5], ids[6]
    async with kafka_broker() as broker:
        cluster = Cluster(broker.address)
        with rtsp_camera(long_clip) as camera:
            # through the CLI, as a user adds them
            add = [f"--source={source_id}={long_clip}" for source_id in replays]
            with framelabel_process("sources", "add", "--bootstrap", broker.address, *add, "--realtime",
                                    "--every-nth", str(EVERY_NTH)) as adding:  # fmt: skip
                assert adding.finish() == 0, adding.log()
            camera_source = SourceConfig(id=ids[5], uri=camera.url, fps=2)
            await put_sources(cluster.connection, "framelabel.sources", [camera_source])
            config = worker_config(tmp_path, broker.address)
            with workers(config, 3) as running:
                await cluster.until(
                    lambda c: len(c.workers) == 3 and len(c.running()) == 6, "6 sources on 3 workers", 90
                )
                shares = sorted(sum(1 for s in w.sources if s.state != "ended") for w in cluster.workers)
                assert shares == [2, 2, 2], cluster.summary()  # spread evenly

                victim = next(run for run in running if run.process.pid == cluster.running()[replays[0]])
                pid = victim.process.pid
                victim_id = next(w.worker for w in cluster.workers if w.pid == pid)
                lost = {source for source, worker in cluster.running().items() if worker == pid}
                killed_at_ms = round(time.time() * 1000)
                victim.process.kill()
                victim.finish()
                await cluster.until(
                    lambda c: all(c.running().get(source, pid) != pid for source in lost),
                    f"{sorted(lost)} running on the other workers",
                )

                # a source added and one removed while the workers run
                await put_sources(cluster.connection, "framelabel.sources", [replay(added, long_clip)])
                await remove_sources(cluster.connection, "framelabel.sources", [replays[4]])
                await cluster.until(
                    lambda c: (added in c.running() or added in c.ended()) and replays[4] not in c.running(),
                    f"{added} running and {replays[4]} stopped",
                )
                finished = [*replays[:4], added]
                await cluster.until(lambda c: set(finished) <= c.ended(), f"{finished} ended", 120)
                for run in running:
                    if run.process.poll() is None:
                        assert run.finish(signal.SIGTERM) == 0, run.log()
        records = by_source(await read_topic(broker.address, "frames"))
    moved_in_s = max(seconds_to_move(records, lost, victim_id, killed_at_ms).values())
    figures["workers: seconds from a SIGKILL to its sources' first records from other workers"] = moved_in_s
    assert moved_in_s < SESSION_S + 5, moved_in_s
    duplicates = 0
    for source_id in finished:
        delivered = delivery_figures(records[source_id], EXPECTED)
        assert delivered.lost == 0, (source_id, delivered)
        assert delivered.in_order, source_id
        duplicates += delivered.duplicates
    assert len(records[ids[5]]) > 0  # the camera was annotated, on one worker or another
    figures["workers: replay frames published twice after a SIGKILL (at least once, Tansu)"] = duplicates
