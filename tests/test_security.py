"""API keys, IAM tokens, TLS and mutual TLS on the Annotate service."""

from __future__ import annotations

import datetime
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.api.image_classifier_service_pb2_grpc import ImageClassifierServiceStub
from tests.helpers import FRAMELABEL, ServiceProcess, jpeg, photo, request, start_service

API_KEY = "k-0123456789abcdef"
IAM_TOKEN = "t1.iam-token-for-tests"
COFFEE_JPEG = jpeg(photo("coffee"))


def call_code(address: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        try:
            ImageClassifierServiceStub(channel).Annotate(request(COFFEE_JPEG), metadata=metadata, timeout=30)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


SECURED_ENV = os.environ | {"FRAMELABEL_API_KEYS": f"other-key,{API_KEY}", "FRAMELABEL_IAM_TOKENS": IAM_TOKEN}


@pytest.fixture(scope="module")
def secured_service() -> Iterator[ServiceProcess]:
    """One service for the calls that only ask it something (each call is checked on its own)."""
    service = start_service(env=SECURED_ENV)
    yield service
    service.stop()


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        pytest.param((("authorization", f"Api-Key {API_KEY}"),), grpc.StatusCode.OK, id="api-key"),
        pytest.param((("authorization", f"Bearer {IAM_TOKEN}"),), grpc.StatusCode.OK, id="bearer"),
        pytest.param((("authorization", "Api-Key wrong"),), grpc.StatusCode.UNAUTHENTICATED, id="wrong-key"),
        pytest.param((("authorization", f"Bearer {API_KEY}"),), grpc.StatusCode.UNAUTHENTICATED, id="key-as-token"),
        pytest.param((("authorization", API_KEY),), grpc.StatusCode.UNAUTHENTICATED, id="no-scheme"),
        pytest.param((), grpc.StatusCode.UNAUTHENTICATED, id="missing"),
    ],
)
def test_api_keys_and_tokens(
    secured_service: ServiceProcess, metadata: tuple[tuple[str, str], ...], expected: grpc.StatusCode
) -> None:
    assert call_code(secured_service.address, metadata) == expected


def test_health_stays_open_and_secrets_stay_out_of_the_log(service_factory: Callable[..., ServiceProcess]) -> None:
    secured_service = service_factory(env=SECURED_ENV)  # its own: stopped here, so that its whole log is read
    with grpc.insecure_channel(secured_service.address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    call_code(secured_service.address, (("authorization", "Api-Key wrong-guess"),))
    secured_service.stop()
    log = "".join(secured_service.log)
    assert "auth=on" in log
    assert API_KEY not in log
    assert IAM_TOKEN not in log
    assert "wrong-guess" not in log


def test_refuses_to_serve_off_loopback_without_credentials() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FRAMELABEL_")}
    result = subprocess.run(
        [FRAMELABEL, "serve", "--host", "0.0.0.0", "--port", "0"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "auth: serving on 0.0.0.0 with no API keys or tokens" in result.stderr
    assert "Traceback" not in result.stderr


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _issue(
    name: str, issuer: x509.Name | None, signing_key: ec.EllipticCurvePrivateKey | None, is_ca: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(signing_key or key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = _issue("framelabel test CA", None, None, is_ca=True)
    paths = {"ca": folder / "ca.pem"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for role in ("server", "client"):
        cert, key = _issue(role if role == "client" else "localhost", ca_cert.subject, ca_key, is_ca=False)
        paths[f"{role}_cert"] = folder / f"{role}.pem"
        paths[f"{role}_key"] = folder / f"{role}.key"
        paths[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{role}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return Pki(**paths)


def tls_code(address: str, pki: Pki, with_client_cert: bool) -> grpc.StatusCode:
    client_key = pki.client_key.read_bytes() if with_client_cert else None
    client_cert = pki.client_cert.read_bytes() if with_client_cert else None
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes(), client_key, client_cert)
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(address, credentials, options=options) as channel:
        try:
            ImageClassifierServiceStub(channel).Annotate(request(COFFEE_JPEG), timeout=30)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def write_tls_config(folder: Path, pki: Pki, mutual: bool) -> Path:
    config = folder / "service.yaml"
    lines = ["tls:", f"  cert_file: {pki.server_cert}", f"  key_file: {pki.server_key}"]
    if mutual:
        lines.append(f"  client_ca_file: {pki.ca}")
    config.write_text("\n".join(lines) + "\n")
    return config


def test_tls(service_factory: Callable[..., ServiceProcess], pki: Pki, tmp_path: Path) -> None:
    service = service_factory("--config", str(write_tls_config(tmp_path, pki, mutual=False)))
    assert tls_code(service.address, pki, with_client_cert=False) == grpc.StatusCode.OK
    assert call_code(service.address, ()) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port


def test_mutual_tls_requires_a_client_certificate(
    service_factory: Callable[..., ServiceProcess], pki: Pki, tmp_path: Path
) -> None:
    service = service_factory("--config", str(write_tls_config(tmp_path, pki, mutual=True)))
    assert tls_code(service.address, pki, with_client_cert=True) == grpc.StatusCode.OK
    assert tls_code(service.address, pki, with_client_cert=False) == grpc.StatusCode.UNAVAILABLE
