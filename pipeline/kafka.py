"""Kafka plumbing shared by the publisher, the consumer and the CLI: settings, client options, the topic.

`KafkaConnection` is what any client needs to reach a cluster (addresses,
timeouts, TLS, SASL); `KafkaSettings` adds what the publisher does with it.
Both are validated once, when the run config or the flags are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.codec import has_gzip, has_lz4, has_snappy, has_zstd
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError, for_code
from aiokafka.helpers import create_ssl_context
from pydantic import Field, SecretStr, model_validator

from pipeline.retry import RetryPolicy, saying_while_waiting
from services.config import StrictModel
from services.errors import ConfigError, FramelabelError

log = logging.getLogger("framelabel.kafka")

MiB = 1024 * 1024
EMBEDDED = "embedded"  # not an address: the run starts a Tansu broker of its own
DEFAULT_TOPIC = "framelabel.annotations"
CLIENT_ID = "framelabel"

# A compacted topic is read to its end: its end offsets, then READ_QUIET_S more (Tansu's end offsets fall one
# short) or until quiet; an end offset not reached after READ_GIVE_UP_S of quiet is taken to be wrong.
READ_QUIET_S = 0.3
READ_GIVE_UP_S = 3.0
READ_POLL_MS = 200

# Consumer groups (consume --group, the events stage, a group's workers): a member that dies is noticed after the
# session timeout; Tansu lets a join wait half of it, so aiokafka's default 10 s made every join 5 s long
GROUP_SESSION_TIMEOUT_MS = 6000
GROUP_HEARTBEAT_INTERVAL_MS = 500

# a refused connection at start is tried again after 0.2 s, growing to 1 s, for connect_timeout_ms in all
BROKER_RETRY = RetryPolicy(first_s=0.2, cap_s=1.0)
CODEC_AVAILABLE = {"gzip": has_gzip, "snappy": has_snappy, "lz4": has_lz4, "zstd": has_zstd}


class KafkaUnreachable(FramelabelError):
    """No broker answered, or the cluster refused a client or a topic; the message names the address."""


class KafkaConnection(StrictModel):
    bootstrap_servers: Annotated[str, Field(min_length=1, description="host:port[,host:port…], or `embedded`")] = (
        EMBEDDED
    )
    topic: Annotated[str, Field(min_length=1)] = DEFAULT_TOPIC
    request_timeout_ms: Annotated[int, Field(gt=0)] = 30_000  # also how long aiokafka keeps retrying a batch
    connect_timeout_ms: Annotated[int, Field(gt=0)] = 10_000  # bound on start-up: bootstrap and topic creation
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password_env: str = "KAFKA_SASL_PASSWORD"
    # read from the variable `sasl_password_env` names when the config is loaded; never from a file
    sasl_password: SecretStr | None = Field(None, exclude=True)
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> KafkaConnection:
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_username, and the password in "
                f"the environment variable {self.sasl_password_env}"
            )
        return self


class KafkaSettings(KafkaConnection):
    """Everything the publisher does, settable in the run config's `kafka:` section."""

    partitions: Annotated[int, Field(ge=1, description="used only when the topic has to be created")] = 3
    replication_factor: Annotated[int, Field(ge=1)] = 1
    value_format: Literal["protobuf", "json"] = "protobuf"
    acks: Literal["all", 1] = "all"
    linger_ms: Annotated[int, Field(ge=0)] = 20
    max_batch_bytes: Annotated[int, Field(gt=0, description="per partition")] = 1 * MiB
    # the largest record; brokers default to ~1 MiB (message.max.bytes)
    max_request_bytes: Annotated[int, Field(gt=0)] = 4 * MiB
    compression: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    enable_idempotence: bool | None = Field(
        None, description="default: on (giving way to a broker that refuses it), off for the embedded broker"
    )
    max_in_flight_records: Annotated[int, Field(ge=1, description="unsettled records before publishing waits")] = 1000
    max_block_ms: (
        Annotated[int, Field(gt=0, description="how long publishing waits for room; null: no limit")] | None
    ) = None
    delivery_timeout_ms: Annotated[int, Field(gt=0, description="from publish to acknowledged, re-sends included")] = (
        300_000  # a broker outage this long loses nothing
    )
    delivery_retries: Annotated[int, Field(ge=0, description="a cap on re-sends of a record; null: none")] | None = None
    retry_backoff_ms: Annotated[int, Field(gt=0, description="first wait before a re-send; doubles up to 10 s")] = 500

    @model_validator(mode="after")
    def _codec_installed(self) -> KafkaSettings:
        if self.compression is not None and not CODEC_AVAILABLE[self.compression]():
            raise ValueError(f"compression {self.compression!r} needs cramjam: pip install 'aiokafka[all]'")
        return self

    @property
    def idempotent(self) -> bool:
        return self.enable_idempotence if self.enable_idempotence is not None else self.bootstrap_servers != EMBEDDED


