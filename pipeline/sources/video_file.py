"""Video files, replayed losslessly: every frame read is delivered, in order.

Anything FFmpeg reads works. A reader thread decodes ahead into a bounded
hand-off, so a slow consumer slows the reader and nothing is dropped. Each
frame carries its position in the file (`media_position_ms`) and
`capture_time_ms`, the wall clock when the reader released it; with
`realtime` that is when the frame became due, as if a camera had just taken it.

A sampled replay decodes with PyAV only the frames its sampling keeps (see
`_pyav`); one that keeps every frame decodes with OpenCV. Either way the same
frames are published. Each frame keeps its number in the file whatever
`start_ms` is, so that a replay started later publishes its frames with the
numbers a whole replay gives them: with `start_ms` the reader seeks to it and
numbers the first frame from its timestamp at the file's frame rate (PyAV
reads a file whose frame rate varies from its start instead, without decoding
what comes before, and counts). A replay resumed after a frame
(`resume_after_ms`) reads with PyAV from the file's start in the same way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Generator, Iterator
from fractions import Fraction

import cv2

from pipeline.frames import DeliveryPolicy
from pipeline.sampler import SamplingSettings
from pipeline.sources._ffmpeg import open_capture
from pipeline.sources._pyav import (
    DecodedFrame,
    LibraryError,
    SparseDecoder,
    constant_frame_rate,
    open_video,
    uses_pyav,
)
from pipeline.sources._threaded import FrameHandoff, ThreadedSource
from pipeline.sources._types import SourceError, SourceSettings

log = logging.getLogger("framelabel.sources")

# OpenCV and PyAV compute a frame's position with different rounding (1400.0000000000002 against 1400.0): a
# resume after a position skips what lies within this of it, far less than any frame's duration
POSITION_NOISE_MS = 0.01


class VideoFileSource(ThreadedSource):
    policy = DeliveryPolicy.REPLAY

    def __init__(self, source_id: str, path: str, settings: SourceSettings, sampling: SamplingSettings) -> None:
        super().__init__(source_id, settings, sampling)
        self.path = path
        self._resuming = settings.resume_after_ms is not None and not settings.loop
        self._pyav = self._resuming or uses_pyav(settings, sampling)
        self._numbered = 0  # frames gone through (decoded or not), over the passes: PyAV's indexes go on from it

    @functools.cached_property
    def total_frames(self) -> int | None:
        """The frames a replay without `loop` will deliver (estimated with offsets), from a probe of the file."""
        if self.settings.loop:
            return None
        try:
            capture = self._open()
        except SourceError:
            return None  # frames() raises it
        try:
            return self._expected_frames(capture)
        finally:
            capture.release()

    def _start(self, handoff: FrameHandoff) -> None:
        self._start_thread("reader", self._replay, handoff)

    def _replay(self, handoff: FrameHandoff) -> None:
        while True:  # the file is opened again for each pass of a loop: works for files that cannot seek, too
            numbered_before = self._numbered
            with contextlib.closing(self._pyav_frames() if self._pyav else self._opencv_frames()) as frames:
                delivered = self._replay_pass(frames, handoff)
            if handoff.stopped:
                return
            if delivered == 0:
                break  # nothing (more) in range: looping would spin
            if not self.settings.loop:
                self._check_complete(self._numbered - numbered_before)
                break
        if self.stats.read == 0 and not self._resuming:  # a resumed replay may have been at its end
            raise SourceError(f"video file {self.path}: no decodable video frames{self._range_text()}")
        handoff.end()

    def _check_file(self) -> None:
        try:
            with open(self.path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
        except OSError as exc:
            raise SourceError(f"video file {self.path}: {exc.strerror or exc}") from exc
        if size == 0:
            raise SourceError(f"video file {self.path}: the file is empty")

    def _open(self) -> cv2.VideoCapture:
        self._check_file()
        try:
            capture = open_capture(self.path, [cv2.CAP_PROP_N_THREADS, self.settings.decode_threads])
        except cv2.error as exc:
            raise SourceError(f"video file {self.path}: OpenCV cannot open it: {exc}") from exc
        if not capture.isOpened():
            raise SourceError(f"video file {self.path}: not a video FFmpeg can read")
        return capture

    def _opencv_frames(self) -> Generator[DecodedFrame]:
        """Every frame of one pass, decoded by OpenCV; positions counted at the file's fps where it has none."""
        capture = self._open()
        try:
            fps = capture.get(cv2.CAP_PROP_FPS)
            # With start_ms, frames are numbered in the file, on from the passes before; else as they are read.
            numbered, numbered_before = self.settings.start_ms > 0, self._numbered
            rate = self._probed_rate() if numbered else None
            if rate is not None:  # frame-accurate; a frame rate that varies is read from the start instead
                capture.set(cv2.CAP_PROP_POS_MSEC, self.settings.start_ms)
            previous_ms: float | None = None
            while True:
                try:
                    ok, pixels = capture.read()
                except cv2.error as exc:
                    self._read_failed(exc)
                    return
                if not ok:
                    return
                self.stats.decoded += 1
                position_ms = capture.get(cv2.CAP_PROP_POS_MSEC)
                if rate is not None and previous_ms is None:  # the first frame after the seek
                    self._numbered = numbered_before + round(position_ms * rate / 1000)
                self._numbered += 1
                if previous_ms is not None and position_ms <= previous_ms and fps > 0:
                    position_ms = previous_ms + 1000 / fps  # no timestamps (raw streams): count frames instead
                previous_ms = position_ms
                yield DecodedFrame(pixels, position_ms, self._numbered - 1 if numbered else None)
        finally:
            capture.release()

    def _pyav_frames(self) -> Generator[DecodedFrame]:
        """The frames of one pass that the sampling keeps, decoded by PyAV and nothing else (see `_pyav`)."""
        self._check_file()
        name = f"video file {self.path}"
        container, stream = open_video(self.path, name, {}, None, self.settings.decode_threads)
        rate = constant_frame_rate(stream) if self.settings.start_ms > 0 and not self._resuming else None
        decoder = SparseDecoder(stream, self.sampling, self.stats, self._first_ms, self._numbered, frame_rate=rate)
        try:
            if rate is not None and stream.time_base:  # to the keyframe before start_ms
                offset = int(self.settings.start_ms / 1000 / stream.time_base) + (stream.start_time or 0)
                container.seek(offset, stream=stream, backward=True)
            for packet in container.demux(stream):
                yield from decoder.push(packet)
        except LibraryError as exc:
            self._read_failed(exc)
        finally:
            self._numbered = decoder.packets
            container.close()

    def _probed_rate(self) -> Fraction | None:
        """The file's constant frame rate, read by PyAV: OpenCV does not tell a frame rate that varies apart."""
        container, stream = open_video(self.path, f"video file {self.path}", {}, None, 1)
        try:
            return constant_frame_rate(stream)
        finally:
            container.close()

    def _read_failed(self, exc: Exception) -> None:
        """Corrupt data the decoder gave up on: end the pass cleanly, like a truncated file, and say so."""
        log.warning("source %s: reading %s failed: %s", self.source_id, self.path, exc)
        self.stats.errors += 1
        self.stats.last_error = str(exc)

    def _replay_pass(self, frames: Iterator[DecodedFrame], handoff: FrameHandoff) -> int:
        """Deliver the frames in [start_ms, end_ms) once (after `resume_after_ms`); returns how many."""
        start_ms, end_ms = self._first_ms, self.settings.end_ms
        pace = _Pace() if self.settings.realtime else None
        delivered = 0
        for frame in frames:
            if handoff.stopped:
                break
            position_ms = frame.position_ms
            if position_ms is not None and position_ms < start_ms:
                continue
            if end_ms is not None and position_ms is not None and position_ms >= end_ms:
                break
            if pace is not None and position_ms is not None and pace.wait_until_due(position_ms, handoff):
                break
            if not handoff.put(self._new_frame(frame.pixels, position_ms, index=frame.number)):
                break
            delivered += 1
        return delivered

    def _expected_frames(self, capture: cv2.VideoCapture) -> int | None:
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT)  # from the container; negative or huge when unknown
        fps = capture.get(cv2.CAP_PROP_FPS)
        if not 0 < count < 2**31:
            return None
        if self._whole_file:
            return int(count)
        start_ms, end_ms = self._first_ms, self.settings.end_ms
        if fps <= 0:
            return None
        first = math.ceil(start_ms * fps / 1000)
        stop = int(count) if end_ms is None else min(int(count), math.ceil(end_ms * fps / 1000))
        return max(0, stop - first)

    def _check_complete(self, went_through: int) -> None:
        """A file that ends before its announced frame count is truncated or corrupt: say so, and carry on."""
        expected = self.total_frames
        if self._whole_file and expected is not None and went_through < expected:
            message = f"video file {self.path} ended after {went_through} of {expected} frames"
            log.warning("source %s: %s (truncated or corrupt?)", self.source_id, message)
            self.stats.last_error = message

    @property
    def _first_ms(self) -> float:
        """The position of the first frame to deliver, at the earliest."""
        after_ms = self.settings.resume_after_ms
        if after_ms is None or not self._resuming:
            return self.settings.start_ms
        return max(self.settings.start_ms, after_ms + POSITION_NOISE_MS)

    @property
    def _whole_file(self) -> bool:
        return self._first_ms == 0 and self.settings.end_ms is None

    def _range_text(self) -> str:
        if self._whole_file:
            return ""
        start_ms, end_ms = self.settings.start_ms, self.settings.end_ms
        return f" between {start_ms:g} ms and {'the end' if end_ms is None else f'{end_ms:g} ms'}"


class _Pace:
    """Releases frames at the pace of their media positions; after a slow consumer it resumes, never bursts."""

    def __init__(self) -> None:
        self._origin: float | None = None  # time.monotonic() at which media position 0 is due

    def wait_until_due(self, position_ms: float, handoff: FrameHandoff) -> bool:
        """Wait until the frame at `position_ms` is due; True if the source was closed meanwhile."""
        now = time.monotonic()
        if self._origin is None:
            self._origin = now - position_ms / 1000
        delay = self._origin + position_ms / 1000 - now
        if delay <= 0:
            self._origin -= delay  # late: shift the schedule so the next frames are not rushed out
            return False
        return handoff.wait_until_stopped(delay)
