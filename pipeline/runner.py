"""Runs every source's lane at once: source → sampler → encoder → annotator → publisher.

Each source has its own lane, and each lane is one task group: the capture
loop, the frames being encoded and annotated (up to `frames_in_flight` at a
time, bounded), and the task that hands them to the publisher strictly in
capture order, so one source's records reach Kafka in frame order. A full lane
makes the capture loop wait: replay sources then slow down (lossless), live
sources drop stale frames at the camera (freshest).

A worker adds and stops lanes while the runner runs (`start_lane`, `stop_lane`):
stopping one closes its source and lets its frames in flight finish, as a stop
signal does for all of them.

A lane ends when its source does, or with an error that names the source and
the frame: the source failed, a record could not be published, the annotator
stayed unavailable for a replay frame, or an internal error. Its report says
why and the other lanes go on. A frame that cannot be annotated (a bad image,
a live frame while the annotator is unavailable) is counted and skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline.annotators import Annotator
from pipeline.encoder import EncoderSettings, encode
from pipeline.frames import AnnotatedFrame, DeliveryPolicy, Frame
from pipeline.publisher import Publisher, PublishError
from pipeline.report import SourceReport, Stage
from pipeline.sampler import Sampler, SamplingSettings
from pipeline.sources import Source, SourceError
from services.errors import AnnotatorError, AnnotatorUnavailable, FramelabelError, InvalidImageError

log = logging.getLogger("framelabel.run")

FrameQueue = asyncio.Queue[asyncio.Task[AnnotatedFrame | None] | None]


class LaneError(FramelabelError):
    """A lane stopped early; the message names its source and the frame."""

    def __init__(self, source_id: str, frame_index: int, problem: str) -> None:
        super().__init__(f"source {source_id} frame {frame_index}: {problem}")


@dataclass
class Lane:
    """One source and the per-source stages that follow it."""

    source: Source
    sampling: SamplingSettings
    encoding: EncoderSettings
    report: SourceReport
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # set: capture no more, finish what is in flight


class Runner:
    def __init__(
        self,
        lanes: list[Lane],
        annotator: Annotator,
        publisher: Publisher,
        frames_in_flight: int = 4,
        encode_threads: int = 2,
        on_end: Callable[[Lane], Awaitable[None]] | None = None,
    ) -> None:
        """`on_end`: awaited when a lane has ended (its frames handed to the publisher, or its error set)."""
        self.lanes = lanes
        self._on_end = on_end
        self._annotator = annotator
        self._publisher = publisher
        self._frames_in_flight = frames_in_flight
        self._encode_threads = encode_threads
        self._stopping = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._encode_pool: ThreadPoolExecutor | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def stop(self) -> None:
        """Stop capturing; frames already captured are still annotated and published."""
        self._stopping.set()
        for lane in self.lanes:
            lane.stopping.set()

    def start_lane(self, lane: Lane) -> None:
        """Run one more lane, beside the others (before `run()`, it starts with the others)."""
        self.lanes.append(lane)
        if self._group is None or self._encode_pool is None:
            return
        self._launch(lane, self._group, self._encode_pool)

    def _launch(self, lane: Lane, group: asyncio.TaskGroup, encode_pool: ThreadPoolExecutor) -> None:
        if self._stopping.is_set():
            lane.stopping.set()
        name = f"lane-{lane.report.source_id}"
        self._tasks[lane.report.source_id] = group.create_task(self._run_lane(lane, encode_pool), name=name)

    async def stop_lane(self, source_id: str) -> None:
        """Stop capturing one source and wait until its frames in flight are handed to the publisher."""
        lane = next(lane for lane in self.lanes if lane.report.source_id == source_id)
        lane.stopping.set()
        task = self._tasks.pop(source_id, None)
        if task is not None:
            await asyncio.wait([task])
        self.lanes.remove(lane)

    @property
    def frames_in_flight(self) -> int:
        """Frames captured and sampled but not yet handed to the publisher."""
        return sum(lane.report.sampled - lane.report.handed_over for lane in self.lanes)

    async def run(self, until_stopped: bool = False) -> None:
        """Until every lane has ended: replays at their end, cameras when stopped, any lane on its error.

        `until_stopped`: until `stop()` and the end of every lane, however many lanes come and go."""
        with ThreadPoolExecutor(self._encode_threads, thread_name_prefix="encode") as encode_pool:
            async with asyncio.TaskGroup() as group:
                self._group, self._encode_pool = group, encode_pool
                try:
                    for lane in self.lanes:
                        self._launch(lane, group, encode_pool)
                    if until_stopped:
                        await self._stopping.wait()
                finally:
                    self._group = None
        self._tasks.clear()

    async def _run_lane(self, lane: Lane, encode_pool: ThreadPoolExecutor) -> None:
        source_id = lane.report.source_id
        try:
            async with lane.source, asyncio.TaskGroup() as stages:
                closer = stages.create_task(self._close_on_stop(lane), name=f"close-{source_id}")
                in_order: FrameQueue = asyncio.Queue(self._frames_in_flight)
                stages.create_task(self._publish_in_order(lane, in_order), name=f"publish-{source_id}")
                await self._capture(lane, in_order, stages, encode_pool)
                closer.cancel()
        except* FramelabelError as failures:
            error = failures.exceptions[0]
            lane.report.error = str(error)
            # an expected failure is one line; one caused by a bug carries the bug's traceback
            bug = error.__cause__ if not isinstance(error.__cause__, FramelabelError | None) else None
            log.error("%s", error, exc_info=bug)
        except* Exception as failures:  # a bug outside any frame: this lane ends, the others go on
            lane.report.error = f"source {source_id}: internal error: {failures.exceptions[0]!r}"
            log.error("%s", lane.report.error, exc_info=failures.exceptions[0])
        finally:
            lane.report.ended = True
        if self._on_end is not None:
            await self._on_end(lane)

    async def _close_on_stop(self, lane: Lane) -> None:
        await lane.stopping.wait()
        await lane.source.close()  # ends its frames(): the capture loop finishes, the frames in flight go on

    async def _capture(
        self, lane: Lane, in_order: FrameQueue, stages: asyncio.TaskGroup, encode_pool: ThreadPoolExecutor
    ) -> None:
        sampler = Sampler(lane.sampling)
        try:
            async for frame in lane.source.frames():
                lane.report.observe(Stage.DECODE, frame.info.decode_seconds)
                if not sampler.keep(frame.info):
                    continue
                lane.report.sampled += 1
                name = f"frame-{frame.info.source_id}-{frame.info.index}"
                await in_order.put(stages.create_task(self._annotate(lane, frame, encode_pool), name=name))
        except SourceError as exc:  # what was captured before it is still published
            lane.report.error = str(exc)
            log.error("source %s: %s", lane.source.source_id, exc)
        await in_order.put(None)

    async def _publish_in_order(self, lane: Lane, in_order: FrameQueue) -> None:
        while (pending := await in_order.get()) is not None:
            annotated = await pending
            if annotated is not None:
                try:
                    await self._publisher.publish(annotated)
                except PublishError:
                    lane.report.lost += 1  # refused: it will never reach Kafka
                    raise
            lane.report.handed_over += 1

    async def _annotate(self, lane: Lane, frame: Frame, encode_pool: ThreadPoolExecutor) -> AnnotatedFrame | None:
        """The annotated frame, or None when it cannot be annotated (counted and logged)."""
        report, index = lane.report, frame.info.index
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            encoded = await loop.run_in_executor(encode_pool, encode, frame, lane.encoding, self._annotator.input_size)
        except ValueError as exc:
            report.failed += 1
            log.warning("source %s frame %d: cannot encode: %s", report.source_id, index, exc)
            return None
        encoded_at = time.monotonic()
        report.observe(Stage.ENCODE, encoded_at - started)
        live = lane.source.policy is DeliveryPolicy.LIVE
        try:
            # a live frame is not worth waiting for: the next one is fresher
            response = await self._annotator.annotate(encoded.request, patient=not (live or lane.stopping.is_set()))
        except InvalidImageError as exc:
            report.failed += 1
            log.warning("source %s frame %d: INVALID_ARGUMENT: %s", report.source_id, index, exc)
            return None
        except AnnotatorUnavailable as exc:
            if not live:  # a replay skips no frame: it stops here, to be resumed from this frame
                raise LaneError(report.source_id, index, f"not annotated: {exc}") from None
            report.unavailable += 1  # dropped like any stale live frame: the next one is fresher
            log.warning("source %s frame %d: not annotated: %s", report.source_id, index, exc)
            return None
        except AnnotatorError as exc:
            report.failed += 1
            log.warning("source %s frame %d: %s", report.source_id, index, exc)
            return None
        except FramelabelError:
            raise
        except Exception as exc:
            raise LaneError(report.source_id, index, f"internal error while annotating: {exc!r}") from exc
        report.annotated += 1
        report.observe(Stage.ANNOTATE, time.monotonic() - encoded_at)
        jpeg = encoded.request.image.content
        return AnnotatedFrame(encoded.info, response, width=encoded.width, height=encoded.height, jpeg=jpeg)
