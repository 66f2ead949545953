"""`framelabel run`: build every stage from a `RunConfig`, run them, report, and say how it went.

The one place where the stages are composed, each an async context manager
entered in order (embedded broker, annotator, publisher) and left in reverse. The stop
signals are handled from the start: a first SIGINT, SIGTERM or SIGHUP stops
capturing and lets what is in flight finish (or, while still connecting, stops
at once); a second gives up on what is unsettled, within `GIVE_UP_WITHIN_S`.

The exit status (README, "Exit status"):
  0  every source finished (replays read to their end) or a signal stopped the run, every record acknowledged
  1  records were lost (not annotated, or not acknowledged by Kafka), the run was given up, or no source ran
  2  a bad config, or Kafka or the Annotate service could not be reached at start (raised, for the CLI)
  3  some sources failed while the others completed, and nothing was lost
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from rich.console import Console

from pipeline.annotators import Annotator
from pipeline.annotators.grpc_client import CallObserver, GrpcAnnotator, GrpcSettings
from pipeline.annotators.in_process import InProcessAnnotator
from pipeline.broker import EmbeddedBroker
from pipeline.config import AnnotatorConfig, RunConfig
from pipeline.events.in_run import RunEvents, events_in_run
from pipeline.kafka import EMBEDDED, KafkaSettings
from pipeline.live_view import LiveView
from pipeline.metrics import PipelineMetrics
from pipeline.publisher import Ownership, ProgressLog, Publisher, PublishError
from pipeline.report import ProgressDisplay, RunReports, summary
from pipeline.runner import Lane, Runner
from pipeline.sources import open_source
from services.classifier import build_classifier, classifier_config
from services.errors import ConfigError
from services.monitoring import MonitoringServer
from services.runtime import STOP_SIGNALS, settle_heap

log = logging.getLogger("framelabel.run")

GIVE_UP_WITHIN_S = 5.0


class ExitStatus(enum.IntEnum):
    OK = 0
    FAILED = 1  # records lost, given up, or no source ran
    NOT_STARTED = 2  # bad config, or Kafka or the Annotate service unreachable at start
    PARTIAL = 3  # some sources failed, the others completed, nothing lost


def authorization_from_env(api_key_env: str, iam_token_env: str) -> str | None:
    """The `authorization` metadata, from the variables Yandex's own tools use."""
    if api_key := os.environ.get(api_key_env):
        return f"Api-Key {api_key}"
    if token := os.environ.get(iam_token_env):
        return f"Bearer {token}"
    return None


def build_annotator(config: AnnotatorConfig, on_grpc_call: CallObserver | None = None) -> Annotator:
    """The annotator, not started: `async with` it to load the model or reach the service.

    `on_grpc_call` sees every call a gRPC annotator makes (the metrics)."""
    if config.kind == "in-process":
        overrides = {
            "top_k": config.top_k,
            "min_confidence": config.min_confidence or 0.0,
            "specification_labels": config.specification_labels,
        }
        declared = classifier_config(config.classifier, config.classifiers_file, overrides)  # a wrong name fails here
        load = functools.partial(build_classifier, config.classifier, declared)
        return InProcessAnnotator(config.classifier, load, config.threads)
    try:
        root_certificates = config.ca_file.read_bytes() if config.ca_file else None
    except OSError as exc:
        raise ConfigError(f"annotator.ca_file: cannot read {config.ca_file}: {exc.strerror}") from None
    metadata = (("x-folder-id", config.folder_id),) if config.folder_id else ()
    return GrpcAnnotator(
        GrpcSettings(
            targets=tuple(config.targets),
            tls=config.tls or root_certificates is not None,
            root_certificates=root_certificates,
            authorization=authorization_from_env(config.api_key_env, config.iam_token_env),
            extra_metadata=metadata,
            deadline_seconds=config.deadline_seconds,
            max_in_flight=config.max_in_flight,
            retry_for_seconds=config.retry_for_seconds,
            connect_timeout_seconds=config.connect_timeout_seconds,
            health_check=config.health_check,
        ),
        on_grpc_call,
    )


