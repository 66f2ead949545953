"""Lanes under failure: a real image-folder source, an annotator and a producer that fail chosen calls.

A lane that fails ends with one error naming its source and frame; the other lanes go on; nothing hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import simplejpeg

from pipeline.encoder import EncoderSettings
from pipeline.kafka import KafkaSettings
from pipeline.publisher import Publisher, PublishError
from pipeline.report import RunReports
from pipeline.runner import Lane, Runner
from pipeline.sampler import SamplingSettings
from pipeline.sources import SourceSettings, open_source
from services.api.image_classifier_pb2 import AnnotationRequest
from services.errors import AnnotatorUnavailable, InvalidImageError
from tests.helpers import within
from tests.scripted import AnnotateOutcome, ScriptedAnnotator, ScriptedProducer

FRAMES = 6
HANG_GUARD_S = 20.0


def frame_index(request: AnnotationRequest) -> int:
    """The frames are painted with grey level 10 × index (JPEG keeps a flat grey within ±2)."""
    pixels = simplejpeg.decode_jpeg(request.image.content)
    return round(float(pixels.mean()) / 10)


@pytest.fixture
def folders(tmp_path: Path) -> Callable[[str], str]:
    def folder(name: str) -> str:
        path = tmp_path / name
        path.mkdir()
        for index in range(FRAMES):
            cv2.imwrite(str(path / f"{index:03d}.png"), np.full((32, 32, 3), 10 * index, dtype=np.uint8))
        return str(path)

    return folder


async def run_lanes(
    folders: Callable[[str], str],
    outcome: AnnotateOutcome,
    producer: ScriptedProducer | None = None,
    **kafka: object,
) -> tuple[RunReports, ScriptedProducer]:
    """Two image-folder sources, `a` and `b`, through one scripted annotator into a scripted producer."""
    sources = [open_source(name, folders(name), SourceSettings()) for name in ("a", "b")]
    reports = RunReports(sources)
    lanes = [
        Lane(source, SamplingSettings(), EncoderSettings(), reports.by_source[source.source_id]) for source in sources
    ]
    producer = producer or ScriptedProducer()
    settings = KafkaSettings.model_validate({"bootstrap_servers": "unused:9092"} | kafka)
    annotator = ScriptedAnnotator(frame_index, outcome)
    async with (
        within(HANG_GUARD_S, "the lanes"),
        annotator,
        Publisher(settings, reports, producer=producer) as publisher,
    ):
        await Runner(lanes, annotator, publisher).run()
        with contextlib.suppress(PublishError):  # records lost: the reports count them
            await publisher.flush()
    return reports, producer


async def test_every_frame_of_both_lanes_is_published_in_order(folders: Callable[[str], str]) -> None:
    reports, producer = await run_lanes(folders, lambda index: None)
    assert producer.stored == {"a": list(range(FRAMES)), "b": list(range(FRAMES))}
    assert all(report.error is None and report.published == FRAMES for report in reports.by_source.values())


async def test_a_stage_that_raises_ends_its_lane_naming_the_frame(folders: Callable[[str], str]) -> None:
    def outcome(index: int) -> BaseException | None:
        return RuntimeError("a bug in the annotator") if index == 3 else None

    reports, producer = await run_lanes(folders, outcome)
    for source_id in ("a", "b"):  # both lanes meet frame 3, each ends there on its own
        report = reports.by_source[source_id]
        assert report.error == (
            f"source {source_id} frame 3: internal error while annotating: RuntimeError('a bug in the annotator')"
        )
        stored = producer.stored.get(source_id, [])  # frames 0–2 may still be in flight when frame 3 fails
        assert stored == list(range(len(stored)))  # in order, no gap
        assert len(stored) <= 3
        assert report.resume_hint == "source error (see the log)"


async def test_a_record_too_large_ends_its_lane_with_the_size_and_the_limit(folders: Callable[[str], str]) -> None:
    reports, producer = await run_lanes(folders, lambda index: None, max_request_bytes=200)
    for source_id in ("a", "b"):
        error = reports.by_source[source_id].error or ""
        assert error.startswith(f"the record of {source_id} frame 0 is ")
        assert error.endswith("bytes, more than kafka.max_request_bytes 200")
        assert reports.by_source[source_id].lost == 1  # the refused record is counted, not only logged
    assert producer.stored == {}


async def test_a_bad_frame_is_counted_and_skipped_and_the_lane_goes_on(folders: Callable[[str], str]) -> None:
    reports, producer = await run_lanes(
        folders, lambda index: InvalidImageError("cannot decode") if index == 2 else None
    )
    assert producer.stored == {"a": [0, 1, 3, 4, 5], "b": [0, 1, 3, 4, 5]}
    assert [(r.failed, r.error) for r in reports.by_source.values()] == [(1, None), (1, None)]


async def test_an_unavailable_annotator_stops_a_replay_at_the_frame_to_resume_from(
    folders: Callable[[str], str],
) -> None:
    outcome = lambda index: AnnotatorUnavailable("x:1: UNAVAILABLE for 60 s") if index == 4 else None  # noqa: E731
    reports, producer = await run_lanes(folders, outcome)
    for source_id in ("a", "b"):
        assert (
            reports.by_source[source_id].error
            == f"source {source_id} frame 4: not annotated: x:1: UNAVAILABLE for 60 s"
        )
        stored = producer.stored.get(source_id, [])
        assert stored == list(range(len(stored)))


async def test_a_publisher_whose_delivery_died_ends_the_lane_instead_of_hanging(folders: Callable[[str], str]) -> None:
    class DiesOnA(ScriptedProducer):
        async def send(self, topic: str, value: bytes, **record: object) -> asyncio.Future[object]:
            if record["key"] == b"a":
                raise RuntimeError("a bug in delivery")
            return await super().send(topic, value, **record)  # type: ignore[arg-type]

    reports, producer = await run_lanes(folders, lambda index: None, producer=DiesOnA())
    assert "internal error: RuntimeError('a bug in delivery')" in (reports.by_source["a"].error or "")
    assert reports.by_source["a"].lost >= 1  # counted, and the frames named in the log
    assert producer.stored == {"b": list(range(FRAMES))}
