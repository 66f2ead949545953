"""`framelabel run --group NAME`: one worker of a group that shares the sources of a topic.

The worker reads the whole sources topic (the catalog), joins the group
(`Membership`), and runs the sources whose records lie in the partitions it
holds, starting and stopping lanes as sources are added, removed or moved by a
rebalance. A replay records its last published frame in the progress topic
after each batch, and starts after the one recorded there: a replay that moves,
or whose worker restarts, goes on where it stopped. Where the broker has
transactions (`delivery: exactly-once`, or `auto`), each replay has a
transactional producer of its own (id `framelabel.<group>.<source>`): its
records and its progress commit together, and a worker taking the source over
fences the one it took it from. Cameras publish at least once either way:
there is nothing to replay of a live stream.

Every `status_interval_seconds` the worker writes a heartbeat to the status
topic (`framelabel status` reads them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from rich.console import Console

from pipeline.cluster.catalog import decode_source, ensure_compacted_topic
from pipeline.cluster.membership import Membership, SoleMember
from pipeline.cluster.settings import SOURCES_PARTITIONS, GroupConfig
from pipeline.cluster.status import SourceStatus, StatusPublisher, WorkerStatus, worker_id
from pipeline.config import RunConfig, SourceConfig
from pipeline.frames import DeliveryPolicy
from pipeline.job import ExitStatus, StopSignals, exit_status, started_stages, stop_runner
from pipeline.kafka import EMBEDDED, KafkaSettings, client_options, read_latest, unreachable
from pipeline.metrics import PipelineMetrics
from pipeline.publisher import ProgressLog, Publisher, PublishError
from pipeline.report import RunReports, summary
from pipeline.runner import Lane, Runner
from pipeline.sources import open_source
from services.errors import ConfigError, FramelabelError

log = logging.getLogger("framelabel.cluster")

CATALOG_POLL_MS = 500


class Worker:
    """The sources this worker runs, kept in step with the catalog and the group's assignment."""

    def __init__(self, config: RunConfig, group: GroupConfig, reports: RunReports) -> None:
        self._config = config
        self._group = group
        self._reports = reports
        self.id = worker_id()
        self.started_ms = round(time.time() * 1000)
        self.catalog: dict[str, tuple[int, SourceConfig]] = {}  # source id → (partition, config)
        self.running: dict[str, SourceConfig] = {}  # what runs here, as configured when it started
        self._partitions: set[int] = set()
        self._transactional = False
        self._changed = asyncio.Event()  # the catalog or the assignment changed: `keep_reconciled` acts on it
        self._runner: Runner | None = None
        self._publisher: Publisher | None = None
        self._membership: Membership | SoleMember | None = None

    def weights(self) -> Counter[int]:
        """Partition → the number of sources in it, for the group's assignor."""
        return Counter(partition for partition, _ in self.catalog.values())

    async def holds(self, source_id: str) -> bool:
        """The publisher's `Ownership`: wait while the group's answer is due; False once the source is gone."""
        membership = self._membership
        while source_id in self.running and membership is not None:
            if membership.current():
                return True
            await membership.wait_for_change(timeout_s=0.2)
        return False

    async def assigned(self, partitions: set[int]) -> None:
        self._partitions = partitions
        self._forget_lost()  # before any await: see Membership
        log.info("group %s: this worker holds partitions %s", self._group.name, sorted(partitions) or "none")
        # not awaited here: aiokafka heartbeats only once this callback returns, and starting sources (reading
        # the progress topic, fencing) may outlast the session, which would cost the membership just granted
        self._changed.set()

    async def keep_reconciled(self) -> None:
        """Apply each change of the catalog or the assignment, one at a time."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self.reconcile()

    def _wanted(self) -> dict[str, SourceConfig]:
        return {
            source_id: config
            for source_id, (partition, config) in self.catalog.items()
            if partition in self._partitions
        }

    def _forget_lost(self) -> None:
        """Sources no longer ours (moved, removed, changed) stop publishing at once: `holds()` says so."""
        wanted = self._wanted()
        for source_id, config in list(self.running.items()):
            if wanted.get(source_id) != config:
                del self.running[source_id]

    async def reconcile(self) -> None:
        """Stop what is no longer ours (or changed), start what is ours and not running."""
        if self._runner is None or self._publisher is None:
            return
        self._forget_lost()
        for lane in list(self._runner.lanes):
            if lane.report.source_id not in self.running:
                await self._stop(lane.report.source_id)
        starting = [config for source_id, config in self._wanted().items() if source_id not in self.running]
        if not starting:
            return
        replays = [config for config in starting if self._is_replay(config)]
        if self._transactional:  # fences the workers that ran them before, before their progress is read
            await asyncio.gather(*(self._claim(config.id) for config in replays))
        progress = await self._progress() if replays else {}
        still_ours = self._wanted()  # a rebalance may have come while the progress was read
        for config in starting:
            if still_ours.get(config.id) == config:
                self._start(config, progress.get(config.id))

    @staticmethod
    def _is_replay(config: SourceConfig) -> bool:
        return open_source(config.id, config.uri, config, config).policy is DeliveryPolicy.REPLAY and not config.loop

    async def _claim(self, source_id: str) -> None:
        await self._serving()[1].claim(source_id, self._transactional_id(source_id))

    def _start(self, config: SourceConfig, progress: Mapping[str, Any] | None) -> None:
        """Start the source here; a replay after the last frame its progress records (or not at all if it ended)."""
        runner = self._serving()[0]
        self.running[config.id] = config
        settings = config
        if progress is not None and progress.get("ended"):
            log.info("source %s: its replay ended (on worker %s); not started again", config.id, progress["worker"])
            return
        if progress is not None and progress.get("position_ms") is not None:
            log.info(
                "source %s: resuming after frame %s (published by worker %s)",
                config.id,
                progress["frame"],
                progress["worker"],
            )
            settings = config.model_copy(update={"resume_after_ms": progress["position_ms"]})
        source = open_source(config.id, config.uri, settings, settings)
        report = self._reports.add(source)
        runner.start_lane(Lane(source=source, sampling=settings, encoding=settings, report=report))
        log.info("source %s: started on worker %s", config.id, self.id)

    async def _stop(self, source_id: str) -> None:
        """Stop the source here: capture ends, frames in flight go to the publisher (which drops them as moved)."""
        runner, publisher = self._serving()
        if any(lane.report.source_id == source_id for lane in runner.lanes):
            await runner.stop_lane(source_id)
        await publisher.release(source_id)
        self._reports.by_source.pop(source_id, None)
        log.info("source %s: stopped on worker %s", source_id, self.id)

    def _serving(self) -> tuple[Runner, Publisher]:
        if self._runner is None or self._publisher is None:
            raise RuntimeError("the worker is not serving")
        return self._runner, self._publisher

    async def _progress(self) -> dict[str, dict[str, Any]]:
        """Every replay's last recorded progress, by source id."""
        latest = await read_latest(self._connection, self._group.progress_topic, read_committed=self._transactional)
        return {source_id: json.loads(saved.value) for source_id, saved in latest.items() if saved.value is not None}

    async def lane_ended(self, lane: Lane) -> None:
        """A replay that read to its end here is recorded as ended: no worker starts it again. Not one that was
        stopped, nor one that moved away while it read on (a worker cut off from Kafka keeps capturing)."""
        report, source_id = lane.report, lane.report.source_id
        if lane.source.policy is not DeliveryPolicy.REPLAY or report.error or lane.stopping.is_set():
            return
        if source_id in self.running and await self._serving()[1].release(source_id, ended=True):
            last = report.last_published
            log.info("source %s: replay ended after frame %s", source_id, last.index if last else None)

    def _transactional_id(self, source_id: str) -> str:
        return f"framelabel.{self._group.name}.{source_id}"

    def status(self) -> WorkerStatus:
        # in a rebalance, or away from the group, what it ran may be another's by now: it lists none
        in_doubt = self._membership is not None and not self._membership.current()
        sources = [
            SourceStatus(
                id=report.source_id,
                state=report.state.value,
                fps=report.fps(),
                published=report.published,
                dropped=report.dropped,
                failed=report.failed,
                last_frame=report.last_published.index if report.last_published else None,
                latency_ms=report.latency_percentile(50),
                error=report.error,
            )
            for report in self._reports.by_source.values()
            if not in_doubt and report.source_id in self.running  # not one being stopped: it may read as ended
        ]
        return WorkerStatus(
            worker=self.id,
            group=self._group.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_ms=self.started_ms,
            at_ms=round(time.time() * 1000),
            interval_s=self._group.status_interval_seconds,
            sources=sources,
        )

    @property
    def _connection(self) -> KafkaSettings:
        return self._config.kafka

    async def watch_catalog(self, connection: KafkaSettings) -> None:
        """Follow the sources topic from its start, applying each added, changed or removed source."""
        reader = AIOKafkaConsumer(**client_options(connection), group_id=None, enable_auto_commit=False)
        try:
            await reader.start()
            await reader.topics()
            partitions = sorted(reader.partitions_for_topic(self._group.sources_topic) or ())
            assigned = [TopicPartition(self._group.sources_topic, partition) for partition in partitions]
            reader.assign(assigned)
            await reader.seek_to_beginning(*assigned)
            while True:
                fetched = await reader.getmany(timeout_ms=CATALOG_POLL_MS)
                changed = False
                for partition, records in fetched.items():
                    for record in records:
                        changed |= self._apply(partition.partition, record.key, record.value)
                if changed:
                    self._changed.set()
        except KafkaError as exc:
            raise unreachable(connection, exc) from exc
        finally:
            await reader.stop()

    def _apply(self, partition: int, key: bytes | None, value: bytes | None) -> bool:
        if key is None:
            return False
        source_id = key.decode()
        if value is None:
            return self.catalog.pop(source_id, None) is not None
        try:
            config = decode_source(source_id, value)
        except ConfigError as exc:
            log.warning("sources topic: %s (left out)", exc)
            return False
        if self.catalog.get(source_id) == (partition, config):
            return False
        self.catalog[source_id] = (partition, config)
        return True

    async def load_catalog(self, connection: KafkaSettings) -> None:
        """The catalog as it stands, before joining the group: the assignor weighs partitions by it."""
        for source_id, saved in (await read_latest(connection, self._group.sources_topic)).items():
            self._apply(saved.partition, source_id.encode(), saved.value)

    @contextlib.asynccontextmanager
    async def serving(self, runner: Runner, publisher: Publisher, connection: KafkaSettings) -> AsyncIterator[None]:
        self._runner, self._publisher = runner, publisher
        self._transactional = await self._has_transactions(publisher)
        delivery = "exactly once (Kafka transactions)" if self._transactional else "at least once"
        log.info("worker %s of group %s: replays published %s", self.id, self._group.name, delivery)
        tasks = [
            asyncio.create_task(self._ending_on_error(self.watch_catalog(connection)), name="framelabel-catalog"),
            asyncio.create_task(self._ending_on_error(self.keep_reconciled()), name="framelabel-reconcile"),
        ]
        membership: Membership | SoleMember
        if self._group.sole_worker:
            membership = SoleMember(connection, self._group.sources_topic, self.assigned)
        else:
            membership = Membership(
                connection,
                self._group.sources_topic,
                self._group.name,
                self.weights,
                self.assigned,
                self._group.session_timeout_ms,
            )
        self._membership = membership
        try:
            async with (
                membership,
                StatusPublisher(connection, self._group.status_topic, self.status, self._group.status_interval_seconds),
            ):
                yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _ending_on_error(self, work: Coroutine[Any, Any, None]) -> None:
        """The worker cannot go on without it: a failure stops the worker, with the error logged."""
        try:
            await work
        except FramelabelError as exc:
            log.error("worker %s: %s; stopping", self.id, exc)
            self._serving()[0].stop()
            raise

    async def _has_transactions(self, publisher: Publisher) -> bool:
        if self._group.delivery == "at-least-once":
            return False
        probe = f"framelabel.{self._group.name}.{self.id}.probe"
        try:
            await publisher.claim(probe, probe)
        except PublishError as exc:
            if self._group.delivery == "exactly-once":
                raise ConfigError(f"group.delivery exactly-once: {exc}") from exc
            return False
        await publisher.release(probe)
        return True


