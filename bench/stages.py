"""Figure 1 and 2: each stage's CPU cost per frame in isolation, one thread, and the ceiling they imply.

Costs are process CPU time per call (so FFmpeg's and onnxruntime's own
threads count), medians over repeats, on the same 720p clip the replays use.
The ceiling is cores ÷ the per-frame CPU of the stages the pipeline runs.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from numpy.typing import NDArray

from bench.timing import Sample, cpu_ms_per_call, repeat
from pipeline.broker import EmbeddedBroker
from pipeline.frames import AnnotatedFrame, FrameInfo
from pipeline.kafka import KafkaSettings
from pipeline.publisher import Publisher
from services.classifier import Classifier, load_classifier
from services.imaging import downscale, resize

SMALL = (640, 360)
CLASSIFIER_SIZE = (455, 256)  # 1280×720 at imagenet's input size, shorter side 256 (the encoder's default)
PIPELINE_CAPS = {"top_k": 5, "specification_labels": "annotated"}  # what `framelabel run` asks for


@dataclass(frozen=True)
class StageCosts:
    per_stage_ms: dict[str, Sample]
    pipeline_stages: dict[str, tuple[str, ...]]  # resolution → the stages a frame goes through

    def cpu_per_frame_ms(self, resolution: str) -> float:
        return sum(self.per_stage_ms[name].median for name in self.pipeline_stages[resolution])

    def ceiling_fps(self, resolution: str, cores: int) -> float:
        return cores * 1000.0 / self.cpu_per_frame_ms(resolution)


def read_frames(clip: Path, count: int) -> list[NDArray[np.uint8]]:
    capture = cv2.VideoCapture(str(clip))
    frames = []
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(np.asarray(frame, dtype=np.uint8))
    capture.release()
    return frames


def decode_video_ms(clip: Path, frames: int) -> float:
    """As the pipeline's reader decodes: one FFmpeg decoder thread, frames converted to BGR."""
    capture = cv2.VideoCapture(str(clip), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    started = time.process_time()
    for _ in range(frames):
        capture.grab()
        capture.retrieve()
    spent = time.process_time() - started
    capture.release()
    return spent / frames * 1000.0


def inference_ms(classifier: Classifier, pixels: NDArray[np.uint8], batch: int, calls: int) -> float:
    """CPU per image of the bare session.run, at this batch size."""
    tensor = np.stack([classifier.preprocess(pixels)] * batch)
    session = classifier._session
    feed = {session.get_inputs()[0].name: tensor}
    return cpu_ms_per_call(lambda: session.run(None, feed), calls) / batch


async def produce_ms(records: int) -> float:
    """CPU per record of batched aiokafka sends into a real (embedded) broker, broker CPU excluded."""
    response = load_classifier("moderation").response(np.array([0.9, 0.1]))
    frame = AnnotatedFrame(FrameInfo("bench", 0, int(time.time() * 1000), time.monotonic(), 0.0), response, 640, 360)
    async with EmbeddedBroker() as broker:
        publisher = Publisher(
            KafkaSettings(bootstrap_servers=broker.address, topic="bench.produce", enable_idempotence=False)
        )
        await publisher.start()
        started = time.process_time()
        for _ in range(records):
            await publisher.publish(frame)
        await publisher.flush()
        spent = time.process_time() - started
        await publisher.stop()
    return spent / records * 1000.0


def measure_stages(clip: Path, repeats: int = 5) -> StageCosts:
    frames = read_frames(clip, 60)
    big = frames[30]
    small = resize(big, *SMALL)
    jpeg_big = simplejpeg.encode_jpeg(big, quality=85, colorspace="BGR")
    jpeg_small = simplejpeg.encode_jpeg(small, quality=85, colorspace="BGR")
    rgb_small = simplejpeg.decode_jpeg(jpeg_small, colorspace="RGB")
    at_classifier = downscale(big, *CLASSIFIER_SIZE)
    jpeg_at_classifier = simplejpeg.encode_jpeg(at_classifier, quality=95, colorspace="BGR")
    rgb_at_classifier = simplejpeg.decode_jpeg(jpeg_at_classifier, colorspace="RGB")
    imagenet = load_classifier("imagenet", overrides=PIPELINE_CAPS)
    scores = imagenet.confidences(rgb_small)
    costs = {
        "video_decode_720p": repeat(lambda: decode_video_ms(clip, 100), repeats),
        "resize_720p_to_640x360": repeat(lambda: cpu_ms_per_call(lambda: resize(big, *SMALL), 200), repeats),
        "jpeg_encode_720p": repeat(
            lambda: cpu_ms_per_call(lambda: simplejpeg.encode_jpeg(big, 85, "BGR"), 50), repeats
        ),
        "jpeg_encode_640x360": repeat(
            lambda: cpu_ms_per_call(lambda: simplejpeg.encode_jpeg(small, 85, "BGR"), 100), repeats
        ),
        "jpeg_decode_720p_simplejpeg": repeat(
            lambda: cpu_ms_per_call(lambda: simplejpeg.decode_jpeg(jpeg_big, "RGB"), 50), repeats
        ),
        "jpeg_decode_720p_cv2": repeat(
            lambda: cpu_ms_per_call(lambda: cv2.imdecode(np.frombuffer(jpeg_big, np.uint8), cv2.IMREAD_COLOR), 50),
            repeats,
        ),
        "jpeg_decode_640x360_simplejpeg": repeat(
            lambda: cpu_ms_per_call(lambda: simplejpeg.decode_jpeg(jpeg_small, "RGB"), 100), repeats
        ),
        "resize_720p_to_455x256": repeat(
            lambda: cpu_ms_per_call(lambda: downscale(big, *CLASSIFIER_SIZE), 200), repeats
        ),
        "jpeg_encode_455x256_q95": repeat(
            lambda: cpu_ms_per_call(lambda: simplejpeg.encode_jpeg(at_classifier, 95, "BGR"), 100), repeats
        ),
        "jpeg_decode_455x256_q95": repeat(
            lambda: cpu_ms_per_call(lambda: simplejpeg.decode_jpeg(jpeg_at_classifier, "RGB"), 100), repeats
        ),
        "preprocess_imagenet_455x256": repeat(
            lambda: cpu_ms_per_call(lambda: imagenet.preprocess(rgb_at_classifier), 200), repeats
        ),
        "preprocess_imagenet": repeat(lambda: cpu_ms_per_call(lambda: imagenet.preprocess(rgb_small), 200), repeats),
        "inference_imagenet_batch1": repeat(lambda: inference_ms(imagenet, rgb_small, 1, 40), repeats),
        "inference_imagenet_batch4": repeat(lambda: inference_ms(imagenet, rgb_small, 4, 10), repeats),
        "response_and_serialise": repeat(
            lambda: cpu_ms_per_call(lambda: imagenet.response(scores).SerializeToString(), 500), repeats
        ),
        "kafka_produce": repeat(lambda: asyncio.run(produce_ms(5000)), max(1, repeats // 2)),
    }
    for name in ("moderation", "nudity", "objects"):
        other = load_classifier(name)
        costs[f"inference_{name}_batch1"] = repeat(lambda other=other: inference_ms(other, rgb_small, 1, 20), repeats)
    objects = load_classifier("objects")
    costs["preprocess_objects"] = repeat(lambda: cpu_ms_per_call(lambda: objects.preprocess(rgb_small), 200), repeats)
    imagenet_stages = ("preprocess_imagenet", "inference_imagenet_batch1")
    common = ("video_decode_720p", "response_and_serialise", "kafka_produce")
    small = ("resize_720p_to_640x360", "jpeg_encode_640x360", "jpeg_decode_640x360_simplejpeg")
    at_classifier_size = ("resize_720p_to_455x256", "jpeg_encode_455x256_q95", "jpeg_decode_455x256_q95")
    return StageCosts(
        per_stage_ms=costs,
        pipeline_stages={
            "720p": (*common, *imagenet_stages, "jpeg_encode_720p", "jpeg_decode_720p_simplejpeg"),
            "640x360": (*common, *imagenet_stages, *small),
            "455x256": (*common, "preprocess_imagenet_455x256", "inference_imagenet_batch1", *at_classifier_size),
            "640x360_objects": (*common, "preprocess_objects", "inference_objects_batch1", *small),
        },
    )


def cores() -> int:
    return len(os.sched_getaffinity(0))