def client_options(connection: KafkaConnection) -> dict[str, Any]:
    """The connection options every aiokafka client of ours takes: producer, consumer, admin."""
    password = connection.sasl_password
    return {
        "bootstrap_servers": connection.bootstrap_servers,
        "client_id": CLIENT_ID,
        "request_timeout_ms": connection.request_timeout_ms,
        "security_protocol": connection.security_protocol,
        "ssl_context": _ssl_context(connection),
        "sasl_mechanism": connection.sasl_mechanism,
        "sasl_plain_username": connection.sasl_username,
        "sasl_plain_password": password.get_secret_value() if password else None,
    }


def _ssl_context(connection: KafkaConnection) -> ssl.SSLContext | None:
    if not connection.security_protocol.endswith("SSL"):
        return None
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=connection.ssl_cafile and str(connection.ssl_cafile),
            certfile=connection.ssl_certfile and str(connection.ssl_certfile),
            keyfile=connection.ssl_keyfile and str(connection.ssl_keyfile),
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"kafka TLS files cannot be loaded: {exc}") from exc
    return context


def unreachable(connection: KafkaConnection, exc: BaseException, hint: str = "") -> KafkaUnreachable:
    """Our error for a client that could not start: no answer, or a refusal; `hint` says what may help."""
    if isinstance(exc, KafkaConnectionError | OSError | TimeoutError):
        reason = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
        return KafkaUnreachable(f"cannot reach Kafka at {connection.bootstrap_servers}: {reason}{hint}")
    return KafkaUnreachable(f"Kafka at {connection.bootstrap_servers} refused the client: {exc}{hint}")


async def wait_for_broker(connection: KafkaConnection) -> None:
    """Return once the broker answers, retrying a refused connection for `connect_timeout_ms` and saying so.

    A broker started together with its clients (a compose stack, a quickstart's background jobs) may listen a
    moment after they first call it; aiokafka gives up at the first refusal. `KafkaUnreachable` past the time."""
    within_s = connection.connect_timeout_ms / 1000
    attempts = BROKER_RETRY.start()
    try:
        # a whole bound too: a TLS handshake with a plaintext broker waits without refusing
        async with (
            saying_while_waiting(log, f"Kafka at {connection.bootstrap_servers}", within_s),
            asyncio.timeout(within_s),
        ):
            while True:
                try:
                    async with _metadata_reader(connection):
                        return
                except KafkaConnectionError as exc:
                    delay = attempts.failed()
                    if attempts.failures == 1:
                        address = connection.bootstrap_servers
                        log.info("waiting for Kafka at %s to answer (up to %g s)", address, within_s)
                    if attempts.failing_for_s + delay > within_s:
                        raise unreachable(connection, exc) from exc
                except KafkaError as exc:
                    raise unreachable(connection, exc) from exc
                await asyncio.sleep(delay)
    except TimeoutError as exc:
        raise unreachable(connection, exc) from exc


async def started_producer(connection: KafkaConnection, **options: Any) -> AIOKafkaProducer:
    """An aiokafka producer with our connection options (`options` on top), started; KafkaUnreachable if not."""
    producer = AIOKafkaProducer(**client_options(connection) | options)
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        raise unreachable(connection, exc) from exc
    return producer


