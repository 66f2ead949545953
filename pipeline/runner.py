"""Runs every source's lane at once: source → sampler → encoder → annotator → publisher.

Each source has its own lane. Its frames are encoded and annotated
concurrently (up to `frames_in_flight` at a time, bounded), but handed to the
publisher strictly in capture order, so one source's records reach Kafka in
frame order. A full lane makes the capture loop wait: replay sources then slow
down (lossless), live sources drop stale frames at the camera (freshest).
"""

from __future__ import annotations

import asyncio
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipeline.annotators import Annotator
from pipeline.encoder import EncoderSettings, encode
from pipeline.frames import AnnotatedFrame, DeliveryPolicy, Frame
from pipeline.publisher import Publisher
from pipeline.report import SourceReport
from pipeline.sampler import Sampler, SamplingSettings
from pipeline.sources import Source, SourceError
from services.errors import AnnotatorError, AnnotatorUnavailable, InvalidImageError

log = logging.getLogger("framelabel.run")

UNAVAILABLE_BACKOFF_MAX_S = 10.0


@dataclass
class Lane:
    """One source and the per-source stages that follow it."""

    source: Source
    sampling: SamplingSettings
    encoding: EncoderSettings
    report: SourceReport


class Runner:
    def __init__(
        self,
        lanes: list[Lane],
        annotator: Annotator,
        publisher: Publisher,
        frames_in_flight: int = 4,
        encode_threads: int = 2,
    ) -> None:
        self.lanes = lanes
        self._annotator = annotator
        self._publisher = publisher
        self._frames_in_flight = frames_in_flight
        self._encode_pool = ThreadPoolExecutor(encode_threads, thread_name_prefix="encode")
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Stop capturing; frames already captured are still annotated and published."""
        self._stopping.set()

    async def run(self) -> None:
        """Until every replay source has ended (and live ones are stopped), then flush the publisher."""
        closer = asyncio.create_task(self._close_sources_on_stop(), name="close-sources")
        try:
            async with asyncio.TaskGroup() as lanes:
                for lane in self.lanes:
                    lanes.create_task(self._run_lane(lane), name=f"lane-{lane.report.source_id}")
        finally:
            closer.cancel()
            self._encode_pool.shutdown(wait=False)
        await self._publisher.flush()

    async def _close_sources_on_stop(self) -> None:
        await self._stopping.wait()
        await asyncio.gather(*(lane.source.close() for lane in self.lanes))

    async def _run_lane(self, lane: Lane) -> None:
        in_order: asyncio.Queue[asyncio.Task[AnnotatedFrame | None] | None] = asyncio.Queue(self._frames_in_flight)
        publishing = asyncio.create_task(
            self._publish_in_order(lane, in_order), name=f"publish-{lane.source.source_id}"
        )
        sampler = Sampler(lane.sampling)
        try:
            async for frame in lane.source.frames():
                if not sampler.keep(frame.info):
                    continue
                lane.report.sampled += 1
                name = f"frame-{frame.info.source_id}-{frame.info.index}"
                await in_order.put(asyncio.create_task(self._annotate(lane, frame), name=name))
        except SourceError as exc:
            lane.report.error = str(exc)
            log.error("source %s: %s", lane.source.source_id, exc)
        except Exception as exc:
            # a bug in one lane must not take the other sources down with it
            lane.report.error = f"internal error: {exc!r}"
            log.exception("source %s stopped by an internal error", lane.source.source_id)
        finally:
            await in_order.put(None)
            await publishing
            await lane.source.close()

    async def _publish_in_order(
        self, lane: Lane, in_order: asyncio.Queue[asyncio.Task[AnnotatedFrame | None] | None]
    ) -> None:
        while (pending := await in_order.get()) is not None:
            try:
                annotated = await pending
            except Exception:
                lane.report.failed += 1
                log.exception("source %s: frame lost to an internal error", lane.source.source_id)
                continue
            if annotated is not None:
                await self._publisher.publish(annotated)

    async def _annotate(self, lane: Lane, frame: Frame) -> AnnotatedFrame | None:
        """The annotated frame, or None when it cannot be annotated (counted and logged)."""
        loop = asyncio.get_running_loop()
        report = lane.report
        try:
            encoded = await loop.run_in_executor(self._encode_pool, encode, frame, lane.encoding)
        except ValueError as exc:
            report.failed += 1
            log.warning("source %s frame %d: cannot encode: %s", report.source_id, frame.info.index, exc)
            return None
        backoff = 0.5
        live = lane.source.policy is DeliveryPolicy.LIVE
        while True:
            try:
                # a live frame is not worth waiting for: the next one is fresher
                response = await self._annotator.annotate(encoded.request, patient=not live)
            except InvalidImageError as exc:
                report.failed += 1
                log.warning("source %s frame %d: INVALID_ARGUMENT: %s", report.source_id, frame.info.index, exc)
                return None
            except AnnotatorUnavailable as exc:
                if live or self._stopping.is_set():
                    report.failed += 1
                    log.warning("source %s frame %d: not annotated: %s", report.source_id, frame.info.index, exc)
                    return None
                # a replay loses nothing: wait for the annotator to come back
                log.warning("source %s: annotator unavailable, retrying in %.0fs: %s", report.source_id, backoff, exc)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
                backoff = min(backoff * 2, UNAVAILABLE_BACKOFF_MAX_S)
                continue
            except AnnotatorError as exc:
                report.failed += 1
                log.warning("source %s frame %d: %s", report.source_id, frame.info.index, exc)
                return None
            report.annotated += 1
            return AnnotatedFrame(info=encoded.info, response=response, width=encoded.width, height=encoded.height)
