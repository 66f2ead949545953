"""What flows between the stages: a frame's metadata travels with it from source to publisher.

Frame ──encoder──▶ EncodedFrame ──annotator──▶ AnnotatedFrame ──publisher──▶ Kafka
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from services.api.image_classifier_pb2 import AnnotationRequest, AnnotationResponse


class DeliveryPolicy(enum.Enum):
    """How a source trades completeness for freshness."""

    REPLAY = "replay"  # files, folders: every frame read is published; slow stages slow the reader
    LIVE = "live"  # cameras: only the newest frame is kept; every drop is counted


@dataclass(frozen=True, slots=True)
class FrameInfo:
    source_id: str
    index: int  # 0-based, among every frame of the source (sampled out or not, decoded or not)
    capture_time_ms: int  # wall clock, ms since the epoch: the Kafka record's timestamp
    captured_at: float  # time.monotonic() at capture, for capture→published latency
    # position in a video file, or on a camera stream's own clock when PyAV reads it; None otherwise
    media_position_ms: float | None = None
    file_name: str | None = None  # the image's path as listed, for image folders
    decode_seconds: float = 0.0  # the reader thread's CPU time for this frame (waiting on a camera not counted)


@dataclass(frozen=True, slots=True)
class Frame:
    info: FrameInfo
    pixels: NDArray[np.uint8]  # H×W×3 BGR, as OpenCV decodes it


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    info: FrameInfo
    request: AnnotationRequest  # the JPEG Image, ready for any Annotator
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class AnnotatedFrame:
    info: FrameInfo
    response: AnnotationResponse
    width: int
    height: int
    jpeg: bytes = b""  # the image that was annotated, for the live view (shared with the request, not a copy)