@contextlib.asynccontextmanager
async def kafka_bootstrap(settings: KafkaSettings, console: Console) -> AsyncIterator[KafkaSettings]:
    """The settings with a real address; `embedded` starts a Tansu broker for the length of the run."""
    if settings.bootstrap_servers != EMBEDDED:
        yield settings
        return
    async with EmbeddedBroker() as broker:
        console.print(f"embedded Kafka broker (Tansu) on {broker.address}; it stops with this run")
        # `idempotent` is decided on the settings as written: off for `embedded` unless asked for
        yield settings.model_copy(
            update={"bootstrap_servers": broker.address, "enable_idempotence": settings.idempotent}
        )


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP for the length of a run: the first stops it, the second gives up.

    Until `running()` is called the run is still starting, and the first signal cancels it at once."""

    def __init__(self) -> None:
        self.received = 0
        self._main = asyncio.current_task()
        self._on_stop: Callable[[signal.Signals], None] | None = None
        self._deadline: threading.Timer | None = None

    @property
    def gave_up(self) -> bool:
        return self.received > 1

    def running(self, on_stop: Callable[[signal.Signals], None]) -> None:
        self._on_stop = on_stop

    def __enter__(self) -> StopSignals:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._received, sig)
        return self

    def __exit__(self, *exc_info: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        if self._deadline is not None:
            self._deadline.cancel()

    def _received(self, sig: signal.Signals) -> None:
        self.received += 1
        if self.received == 1 and self._on_stop is not None:
            self._on_stop(sig)
            return
        if self.received == 1:
            log.info("%s while starting: stopping", sig.name)
        elif self.received == 2:
            log.warning("%s again: giving up on what is unsettled; ending within %.0f s", sig.name, GIVE_UP_WITHIN_S)
            # closing a source blocked in a native call, or a producer, may take longer: never past the promise
            self._deadline = threading.Timer(GIVE_UP_WITHIN_S, _exit_now)
            self._deadline.daemon = True
            self._deadline.start()
        else:
            return
        if self._main is not None:
            self._main.cancel()


def _exit_now() -> None:
    log.error("could not close everything within %.0f s of giving up; exiting now", GIVE_UP_WITHIN_S)
    logging.shutdown()
    os._exit(ExitStatus.FAILED)


def exit_status(reports: RunReports, gave_up: bool) -> ExitStatus:
    rows = list(reports.by_source.values())
    if gave_up or any(report.lost or report.failed for report in rows):
        return ExitStatus.FAILED
    failed_sources = sum(1 for report in rows if report.error)
    if failed_sources == len(rows):
        return ExitStatus.FAILED
    return ExitStatus.PARTIAL if failed_sources else ExitStatus.OK


async def run_job(config: RunConfig, console: Console) -> int:
    """Run until the sources end or a signal stops the run; the exit status. Start-up failures raise."""
    if config.group is not None:
        from pipeline.cluster.worker import run_worker  # it builds on this module

        return await run_worker(config, console)
    sources = [open_source(c.id, c.uri, c, c) for c in config.sources]
    metrics = PipelineMetrics()
    reports = RunReports(sources, metrics)
    metrics.watch(reports)
    progress = ProgressDisplay()
    for source in sources:
        progress.add(reports.by_source[source.source_id], source.total_frames)
    lanes = [
        Lane(source=source, sampling=c, encoding=c, report=reports.by_source[source.source_id])
        for source, c in zip(sources, config.sources, strict=True)
    ]
    started_at = time.monotonic()
    with StopSignals() as signals:
        try:
            await _run(config, console, lanes, reports, progress, signals, metrics)
        except asyncio.CancelledError:
            if not signals.received:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]  # a task runs this
            if not reports.started:
                return ExitStatus.OK  # stopped while connecting: nothing was captured
        console.print(summary(reports, time.monotonic() - started_at, console.width))
    return exit_status(reports, signals.gave_up)


@dataclass
class Stages:
    """The stages every source shares, started: Kafka's address, the annotator, the publisher, the events stage."""

    settings: KafkaSettings
    annotator: Annotator
    publisher: Publisher
    events: RunEvents | None


