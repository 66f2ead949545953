"""Live cameras: RTSP, HTTP(S) MJPEG or any stream FFmpeg reads, and local devices; always the newest frame.

A reader thread reads as fast as the camera sends and keeps only the newest
frame: one nobody took before the next arrived is counted in `stats.dropped`.
Each frame's capture time is the moment `read()` returned.

A camera that fails to open, fails to read or ends is reopened with capped
exponential backoff and jitter, forever, until close(); each reopen counts in
`stats.reconnects` and logs one line with the cause (credentials masked).
Streams open through FFmpeg with open and read timeouts; since a native call
can still block longer than asked, a watchdog thread gives up on a reader that
has had no frame for `stall_seconds` since it connected or since its last
frame, and starts another (the stuck thread ends once its call returns).
Everything blocking runs in these threads, so a dead camera never holds up
other sources.

A sampled stream (`fps`, `keyframes`, `every_nth`) is read with PyAV, which
decodes only the frames the sampling keeps (see `_pyav`); its frames carry
their position on the stream's own clock (`media_position_ms`, from its
timestamps; it starts again after a reconnect) and their number in the
stream. A stream that keeps every frame is read with OpenCV. RTSP goes over
`rtsp_transport` (TCP by default): per camera with PyAV, but one setting for
the whole process with OpenCV (see `_ffmpeg`).
"""

from __future__ import annotations

import logging
import re
import threading
import time

import cv2

from pipeline.frames import DeliveryPolicy
from pipeline.sampler import SamplingSettings
from pipeline.sources._ffmpeg import open_capture, use_rtsp_transport
from pipeline.sources._pyav import CorruptData, LibraryError, SparseDecoder, describe, open_video, uses_pyav
from pipeline.sources._threaded import FrameHandoff, ThreadedSource
from pipeline.sources._types import SourceError, SourceSettings
from services.errors import ConfigError

log = logging.getLogger("framelabel.sources")

# streams FFmpeg reads live: a URL with one of these schemes is a camera
LIVE_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "srt", "udp", "rtp", "tcp", "http", "https"})
RTSP_SCHEMES = frozenset({"rtsp", "rtsps"})
DEVICE = re.compile(r"\d+|/dev/video\d+")  # a device index, or a V4L2 device path
CREDENTIALS = re.compile(r"(?<=://)[^/]*@")  # user:password@ (up to the last @ of the authority)


def _scheme(uri: str) -> str:
    scheme, separator, _ = uri.partition("://")
    return scheme.lower() if separator else ""


def is_camera(uri: str) -> bool:
    return _scheme(uri) in LIVE_SCHEMES or DEVICE.fullmatch(uri) is not None


def mask_credentials(uri: str) -> str:
    """The URI as it may appear in logs and errors: `rtsp://***@host/…` instead of the user and password."""
    return CREDENTIALS.sub("***@", uri, count=1)


def _device_target(uri: str) -> int | str | None:
    """What cv2.VideoCapture takes for a local device: its index or its path; None for a stream URL."""
    if DEVICE.fullmatch(uri) is None:
        return None
    return int(uri) if uri.isdigit() else uri


