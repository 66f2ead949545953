"""The JPEG encoding stage: a frame's pixels become the API's `Image`.

Frames larger than `max_side` are downscaled first: the classifiers work at
224–320 px, so sending 640 px instead of 1280 px costs them nothing in accuracy
and saves encode, transfer and decode time. Blocking: run it in a thread.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import simplejpeg
from pydantic import Field

from pipeline.frames import EncodedFrame, Frame
from services.api.image_classifier_pb2 import AnnotationRequest
from services.api.image_pb2 import Image
from services.config import StrictModel
from services.imaging import resize


class EncoderSettings(StrictModel):
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 85
    max_side: Annotated[int, Field(ge=16, description="downscale to this longest side; null: full frames")] | None = 640


def encode(frame: Frame, settings: EncoderSettings) -> EncodedFrame:
    pixels = frame.pixels
    height, width = pixels.shape[:2]
    if settings.max_side is not None and max(height, width) > settings.max_side:
        scale = settings.max_side / max(height, width)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        pixels = resize(pixels, width, height)
    content = simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=settings.jpeg_quality, colorspace="BGR")
    request = AnnotationRequest(image=Image(content=content, image_type=Image.JPEG))
    return EncodedFrame(info=frame.info, request=request, width=width, height=height)
