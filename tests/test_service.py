"""The gRPC Annotate service, run as `framelabel serve`, called over loopback."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_tools import protoc

from services.api.image_classifier_pb2 import AnnotationResponse, ClassifierSpecification
from services.api.image_classifier_service_pb2_grpc import ImageClassifierServiceStub
from services.api.image_pb2 import Image
from services.classifier import Classifier
from tests.cameras import free_port
from tests.helpers import ServiceProcess, jpeg, photo, request, scrape
from tests.test_imaging import png, png_bomb, with_jpeg_size

PROTO_ROOT = Path(__file__).resolve().parents[1] / "services" / "protos"
COFFEE_JPEG = jpeg(photo("coffee"))


@pytest.fixture(scope="module")
def stub(imagenet_service: ServiceProcess) -> Iterator[ImageClassifierServiceStub]:
    with grpc.insecure_channel(imagenet_service.address) as channel:
        yield ImageClassifierServiceStub(channel)


def annotate(stub: ImageClassifierServiceStub, content: bytes, image_type: int = Image.JPEG) -> AnnotationResponse:
    response: AnnotationResponse = stub.Annotate(request(content, image_type), timeout=30)
    return response


def test_annotates_a_photo(stub: ImageClassifierServiceStub) -> None:
    response = annotate(stub, COFFEE_JPEG)
    assert response.annotations[0].label.name == "espresso"
    assert response.classifier_specification.classification_type == ClassifierSpecification.MULTI_CLASS
    assert len(response.classifier_specification.labels) == 1000
    assert response.request_id != annotate(stub, COFFEE_JPEG).request_id


def test_unspecified_image_type_is_sniffed(stub: ImageClassifierServiceStub) -> None:
    response = annotate(stub, png(photo("coffee")[:, :, ::-1]), Image.IMAGE_TYPE_UNSPECIFIED)
    assert response.annotations[0].label.name == "espresso"


@pytest.mark.parametrize(
    ("content", "image_type", "message"),
    [
        pytest.param(b"", Image.JPEG, "image content is empty", id="empty"),
        pytest.param(b"hello, world" * 10, Image.JPEG, "cannot decode image", id="not-an-image"),
        pytest.param(COFFEE_JPEG[: len(COFFEE_JPEG) // 2], Image.JPEG, "cannot decode image", id="truncated-jpeg"),
        pytest.param(png(photo("coffee")), Image.JPEG, "content is PNG but image_type says JPEG", id="png-as-jpeg"),
        pytest.param(COFFEE_JPEG, Image.PNG, "content is JPEG but image_type says PNG", id="jpeg-as-png"),
        pytest.param(png_bomb(50_000), Image.PNG, "image resolution too high: 50000×50000 > 20 MP", id="png-bomb"),
        pytest.param(with_jpeg_size(COFFEE_JPEG, 6000, 4000), Image.JPEG, "image resolution too high", id="jpeg-24mp"),
    ],
)
def test_bad_input_gets_invalid_argument_and_the_server_goes_on(
    stub: ImageClassifierServiceStub, content: bytes, image_type: int, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        annotate(stub, content, image_type)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert "Traceback" not in caught.value.details()
    assert annotate(stub, COFFEE_JPEG).annotations[0].label.name == "espresso"


def test_health_answers_serving(imagenet_service: ServiceProcess) -> None:
    with grpc.insecure_channel(imagenet_service.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "yandex.cloud.ai.vision.v2.ImageClassifierService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(imagenet_service: ServiceProcess) -> None:
    with grpc.insecure_channel(imagenet_service.address) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {service.name for answer in answers for service in answer.list_services_response.service}
    assert "yandex.cloud.ai.vision.v2.ImageClassifierService" in names


def test_a_client_generated_from_the_protos_calls_the_server(imagenet_service: ServiceProcess, tmp_path: Path) -> None:
    """What any client built from the upstream `yandex.cloud.ai.vision.v2` protos does (yandexcloud SDK style)."""
    protos = [str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto")]
    assert (
        protoc.main(["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos])
        == 0
    )
    (tmp_path / "coffee.jpg").write_bytes(COFFEE_JPEG)
    client = textwrap.dedent(
        f"""
        import grpc
        from yandex.cloud.ai.vision.v2 import image_classifier_pb2, image_pb2
        from yandex.cloud.ai.vision.v2.image_classifier_service_pb2_grpc import ImageClassifierServiceStub
        content = open("coffee.jpg", "rb").read()
        with grpc.insecure_channel("{imagenet_service.address}") as channel:
            stub = ImageClassifierServiceStub(channel)
            image = image_pb2.Image(content=content, image_type=image_pb2.Image.JPEG)
            response = stub.Annotate(image_classifier_pb2.AnnotationRequest(image=image), timeout=30)
        print(response.annotations[0].label.name)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", client], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "espresso"


