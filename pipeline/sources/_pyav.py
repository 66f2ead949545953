"""Decoding with PyAV (FFmpeg's libraries, bundled in the `av` wheel): only the frames the sampling keeps.

OpenCV's `grab()` decodes every frame, so a camera sampled at 1 fps of 25
decodes 25 frames for one. PyAV hands us the compressed packets first, so
`SparseDecoder` feeds the decoder only what a wanted frame depends on:

- `keyframes`: keyframe packets only, with FFmpeg's `skip_frame = NONKEY`;
  each keyframe is delivered as soon as its packet arrives (with `fps`, the first keyframe at or after each
  sample time).
- `fps`: the first frame at or after each sample time, on the stream's own
  clock. Packets wait undecoded until one at or after the sample time
  arrives; then the packets it depends on since the last keyframe are decoded,
  the frames nobody refers to (`skip_frame = NONREF`) skipped. With a keyframe
  at every sample time that is one frame decoded per sample.
- `every_nth` or nothing: every frame is decoded (a frame's number in
  presentation order is known only once the packets around it are in);
  `every_nth` keeps frames 0, N, 2N, …

Frames keep their number in the stream (in presentation order, counting the
frames not decoded) and their position from the stream's timestamps,
relative to its start. After a seek, what came before is not counted: the
first frame's number comes from its timestamp at the stream's frame rate.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

import av
from av.container import InputContainer
from av.packet import Packet
from av.video.frame import VideoFrame
from av.video.stream import VideoStream
from cv2.typing import MatLike

from pipeline.sampler import FpsSchedule, SamplingSettings
from pipeline.sources._types import SourceError, SourceSettings, SourceStats
from services.errors import ConfigError

MAX_REORDERED_FRAMES = 16  # H.264/HEVC hold at most 16 frames back for reordering (the DPB's size)
LibraryError = av.error.FFmpegError  # what PyAV raises for a stream it cannot open, read or decode
CorruptData = av.error.InvalidDataError  # among them: data the decoder cannot make sense of


@dataclass(frozen=True, slots=True)
class DecodedFrame:
    pixels: MatLike  # H×W×3 BGR
    position_ms: float | None  # from the stream's timestamps, relative to its start; None without timestamps
    number: int | None  # the frame's number in the stream, counting the frames not decoded; None: not known


def describe(exc: LibraryError) -> str:
    """FFmpeg's message without the URL PyAV appends to it, which may hold a camera's credentials."""
    return exc.strerror or type(exc).__name__


def open_video(
    uri: str, name: str, options: Mapping[str, str], timeout: tuple[float, float] | None, threads: int
) -> tuple[InputContainer, VideoStream]:
    """The container and its first video stream; `options` go to the demuxer (e.g. rtsp_transport).

    SourceError starting with `name` when it cannot be opened or holds no video."""
    try:
        container = av.open(uri, options=dict(options), timeout=timeout)
    except CorruptData as exc:
        raise SourceError(f"{name}: not a video FFmpeg can read") from exc
    except LibraryError as exc:
        raise SourceError(f"{name}: {describe(exc)}") from exc
    if not container.streams.video:
        container.close()
        raise SourceError(f"{name}: no video stream")
    stream = container.streams.video[0]
    stream.codec_context.thread_count = threads
    return container, stream


class SparseDecoder:
    """Feeds one stream's packets to its decoder only as far as the frames the sampling keeps need."""

    def __init__(
        self,
        stream: VideoStream,
        sampling: SamplingSettings,
        stats: SourceStats,
        start_ms: float = 0.0,
        first_number: int = 0,
        live: bool = False,
        frame_rate: Fraction | None = None,
    ) -> None:
        self._stats = stats  # its `decoded` counts the frames that came out of the decoder, delivered or not
        self._codec = stream.codec_context
        self._time_base = stream.time_base
        # Positions count from the file's start, or from a live stream's first decoded frame with a timestamp:
        # RTSP's start_time is its first packet's pts, which frames reordered before it precede.
        self._origin: int | None = None if live else stream.start_time or 0
        self._start_ms = start_ms
        self._keyframes = sampling.keyframes
        self._every_nth = sampling.every_nth
        self._schedule = FpsSchedule(sampling.fps) if sampling.fps is not None else None
        self._codec.skip_frame = "NONKEY" if self._keyframes else "DEFAULT"
        self._pending: list[Packet[VideoStream]] = []  # packets since the last keyframe, not yet decoded
        self._catching_up = False  # a wanted frame is on its way out of the decoder: give it every packet
        self._seen_keyframe = False  # packets before the first keyframe cannot be decoded
        self.packets = first_number  # packets demuxed so far, with `first_number`: the next one's number
        # Frame numbers in presentation order: a frame's number is the count of packets with an earlier pts.
        self._counted = first_number  # packets whose pts lies below every entry of _uncounted
        self._uncounted: list[int] = []  # pts of the packets since then, sorted
        # After a seek the packets before it are not counted: the first frame out of the decoder is numbered
        # from its timestamp at this (constant) frame rate, on from `first_number`, and the rest counted on from it.
        self._first_number = first_number
        self._frame_rate = frame_rate

    def push(self, packet: Packet[VideoStream]) -> list[DecodedFrame]:
        """The wanted frames that this packet completes (often none); an empty packet flushes the decoder."""
        if packet.size == 0:
            return self._decode([packet], flush=True) if self._seen_keyframe else []  # frames held back
        self.packets += 1
        if packet.pts is None:  # untimed (RTSP's first packet, raw streams): shown before what follows it
            self._counted += 1
        else:
            if packet.is_keyframe:  # a GOP starts: of what came before, only the decoder's reorder buffer is left
                before = bisect.bisect_left(self._uncounted, packet.pts)
                if before > MAX_REORDERED_FRAMES:
                    self._count_up_to(self._uncounted[before - MAX_REORDERED_FRAMES - 1])
            bisect.insort(self._uncounted, packet.pts)
        self._seen_keyframe = self._seen_keyframe or packet.is_keyframe
        if not self._seen_keyframe or (self._keyframes and not packet.is_keyframe):
            return []
        if packet.is_keyframe and not self._catching_up:
            self._pending.clear()  # nothing after a keyframe refers to what came before it
        self._pending.append(packet)
        if not (self._catching_up or self._wants(self._position_ms(packet.pts))):
            return []
        self._catching_up = True
        pending, self._pending = self._pending, []
        return self._decode(pending)

    def _decode(self, packets: list[Packet[VideoStream]], flush: bool = False) -> list[DecodedFrame]:
        frames: list[VideoFrame] = []
        for packet in packets:
            if not self._keyframes:  # decode what is wanted; of the rest only what other frames refer to
                wanted = flush or self._wants(self._position_ms(packet.pts))
                self._codec.skip_frame = "DEFAULT" if wanted else "NONREF"
            frames += self._codec.decode(None if flush else packet)
            if self._keyframes and not flush:  # drain: a decoder that reorders would hold a keyframe back
                frames += self._codec.decode(None)  # until the next ones came, a GOP or two late
                self._codec.flush_buffers()
        self._stats.decoded += len(frames)
        return [decoded for frame in frames if (decoded := self._take(frame)) is not None]

    def _take(self, frame: VideoFrame) -> DecodedFrame | None:
        if self._origin is None:  # frames leave the decoder in pts order: none will come before this one
            self._origin = frame.pts
        position_ms = self._position_ms(frame.pts)
        if frame.pts is None:
            number = self._counted - 1  # the latest untimed packet's
        else:  # frames leave the decoder in pts order: what lies below this one is counted for good
            number = self._counted + bisect.bisect_left(self._uncounted, frame.pts)
            if self._frame_rate is not None and position_ms is not None:
                shift = self._first_number + round(position_ms * self._frame_rate / 1000) - number
                self._counted += shift
                self.packets += shift
                number += shift
                self._frame_rate = None
            self._count_up_to(frame.pts)
        if position_ms is not None and position_ms < self._start_ms:
            return None
        if self._every_nth is not None and number % self._every_nth != 0:
            return None
        if position_ms is not None and self._schedule is not None and not self._schedule.take(position_ms):
            return None
        self._catching_up = False
        return DecodedFrame(frame.to_ndarray(format="bgr24"), position_ms, number)

    def _count_up_to(self, pts: int) -> None:
        below = bisect.bisect_right(self._uncounted, pts)
        self._counted += below
        del self._uncounted[:below]

    def _wants(self, position_ms: float | None) -> bool:
        """Whether the frame at `position_ms` may be kept (every_nth: any frame, its number is known only later)."""
        if position_ms is None:
            return True  # no timestamps: decode, and let the sampler judge on the capture clock
        return position_ms >= self._start_ms and (self._schedule is None or self._schedule.wants(position_ms))

    def _position_ms(self, pts: int | None) -> float | None:
        if pts is None or self._origin is None:  # e.g. RTSP's first frame, before the stream's clock is known
            return None
        position_ms = float((pts - self._origin) * self._time_base * 1000) if self._time_base else math.nan
        return None if math.isnan(position_ms) else position_ms


def constant_frame_rate(stream: VideoStream) -> Fraction | None:
    """The stream's frame rate when it is constant (its average is its base rate), so that a frame's number
    follows from its timestamp; None when it varies or is unknown."""
    rate = stream.average_rate
    return rate if stream.time_base and rate and rate == stream.base_rate else None


def uses_pyav(settings: SourceSettings, sampling: SamplingSettings) -> bool:
    """Whether a file or stream decodes with PyAV: asked for, or `auto` and the sampling lets it skip frames."""
    if settings.decoder == "opencv":
        if sampling.keyframes:
            raise ConfigError("`keyframes` needs `decoder: pyav` or `auto`: OpenCV cannot tell keyframes apart")
        return False
    return settings.decoder == "pyav" or sampling.skips_decoding
