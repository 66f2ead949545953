"""What a run counts per source, the live progress display, and the summary at the end."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.frames import AnnotatedFrame, FrameInfo
from pipeline.sources import Source, SourceStats

LATENCY_WINDOW = 10_000  # the most recent latencies kept per source: bounded memory on endless runs


@dataclass
class SourceReport:
    source_id: str
    source_stats: SourceStats = field(default_factory=SourceStats)
    sampled: int = 0
    annotated: int = 0
    handed_over: int = 0  # sampled frames done with the lane: given to the publisher, or failed
    published: int = 0  # acknowledged by Kafka
    failed: int = 0  # could not be encoded or annotated (a bad image, an annotator error)
    unavailable: int = 0  # LIVE: skipped while the annotator was unavailable (the next frame is fresher)
    lost: int = 0  # annotated, but Kafka never acknowledged the record
    error: str | None = None  # why the source stopped early, if it did
    last_published: FrameInfo | None = None
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def record_published(self, info: FrameInfo) -> None:
        self.published += 1
        self.latencies_ms.append((time.monotonic() - info.captured_at) * 1000.0)
        if self.last_published is None or info.index > self.last_published.index:
            self.last_published = info

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

    def __init__(self, sources: list[Source], progress: ProgressDisplay | None = None) -> None:
        self.by_source = {source.source_id: SourceReport(source.source_id, source.stats) for source in sources}
        self._progress = progress
        self.started = False  # the stages are up and the sources capturing
        self.first_captured_at: float | None = None  # time.monotonic() of the earliest frame published
        self.last_published_at: float | None = None

    def lost(self, frames: Sequence[AnnotatedFrame], reason: str) -> None:
        for frame in frames:
            self.by_source[frame.info.source_id].lost += 1

    def published(self, frame: AnnotatedFrame) -> None:
        report = self.by_source[frame.info.source_id]
        report.record_published(frame.info)
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
            str(stats.dropped + report.unavailable),
            str(report.failed),
            str(report.lost),
            str(stats.reconnects),
            "-" if p50 is None else f"{p50:.0f}",
            "-" if p95 is None else f"{p95:.0f}",
            report.resume_hint,
        )
    return table