class _Reader:
    """One reader thread's standing: the watchdog abandons it once it has waited too long for a frame."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting_since: float | None = None  # time.monotonic() of the connect or the last frame
        self.abandoned = False

    def expect_frame(self) -> bool:
        """(Re)start the stall clock, on connecting and after each frame; False once the reader is abandoned."""
        with self._lock:
            self._waiting_since = time.monotonic()
            return not self.abandoned

    def rest(self) -> None:
        """Stop the stall clock: between connections nobody expects a frame."""
        with self._lock:
            self._waiting_since = None

    def abandon_if_stalled(self, stall_seconds: float) -> bool:
        with self._lock:
            if self._waiting_since is None or time.monotonic() - self._waiting_since <= stall_seconds:
                return False
            self.abandoned = True
            return True


class CameraSource(ThreadedSource):
    policy = DeliveryPolicy.LIVE

    def __init__(self, source_id: str, uri: str, settings: SourceSettings, sampling: SamplingSettings) -> None:
        super().__init__(source_id, settings, sampling)
        self.uri = uri
        self.display_uri = mask_credentials(uri)
        self._device = _device_target(uri)
        self._pyav = uses_pyav(settings, sampling) and self._device is None
        if self._device is not None and (sampling.keyframes or settings.decoder == "pyav"):
            raise ConfigError(f"camera {source_id}: a local device is read with OpenCV: no `keyframes`, no pyav")
        self._demuxer_options: dict[str, str] = {}
        if _scheme(uri) in RTSP_SCHEMES:
            if self._pyav:
                self._demuxer_options["rtsp_transport"] = settings.rtsp_transport
            else:
                use_rtsp_transport(settings.rtsp_transport)
        self._numbered = 0  # PyAV: packets of earlier connections, so that frame numbers keep growing
        self._reader: _Reader | None = None  # the reader the watchdog watches
        self._readers_started = 0

    def _start(self, handoff: FrameHandoff) -> None:
        self._start_reader(handoff)
        self._start_thread("watchdog", self._watch, handoff)

    def _start_reader(self, handoff: FrameHandoff) -> None:
        reader = _Reader()

        def read_forever(handoff: FrameHandoff) -> None:
            self._read_forever(handoff, reader)

        self._reader = reader
        self._readers_started += 1
        self._start_thread(f"reader{self._readers_started}", read_forever, handoff)

    def _read_forever(self, handoff: FrameHandoff, reader: _Reader) -> None:
        attempts = self.settings.reconnect_policy.start()  # connections in a row that gave no frame
        while True:
            cause, streamed = self._stream(handoff, reader)
            if handoff.stopped or reader.abandoned:
                return
            if streamed:
                attempts.succeeded()
            delay = attempts.failed()  # the policy has no deadline
            self._reconnecting(cause, delay)
            if handoff.wait_until_stopped(delay):
                return

    def _stream(self, handoff: FrameHandoff, reader: _Reader) -> tuple[str, bool]:
        """Open the camera and hand frames over until it fails; returns why it stopped and whether frames came."""
        reader.expect_frame()
        try:
            return self._stream_pyav(handoff, reader) if self._pyav else self._stream_opencv(handoff, reader)
        finally:
            reader.rest()

    def _stream_opencv(self, handoff: FrameHandoff, reader: _Reader) -> tuple[str, bool]:
        streamed = False
        capture: cv2.VideoCapture | None = None
        try:
            capture = self._open()
            if not capture.isOpened():
                self.stats.errors += 1
                return "could not open it (refused, timed out or not a stream)", False
            while not (handoff.stopped or reader.abandoned):
                ok, pixels = capture.read()
                if not ok:
                    return "the stream ended or a read failed", streamed
                self.stats.decoded += 1
                if reader.expect_frame():  # unless the watchdog has given up on this reader meanwhile
                    self._say_if_back(streamed)
                    streamed = True
                    handoff.put(self._new_frame(pixels))
            return "closed", streamed
        except cv2.error as exc:
            self.stats.errors += 1
            return f"OpenCV error: {str(exc).strip()}", streamed
        finally:
            if capture is not None:
                capture.release()

    def _stream_pyav(self, handoff: FrameHandoff, reader: _Reader) -> tuple[str, bool]:
        """Like _stream_opencv, but decoding only the sampled frames; any packet counts as a sign of life."""
        streamed = False
        timeouts = (self.settings.open_timeout_ms / 1000, self.settings.read_timeout_ms / 1000)
        try:
            container, stream = open_video(
                self.uri, "could not open it", self._demuxer_options, timeouts, self.settings.decode_threads
            )
        except SourceError as exc:
            self.stats.errors += 1
            return str(exc), False
        decoder = SparseDecoder(stream, self.sampling, self.stats, first_number=self._numbered, live=True)
        try:
            for packet in container.demux(stream):
                if handoff.stopped or not reader.expect_frame():
                    return "closed", streamed
                try:
                    frames = decoder.push(packet)
                except CorruptData as exc:  # a packet damaged on the way (UDP loss): the next keyframe mends it
                    self.stats.errors += 1
                    self.stats.last_error = f"a damaged packet: {describe(exc)}"
                    continue
                for frame in frames:
                    self._say_if_back(streamed)
                    streamed = True
                    handoff.put(self._new_frame(frame.pixels, frame.position_ms, index=frame.number))
            return "the stream ended", streamed
        except LibraryError as exc:
            self.stats.errors += 1
            return f"FFmpeg error: {describe(exc)}", streamed
        finally:
            self._numbered = decoder.packets
            container.close()

    def _open(self) -> cv2.VideoCapture:
        if self._device is not None:
            return cv2.VideoCapture(self._device)  # the platform's camera backend (V4L2 on Linux)
        timeouts = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            self.settings.open_timeout_ms,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            self.settings.read_timeout_ms,
            cv2.CAP_PROP_N_THREADS,
            self.settings.decode_threads,
        ]
        return open_capture(self.uri, timeouts)

    def _watch(self, handoff: FrameHandoff) -> None:
        """Every quarter of stall_seconds, replace a reader that has waited longer than that for a frame."""
        stall_seconds = self.settings.stall_seconds
        while not handoff.wait_until_stopped(stall_seconds / 4):
            if self._reader is not None and self._reader.abandon_if_stalled(stall_seconds):
                self._reconnecting(f"stalled: no frame for {stall_seconds:g} s", 0.0)
                self._start_reader(handoff)

    def _say_if_back(self, streamed: bool) -> None:
        """One line when the first frame of a connection follows a reconnect."""
        if not streamed and self.stats.reconnects:
            log.info("camera %s (%s): streaming again", self.source_id, self.display_uri)

    def _reconnecting(self, cause: str, delay: float) -> None:
        self.stats.streaming = False
        self.stats.reconnects += 1
        self.stats.last_error = cause
        log.warning("camera %s (%s): %s; reconnecting in %.1f s", self.source_id, self.display_uri, cause, delay)
