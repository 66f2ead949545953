"""`framelabel run`: build every stage from a `RunConfig`, run them, report.

The one place where the stages are composed. Returns the exit code: 0 when
every replay source was read to its end (or the run was stopped by a signal)
and every record is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator

from rich.console import Console

from pipeline.annotators import Annotator
from pipeline.annotators.grpc_client import GrpcAnnotator, GrpcSettings
from pipeline.annotators.in_process import InProcessAnnotator
from pipeline.broker import EmbeddedBroker
from pipeline.config import EMBEDDED, AnnotatorConfig, KafkaConfig, RunConfig, SourceConfig
from pipeline.encoder import EncoderSettings
from pipeline.frames import DeliveryPolicy
from pipeline.publisher import KafkaSettings, Publisher, PublishError
from pipeline.report import ProgressDisplay, RunReports, summary_table
from pipeline.runner import Lane, Runner
from pipeline.sampler import SamplingSettings
from pipeline.sources import SourceSettings, open_source
from services.classifier import load_classifier
from services.errors import ConfigError
from services.runtime import settle_heap

log = logging.getLogger("framelabel.run")


def authorization_from_env(api_key_env: str, iam_token_env: str) -> str | None:
    """The `authorization` metadata, from the variables Yandex's own tools use."""
    if api_key := os.environ.get(api_key_env):
        return f"Api-Key {api_key}"
    if token := os.environ.get(iam_token_env):
        return f"Bearer {token}"
    return None


def build_annotator(config: AnnotatorConfig) -> Annotator:
    if config.kind == "in-process":
        overrides = {
            "top_k": config.top_k,
            "min_confidence": config.min_confidence or 0.0,
            "specification_labels": config.specification_labels,
        }
        classifier = load_classifier(config.classifier, config.classifiers_file, overrides=overrides)
        return InProcessAnnotator(classifier, config.threads)
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
        )
    )


def kafka_settings(config: KafkaConfig, bootstrap: str, embedded: bool) -> KafkaSettings:
    idempotence = config.enable_idempotence
    if idempotence is None:
        idempotence = not embedded  # Tansu rejects aiokafka's idempotent producer
    same_fields = config.model_dump(
        exclude={"bootstrap_servers", "enable_idempotence", "sasl_mechanism", "sasl_password_env"}
    )
    return KafkaSettings(
        bootstrap_servers=bootstrap,
        enable_idempotence=idempotence,
        sasl_mechanism=config.sasl_mechanism or "PLAIN",
        sasl_password=os.environ.get(config.sasl_password_env),
        **same_fields,
    )


NOT_SOURCE_SETTINGS = {"id", "uri", "fps", "every_nth", "max_side", "jpeg_quality"}  # identity, sampler, encoder


def source_settings(config: SourceConfig) -> SourceSettings:
    try:
        return SourceSettings(**config.model_dump(exclude=NOT_SOURCE_SETTINGS))
    except ValueError as exc:
        raise ConfigError(f"source {config.id}: {exc}") from None


@contextlib.asynccontextmanager
async def kafka_bootstrap(config: KafkaConfig, console: Console) -> AsyncIterator[str]:
    """The bootstrap address; `embedded` starts a Tansu broker for the length of the run."""
    if config.bootstrap_servers != EMBEDDED:
        yield config.bootstrap_servers
        return
    async with EmbeddedBroker() as broker:
        console.print(f"embedded Kafka broker (Tansu) on {broker.address}; it stops with this run")
        yield broker.address


async def run_job(config: RunConfig, console: Console) -> int:
    sources = [open_source(c.id, c.uri, source_settings(c)) for c in config.sources]
    progress = ProgressDisplay()
    for source in sources:
        if source.policy is DeliveryPolicy.REPLAY:
            progress.add(source.source_id, source.total_frames)
    reports = RunReports(sources, progress)
    lanes = [
        Lane(
            source=source,
            sampling=SamplingSettings(fps=c.fps, every_nth=c.every_nth),
            encoding=EncoderSettings(quality=c.jpeg_quality, max_side=c.max_side),
            report=reports.by_source[source.source_id],
        )
        for source, c in zip(sources, config.sources, strict=True)
    ]
    annotator = build_annotator(config.annotator)
    started = time.monotonic()
    try:
        if isinstance(annotator, GrpcAnnotator):
            await annotator.wait_until_reachable(config.annotator.retry_for_seconds)
        async with kafka_bootstrap(config.kafka, console) as bootstrap:
            embedded = config.kafka.bootstrap_servers == EMBEDDED
            publisher = Publisher(kafka_settings(config.kafka, bootstrap, embedded), on_published=reports.on_published)
            await publisher.start()
            runner = Runner(lanes, annotator, publisher, config.frames_in_flight)
            settle_heap()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, _stop_on_signal, runner, sig)
            kinds = ", ".join(f"{s.source_id} ({s.policy.value})" for s in sources)
            log.info("running %s → %s → kafka %s topic %s", kinds, annotator.description, bootstrap, config.kafka.topic)
            try:
                with progress:
                    await runner.run()
            except PublishError as exc:
                log.error("%s", exc)
                return 1
            finally:
                await publisher.stop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
    finally:
        await annotator.close()
        console.print(summary_table(reports, time.monotonic() - started))
    failed_sources = [report for report in reports.by_source.values() if report.error]
    return 1 if len(failed_sources) == len(sources) else 0


def _stop_on_signal(runner: Runner, sig: signal.Signals) -> None:
    log.info("%s: stopping capture, finishing the frames in flight", sig.name)
    runner.stop()
