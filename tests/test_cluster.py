"""Workers of a group sharing sources through Kafka: real workers (`framelabel run --group`), a real broker,
real clips and a real RTSP camera; workers killed, frozen and cut off from the broker."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.cluster.catalog import ensure_compacted_topic, put_sources, remove_sources
from pipeline.cluster.settings import SOURCES_PARTITIONS
from pipeline.config import SourceConfig
from pipeline.kafka import KafkaConnection
from pipeline.records import DecodedRecord, decode_record
from tests import netns
from tests.cameras import rtsp_camera
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
from tests.faults import PipelineRun, delivery_figures, eventually, framelabel_process, noida_broker
from tests.kafka import QUIET_S, kafka_broker, read_topic

SESSION_MS = 4000  # shorter than the default, for shorter tests
EVERY_NTH = 5
CLIP_SECONDS = 12
CLIP_FRAMES = CLIP_SECONDS * CLIP_FPS


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    clip = tmp_path_factory.mktemp("clips") / "bikes12.mp4"
    subprocess.run(["ffmpeg", "-v", "error", *looped_clip_args(CLIP_SECONDS), str(clip)], check=True)
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
            config = worker_config(tmp_path, broker.address, session_timeout_ms=SESSION_MS)
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
    assert moved_in_s < SESSION_MS / 1000 + 5, moved_in_s
    duplicates = 0
    for source_id in finished:
        delivered = delivery_figures(records[source_id], EXPECTED)
        assert delivered.lost == 0, (source_id, delivered)
        assert delivered.in_order, source_id
        duplicates += delivered.duplicates
    assert len(records[ids[5]]) > 0  # the camera was annotated, on one worker or another
    figures["workers: replay frames published twice after a SIGKILL (at least once, Tansu)"] = duplicates


async def read_committed(address: str, topic: str) -> list[DecodedRecord]:
    """Every record committed when it is called, as a `read_committed` consumer downstream sees them (read up
    to the last stable offsets, which noida-db reports truly)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=address, isolation_level="read_committed")
    await consumer.start()
    records: list[DecodedRecord] = []
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        while any([await consumer.position(p) < end for p, end in ends.items()]):
            for batch in (await consumer.getmany(timeout_ms=int(QUIET_S * 1000))).values():
                records += [decode_record(r.key, r.value, r.headers, r.timestamp) for r in batch]
    finally:
        await consumer.stop()
    return records


async def sole_worker_of_one_replay(folder: Path, address: str, clip: Path) -> Path:
    """The catalog holds one replay, `clip`; the config of a sole worker delivering exactly once."""
    connection = KafkaConnection(bootstrap_servers=address)
    await ensure_compacted_topic(connection, "framelabel.sources", SOURCES_PARTITIONS)
    await put_sources(connection, "framelabel.sources", [replay("clip", clip)])
    return worker_config(folder, address, sole_worker=True, delivery="exactly-once")


@pytest.mark.timeout(300)
async def test_a_replay_killed_five_times_is_published_exactly_once_on_a_broker_with_transactions(
    tmp_path: Path, long_clip: Path, figures: dict[str, object]
) -> None:
    """noida-db has transactions (its consumer groups do not settle after a member dies: a sole worker)."""
    with noida_broker(tmp_path / "noida") as broker:
        config = await sole_worker_of_one_replay(tmp_path, broker.address, long_clip)
        kills = random.Random()
        published_at_kills = []
        for _ in range(5):
            with framelabel_process("run", str(config)) as worker:
                await wait_for_log(worker, "source clip: started")
                await asyncio.sleep(kills.uniform(0.5, 3.0))  # a random point of the replay, not a synchronisation
                worker.process.kill()
                worker.finish()
            published_at_kills.append(len(await read_committed(broker.address, "frames")))
        with framelabel_process("run", str(config)) as worker:
            await wait_for_log(worker, "source clip: replay ended", within_s=60)
            assert worker.finish(signal.SIGTERM) == 0, worker.log()
        with framelabel_process("run", str(config)) as worker:  # the end is recorded where it is read
            await wait_for_log(worker, "source clip: its replay ended")
            assert worker.finish(signal.SIGTERM) == 0, worker.log()
        records = await read_committed(broker.address, "frames")
    assert [r.frame_index for r in records] == EXPECTED  # every frame once, in order
    assert any(0 < published < len(EXPECTED) for published in published_at_kills), published_at_kills  # mid-replay
    figures["workers, exactly once: committed records after each of 5 SIGKILLs"] = published_at_kills