@contextlib.asynccontextmanager
async def started_stages(
    config: RunConfig,
    console: Console,
    reports: RunReports,
    metrics: PipelineMetrics,
    ownership: Ownership | None = None,
    progress: ProgressLog | None = None,
) -> AsyncIterator[Stages]:
    """Monitoring (first, so that /healthz answers while the rest starts), Kafka, the annotator, the publisher
    (`ownership`, `progress`: a worker's, see `Publisher`) and the events stage; stopped in reverse."""
    async with contextlib.AsyncExitStack() as stack:
        readiness = Readiness(reports)
        live_view = LiveView(reports)
        if config.metrics.port is not None:
            monitoring = MonitoringServer(config.metrics, metrics.registry, readiness)
            live_view.add_routes(monitoring.app)
            await stack.enter_async_context(monitoring)
        settings = await stack.enter_async_context(kafka_bootstrap(config.kafka, console))
        annotator = await stack.enter_async_context(build_annotator(config.annotator, metrics.grpc_call))
        readiness.annotator = annotator
        publisher = Publisher(
            settings, reports, ownership=ownership, progress=progress, classifier=config.annotator.classifier_name
        )
        await stack.enter_async_context(publisher)
        readiness.kafka = True
        metrics.watch_publisher(publisher)
        events = await stack.enter_async_context(events_in_run(settings, config.events))
        if events is not None:
            live_view.events = events.recent
        yield Stages(settings, annotator, publisher, events)


async def _run(
    config: RunConfig,
    console: Console,
    lanes: list[Lane],
    reports: RunReports,
    progress: ProgressDisplay,
    signals: StopSignals,
    metrics: PipelineMetrics,
) -> None:
    async with started_stages(config, console, reports, metrics) as stages:
        settings, annotator, publisher, events = stages.settings, stages.annotator, stages.publisher, stages.events
        runner = Runner(lanes, annotator, publisher, config.frames_in_flight)
        signals.running(functools.partial(stop_runner, runner, publisher, settings))
        settle_heap()
        kinds = ", ".join(f"{lane.report.source_id} ({lane.source.policy.value})" for lane in lanes)
        log.info(
            "running %s → %s → kafka %s topic %s",
            kinds,
            annotator.description,
            settings.bootstrap_servers,
            settings.topic,
        )
        reports.started = True
        with progress:
            await runner.run()
            try:
                await publisher.flush()
            except PublishError as exc:
                log.error("%s", exc)
        if events is not None:
            published = {r.source_id: r.last_published.index for r in reports.by_source.values() if r.last_published}
            await events.finish(published, stopped=signals.received > 0)


class Readiness:
    """What `/readyz` checks: Kafka took the producer, the annotator is ready, every source has opened."""

    def __init__(self, reports: RunReports) -> None:
        self._reports = reports
        self.annotator: Annotator | None = None
        self.kafka = False

    def __call__(self) -> dict[str, bool]:
        reports = self._reports.by_source.values()
        return {
            "kafka": self.kafka,
            "annotator": self.annotator is not None and self.annotator.ready,
            "sources": all(report.source_stats.read > 0 or report.ended for report in reports),
        }


def stop_runner(runner: Runner, publisher: Publisher, settings: KafkaSettings, sig: signal.Signals) -> None:
    log.info(
        "%s: stopping capture; finishing the frames in flight (%d) and the records Kafka has not acknowledged (%d; "
        "re-sent for up to %.0f s, kafka.delivery_timeout_ms); %s again gives up on them",
        sig.name,
        runner.frames_in_flight,
        publisher.unsettled,
        settings.delivery_timeout_ms / 1000,
        sig.name,
    )
    runner.stop()
