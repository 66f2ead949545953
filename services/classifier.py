"""One classifier: an ONNX model, its family's pre/post-processing, its labels and type.

`Classifier.annotate` takes the API's `AnnotationRequest` and returns its
`AnnotationResponse`, so the gRPC service and the in-process pipeline stage call
exactly the same code. It blocks (decode + inference): call it from a thread.
onnxruntime releases the GIL and `InferenceSession.run` is safe to call from
several threads at once.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
from numpy.typing import NDArray

from services.api.image_classifier_pb2 import (
    AnnotationRequest,
    AnnotationResponse,
    ClassAnnotation,
    ClassifierSpecification,
    Label,
)
from services.config import ClassifierConfig, LabelConfig, load_catalog, local_path
from services.errors import ConfigError
from services.imaging import ImageLimits, RGBImage, decode_image
from services.model_families import FAMILIES, InputSize, ModelFamily, Tensor

MULTI_CLASS_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ResponseCaps:
    """What each response carries: all labels by default, as the upstream API does."""

    top_k: int | None = None
    min_confidence: float = 0.0
    specification_labels: str = "all"


class Classifier:
    def __init__(
        self,
        name: str,
        session: onnxruntime.InferenceSession,
        family: ModelFamily,
        labels: list[Label],
        classification_type: ClassifierSpecification.ClassificationType.ValueType,
        caps: ResponseCaps = ResponseCaps(),
        limits: ImageLimits = ImageLimits(),  # noqa: B008 - frozen value object
    ) -> None:
        self.name = name
        self.labels = labels
        self.classification_type = classification_type
        self.caps = caps
        self.limits = limits
        self._session = session
        self._family = family
        self._input_name: str = session.get_inputs()[0].name
        self.specification = ClassifierSpecification(labels=labels, classification_type=classification_type)
        self._check_output_size()

    def _check_output_size(self) -> None:
        probe = np.zeros((64, 64, 3), dtype=np.uint8)
        count = len(self.confidences(probe))
        if count != len(self.labels):
            raise ConfigError(f"classifier {self.name}: model gives {count} scores but {len(self.labels)} labels")

    @property
    def input_size(self) -> InputSize | None:
        """The smallest picture this model gives the same answer on, if its family declares one."""
        return self._family.input_size

    def confidences(self, pixels: RGBImage) -> NDArray[np.float64]:
        return self.infer(self.preprocess(pixels)[np.newaxis])[0]

    def preprocess(self, pixels: RGBImage) -> Tensor:
        """The network input for one image (no batch axis)."""
        return self._family.preprocess(pixels)

    def prepare(self, request: AnnotationRequest) -> Tensor:
        """The network input for one request; raises `InvalidImageError`."""
        return self.preprocess(decode_image(request.image, self.limits))

    def infer(self, batch: Tensor) -> list[NDArray[np.float64]]:
        """One inference over a batch of prepared inputs → each image's label confidences."""
        (outputs,) = self._session.run(None, {self._input_name: batch})[:1]
        results = []
        for output in outputs:
            scores = self._family.confidences(output)
            if self.classification_type == ClassifierSpecification.MULTI_CLASS:
                scores = scores / scores.sum()
            results.append(scores)
        return results

    def annotate(self, request: AnnotationRequest) -> AnnotationResponse:
        """Raises `InvalidImageError` when the image cannot be used."""
        return self.response(self.infer(self.prepare(request)[np.newaxis])[0])

    def response(self, scores: NDArray[np.float64]) -> AnnotationResponse:
        order = np.argsort(-scores, kind="stable")
        if self.caps.top_k is not None:
            order = order[: self.caps.top_k]
        chosen = [int(i) for i in order if scores[i] >= self.caps.min_confidence]
        annotations = [ClassAnnotation(label=self.labels[i], confidence=float(scores[i])) for i in chosen]
        if self.caps.specification_labels == "all":
            specification = self.specification
        else:
            specification = ClassifierSpecification(
                labels=[self.labels[i] for i in chosen], classification_type=self.classification_type
            )
        return AnnotationResponse(
            request_id=uuid.uuid4().hex,  # uuid4 draws from os.urandom: unguessable
            classifier_specification=specification,
            annotations=annotations,
        )


def _labels_from_file(path: Path) -> list[LabelConfig]:
    try:
        raw = json.loads(path.read_text())
        return [LabelConfig.model_validate(item) for item in raw]
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"cannot read labels file {path}: {exc}") from None


def _read_labels(config: ClassifierConfig) -> list[Label]:
    entries = config.labels if config.labels is not None else _labels_from_file(local_path(config.labels_file or ""))
    names = [entry.name for entry in entries]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"label names must be unique; repeated: {', '.join(duplicates)}")
    return [Label(name=entry.name, description=entry.description) for entry in entries]


def _open_session(config: ClassifierConfig, name: str) -> onnxruntime.InferenceSession:
    path = local_path(config.model)
    try:
        model_bytes = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"classifier {name}: cannot read model {path}: {exc.strerror}") from None
    if config.sha256 and hashlib.sha256(model_bytes).hexdigest() != config.sha256:
        raise ConfigError(f"classifier {name}: {path} does not match its sha256 {config.sha256}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.allow_spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if config.allow_spinning else "0")
    try:
        return onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ConfigError(f"classifier {name}: onnxruntime cannot load {path}: {exc}") from None


def build_classifier(name: str, config: ClassifierConfig, limits: ImageLimits = ImageLimits()) -> Classifier:  # noqa: B008
    return Classifier(
        name=name,
        session=_open_session(config, name),
        family=FAMILIES[config.family],
        labels=_read_labels(config),
        classification_type=ClassifierSpecification.ClassificationType.Value(config.classification_type),
        caps=ResponseCaps(config.top_k, config.min_confidence, config.specification_labels),
        limits=limits,
    )


def load_classifier(
    name: str,
    catalog_file: Path | None = None,
    limits: ImageLimits = ImageLimits(),  # noqa: B008
    overrides: Mapping[str, object] | None = None,
) -> Classifier:
    """Build the classifier `name`, built in or declared in `catalog_file`, with optional field overrides."""
    return build_classifier(name, classifier_config(name, catalog_file, overrides), limits)


def classifier_config(
    name: str, catalog_file: Path | None = None, overrides: Mapping[str, object] | None = None
) -> ClassifierConfig:
    """The declaration of classifier `name`, checked, without loading its model; ConfigError if there is none."""
    catalog = load_catalog(catalog_file)
    if name not in catalog.classifiers:
        known = ", ".join(sorted(catalog.classifiers))
        where = "among the built-in classifiers" if catalog_file is None else f"in {catalog_file} or built in"
        raise ConfigError(f"unknown classifier {name!r} {where} (known: {known})")
    config = catalog.classifiers[name]
    if overrides:
        config = ClassifierConfig.model_validate(config.model_dump() | dict(overrides))
    return config