async def wait_for_log(run: PipelineRun, text: str, within_s: float = 60.0) -> None:
    try:
        await eventually(lambda: text in run.log() or run.process.poll() is not None, repr(text), within_s)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; the log:\n{run.log()[-6000:]}") from None
    assert text in run.log(), run.log()[-6000:]


def slipped_through(records: list[DecodedRecord], zombie: str) -> list[DecodedRecord]:
    """The zombie's records, stored after another worker took the source over, of frames that worker had
    already published: what the zombie published of its old run (none), or repeated of the new owner's work."""
    taken_over = next(i for i, record in enumerate(records) if record.worker != zombie)
    published_by_others: set[int] = set()
    slipped = []
    for record in records[taken_over:]:
        if record.worker != zombie:
            published_by_others.add(record.frame_index)
        elif record.frame_index <= max(published_by_others, default=-1):
            slipped.append(record)
    return slipped


async def one_worker_away_for_a_while(
    tmp_path: Path,
    clip: Path,
    address: str,
    start: Callable[[Path], contextlib.AbstractContextManager[list[PipelineRun]]],
    away: Callable[[PipelineRun], contextlib.AbstractContextManager[None]],
) -> tuple[list[DecodedRecord], str, int]:
    """Two workers, a replay on each; one is `away` (frozen, cut off) until its replay runs on the other, then
    back. Both replays run to their end. The records of the replay that moved, the id of the worker away and
    when it went away (ms since the epoch)."""
    ids = ids_in_distinct_partitions(2, "moved-")
    cluster = Cluster(address)
    await ensure_compacted_topic(cluster.connection, "framelabel.sources", SOURCES_PARTITIONS)
    await put_sources(cluster.connection, "framelabel.sources", [replay(source_id, clip) for source_id in ids])
    with start(worker_config(tmp_path, address, session_timeout_ms=SESSION_MS)) as running:
        await cluster.until(lambda c: len(c.workers) == 2 and len(set(c.running().values())) == 2, "one source each")
        zombie = running[0]
        pid = zombie.process.pid
        zombie_id = next(worker.worker for worker in cluster.workers if worker.pid == pid)
        lost = next(source for source, worker in cluster.running().items() if worker == pid)
        away_since_ms = round(time.time() * 1000)
        with away(zombie):
            await cluster.until(lambda c: c.running().get(lost, pid) != pid, f"{lost} on the other worker")
        await wait_for_log(zombie, "session lapsed")  # it noticed
        await cluster.until(lambda c: set(ids) <= c.ended(), "both replays ended", 120)
        for run in running:
            assert run.finish(signal.SIGTERM) == 0, run.log()
    return by_source(await read_topic(address, "frames"))[lost], zombie_id, away_since_ms


def assert_only_in_flight_slipped(records: list[DecodedRecord], zombie: str, away_since_ms: int) -> int:
    """What a worker away published of its old run after another took its source over may only be what it had
    handed to Kafka while its session could still be current (it cannot know it is cut off before then, and
    without transactions nothing calls a record in flight back); the count."""
    slipped = slipped_through(records, zombie)
    lease_ended_ms = away_since_ms + SESSION_MS
    late = [record.frame_index for record in slipped if record.capture_time_ms >= lease_ended_ms]
    assert not late, f"captured after its session lapsed, published after the move: frames {late}"
    assert delivery_figures(records, EXPECTED).lost == 0
    return len(slipped)


@contextlib.contextmanager
def frozen(run: PipelineRun) -> Iterator[None]:
    run.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        run.process.send_signal(signal.SIGCONT)


