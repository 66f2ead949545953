"""Make the INT8 variant of the imagenet model: static QDQ quantization, calibrated on real frames.

    /tmp/export/bin/pip install onnx onnxruntime opencv-python-headless numpy
    /tmp/export/bin/python tools/quantize_imagenet.py services/models/imagenet CLIP.mp4 [CLIP.mp4 ...]

U8S8 (uint8 activations, int8 weights), per-channel weights, reduce_range (7-bit
weights, safe on CPUs without VNNI), percentile calibration over frames sampled
from the clips. Writes `efficientnet_lite0_int8.onnx` and its `.sha256`. It is
offered as a separate classifier (`imagenet-int8`), never in place of fp32:
`make bench` prints how often its top-1 agrees with fp32's.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

FRAMES_PER_CLIP = 100
RESIZE, CROP = 256, 224


def preprocess(bgr: np.ndarray) -> np.ndarray:
    """The same as services/model_families.py's EfficientNet (kept free of framelabel's imports)."""
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    height, width = rgb.shape[:2]
    scale = RESIZE / min(height, width)
    size = (max(RESIZE, round(width * scale)), max(RESIZE, round(height * scale)))
    scaled = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
    top, left = (size[1] - CROP) // 2, (size[0] - CROP) // 2
    crop = scaled[top : top + CROP, left : left + CROP].astype(np.float32)
    return ((crop - 127.0) / 128.0).transpose(2, 0, 1)[np.newaxis]


def sampled_frames(clips: list[Path]) -> Iterator[np.ndarray]:
    for clip in clips:
        capture = cv2.VideoCapture(str(clip))
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or FRAMES_PER_CLIP
        step = max(1, total // FRAMES_PER_CLIP)
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if index % step == 0:
                yield preprocess(frame)
            index += 1
        capture.release()


class Frames(CalibrationDataReader):
    def __init__(self, clips: list[Path]) -> None:
        self._frames = sampled_frames(clips)

    def get_next(self) -> dict[str, np.ndarray] | None:
        frame = next(self._frames, None)
        return None if frame is None else {"input": frame}


def main() -> None:
    folder, clips = Path(sys.argv[1]), [Path(arg) for arg in sys.argv[2:]]
    source = folder / "efficientnet_lite0.onnx"
    prepared = folder / "efficientnet_lite0.prepared.onnx"
    target = folder / "efficientnet_lite0_int8.onnx"
    quant_pre_process(str(source), str(prepared))
    try:
        quantize_static(
            str(prepared),
            str(target),
            Frames(clips),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            calibrate_method=CalibrationMethod.Percentile,
        )
    finally:
        prepared.unlink(missing_ok=True)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    (folder / f"{target.name}.sha256").write_text(f"{digest}  {target.name}\n")
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB), sha256 {digest}")


if __name__ == "__main__":
    main()
