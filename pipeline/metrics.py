"""`framelabel run`'s Prometheus metrics (README, "Monitor").

Counts are read from the run's own reports at scrape time, so a scrape and the summary can never
disagree and the frame path does no bookkeeping twice; timings go into histograms as they are
measured (the run's `Observer`). Every series carries at most the source id and a fixed set of
values (stage, cause, status code): no label grows without bound.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.publisher import Publisher
from pipeline.report import RunReports, SourceState, Stage

# seconds: a stage takes milliseconds, capture→published up to seconds when Kafka or the service is slow
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
UP_STATES = (SourceState.LIVE, SourceState.REPLAYING)


class PipelineMetrics:
    """The registry a run's `/metrics` serves; watch the reports and the publisher once they exist."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._stage_seconds = Histogram(
            "framelabel_stage_seconds",
            "Time a frame spent in each stage: decode (reader CPU), encode, annotate, kafka_ack",
            ["source", "stage"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._capture_to_published = Histogram(
            "framelabel_capture_to_published_seconds",
            "From a frame's capture to Kafka's acknowledgement of its record",
            ["source"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._grpc_calls = Counter(
            "framelabel_grpc_client_calls",
            "Annotate calls to the gRPC service, by status code",
            ["code"],
            registry=self.registry,
        )
        self._grpc_seconds = Histogram(
            "framelabel_grpc_client_call_seconds",
            "Duration of one Annotate call",
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._collector = _RunCollector()
        self.registry.register(self._collector)

    def watch(self, reports: RunReports) -> None:
        self._collector.reports = reports
        for source_id in reports.by_source:  # every series exists from the start, at zero
            self._capture_to_published.labels(source_id)
            for stage in Stage:
                self._stage_seconds.labels(source_id, stage.value)

    def watch_publisher(self, publisher: Publisher) -> None:
        self._collector.publisher = publisher

    # the run's Observer
    def stage(self, source_id: str, stage: Stage, seconds: float) -> None:
        self._stage_seconds.labels(source_id, stage.value).observe(seconds)

    def published(self, source_id: str, capture_to_published_s: float) -> None:
        self._capture_to_published.labels(source_id).observe(capture_to_published_s)

    # the gRPC annotator's CallObserver
    def grpc_call(self, code: str, seconds: float) -> None:
        self._grpc_calls.labels(code).inc()
        self._grpc_seconds.observe(seconds)


class _RunCollector(Collector):
    def __init__(self) -> None:
        self.reports: RunReports | None = None
        self.publisher: Publisher | None = None

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        if self.reports is not None:
            yield from _source_families(self.reports)
        if self.publisher is not None:
            publisher = self.publisher
            yield GaugeMetricFamily(
                "framelabel_kafka_records_unsettled",
                "Records handed to Kafka, not yet acknowledged or lost",
                value=publisher.unsettled,
            )
            yield CounterMetricFamily(
                "framelabel_kafka_resends", "Records sent again after a failed delivery", value=publisher.stats.retried
            )
            yield CounterMetricFamily(
                "framelabel_kafka_delivery_failures",
                "Records Kafka never acknowledged (lost)",
                value=publisher.stats.lost,
            )


def _source_families(reports: RunReports) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    def counter(name: str, documentation: str) -> CounterMetricFamily:
        return CounterMetricFamily(name, documentation, labels=["source"])

    read = counter("framelabel_frames_read", "Frames read from the source")
    sampled = counter("framelabel_frames_sampled", "Frames kept by the sampler")
    annotated = counter("framelabel_frames_annotated", "Frames annotated")
    published = counter("framelabel_frames_published", "Records acknowledged by Kafka")
    failed = counter("framelabel_frames_failed", "Frames that could not be encoded or annotated")
    reconnects = counter("framelabel_source_reconnects", "Times a camera was reopened")
    dropped = CounterMetricFamily(
        "framelabel_frames_dropped",
        "Frames not published, by cause: stale (a live frame replaced by a newer one), unavailable "
        "(a live frame skipped while the Annotate service was away), lost (Kafka never acknowledged it)",
        labels=["source", "cause"],
    )
    up = GaugeMetricFamily("framelabel_source_up", "1 while the source delivers frames", labels=["source"])
    age = GaugeMetricFamily(
        "framelabel_source_last_published_age_seconds",
        "Seconds since the capture of the source's last published frame",
        labels=["source"],
    )
    now = time.monotonic()
    for source_id, report in reports.by_source.items():
        stats = report.source_stats
        read.add_metric([source_id], stats.read)
        sampled.add_metric([source_id], report.sampled)
        annotated.add_metric([source_id], report.annotated)
        published.add_metric([source_id], report.published)
        failed.add_metric([source_id], report.failed)
        reconnects.add_metric([source_id], stats.reconnects)
        dropped.add_metric([source_id, "stale"], stats.dropped)
        dropped.add_metric([source_id, "unavailable"], report.unavailable)
        dropped.add_metric([source_id, "lost"], report.lost)
        up.add_metric([source_id], 1.0 if report.state in UP_STATES else 0.0)
        if (last := report.last_published) is not None:
            age.add_metric([source_id], now - last.captured_at)
    yield from (read, sampled, annotated, published, failed, dropped, reconnects, up, age)
