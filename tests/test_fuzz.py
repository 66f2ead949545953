"""Fuzzing the Annotate path with hypothesis: raw bytes, and real JPEGs and PNGs mutated where it hurts.

Whatever a client sends, the answer is an annotation or INVALID_ARGUMENT: no crash,
no hang, no INTERNAL, and the service's memory stays flat. Most inputs go to the
in-process decoder and classifier (the code the service runs), a few hundred through
real gRPC. `make fuzz` runs FUZZ_SCALE times as many, with fresh random inputs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import cv2
import grpc
import numpy as np
import pytest
import simplejpeg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.api.image_classifier_service_pb2_grpc import ImageClassifierServiceStub
from services.api.image_pb2 import Image
from services.classifier import Classifier
from services.errors import InvalidImageError
from services.imaging import ImageLimits, decode_image
from tests.helpers import ServiceProcess, photo, request, rss_mb

SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
FUZZ = settings(
    database=None,  # nothing written to the work tree
    derandomize=SCALE == 1,  # CI tries the same inputs every time; `make fuzz` new ones
    deadline=None,  # the hang guard is the per-test timeout, not hypothesis' timing
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIMITS = ImageLimits(max_bytes=1024 * 1024, max_pixels=4_000_000)  # small limits, so bombs are cheap to refuse
RSS_GROWTH_LIMIT_MB = 30.0
TRIED: dict[str, int] = {}


def _seeds() -> list[bytes]:
    rgb = cv2.resize(photo("coffee"), (64, 48))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return [
        bytes(simplejpeg.encode_jpeg(rgb, quality=80)),
        bytes(simplejpeg.encode_jpeg(np.ascontiguousarray(gray[:, :, None]), quality=60, colorspace="GRAY")),
        cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
        cv2.imencode(".png", rgb)[1].tobytes(),
        cv2.imencode(".png", (gray.astype(np.uint16) * 257))[1].tobytes(),  # 16-bit grayscale
        cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA))[1].tobytes(),  # with alpha
    ]


SEEDS = _seeds()
HEADER_BYTES = 160  # where the markers, IHDR and SOF sit: mutated more often than the rest


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A seed image with 0–8 mutations: bit flips, overwrites, insertions, deletions, truncation."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        if not data:
            break
        where = draw(st.one_of(st.integers(0, min(HEADER_BYTES, len(data)) - 1), st.integers(0, len(data) - 1)))
        operation = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        if operation == "flip":
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif operation == "overwrite":
            chunk = draw(st.sampled_from([b"\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\xff\xd9"]))
            data[where : where + len(chunk)] = chunk
        elif operation == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=64))
        elif operation == "delete":
            del data[where : where + draw(st.integers(1, 64))]
        else:
            del data[where:]
    return bytes(data)


RAW_BYTES = st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda tail: b"\xff\xd8\xff" + tail, st.binary(max_size=512)),  # a JPEG start, then noise
    st.builds(lambda tail: b"\x89PNG\r\n\x1a\n" + tail, st.binary(max_size=512)),  # a PNG signature, then noise
)
CONTENTS = st.one_of(mutated_images(), RAW_BYTES)
# mostly sniffed (so mutated images get decoded), sometimes declared, now and then not an ImageType at all
IMAGE_TYPES = st.sampled_from([Image.IMAGE_TYPE_UNSPECIFIED] * 6 + [Image.JPEG, Image.PNG, -1, 3, 2**31 - 1])


def _count(name: str) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report_inputs_tried(figures: dict[str, object]) -> Iterator[None]:
    yield
    for name, count in TRIED.items():
        figures[f"fuzz: inputs tried, {name}"] = count


@settings(FUZZ, max_examples=3500 * SCALE)
@given(content=CONTENTS, image_type=IMAGE_TYPES)
def test_decoding_any_bytes_gives_pixels_or_invalid_argument(content: bytes, image_type: int) -> None:
    _count("decode_image")
    try:
        pixels = decode_image(Image(content=content, image_type=image_type), LIMITS)
    except InvalidImageError:
        return
    assert pixels.dtype == np.uint8
    assert pixels.ndim == 3
    assert pixels.shape[2] == 3
    assert pixels.shape[0] * pixels.shape[1] <= LIMITS.max_pixels


@settings(FUZZ, max_examples=1200 * SCALE)
@given(content=mutated_images())
def test_the_classifier_annotates_or_refuses_mutated_images(classifiers: dict[str, Classifier], content: bytes) -> None:
    _count("Classifier.annotate")
    try:
        response = classifiers["imagenet"].annotate(request(content, Image.IMAGE_TYPE_UNSPECIFIED))
    except InvalidImageError:
        return
    _count("Classifier.annotate, annotated")
    assert len(response.annotations) == 1000
    assert abs(sum(a.confidence for a in response.annotations) - 1.0) < 1e-4  # no NaN from a half-decoded image


@pytest.fixture(scope="module")
def fuzzed_service(imagenet_service: ServiceProcess) -> Iterator[tuple[ServiceProcess, ImageClassifierServiceStub]]:
    with grpc.insecure_channel(imagenet_service.address) as channel:
        yield imagenet_service, ImageClassifierServiceStub(channel)


def test_the_service_answers_ok_or_invalid_argument_and_its_memory_stays_flat(
    fuzzed_service: tuple[ServiceProcess, ImageClassifierServiceStub], figures: dict[str, object]
) -> None:
    service, stub = fuzzed_service
    codes: dict[str, int] = {}

    @settings(FUZZ, max_examples=300 * SCALE)
    @given(content=CONTENTS, image_type=IMAGE_TYPES)
    def call(content: bytes, image_type: int) -> None:
        _count("gRPC Annotate")
        try:
            stub.Annotate(request(content, image_type), timeout=30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        codes[code.name] = codes.get(code.name, 0) + 1
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)

    call()  # warms the allocator up, so the second round shows growth rather than first use
    before = rss_mb(service.process.pid)
    started = time.monotonic()
    call()
    grew = rss_mb(service.process.pid) - before
    figures["fuzz over gRPC: status codes"] = dict(sorted(codes.items()))
    figures["fuzz over gRPC: service RSS growth over the second round, MB"] = grew
    figures["fuzz over gRPC: seconds per round"] = time.monotonic() - started
    assert service.process.poll() is None
    assert grew < RSS_GROWTH_LIMIT_MB


def test_an_image_type_outside_the_enum_is_a_client_mistake(
    fuzzed_service: tuple[ServiceProcess, ImageClassifierServiceStub],
) -> None:
    """Found by the fuzzer: proto3 enums are open, and an unknown value used to end in INTERNAL."""
    _, stub = fuzzed_service
    with pytest.raises(grpc.RpcError) as caught:
        stub.Annotate(request(SEEDS[0], 7), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image_type 7 is not an ImageType" in (caught.value.details() or "")
