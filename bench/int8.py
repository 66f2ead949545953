"""The INT8 imagenet variant against fp32: inference CPU per frame, and how often their top-1 agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.stages import inference_ms, read_frames
from bench.timing import repeat
from services.classifier import load_classifier
from services.imaging import resize

CONFIDENT = 0.5


def measure_int8(clip: Path, frames: int = 300, repeats: int = 3) -> dict[str, Any]:
    fp32 = load_classifier("imagenet")
    int8 = load_classifier("imagenet-int8")
    pixels = [resize(frame[:, :, ::-1], 640, 360) for frame in read_frames(clip, frames)]
    agree = confident = confident_agree = 0
    for image in pixels:
        reference, quantized = fp32.confidences(image), int8.confidences(image)
        same = int(np.argmax(reference)) == int(np.argmax(quantized))
        agree += same
        if reference.max() >= CONFIDENT:
            confident += 1
            confident_agree += same
    fp32_ms = repeat(lambda: inference_ms(fp32, pixels[0], 1, 40), repeats)
    int8_ms = repeat(lambda: inference_ms(int8, pixels[0], 1, 40), repeats)
    return {
        "frames": len(pixels),
        "top1_agreement": round(agree / len(pixels), 3),
        "top1_agreement_where_fp32_confident": round(confident_agree / confident, 3) if confident else None,
        "fp32_confident_frames": confident,
        "inference_ms_fp32": fp32_ms.as_json(),
        "inference_ms_int8": int8_ms.as_json(),
        "speedup": round(fp32_ms.median / int8_ms.median, 2),
    }
