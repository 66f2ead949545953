"""What a run counts per source, the live progress display, and the summary at the end."""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.frames import AnnotatedFrame, DeliveryPolicy, FrameInfo
from pipeline.sources import Source, SourceStats

LATENCY_WINDOW = 10_000  # the most recent latencies kept per source: bounded memory on endless runs
FPS_WINDOW_S = 5.0  # a source's current fps: frames published over the last few seconds


class Stage(enum.StrEnum):
    """The steps of a frame's way whose time is measured (the `stage` label of the metrics)."""

    DECODE = "decode"
    ENCODE = "encode"
    ANNOTATE = "annotate"
    KAFKA_ACK = "kafka_ack"  # handed to the publisher → acknowledged by Kafka


class Observer(Protocol):
    """Where timings go as they are measured (the metrics); the report itself keeps only recent latencies."""

    def stage(self, source_id: str, stage: Stage, seconds: float) -> None: ...

    def published(self, source_id: str, capture_to_published_s: float) -> None: ...


class _Unobserved:
    def stage(self, source_id: str, stage: Stage, seconds: float) -> None:
        pass

    def published(self, source_id: str, capture_to_published_s: float) -> None:
        pass


class SourceState(enum.StrEnum):
    STARTING = "starting"  # no frame yet
    LIVE = "live"  # a camera delivering frames
    RECONNECTING = "reconnecting"  # a camera that stopped delivering, being reopened
    REPLAYING = "replaying"  # a file or folder being read
    ENDED = "ended"  # read to its end, or stopped
    FAILED = "failed"  # stopped early on an error


@dataclass
class SourceReport:
    source_id: str
    source_stats: SourceStats = field(default_factory=SourceStats)
    policy: DeliveryPolicy = DeliveryPolicy.REPLAY
    observer: Observer = field(default_factory=_Unobserved)
    sampled: int = 0
    annotated: int = 0
    handed_over: int = 0  # sampled frames done with the lane: given to the publisher, or failed
    published: int = 0  # acknowledged by Kafka
    failed: int = 0  # could not be encoded or annotated (a bad image, an annotator error)
    unavailable: int = 0  # LIVE: skipped while the annotator was unavailable (the next frame is fresher)
    lost: int = 0  # annotated, but Kafka never acknowledged the record
    error: str | None = None  # why the source stopped early, if it did
    ended: bool = False  # its lane is over
    latest: AnnotatedFrame | None = None  # the last frame Kafka acknowledged
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    published_at: deque[float] = field(default_factory=lambda: deque(maxlen=1024))  # time.monotonic() of each

    def observe(self, stage: Stage, seconds: float) -> None:
        self.observer.stage(self.source_id, stage, seconds)

    def record_published(self, frame: AnnotatedFrame) -> None:
        info, now = frame.info, time.monotonic()
        self.published += 1
        self.published_at.append(now)
        self.latencies_ms.append((now - info.captured_at) * 1000.0)
        self.observer.published(self.source_id, now - info.captured_at)
        if self.latest is None or info.index > self.latest.info.index:
            self.latest = frame

    @property
    def last_published(self) -> FrameInfo | None:
        return None if self.latest is None else self.latest.info

    @property
    def state(self) -> SourceState:
        if self.error is not None:
            return SourceState.FAILED
        if self.ended:
            return SourceState.ENDED
        if self.policy is DeliveryPolicy.REPLAY:
            return SourceState.REPLAYING if self.source_stats.read else SourceState.STARTING
        if self.source_stats.streaming:
            return SourceState.LIVE
        return SourceState.RECONNECTING if self.source_stats.reconnects else SourceState.STARTING

    @property
    def dropped(self) -> int:
        """Frames not annotated to keep a live source fresh: stale at the camera, or while the annotator was away."""
        return self.source_stats.dropped + self.unavailable

    def fps(self) -> float:
        """Frames published per second over the last `FPS_WINDOW_S`."""
        if not self.published_at:
            return 0.0
        now = time.monotonic()
        span = min(FPS_WINDOW_S, now - self.published_at[0])  # shorter at the start of a run
        recent = sum(1 for at in self.published_at if now - at <= span)
        return recent / span if span > 0 else 0.0

    def latency_percentile(self, percent: float) -> float | None:
        if not self.latencies_ms:
            return None
        return float(np.percentile(np.fromiter(self.latencies_ms, dtype=np.float64), percent))

    @property
    def resume_hint(self) -> str:
        if self.error is not None:
            return "source error (see the log)"
        info = self.last_published
        if info is None:
            return "-"
        if info.media_position_ms is not None:  # in the unit `start_ms` takes, to resume from here
            return f"frame {info.index} @ {info.media_position_ms:.3f} ms"
        return f"frame {info.index}"


