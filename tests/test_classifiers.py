"""The three shipped classifiers on real photos, and the classifier catalog's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.api.image_classifier_pb2 import ClassifierSpecification
from services.classifier import Classifier, load_classifier
from services.config import load_catalog
from services.errors import ConfigError
from services.imaging import downscale, resize
from tests.helpers import jpeg, photo, request

# ImageNet's domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian cat
CAT_CLASSES = range(281, 286)


def top_label(classifier: Classifier, photo_name: str) -> tuple[str, float]:
    response = classifier.annotate(request(jpeg(photo(photo_name))))
    best = response.annotations[0]
    return best.label.name, best.confidence


def test_imagenet_sees_espresso_in_coffee(classifiers: dict[str, Classifier]) -> None:
    name, confidence = top_label(classifiers["imagenet"], "coffee")
    assert name == "espresso"
    assert confidence > 0.9


def test_int8_imagenet_agrees_on_a_clear_photo() -> None:
    int8 = load_classifier("imagenet-int8")
    name, confidence = top_label(int8, "coffee")
    assert name == "espresso"
    assert confidence > 0.8


def test_imagenet_gets_the_same_input_from_a_picture_at_its_input_size(classifiers: dict[str, Classifier]) -> None:
    imagenet = classifiers["imagenet"]
    assert imagenet.input_size is not None
    frame = resize(photo("chelsea"), 1280, 720)
    scale = imagenet.input_size.scale(1280, 720)
    at_input_size = downscale(frame, round(1280 * scale), round(720 * scale))
    assert at_input_size.shape == (256, 455, 3)
    assert (imagenet.preprocess(at_input_size) == imagenet.preprocess(downscale(frame, 640, 360))).all()


def test_imagenet_sees_a_cat_in_chelsea(classifiers: dict[str, Classifier]) -> None:
    imagenet = classifiers["imagenet"]
    name, _ = top_label(imagenet, "chelsea")
    cat_names = {imagenet.labels[i].name for i in CAT_CLASSES}
    assert name in cat_names


def test_moderation_finds_ordinary_photos_safe(classifiers: dict[str, Classifier]) -> None:
    for photo_name in ("coffee", "chelsea", "astronaut"):
        name, confidence = top_label(classifiers["moderation"], photo_name)
        assert (name, confidence > 0.9) == ("sfw", True), photo_name


def test_nudity_detector_finds_the_astronauts_face(classifiers: dict[str, Classifier]) -> None:
    name, confidence = top_label(classifiers["nudity"], "astronaut")
    assert name == "FACE_FEMALE"
    assert confidence > 0.5


@pytest.mark.parametrize("name", ["imagenet", "moderation"])
def test_multi_class_confidences_sum_to_one(classifiers: dict[str, Classifier], name: str) -> None:
    response = classifiers[name].annotate(request(jpeg(photo("rocket"))))
    assert response.classifier_specification.classification_type == ClassifierSpecification.MULTI_CLASS
    assert len(response.annotations) == len(classifiers[name].labels)
    assert sum(a.confidence for a in response.annotations) == pytest.approx(1.0, abs=1e-6)


def test_multi_label_confidences_are_each_within_0_and_1(classifiers: dict[str, Classifier]) -> None:
    response = classifiers["nudity"].annotate(request(jpeg(photo("astronaut"))))
    assert response.classifier_specification.classification_type == ClassifierSpecification.MULTI_LABEL
    assert len(response.annotations) == 18
    assert all(0.0 <= a.confidence <= 1.0 for a in response.annotations)


def test_response_names_the_served_labels_and_is_sorted(classifiers: dict[str, Classifier]) -> None:
    imagenet = classifiers["imagenet"]
    response = imagenet.annotate(request(jpeg(photo("coffee"))))
    names = [label.name for label in response.classifier_specification.labels]
    assert len(names) == len(set(names)) == 1000
    assert "missile" in names
    assert "projectile, missile" in names  # the clashing clean name, told apart
    confidences = [a.confidence for a in response.annotations]
    assert confidences == sorted(confidences, reverse=True)


def test_request_ids_are_fresh_and_unguessable(classifiers: dict[str, Classifier]) -> None:
    content = jpeg(photo("coffee"))
    ids = {classifiers["moderation"].annotate(request(content)).request_id for _ in range(20)}
    assert len(ids) == 20
    assert all(len(request_id) == 32 for request_id in ids)  # 122 random bits each


def test_caps_trim_annotations_and_specification() -> None:
    capped = load_classifier(
        "imagenet",
        overrides={"top_k": 5, "min_confidence": 0.01, "specification_labels": "annotated"},
    )
    response = capped.annotate(request(jpeg(photo("coffee"))))
    assert 1 <= len(response.annotations) <= 5
    assert all(a.confidence >= 0.01 for a in response.annotations)
    assert [label.name for label in response.classifier_specification.labels] == [
        a.label.name for a in response.annotations
    ]


def write_catalog(tmp_path: Path, entry: dict[str, object]) -> Path:
    path = tmp_path / "classifiers.yaml"
    path.write_text(json.dumps({"classifiers": {"broken": entry}}))  # JSON is valid YAML
    return path


MODERATION = load_catalog().classifiers["moderation"].model_dump(exclude_none=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"top_k": 0}, r"classifiers\.broken\.top_k: Input should be greater than 0"),
        ({"family": "resnet"}, r"classifiers\.broken\.family: Input should be"),
        ({"colour": "red"}, r"classifiers\.broken\.colour: Extra inputs are not permitted"),
        ({"labels_file": "labels.json"}, "exactly one of `labels` and `labels_file`"),
        ({"sha256": "0" * 64}, "does not match its sha256"),
        ({"model": "missing.onnx"}, "cannot read model"),
        ({"model": "package://no_such_package/x.onnx"}, "package 'no_such_package' is not installed"),
        ({"labels": [{"name": "only-one"}]}, "model gives 2 scores but 1 labels"),
        ({"labels": [{"name": "same"}, {"name": "same"}]}, "label names must be unique; repeated: same"),
        (
            {"event_defaults": [{"match": "sfw", "enter_threshold": 0.2, "exit_threshold": 0.4}]},
            r"classifiers\.broken\.event_defaults\.0: Value error, `exit_threshold` \(0\.4\) must not exceed",
        ),
        (
            {"event_defaults": [{"enter_threshold": 0.2}]},
            r"classifiers\.broken\.event_defaults\.0\.match: Field required",
        ),
    ],
)
def test_bad_classifier_entries_are_refused_by_name(tmp_path: Path, change: dict[str, object], message: str) -> None:
    path = write_catalog(tmp_path, MODERATION | change)
    with pytest.raises(ConfigError, match=message):
        load_classifier("broken", path)


def test_unknown_classifier_lists_the_known_ones() -> None:
    known = r"imagenet, imagenet-int8, moderation, nudity"
    with pytest.raises(ConfigError, match=rf"unknown classifier 'nope' among the built-in classifiers.*{known}"):
        load_classifier("nope")


def test_a_classifiers_file_adds_to_the_built_in_ones() -> None:
    example = Path(__file__).resolve().parents[1] / "configs" / "classifiers.yaml"
    catalog = load_catalog(example)
    assert {"imagenet", "moderation", "nudity", "imagenet-top3"} <= set(catalog.classifiers)
    response = load_classifier("imagenet-top3", example).annotate(request(jpeg(photo("coffee"))))
    assert [a.label.name for a in response.annotations][:1] == ["espresso"]
    assert len(response.annotations) == 3
