"""The event record on Kafka: one place that writes it and one that reads it.

key        the source id, UTF-8 (a source's events stay in order in one partition)
value      framelabel.events.v1.AnnotationEvent (services/protos/framelabel/events/v1/event.proto):
           protobuf binary, or the protobuf JSON mapping with the proto's field names and enum names
timestamp  capture time of the frame that produced the message, ms since the epoch
headers    UTF-8 strings: source_id, frame_index, capture_time_ms (that frame's), content_type,
           event_id, event_state (START, UPDATE, END)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from pipeline.records import (
    CAPTURE_TIME_MS,
    CONTENT_TYPE,
    FRAME_INDEX,
    JSON_CONTENT_TYPE,
    PROTOBUF_MEDIA_TYPE,
    SOURCE_ID,
    KafkaRecord,
    RecordFormatError,
    ValueFormat,
    header_texts,
    utf8,
)
from services.api.event_pb2 import AnnotationEvent

EVENT_MESSAGE_TYPE = "framelabel.events.v1.AnnotationEvent"
EVENT_PROTOBUF_CONTENT_TYPE = f"{PROTOBUF_MEDIA_TYPE}; messageType={EVENT_MESSAGE_TYPE}"
EVENT_CONTENT_TYPES: dict[ValueFormat, str] = {"protobuf": EVENT_PROTOBUF_CONTENT_TYPE, "json": JSON_CONTENT_TYPE}
EVENT_ID = "event_id"
EVENT_STATE = "event_state"
DEFAULT_EVENTS_TOPIC = "framelabel.events"


def event_id(source_id: str, label: str, classifier: str, first_frame_index: int, start_time_ms: int) -> str:
    """What identifies an event: 32 hex digits of SHA-256 over what it started with, never a random draw."""
    identity = "\0".join((source_id, label, classifier, str(first_frame_index), str(start_time_ms)))
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def encode_event(event: AnnotationEvent, value_format: ValueFormat) -> KafkaRecord:
    if value_format == "json":
        value = json_format.MessageToJson(event, preserving_proto_field_name=True, indent=None).encode()
    else:
        value = event.SerializeToString(deterministic=True)
    headers = {
        SOURCE_ID: event.source_id,
        FRAME_INDEX: str(event.at_frame_index),
        CAPTURE_TIME_MS: str(event.at_time_ms),
        CONTENT_TYPE: EVENT_CONTENT_TYPES[value_format],
        EVENT_ID: event.event_id,
        EVENT_STATE: AnnotationEvent.State.Name(event.state),
    }
    return KafkaRecord(
        key=event.source_id.encode(),
        value=value,
        timestamp_ms=event.at_time_ms,
        headers=[(name, text.encode()) for name, text in headers.items()],
    )


def is_event_record(headers: Sequence[tuple[str, bytes | None]]) -> bool:
    """Whether a record's headers say it holds an event (rather than an annotation)."""
    return any(name == EVENT_ID for name, _ in headers)


def decode_event(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]
) -> AnnotationEvent:
    """Read an event record as the Kafka client gives it; raise RecordFormatError when it is not one."""
    if key is None or value is None:
        raise RecordFormatError("record has no key or no value")
    content_type = header_texts(headers).get(CONTENT_TYPE)
    if content_type is None:
        raise RecordFormatError(f"record has no {CONTENT_TYPE!r} header")
    media_type = content_type.split(";", 1)[0].strip()
    event = AnnotationEvent()
    try:
        if media_type == JSON_CONTENT_TYPE:
            json_format.Parse(value, event, ignore_unknown_fields=True)
        elif media_type == PROTOBUF_MEDIA_TYPE:
            event.ParseFromString(value)
        else:
            raise RecordFormatError(f"unknown content type {content_type!r}")
    except (DecodeError, json_format.ParseError, UnicodeDecodeError) as exc:
        raise RecordFormatError(f"value is not an AnnotationEvent ({media_type}): {exc}") from exc
    if event.source_id != utf8(key, "key"):
        raise RecordFormatError(f"key {utf8(key, 'key')!r} is not the event's source {event.source_id!r}")
    return event


def event_json(event: AnnotationEvent) -> dict[str, object]:
    """An event as a JSON-ready dict: the proto's field names, enum names, 64-bit integers as numbers."""
    return json_format.MessageToDict(
        event, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    ) | {name: getattr(event, name) for name in INT64_FIELDS}


# the JSON mapping writes int64 as strings (JavaScript's numbers stop at 2^53); ours are far below that
INT64_FIELDS = (
    "first_frame_index",
    "last_frame_index",
    "start_time_ms",
    "end_time_ms",
    "duration_ms",
    "peak_frame_index",
    "peak_time_ms",
    "at_frame_index",
    "at_time_ms",
)