class ProgressDisplay:
    """Frames published / expected and fps per replay source, redrawn on stderr when it is a terminal."""

    def __init__(self, console: Console | None = None) -> None:
        console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[fps]:>6.1f} fps"),
            TimeElapsedColumn(),
            console=console,
            disable=not console.is_terminal,
            transient=True,
        )
        self._tasks: dict[str, tuple[TaskID, float]] = {}

    def add(self, source_id: str, total: int | None) -> None:
        task = self._progress.add_task(source_id, total=total, fps=0.0)
        self._tasks[source_id] = (task, time.monotonic())

    def update(self, report: SourceReport) -> None:
        if report.source_id not in self._tasks:
            return
        task, started = self._tasks[report.source_id]
        fps = report.published / max(time.monotonic() - started, 1e-6)
        self._progress.update(task, completed=report.published, fps=fps)

    def __enter__(self) -> ProgressDisplay:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()


class RunReports:
    """Every source's report, updated as Kafka acknowledges records (a publisher's `DeliveryReport`)."""

    def __init__(
        self, sources: list[Source], progress: ProgressDisplay | None = None, observer: Observer | None = None
    ) -> None:
        observer = observer or _Unobserved()
        self.by_source = {
            source.source_id: SourceReport(source.source_id, source.stats, source.policy, observer)
            for source in sources
        }
        self._progress = progress
        self.started = False  # the stages are up and the sources capturing
        self.first_captured_at: float | None = None  # time.monotonic() of the earliest frame published
        self.last_published_at: float | None = None

    def lost(self, frames: Sequence[AnnotatedFrame], reason: str) -> None:
        for frame in frames:
            self.by_source[frame.info.source_id].lost += 1

    def published(self, frame: AnnotatedFrame, acked_in_s: float) -> None:
        report = self.by_source[frame.info.source_id]
        report.observe(Stage.KAFKA_ACK, acked_in_s)
        report.record_published(frame)
        captured_at = frame.info.captured_at
        if self.first_captured_at is None or captured_at < self.first_captured_at:
            self.first_captured_at = captured_at
        self.last_published_at = time.monotonic()
        if self._progress is not None:
            self._progress.update(report)

    def title(self, elapsed_s: float) -> str:
        """Throughput over the processing itself: first capture to last acknowledgement."""
        published = sum(report.published for report in self.by_source.values())
        if self.first_captured_at is None or self.last_published_at is None:
            return f"framelabel run: 0 frames, {elapsed_s:.1f}s in all"
        span = max(self.last_published_at - self.first_captured_at, 1e-6)
        return (
            f"framelabel run: {published} frames in {span:.2f}s ({published / span:.1f} frames/s), "
            f"{elapsed_s:.1f}s in all"
        )


def summary_table(reports: RunReports, elapsed_s: float) -> Table:
    table = Table(title=reports.title(elapsed_s), title_justify="left")
    columns = (
        "source",
        "read",
        "sampled",
        "annotated",
        "published",
        "dropped",
        "failed",
        "lost",
        "reconnects",
        "p50_ms",
        "p95_ms",
        "last_published",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("source", "last_published") else "right")
    for report in reports.by_source.values():
        stats = report.source_stats
        p50, p95 = report.latency_percentile(50), report.latency_percentile(95)
        table.add_row(
            report.source_id,
            str(stats.read),
            str(report.sampled),
            str(report.annotated),
            str(report.published),
            str(report.dropped),
            str(report.failed),
            str(report.lost),
            str(stats.reconnects),
            "-" if p50 is None else f"{p50:.0f}",
            "-" if p95 is None else f"{p95:.0f}",
            report.resume_hint,
        )
    return table
