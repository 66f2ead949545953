"""Security from the pipeline's side: TLS and an API key to our own service end to end, Kafka SASL/SSL
options as aiokafka receives them, and request ids nobody can guess. (The service's own auth, TLS
and limits are in test_security.py and test_service.py.)"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from pipeline.broker import EmbeddedBroker
from pipeline.config import load_run_config
from pipeline.kafka import KafkaSettings, KafkaUnreachable, client_options
from pipeline.publisher import Publisher
from services.classifier import Classifier
from tests.faults import pipeline_run, write_run_config
from tests.helpers import ServiceProcess, within
from tests.kafka import kafka_broker, read_topic
from tests.test_run import BUNNY, frame_count
from tests.test_security import API_KEY, Pki, pki, write_tls_config

__all__ = ["pki"]  # the fixture, shared with test_security.py

KAFKA_PASSWORD = "kafka-secret-for-tests"


@pytest.mark.parametrize("key", [API_KEY, "Api-Key-nobody-issued"], ids=["right-key", "wrong-key"])
async def test_run_annotates_over_tls_with_an_api_key_and_never_logs_it(
    service_factory: Callable[..., ServiceProcess], pki: Pki, tmp_path: Path, key: str
) -> None:
    service_env = os.environ | {"FRAMELABEL_API_KEYS": API_KEY}
    service = service_factory("--config", str(write_tls_config(tmp_path, pki, mutual=False)), env=service_env)
    every_nth = 22
    expected = len(range(0, frame_count(BUNNY), every_nth))
    annotator = {"kind": "grpc", "targets": [f"localhost:{service.port}"], "ca_file": str(pki.ca)}
    async with kafka_broker() as broker:
        sources = [{"id": "bunny", "uri": str(BUNNY), "every_nth": every_nth}]
        config = write_run_config(tmp_path, broker.address, sources, annotator=annotator)
        with pipeline_run(config, env=os.environ | {"YC_API_KEY": key}) as run:
            code = await run.end()
        records = await read_topic(broker.address, "frames", expected=expected) if key == API_KEY else []
    summary = run.summary("bunny")
    assert code == (0 if key == API_KEY else 1), run.log()  # frames not annotated are lost: exit status 1
    assert key not in run.log() + "".join(run.stdout)
    if key == API_KEY:
        assert [r.frame_index for r in records] == list(range(0, frame_count(BUNNY), every_nth))
        assert summary["published"] == expected
    else:
        assert (summary["published"], summary["failed"]) == (0, expected)
        assert "UNAUTHENTICATED" in run.log()


async def test_kafka_sasl_and_tls_settings_reach_aiokafka(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "sources: [{id: a, uri: a.mp4}]\n"
        "kafka:\n"
        "  bootstrap_servers: kafka.example:9093\n"
        "  security_protocol: SASL_SSL\n"
        "  sasl_mechanism: SCRAM-SHA-512\n"
        "  sasl_username: framelabel\n"
        f"  ssl_cafile: {pki.ca}\n"
        f"  ssl_certfile: {pki.client_cert}\n"
        f"  ssl_keyfile: {pki.client_key}\n"
    )
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", KAFKA_PASSWORD)
    settings = load_run_config(config_file, {}).kafka
    assert KAFKA_PASSWORD not in repr(settings)
    producer = AIOKafkaProducer(**client_options(settings))
    client = producer.client
    assert (client._security_protocol, client._sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (client._sasl_plain_username, client._sasl_plain_password) == ("framelabel", KAFKA_PASSWORD)
    context = client._ssl_context
    assert context.check_hostname
    assert [cert["subject"] for cert in context.get_ca_certs()] == [((("commonName", "framelabel test CA"),),)]


async def test_tls_to_a_plaintext_broker_fails_fast_and_names_it(pki: Pki) -> None:
    async with EmbeddedBroker() as broker:
        settings = KafkaSettings(
            bootstrap_servers=broker.address,
            enable_idempotence=False,
            security_protocol="SSL",
            ssl_cafile=pki.ca,
            connect_timeout_ms=1000,
        )
        # Fast: it gives up by connect_timeout_ms (a TLS handshake to a plaintext broker can wait for ever); the
        # liveness bound is well past that, so only a hang fails it.
        with pytest.raises(KafkaUnreachable, match=f"Kafka at {broker.address}|cannot reach Kafka at {broker.address}"):
            async with within(30, "start() over TLS to a plaintext broker"):
                await Publisher(settings).start()


def test_request_ids_are_uuid4_with_122_unbiased_random_bits(classifiers: dict[str, Classifier]) -> None:
    moderation = classifiers["moderation"]
    ids = [uuid.UUID(moderation.response(np.array([0.5, 0.5])).request_id) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert {(i.version, i.variant) for i in ids} == {(4, uuid.RFC_4122)}
    bits = np.array([[(i.int >> shift) & 1 for shift in range(128)] for i in ids])
    random_bits = np.delete(bits, [76, 77, 78, 79, 62, 63], axis=1)  # the version (4 bits) and variant (2 bits)
    assert np.all(np.abs(random_bits.mean(axis=0) - 0.5) < 0.06)  # each bit a fair coin: ~7 sigma margin