async def run_worker(config: RunConfig, console: Console) -> int:
    """Run as a worker of `config.group` until a stop signal; the exit status."""
    group = config.group
    assert group is not None
    if config.kafka.bootstrap_servers == EMBEDDED:
        raise ConfigError("a group's workers share a Kafka cluster: set kafka.bootstrap_servers (or --bootstrap)")
    metrics = PipelineMetrics()
    reports = RunReports([], metrics)
    metrics.watch(reports)
    worker = Worker(config, group, reports)
    connection = config.kafka
    await ensure_compacted_topic(connection, group.sources_topic, SOURCES_PARTITIONS)
    await ensure_compacted_topic(connection, group.progress_topic, SOURCES_PARTITIONS)
    await worker.load_catalog(connection)
    started_at = time.monotonic()
    progress_log = ProgressLog(group.progress_topic, worker.id)
    with StopSignals() as signals:
        try:
            async with started_stages(config, console, reports, metrics, worker, progress_log) as stages:
                publisher = stages.publisher
                runner = Runner([], stages.annotator, publisher, config.frames_in_flight, on_end=worker.lane_ended)
                signals.running(functools.partial(stop_runner, runner, publisher, stages.settings))
                reports.started = True
                async with asyncio.TaskGroup() as tasks:
                    running = tasks.create_task(runner.run(until_stopped=True))
                    async with worker.serving(runner, publisher, stages.settings):
                        await running
        except asyncio.CancelledError:
            if not signals.received:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]  # a task runs this
    console.print(summary(reports, time.monotonic() - started_at, console.width))
    return exit_status(reports, signals.gave_up) if reports.by_source else ExitStatus.OK
