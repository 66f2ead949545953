"""The JPEG encoding stage: a frame's pixels become the API's `Image`.

Frames are downscaled first, never enlarged. With `size: classifier` (the
default) and an in-process classifier that declares its input size, to that
size: `imagenet` resizes every picture to a shorter side of 256 px before its
centre crop, so a 1280×720 frame is sent at 455×256 and the network gets the
pixels it would get from a larger picture, for less encoding, decoding and
resizing. Anything else (`size: max_side`, a gRPC service, whose model is not
known here) is downscaled to `max_side`, which also bounds the classifier's
size. At the classifier's size JPEG's 8×8 blocks are larger against the
picture, so the default quality there is 95: it moves the model's output as
little from the unencoded picture as 85 does at 640 px (docs/performance.md).
Blocking: run it in a thread.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import simplejpeg
from pydantic import Field

from pipeline.frames import EncodedFrame, Frame
from services.api.image_classifier_pb2 import AnnotationRequest
from services.api.image_pb2 import Image
from services.config import StrictModel
from services.imaging import downscale
from services.model_families import InputSize

QUALITY_AT_MAX_SIDE = 85
QUALITY_AT_CLASSIFIER_SIZE = 95


class EncoderSettings(StrictModel):
    size: Literal["classifier", "max_side"] = "classifier"
    jpeg_quality: (
        Annotated[int, Field(ge=1, le=100, description="default: 95 at the classifier's size, else 85")] | None
    ) = None
    max_side: Annotated[int, Field(ge=16, description="downscale to this longest side; null: full frames")] | None = 640


def encode(frame: Frame, settings: EncoderSettings, input_size: InputSize | None = None) -> EncodedFrame:
    """`input_size`: the in-process classifier's, when it declares one."""
    pixels = frame.pixels
    height, width = pixels.shape[:2]
    classifier_size = input_size if settings.size == "classifier" else None
    scale = 1.0
    if settings.max_side is not None:
        scale = min(scale, settings.max_side / max(height, width))
    if classifier_size is not None:
        scale = min(scale, classifier_size.scale(width, height))
    if scale < 1.0:
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        pixels = downscale(pixels, width, height)
    quality = settings.jpeg_quality or (QUALITY_AT_MAX_SIDE if classifier_size is None else QUALITY_AT_CLASSIFIER_SIZE)
    content = simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality, colorspace="BGR")
    request = AnnotationRequest(image=Image(content=content, image_type=Image.JPEG))
    return EncodedFrame(info=frame.info, request=request, width=width, height=height)
