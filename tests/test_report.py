"""What a run shows: its sources' states, the live status in the terminal, the summary at any width, its waits."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest
from rich.console import Console

from pipeline.frames import DeliveryPolicy
from pipeline.report import ProgressDisplay, RunReports, SourceReport, SourceState, summary
from pipeline.retry import saying_while_waiting
from pipeline.sources import SourceSettings, open_source
from tests.kafka import annotated_frame


def reports_of(*sources: tuple[str, str]) -> RunReports:
    return RunReports([open_source(source_id, uri, SourceSettings()) for source_id, uri in sources])


def test_a_camera_is_starting_then_live_then_reconnecting() -> None:
    camera = SourceReport("gate", policy=DeliveryPolicy.LIVE)
    assert camera.state is SourceState.STARTING
    camera.source_stats.streaming = True
    assert camera.state is SourceState.LIVE
    camera.source_stats.streaming, camera.source_stats.reconnects = False, 1
    assert camera.state is SourceState.RECONNECTING
    camera.error = "gave up"
    assert camera.state is SourceState.FAILED


def test_a_replay_is_replaying_until_its_lane_ends() -> None:
    replay = SourceReport("clip")
    replay.source_stats.read = 1
    assert replay.state is SourceState.REPLAYING
    replay.ended = True
    assert replay.state is SourceState.ENDED


def test_the_summary_is_a_table_when_wide_and_blocks_when_narrow() -> None:
    reports = reports_of(("a-rather-long-source-name", "clip.mp4"), ("gate", "rtsp://127.0.0.1:1/cam"))
    reports.published(annotated_frame("a-rather-long-source-name", 41, media_position_ms=1640.0), 0.01)
    wide, narrow = render(summary(reports, 3.0, 160), 160), render(summary(reports, 3.0, 80), 80)
    assert "┃ source" in wide
    assert "frame 41 @ 1640.000 ms" in wide
    assert max(len(line) for line in narrow.splitlines()) <= 80
    assert "  last published: frame 41 @ 1640.000 ms" in narrow.splitlines()
    assert "  read 0  sampled 0  annotated 0  published 1" in narrow.splitlines()


def test_the_live_status_shows_a_cameras_state_and_a_replays_progress() -> None:
    reports = reports_of(("clip", "clip.mp4"), ("gate", "rtsp://127.0.0.1:1/cam"))
    reports.by_source["gate"].source_stats.reconnects = 3
    console = Console(file=io.StringIO(), width=100, force_terminal=True)
    display = ProgressDisplay(console)
    display.add(reports.by_source["clip"], 132)
    display.add(reports.by_source["gate"], None)
    with display:
        pass  # stopping draws it one last time
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "0/132" in shown
    assert "reconnecting" in shown
    assert "reconnects 3" in shown


def render(renderable: object, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


async def test_a_wait_at_start_says_how_long_it_has_waited(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("framelabel.test")
    caplog.set_level(logging.INFO, logger="framelabel.test")
    said = asyncio.Event()
    log.addFilter(lambda record: said.set() or True)
    async with saying_while_waiting(log, "the service at 127.0.0.1:1", 10, every_s=0.01):
        await asyncio.wait_for(said.wait(), 10)
    assert "still waiting for the service at 127.0.0.1:1 (0 s of 10)" in caplog.text
