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
- `every_nth`: frames 0, N, 2N, … of the stream, decoded the same way.
- nothing: every frame.

Frames keep their number in the stream (decode order: presentation order
for streams without B-frames) and their position from the stream's
timestamps, relative to its start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import av
from av.container import InputContainer
from av.packet import Packet
from av.video.frame import VideoFrame
from av.video.stream import VideoStream
from cv2.typing import MatLike

from pipeline.sampler import FpsSchedule, SamplingSettings
from pipeline.sources._types import SourceError, SourceSettings
from services.errors import ConfigError

LibraryError = av.error.FFmpegError  # what PyAV raises for a stream it cannot open, read or decode


@dataclass(frozen=True, slots=True)
class DecodedFrame:
    pixels: MatLike  # H×W×3 BGR
    position_ms: float | None  # from the stream's timestamps, relative to its start; None without timestamps
    number: int | None  # the frame's number in the stream, counting the frames not decoded; None: not known


def open_video(
    uri: str, name: str, options: Mapping[str, str], timeout: tuple[float, float] | None, threads: int
) -> tuple[InputContainer, VideoStream]:
    """The container and its first video stream; `options` go to the demuxer (e.g. rtsp_transport).

    SourceError starting with `name` when it cannot be opened or holds no video."""
    try:
        container = av.open(uri, options=dict(options), timeout=timeout)
    except av.error.InvalidDataError as exc:
        raise SourceError(f"{name}: not a video FFmpeg can read") from exc
    except LibraryError as exc:
        raise SourceError(f"{name}: {exc.strerror or exc}") from exc
    if not container.streams.video:
        container.close()
        raise SourceError(f"{name}: no video stream")
    stream = container.streams.video[0]
    stream.codec_context.thread_count = threads
    return container, stream


class SparseDecoder:
    """Feeds one stream's packets to its decoder only as far as the frames the sampling keeps need."""

    def __init__(
        self, stream: VideoStream, sampling: SamplingSettings, start_ms: float = 0.0, first_number: int = 0
    ) -> None:
        self._codec = stream.codec_context
        self._time_base = stream.time_base
        self._origin = stream.start_time or 0  # positions count from the stream's start
        self._start_ms = start_ms
        self._keyframes = sampling.keyframes
        self._every_nth = sampling.every_nth
        self._schedule = FpsSchedule(sampling.fps) if sampling.fps is not None else None
        self._codec.skip_frame = "NONKEY" if self._keyframes else "DEFAULT"
        self._pending: list[tuple[Packet[VideoStream], int]] = []  # packets since the last keyframe, not yet decoded
        self._numbers: dict[int, int] = {}  # pts → frame number, for packets given to the decoder
        self._catching_up = False  # a wanted frame is on its way out of the decoder: give it every packet
        self._seen_keyframe = False  # packets before the first keyframe cannot be decoded
        self.packets = first_number  # packets demuxed so far, with `first_number`: the next frame's number
        self.decoded = 0  # frames that came out of the decoder, delivered or not

    def push(self, packet: Packet[VideoStream]) -> list[DecodedFrame]:
        """The wanted frames that this packet completes (often none); an empty packet flushes the decoder."""
        if packet.size == 0:
            return self._decode([(packet, -1)]) if self._seen_keyframe else []  # frames the decoder held back
        number, self.packets = self.packets, self.packets + 1
        self._seen_keyframe = self._seen_keyframe or packet.is_keyframe
        if not self._seen_keyframe or (self._keyframes and not packet.is_keyframe):
            return []
        if packet.is_keyframe and not self._catching_up:
            self._pending.clear()  # nothing after a keyframe refers to what came before it
        self._pending.append((packet, number))
        if not (self._catching_up or self._wants(self._position_ms(packet.pts), number)):
            return []
        self._catching_up = True
        pending, self._pending = self._pending, []
        return self._decode(pending)

    def _decode(self, packets: list[tuple[Packet[VideoStream], int]]) -> list[DecodedFrame]:
        frames: list[VideoFrame] = []
        for packet, number in packets:
            if number >= 0 and packet.pts is not None:
                self._numbers[packet.pts] = number
            if not self._keyframes:  # decode what is wanted; of the rest only what other frames refer to
                wanted = number < 0 or self._wants(self._position_ms(packet.pts), number)
                self._codec.skip_frame = "DEFAULT" if wanted else "NONREF"
            frames += self._codec.decode(None if number < 0 else packet)
            if self._keyframes and number >= 0:  # drain: a decoder that reorders would hold a keyframe back
                frames += self._codec.decode(None)  # until the next ones came, a GOP or two late
                self._codec.flush_buffers()
        self.decoded += len(frames)
        return [decoded for frame in frames if (decoded := self._take(frame)) is not None]

    def _take(self, frame: VideoFrame) -> DecodedFrame | None:
        position_ms = self._position_ms(frame.pts)
        number = self.packets - 1
        if frame.pts is not None:  # frames leave the decoder in pts order: earlier entries are done with
            number = self._numbers.pop(frame.pts, number)
            self._numbers = {pts: n for pts, n in self._numbers.items() if pts > frame.pts}
        if position_ms is not None and position_ms < self._start_ms:
            return None
        if self._every_nth is not None and number % self._every_nth != 0:
            return None
        if position_ms is not None and self._schedule is not None and not self._schedule.take(position_ms):
            return None
        self._catching_up = False
        return DecodedFrame(frame.to_ndarray(format="bgr24"), position_ms, number)

    def _wants(self, position_ms: float | None, number: int) -> bool:
        if self._every_nth is not None:
            return number % self._every_nth == 0
        if position_ms is None:
            return True  # no timestamps: decode, and let the sampler judge on the capture clock
        return position_ms >= self._start_ms and (self._schedule is None or self._schedule.wants(position_ms))

    def _position_ms(self, pts: int | None) -> float | None:
        if pts is None:
            return None
        position_ms = float((pts - self._origin) * self._time_base * 1000) if self._time_base else math.nan
        return None if math.isnan(position_ms) else position_ms


def uses_pyav(settings: SourceSettings, sampling: SamplingSettings) -> bool:
    """Whether a file or stream decodes with PyAV: asked for, or `auto` and the source samples."""
    if settings.decoder == "opencv":
        if sampling.keyframes:
            raise ConfigError("`keyframes` needs `decoder: pyav` or `auto`: OpenCV cannot tell keyframes apart")
        return False
    return settings.decoder == "pyav" or sampling.samples
