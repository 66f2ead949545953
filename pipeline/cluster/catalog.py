"""The sources catalog: a compacted Kafka topic that holds the sources a group of workers runs.

One record per source: key = the source id (UTF-8), value = its `sources:` entry of a run
config as a JSON object, with only the settings that were given (the rest keep the defaults
of whichever framelabel version runs it). A tombstone (no value) removes the source. Records
are keyed, so Kafka's default partitioner spreads the sources over the partitions, and each
worker of a group runs the sources of the partitions it is assigned.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka.errors import KafkaError
from pydantic import ValidationError

from pipeline.config import SourceConfig
from pipeline.kafka import KafkaConnection, KafkaSettings, ensure_topic, read_latest, started_producer, unreachable
from services.config import format_validation_error
from services.errors import ConfigError


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    partition: int
    config: SourceConfig


@dataclass(frozen=True, slots=True)
class Catalog:
    sources: dict[str, CatalogEntry]  # by source id
    invalid: dict[str, str]  # key → why its record cannot be read as a source


async def ensure_compacted_topic(connection: KafkaConnection, topic: str, partitions: int) -> None:
    """Create `topic` with `cleanup.policy: compact` unless it exists (an existing topic is left as it is)."""
    settings = KafkaSettings.model_validate(dict(connection) | {"topic": topic, "partitions": partitions})
    await ensure_topic(settings, {"cleanup.policy": "compact"})


def encode_source(source: SourceConfig) -> bytes:
    return json.dumps(source.model_dump(mode="json", exclude_unset=True), separators=(",", ":")).encode()


def decode_source(key: str, value: bytes) -> SourceConfig:
    """The source a record holds; ConfigError naming the key when it is not JSON, not a valid source, or
    names another id than its key."""
    try:
        return _decoded(key, value)
    except _Unreadable as exc:
        raise ConfigError(f"sources record {key!r}: {exc}") from None


class _Unreadable(Exception):
    """Why a record is not a source (the key is named by whoever reports it)."""


def _decoded(key: str, value: bytes) -> SourceConfig:
    try:
        data = json.loads(value)
    except ValueError as exc:  # not UTF-8 either
        raise _Unreadable(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _Unreadable(f"expected a JSON object, got {type(data).__name__}")
    try:
        source = SourceConfig.model_validate(data)
    except ValidationError as exc:
        raise _Unreadable(format_validation_error("not a valid source", exc)) from None
    if source.id != key:
        raise _Unreadable(f"its id is {source.id!r}, not its key")
    return source


async def put_sources(connection: KafkaConnection, topic: str, sources: Sequence[SourceConfig]) -> None:
    """Add the sources, or replace those of the same id; returns once Kafka has acknowledged every record."""
    await _send(connection, topic, [(source.id, encode_source(source), None) for source in sources])


async def remove_sources(connection: KafkaConnection, topic: str, source_ids: Sequence[str]) -> None:
    """Remove the sources (a record that cannot be read as one is removed by its key alike); ConfigError listing
    the ids the topic does not hold, and then nothing is removed."""
    held = {
        key: record.partition
        for key, record in (await read_latest(connection, topic)).items()
        if record.value is not None
    }
    unknown = [source_id for source_id in source_ids if source_id not in held]
    if unknown:
        raise ConfigError(f"not in {topic}: {', '.join(unknown)} (`framelabel sources list` shows what is)")
    # the tombstone goes where the record is, whichever partitioner placed it
    await _send(connection, topic, [(source_id, None, held[source_id]) for source_id in source_ids])


async def read_sources(connection: KafkaConnection, topic: str) -> Catalog:
    """Every source in the topic with its partition, and every record that is not a source with the reason."""
    sources: dict[str, CatalogEntry] = {}
    invalid: dict[str, str] = {}
    for key, record in sorted((await read_latest(connection, topic)).items()):
        if record.value is None:  # removed
            continue
        try:
            sources[key] = CatalogEntry(record.partition, _decoded(key, record.value))
        except _Unreadable as exc:
            invalid[key] = str(exc)
    return Catalog(sources, invalid)


async def _send(connection: KafkaConnection, topic: str, records: list[tuple[str, bytes | None, int | None]]) -> None:
    producer = await started_producer(connection, acks="all", enable_idempotence=False)
    try:
        deliveries = [
            await producer.send(topic, value, key=key.encode(), partition=partition)
            for key, value, partition in records
        ]
        for delivery in deliveries:
            await delivery
    except KafkaError as exc:
        raise unreachable(connection, exc) from exc
    finally:
        await producer.stop()
