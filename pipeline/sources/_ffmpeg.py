"""Opening captures through OpenCV's FFmpeg backend, which takes some settings only from the environment.

OpenCV reads these process-wide variables at each open, so they are set here, in one place:

- OPENCV_FFMPEG_IS_THREAD_SAFE=1. Without it OpenCV holds one process-wide
  mutex for the whole of every open, so a camera that never answers (an open
  waiting out its timeout) holds up every other source's open, files
  included. The FFmpeg that opencv-python bundles (libavformat 62) is thread
  safe, which is what this asks OpenCV to rely on. OpenCV logs a warning
  saying so at each open.
- OPENCV_FFMPEG_CAPTURE_OPTIONS="rtsp_transport;tcp" (or another transport).
  Being one variable, it gives every RTSP camera of a process the same
  transport: the first RTSP camera sets it (replacing any value from outside),
  and one asking for another is refused.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence

import cv2

from services.errors import ConfigError

THREAD_SAFE_VARIABLE = "OPENCV_FFMPEG_IS_THREAD_SAFE"
CAPTURE_OPTIONS_VARIABLE = "OPENCV_FFMPEG_CAPTURE_OPTIONS"

_rtsp_transport_lock = threading.Lock()
_rtsp_transport: str | None = None  # the transport this process's RTSP cameras use, once one is set


def open_capture(uri: str, params: Sequence[int] = ()) -> cv2.VideoCapture:
    """cv2.VideoCapture through FFmpeg, without waiting for other sources' opens; `params` are CAP_PROP pairs."""
    _allow_concurrent_opens()
    return cv2.VideoCapture(uri, cv2.CAP_FFMPEG, list(params))


@functools.cache  # once: changing the environment while other threads read it is best kept rare
def _allow_concurrent_opens() -> None:
    os.environ[THREAD_SAFE_VARIABLE] = "1"


def use_rtsp_transport(transport: str) -> None:
    """Make FFmpeg's RTSP demuxer use `transport`; ConfigError if this process's RTSP cameras use another."""
    global _rtsp_transport
    with _rtsp_transport_lock:
        if _rtsp_transport not in (None, transport):
            raise ConfigError(
                f"rtsp_transport {transport!r}: this process's RTSP cameras already use {_rtsp_transport!r}, "
                "and OpenCV reads the transport from one process-wide setting"
            )
        _rtsp_transport = transport
        os.environ[CAPTURE_OPTIONS_VARIABLE] = f"rtsp_transport;{transport}"