async def ensure_topic(settings: KafkaSettings, configs: dict[str, str] | None = None) -> None:
    """Create the topic unless it exists; listing first, since a metadata lookup of one topic may auto-create it.

    `configs`: topic settings for a new topic, such as `cleanup.policy: compact`."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        await admin.start()
        if settings.topic in await admin.list_topics():
            return
        response = await admin.create_topics(
            [NewTopic(settings.topic, settings.partitions, settings.replication_factor, topic_configs=configs or {})]
        )
        for topic, error_code, *message in response.topic_errors:  # v1+ responses add a message
            error = for_code(error_code)
            if error_code and error is not TopicAlreadyExistsError:
                reason = message[0] if message and message[0] else error.__name__
                raise KafkaUnreachable(f"cannot create topic {topic} at {settings.bootstrap_servers}: {reason}")
        log.info("created topic %s with %d partitions", settings.topic, settings.partitions)
    except KafkaError as exc:
        raise unreachable(settings, exc) from exc
    finally:
        await admin.close()


@dataclass(frozen=True, slots=True)
class Latest:
    """The newest record of one key in a compacted topic."""

    partition: int
    value: bytes | None  # None: a tombstone, the key was removed
    timestamp_ms: int


async def partitions_of(connection: KafkaConnection, topic: str) -> set[int]:
    """The partitions `topic` has now (none while it does not exist), from a short-lived client's metadata."""
    try:
        async with _metadata_reader(connection) as reader:
            return set(reader.partitions_for_topic(topic) or ())
    except KafkaError as exc:
        raise unreachable(connection, exc) from exc


@contextlib.asynccontextmanager
async def _metadata_reader(connection: KafkaConnection) -> AsyncIterator[AIOKafkaConsumer]:
    """A short-lived client that has read the cluster's metadata (an answer from the broker); stopped after."""
    reader = AIOKafkaConsumer(**client_options(connection), group_id=None)
    try:
        await reader.start()
        await reader.topics()  # the metadata, and time for aiokafka's own start-up tasks before stop()
        yield reader
    finally:
        with contextlib.suppress(KafkaError):
            await reader.stop()


async def read_latest(
    connection: KafkaConnection, topic: str, partitions: set[int] | None = None, *, read_committed: bool = False
) -> dict[str, Latest]:
    """The newest record of every key in `topic` (or in some of its partitions), read from the start to the end.

    For compacted topics that hold state by key (sources, progress, status, the events changelog)."""
    reader = AIOKafkaConsumer(
        **client_options(connection),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed" if read_committed else "read_uncommitted",
    )
    try:
        await reader.start()
        if partitions is None:
            await reader.topics()
            partitions = reader.partitions_for_topic(topic) or set()
        assigned = [TopicPartition(topic, partition) for partition in sorted(partitions)]
        if not assigned:
            return {}
        reader.assign(assigned)
        await reader.seek_to_beginning(*assigned)
        ends = await reader.end_offsets(assigned)
        latest: dict[str, Latest] = {}
        quiet_since = time.monotonic()
        reached_at: float | None = None  # when the end offsets were reached (Tansu's may fall one short)
        while True:
            fetched = await reader.getmany(timeout_ms=READ_POLL_MS)
            for partition, records in fetched.items():
                for record in records:
                    if record.key is not None:
                        latest[record.key.decode()] = Latest(partition.partition, record.value, record.timestamp)
            now = time.monotonic()
            if fetched:
                quiet_since = now
            if reached_at is None and await _reached(reader, ends):
                reached_at = now
            # past the end: a little more for a short end offset, but not on and on while others keep writing
            if reached_at is not None and now - reached_at >= READ_QUIET_S:
                break
            if reached_at is None and now - quiet_since >= READ_GIVE_UP_S:
                break
        return latest
    except KafkaError as exc:
        raise unreachable(connection, exc) from exc
    finally:
        await reader.stop()


async def _reached(reader: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    return all([await reader.position(partition) >= end for partition, end in ends.items()])