@pytest.mark.timeout(300)
async def test_a_frozen_worker_does_not_publish_for_the_source_it_lost(
    tmp_path: Path, long_clip: Path, figures: dict[str, object]
) -> None:
    """SIGSTOP past the session timeout: its source moves; after SIGCONT it notices before publishing more."""
    async with kafka_broker() as broker:
        moved = await one_worker_away_for_a_while(
            tmp_path, long_clip, broker.address, lambda config: workers(config, 2), frozen
        )
    slipped = assert_only_in_flight_slipped(*moved)
    figures["workers: records a worker frozen past its session published for its lost source (Tansu)"] = slipped


@pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))
@pytest.mark.timeout(300)
async def test_a_worker_cut_off_from_the_broker_does_not_publish_what_it_buffered_for_the_source_it_lost(
    tmp_path: Path, long_clip: Path, figures: dict[str, object]
) -> None:
    """Each worker on a host of its own (a network namespace); one is cut off from the broker while it keeps
    capturing, until its source runs on the other; when the cut heals, what it holds must not land."""
    with netns.network(hosts=2) as net, netns.tansu_broker(net) as address:

        @contextlib.contextmanager
        def on_hosts(config: Path) -> Iterator[list[PipelineRun]]:
            with contextlib.ExitStack() as stack:
                yield [
                    stack.enter_context(framelabel_process("run", str(config), prefix=["ip", "netns", "exec", h.name]))
                    for h in net.hosts
                ]

        @contextlib.contextmanager
        def cut_off(run: PipelineRun) -> Iterator[None]:
            net.cut(net.hosts[0])
            try:
                yield
            finally:
                net.heal(net.hosts[0])

        moved = await one_worker_away_for_a_while(tmp_path, long_clip, address, on_hosts, cut_off)
    slipped = assert_only_in_flight_slipped(*moved)
    figures["workers: records a worker cut off past its session published for its lost source (Tansu)"] = slipped


@pytest.mark.timeout(300)
async def test_a_frozen_worker_is_fenced_by_the_transactional_id_of_the_replay_taken_from_it(
    tmp_path: Path, long_clip: Path
) -> None:
    """noida-db: a sole worker frozen mid-replay, a second one takes the replay over (fencing the first); the
    first, resumed, commits nothing more: a `read_committed` consumer sees every frame once, in order."""
    with noida_broker(tmp_path / "noida") as broker:
        config = await sole_worker_of_one_replay(tmp_path, broker.address, long_clip)
        with framelabel_process("run", str(config)) as zombie:
            await wait_for_log(zombie, "source clip: started")
            committed = await eventually_async(lambda: read_committed(broker.address, "frames"), "committed records")
            with framelabel_process("run", str(config)) as successor:
                with frozen(zombie):
                    await wait_for_log(successor, "source clip: resuming after frame")
                    await eventually_async(lambda: _more(broker.address, len(committed)), "the successor's records")
                await wait_for_log(successor, "source clip: replay ended", within_s=90)
                assert successor.finish(signal.SIGTERM) == 0, successor.log()
            await wait_for_log(zombie, "another worker claimed it")
        records = await read_committed(broker.address, "frames")
    assert [record.frame_index for record in records] == EXPECTED
    zombie_ids = {record.worker for record in records[: len(committed)]}
    assert not [r for r in records[len(committed) :] if r.worker in zombie_ids and r.worker != records[-1].worker]


async def eventually_async(read: Callable[[], Awaitable[list[DecodedRecord]]], what: str) -> list[DecodedRecord]:
    """Poll `read()` until it returns something, within a minute."""
    deadline = time.monotonic() + 60
    while not (got := await read()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after 60 s waiting for {what}")
    return got


async def _more(address: str, than: int) -> list[DecodedRecord]:
    records = await read_committed(address, "frames")
    return records if len(records) > than else []


def test_a_worker_needs_a_shared_broker() -> None:
    with framelabel_process("run", "--group", "cameras") as worker:
        assert worker.finish() == 2
    assert "a group's workers share a Kafka cluster" in worker.log(), worker.log()
