"""What a run counts per source, the live progress display, and the summary at the end."""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from rich.console import Console, Group, RenderableType
from rich.progress import Progress, ProgressColumn, Task, TextColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from pipeline.frames import AnnotatedFrame, DeliveryPolicy, FrameInfo
from pipeline.sources import Source, SourceStats

LATENCY_WINDOW = 10_000  # the most recent latencies kept per source: bounded memory on endless runs
FPS_WINDOW_S = 5.0  # a source's current fps: frames published over the last few seconds
RECENT_FRAMES = 8  # per source, for the live view: a few seconds of a sampled camera, a moment of a replay


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
    moved: int = 0  # annotated, not published here: the source moved to another worker of the group
    error: str | None = None  # why the source stopped early, if it did
    ended: bool = False  # its lane is over
    # the last frames Kafka acknowledged, newest last: a page showing one frame's labels then fetches
    # that frame's image, even if a newer one came meanwhile
    recent: deque[AnnotatedFrame] = field(default_factory=lambda: deque(maxlen=RECENT_FRAMES))
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
            self.recent.append(frame)

    @property
    def latest(self) -> AnnotatedFrame | None:
        return self.recent[-1] if self.recent else None

    def recent_frame(self, index: int) -> AnnotatedFrame | None:
        return next((frame for frame in self.recent if frame.info.index == index), None)

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
        # a copy first: the terminal's display reads this from its own thread while the event loop appends,
        # and list() of a deque is one step under the GIL where a Python loop over it is not
        published_at = list(self.published_at)
        if not published_at:
            return 0.0
        now = time.monotonic()
        span = min(FPS_WINDOW_S, now - published_at[0])  # shorter at the start of a run
        recent = sum(1 for at in published_at if now - at <= span)
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
    """Every source's progress, redrawn on stderr ten times a second when it is a terminal.

    A replay shows a bar of frames published out of those expected; a live source its state,
    fps, capture→published latency, drops and reconnects. The columns read the reports as they
    draw, so a camera that goes away shows as reconnecting without any frame arriving."""

    def __init__(self, console: Console | None = None) -> None:
        console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            _ReplayBar(),
            _SourceStatus(),
            console=console,
            disable=not console.is_terminal,
            transient=True,
        )

    def add(self, report: SourceReport, total: int | None) -> None:
        self._progress.add_task(report.source_id, total=total, report=report, started=time.monotonic())

    def __enter__(self) -> ProgressDisplay:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()


class _ReplayBar(ProgressColumn):
    """Frames published out of those expected; nothing for a live source, which has no end."""

    def render(self, task: Task) -> RenderableType:
        report: SourceReport = task.fields["report"]
        if report.policy is DeliveryPolicy.LIVE:
            return Text("")
        return ProgressBar(total=task.total, completed=report.published, width=20)


class _SourceStatus(ProgressColumn):
    def render(self, task: Task) -> Text:
        report: SourceReport = task.fields["report"]
        p50 = report.latency_percentile(50)
        latency = "-" if p50 is None else f"{p50:.0f} ms"
        if report.policy is DeliveryPolicy.REPLAY:
            total = "?" if task.total is None else f"{task.total:.0f}"
            return Text(f"{report.published}/{total} {report.fps():6.1f} fps  p50 {latency}")
        stats = report.source_stats
        return Text(
            f"{report.state.value:<12} {report.fps():5.1f} fps  p50 {latency}  drops {report.dropped}  "
            f"reconnects {stats.reconnects}"
        )


class RunReports:
    """Every source's report, updated as Kafka acknowledges records (a publisher's `DeliveryReport`)."""

    def __init__(self, sources: list[Source], observer: Observer | None = None) -> None:
        self._observer = observer or _Unobserved()
        self.by_source: dict[str, SourceReport] = {}
        for source in sources:
            self.add(source)
        self.started = False  # the stages are up and the sources capturing
        self.first_captured_at: float | None = None  # time.monotonic() of the earliest frame published
        self.last_published_at: float | None = None

    def add(self, source: Source) -> SourceReport:
        """A new report for a source that starts now (a worker's new source; one that came back starts afresh)."""
        report = SourceReport(source.source_id, source.stats, source.policy, self._observer)
        self.by_source[source.source_id] = report
        return report

    def lost(self, frames: Sequence[AnnotatedFrame], reason: str) -> None:
        for frame in frames:
            self.by_source[frame.info.source_id].lost += 1

    def moved(self, frames: Sequence[AnnotatedFrame]) -> None:
        for frame in frames:
            self.by_source[frame.info.source_id].moved += 1

    def published(self, frame: AnnotatedFrame, acked_in_s: float) -> None:
        report = self.by_source[frame.info.source_id]
        report.observe(Stage.KAFKA_ACK, acked_in_s)
        report.record_published(frame)
        captured_at = frame.info.captured_at
        if self.first_captured_at is None or captured_at < self.first_captured_at:
            self.first_captured_at = captured_at
        self.last_published_at = time.monotonic()

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


SUMMARY_COLUMNS = (
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
WIDE_SUMMARY = 130  # columns the table needs before it starts to squeeze its headers


def summary(reports: RunReports, elapsed_s: float, width: int) -> RenderableType:
    """The table at the end of a run; on a narrow terminal one block per source, the resume point whole."""
    rows = [_summary_row(report) for report in reports.by_source.values()]
    title = reports.title(elapsed_s)
    if width >= WIDE_SUMMARY:
        table = Table(title=title, title_justify="left")
        for column in SUMMARY_COLUMNS:
            table.add_column(column, justify="left" if column in ("source", "last_published") else "right")
        for row in rows:
            table.add_row(*row)
        return table
    lines = [Text(title)]
    for row in rows:
        values = dict(zip(SUMMARY_COLUMNS, row, strict=True))
        frames, losses = (
            "  ".join(f"{column} {values[column]}" for column in columns)
            for columns in (SUMMARY_COLUMNS[1:5], SUMMARY_COLUMNS[5:9])
        )
        lines += [
            Text(values["source"], style="bold"),
            Text(f"  {frames}"),
            Text(f"  {losses}"),
            Text(f"  latency p50 {values['p50_ms']} ms, p95 {values['p95_ms']} ms"),
            Text(f"  last published: {values['last_published']}", no_wrap=True, overflow="ignore"),
        ]
    return Group(*lines)


def _summary_row(report: SourceReport) -> tuple[str, ...]:
    stats = report.source_stats
    p50, p95 = report.latency_percentile(50), report.latency_percentile(95)
    return (
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