def test_wire_bytes_match_the_upstream_field_numbers() -> None:
    wire = request(b"x", Image.JPEG).SerializeToString()
    # AnnotationRequest.image = 1 (5 bytes) → Image.content = 1 (b"x"), Image.image_type = 2 (JPEG = 1)
    assert wire == bytes.fromhex("0a050a01781001")
    # request_id = 1 ("a"); annotations = 3 → label = 1 → name = 1 ("cat"); confidence = 2 (double 0.5)
    response = AnnotationResponse.FromString(bytes.fromhex("0a01611a100a050a0363617411000000000000e03f"))
    assert (response.request_id, response.annotations[0].label.name) == ("a", "cat")
    assert response.annotations[0].confidence == 0.5


def test_concurrency_limit_answers_resource_exhausted(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    config = tmp_path / "service.yaml"
    config.write_text("max_concurrent_requests: 1\ninference_threads: 1\n")
    service = service_factory("--config", str(config))
    big = jpeg(photo("astronaut").repeat(6, axis=0).repeat(6, axis=1))  # ~9 MP: decode takes a while
    with grpc.insecure_channel(service.address) as channel:
        limited = ImageClassifierServiceStub(channel)

        def call(_: int) -> grpc.StatusCode:
            try:
                limited.Annotate(request(big), timeout=60)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(call, range(12)))
    assert grpc.StatusCode.OK in codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_image_byte_limit_and_message_limit(service_factory: Callable[..., ServiceProcess], tmp_path: Path) -> None:
    config = tmp_path / "service.yaml"
    config.write_text("max_image_bytes: 50000\nmax_message_bytes: 200000\n")
    service = service_factory("--config", str(config))
    with grpc.insecure_channel(service.address) as channel:
        limited = ImageClassifierServiceStub(channel)
        with pytest.raises(grpc.RpcError) as too_big:
            annotate(limited, jpeg(photo("coffee"), quality=95))
        assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image too big" in too_big.value.details()
        with pytest.raises(grpc.RpcError) as too_long:
            annotate(limited, b"\xff\xd8\xff" + b"\x00" * 300_000)
        assert too_long.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_sigterm_finishes_in_flight_calls_then_exits_0(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    config = tmp_path / "service.yaml"
    config.write_text("inference_threads: 1\n")  # calls queue up behind each other
    service = service_factory("--config", str(config))
    big = jpeg(photo("astronaut").repeat(6, axis=0).repeat(6, axis=1))
    first_done = threading.Event()
    with grpc.insecure_channel(service.address) as channel:
        stub = ImageClassifierServiceStub(channel)
        calls = [stub.Annotate.future(request(big), timeout=60) for _ in range(8)]
        calls[0].add_done_callback(lambda _: first_done.set())
        assert first_done.wait(60)  # the server is working through the queue: the rest are in flight
        in_flight = [call for call in calls if not call.done()]
        service.process.send_signal(signal.SIGTERM)
        results = [call.result() for call in calls]
    assert in_flight  # calls were still in flight when the signal came …
    assert all(result.annotations for result in results)  # … and each was answered
    assert service.stop() == 0
    assert any("stopped" in line for line in service.log)


def test_dynamic_batching_answers_as_single_calls_do(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path, classifiers: dict[str, Classifier]
) -> None:
    config = tmp_path / "service.yaml"
    config.write_text("batching: {max_batch: 4, max_wait_ms: 50}\n")
    metrics_port = free_port()
    service = service_factory("--config", str(config), "--metrics-port", str(metrics_port))
    assert any("batching=≤4" in line for line in service.log)
    photos = [jpeg(photo(name)) for name in ("coffee", "chelsea", "rocket", "astronaut")] * 3
    with grpc.insecure_channel(service.address) as channel:
        stub = ImageClassifierServiceStub(channel)
        calls = [stub.Annotate.future(request(content), timeout=60) for content in photos]
        bad = stub.Annotate.future(request(b"not an image"), timeout=60)
        responses = [call.result() for call in calls]
        with pytest.raises(grpc.RpcError) as refused:
            bad.result()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for content, response in zip(photos, responses, strict=True):
        single = classifiers["imagenet"].annotate(request(content))
        assert response.annotations[0].label.name == single.annotations[0].label.name
        assert response.annotations[0].confidence == pytest.approx(single.annotations[0].confidence, abs=1e-4)
    # every image that decoded went through one batch of at most 4 (the one that did not, through none)
    batches = scrape(f"http://127.0.0.1:{metrics_port}")
    assert batches[("framelabel_service_batch_size_sum", ())] == len(photos)
    assert batches[("framelabel_service_batch_size_count", ())] >= len(photos) / 4
    assert (
        batches[("framelabel_service_batch_size_bucket", (("le", "4.0"),))]
        == batches[("framelabel_service_batch_size_count", ())]
    )
