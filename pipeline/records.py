"""The Kafka record framelabel publishes: one place that writes it and one that reads it.

One record per annotated frame:

    key        the source id, UTF-8 (a source's frames share a partition, so they stay in order)
    value      the AnnotationResponse: protobuf binary, or the protobuf JSON mapping with the
               API reference's field names (`request_id`, `classifier_specification`) and enum names
    timestamp  the frame's capture time, ms since the epoch
    headers    UTF-8 strings: source_id, frame_index, media_position_ms (files, PyAV cameras),
               file_name (image folders only), capture_time_ms, content_type, image_width, image_height,
               worker (the worker of a group that published it, `framelabel run --group`),
               classifier (the name of the classifier that annotated it, when the run knows it)

A Python consumer needs three lines:

    from pipeline.records import decode_record
    async for message in consumer:
        record = decode_record(message.key, message.value, message.headers, message.timestamp)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from pipeline.frames import AnnotatedFrame
from services.api.image_classifier_pb2 import AnnotationResponse
from services.errors import FramelabelError

ValueFormat = Literal["protobuf", "json"]

PROTOBUF_MEDIA_TYPE = "application/x-protobuf"
PROTOBUF_CONTENT_TYPE = f"{PROTOBUF_MEDIA_TYPE}; messageType=yandex.cloud.ai.vision.v2.AnnotationResponse"
JSON_CONTENT_TYPE = "application/json"
CONTENT_TYPES: dict[ValueFormat, str] = {"protobuf": PROTOBUF_CONTENT_TYPE, "json": JSON_CONTENT_TYPE}

SOURCE_ID = "source_id"
FRAME_INDEX = "frame_index"
MEDIA_POSITION_MS = "media_position_ms"
CAPTURE_TIME_MS = "capture_time_ms"
CONTENT_TYPE = "content_type"
IMAGE_WIDTH = "image_width"
IMAGE_HEIGHT = "image_height"
FILE_NAME = "file_name"
WORKER = "worker"
CLASSIFIER = "classifier"


class RecordFormatError(FramelabelError, ValueError):
    """A Kafka record is not a framelabel annotation record; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """What the publisher hands to the Kafka client for one frame."""

    key: bytes
    value: bytes
    timestamp_ms: int
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class DecodedRecord:
    source_id: str
    frame_index: int
    media_position_ms: float | None  # None for images, and for cameras unless PyAV read them
    capture_time_ms: int  # from the header: the capture time even when the topic stamps LogAppendTime
    timestamp_ms: int  # the record's own timestamp (the capture time under the default CreateTime)
    image_width: int
    image_height: int
    content_type: str
    response: AnnotationResponse
    file_name: str | None = None  # image folders: the image's path
    worker: str | None = None  # the group's worker that published it
    classifier: str | None = None  # the classifier that annotated it, when the publisher knew


def encode_record(
    frame: AnnotatedFrame, value_format: ValueFormat, worker: str | None = None, classifier: str | None = None
) -> KafkaRecord:
    info = frame.info
    if value_format == "json":
        value = json_format.MessageToJson(
            frame.response, preserving_proto_field_name=True, indent=None, ensure_ascii=False
        ).encode()
    else:
        value = frame.response.SerializeToString()
    headers = {
        SOURCE_ID: info.source_id,
        FRAME_INDEX: str(info.index),
        CAPTURE_TIME_MS: str(info.capture_time_ms),
        CONTENT_TYPE: CONTENT_TYPES[value_format],
        IMAGE_WIDTH: str(frame.width),
        IMAGE_HEIGHT: str(frame.height),
    }
    if info.media_position_ms is not None:
        headers[MEDIA_POSITION_MS] = f"{info.media_position_ms:.3f}"
    if info.file_name is not None:
        headers[FILE_NAME] = info.file_name
    if worker is not None:
        headers[WORKER] = worker
    if classifier is not None:
        headers[CLASSIFIER] = classifier
    return KafkaRecord(
        key=info.source_id.encode(),
        value=value,
        timestamp_ms=info.capture_time_ms,
        headers=[(name, text.encode()) for name, text in headers.items()],
    )


def decode_record(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]], timestamp_ms: int
) -> DecodedRecord:
    """Read a record as the Kafka client gives it; raise RecordFormatError when it is not ours."""
    if key is None or value is None:
        raise RecordFormatError("record has no key or no value")
    texts = header_texts(headers)

    def header(name: str) -> str:
        if name not in texts:
            raise RecordFormatError(f"record has no {name!r} header")
        return texts[name]

    def integer(name: str) -> int:
        text = header(name)
        try:
            return int(text)
        except ValueError:
            raise RecordFormatError(f"header {name!r} is not an integer: {text!r}") from None

    content_type = header(CONTENT_TYPE)
    media_position = texts.get(MEDIA_POSITION_MS)
    try:
        media_position_ms = None if media_position is None else float(media_position)
    except ValueError:
        raise RecordFormatError(f"header {MEDIA_POSITION_MS!r} is not a number: {media_position!r}") from None
    return DecodedRecord(
        source_id=utf8(key, "key"),
        frame_index=integer(FRAME_INDEX),
        media_position_ms=media_position_ms,
        capture_time_ms=integer(CAPTURE_TIME_MS),
        timestamp_ms=timestamp_ms,
        image_width=integer(IMAGE_WIDTH),
        image_height=integer(IMAGE_HEIGHT),
        content_type=content_type,
        response=_parse_response(value, content_type),
        file_name=texts.get(FILE_NAME),
        worker=texts.get(WORKER),
        classifier=texts.get(CLASSIFIER),
    )


def record_json(record: DecodedRecord) -> dict[str, Any]:
    """A decoded record as a JSON-ready dict, the response under the API reference's field names."""
    return {
        "source_id": record.source_id,
        "frame_index": record.frame_index,
        "media_position_ms": record.media_position_ms,
        "capture_time_ms": record.capture_time_ms,
        "timestamp_ms": record.timestamp_ms,
        "image_width": record.image_width,
        "image_height": record.image_height,
        "content_type": record.content_type,
        "file_name": record.file_name,
        "worker": record.worker,
        "classifier": record.classifier,
        "response": json_format.MessageToDict(record.response, preserving_proto_field_name=True),
    }


def header_texts(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
    # Kafka allows null header values; none of ours is null, so such a header counts as absent.
    return {name: utf8(raw, f"header {name!r}") for name, raw in headers if raw is not None}


def utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise RecordFormatError(f"{what} is not UTF-8") from None


def _parse_response(value: bytes, content_type: str) -> AnnotationResponse:
    media_type = content_type.split(";", 1)[0].strip()
    response = AnnotationResponse()
    if media_type not in (JSON_CONTENT_TYPE, PROTOBUF_MEDIA_TYPE):
        raise RecordFormatError(f"unknown content type {content_type!r}")
    try:
        if media_type == JSON_CONTENT_TYPE:
            # Unknown fields are skipped, as the binary parser does, so newer producers stay readable.
            json_format.Parse(value, response, ignore_unknown_fields=True)
        else:
            response.ParseFromString(value)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError) as exc:
        raise RecordFormatError(f"value is not an AnnotationResponse ({media_type}): {exc}") from exc
    return response
