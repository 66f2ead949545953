"""Run inside bench/.venv-peer: Roboflow's InferencePipeline with our model as custom logic.

    bench/.venv-peer/bin/python bench/peer_roboflow_job.py CLIP MODEL [REPEATS]

`InferencePipeline.init_with_custom_logic` reads CLIP with its own video source
(a video file: every frame, no drops; `max_fps` unset, so as fast as it goes) and
calls `on_video_frame` with each batch of frames; that runs EfficientNet-Lite0
(MODEL, a default onnxruntime session, as a user would open it) with the
preprocessing of services/model_families.py `EfficientNet` — RGB, shorter side to
256 (INTER_LINEAR), centre crop 224, (x − 127) / 128, softmax — and the sink
counts the frames. Wall time and this process's CPU time run from the first
`on_video_frame` call to the last sink call. The whole clip is run REPEATS times
(default 1) in this one process, a new pipeline and session each time. Prints one
JSON line, from the median run by fps: fps (and fps_runs, every run's), frames,
seconds, cpu_cores (CPU seconds per wall second), cpu_utilisation (of all cores),
other_cpu_cores_runs (every other process's, per run: ≈ 0 unless disturbed), the most
frequent top-1 class index, versions; or fps null and why.

Imports nothing of framelabel's: this venv has inference's own torch and OpenCV.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections import Counter
from typing import Any

import cv2
import numpy as np
import onnxruntime
from numpy.typing import NDArray

RESIZE = 256
CROP = 224


class Classify:
    """The custom logic: preprocess each frame, run the model, keep the top class; records timing."""

    def __init__(self, model_path: str) -> None:
        self.session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.first_call: float | None = None
        self.cpu_at_first_call = self.machine_at_first_call = 0.0
        self.last_sink: float | None = None
        self.cpu_at_last_sink = self.machine_at_last_sink = 0.0
        self.frames = 0
        self.top1: Counter[int] = Counter()

    def preprocess(self, bgr: NDArray[np.uint8]) -> NDArray[np.float32]:
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        height, width = rgb.shape[:2]
        scale = RESIZE / min(height, width)
        size = (max(RESIZE, round(width * scale)), max(RESIZE, round(height * scale)))
        scaled = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
        top, left = (size[1] - CROP) // 2, (size[0] - CROP) // 2
        crop = scaled[top : top + CROP, left : left + CROP].astype(np.float32)
        tensor: NDArray[np.float32] = ((crop - 127.0) / 128.0).transpose(2, 0, 1)
        return tensor

    def on_video_frame(self, video_frames: list[Any]) -> list[dict[str, Any]]:
        if self.first_call is None:
            self.first_call, self.cpu_at_first_call = time.perf_counter(), _cpu_seconds()
            self.machine_at_first_call = _machine_busy_seconds()
        predictions = []
        for frame in video_frames:
            batch = self.preprocess(frame.image)[np.newaxis]
            (logits,) = self.session.run(None, {self.input_name: batch})
            scores = logits[0].astype(np.float64)
            probabilities = np.exp(scores - scores.max())
            probabilities /= probabilities.sum()
            best = int(probabilities.argmax())
            predictions.append({"class_index": best, "confidence": float(probabilities[best])})
        return predictions

    def on_prediction(self, prediction: dict[str, Any] | None, video_frame: Any) -> None:
        if prediction is None:
            return
        self.frames += 1
        self.top1[prediction["class_index"]] += 1
        self.last_sink, self.cpu_at_last_sink = time.perf_counter(), _cpu_seconds()
        self.machine_at_last_sink = _machine_busy_seconds()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def _machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has spent busy, from /proc/stat: shows a disturbed run."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("inference-core", "onnxruntime", "opencv-python", "torch", "numpy")}


def run_once(clip: str, model: str) -> dict[str, Any]:
    """One InferencePipeline over the whole clip; its figures, or fps None and why."""
    from inference import InferencePipeline  # type: ignore[import-not-found, unused-ignore]

    logic = Classify(model)
    pipeline = InferencePipeline.init_with_custom_logic(
        video_reference=clip,
        on_video_frame=logic.on_video_frame,
        on_prediction=logic.on_prediction,
    )
    pipeline.start()  # dispatches on this thread until the file ends
    pipeline.join()
    if logic.frames == 0 or logic.first_call is None or logic.last_sink is None:
        return {"fps": None, "frames": 0, "why": "the pipeline delivered no frame"}
    seconds = logic.last_sink - logic.first_call
    cpu = logic.cpu_at_last_sink - logic.cpu_at_first_call
    return {
        "fps": logic.frames / seconds,
        "frames": logic.frames,
        "seconds": seconds,
        "cpu_cores": cpu / seconds,
        "other_cpu_cores": (logic.machine_at_last_sink - logic.machine_at_first_call - cpu) / seconds,
        "top_class_index": logic.top1.most_common(1)[0][0],
    }


def main() -> int:
    clip, model = sys.argv[1], sys.argv[2]
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    runs = []
    try:
        for _ in range(repeats):  # in one process: importing inference takes ~15 s
            run = run_once(clip, model)
            if run["fps"] is None:
                print(json.dumps(run))
                return 1
            runs.append(run)
    except Exception as exc:  # report, as one JSON line, why the peer did not run
        print(json.dumps({"fps": None, "frames": 0, "why": f"{type(exc).__name__}: {exc}"}))
        return 1
    median = sorted(runs, key=lambda run: run["fps"])[len(runs) // 2]
    result = {
        "fps": round(median["fps"], 2),
        "fps_runs": [round(run["fps"], 2) for run in runs],
        "frames": median["frames"],
        "seconds": round(median["seconds"], 3),
        "cpu_cores": round(median["cpu_cores"], 2),
        "cpu_utilisation": round(median["cpu_cores"] / (os.cpu_count() or 1), 3),
        "other_cpu_cores_runs": [round(run["other_cpu_cores"], 2) for run in runs],
        "top_class_index": median["top_class_index"],
        "versions": _versions(),
        "why": None,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
