"""Annotate over gRPC: our own service or Yandex's `vision.api.cloud.yandex.net:443`.

Retries belong to gRPC itself: the channel's service config carries a
`retryPolicy` for UNAVAILABLE and RESOURCE_EXHAUSTED (exponential backoff with
jitter, at most 5 attempts). Since 5 attempts cannot wait out a service being
redeployed, an outer loop keeps retrying those two codes, with capped backoff,
until `retry_for_seconds` has passed. Several targets share the load in turn;
each channel also balances `round_robin` over every address its name resolves to.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from dataclasses import dataclass, field

import grpc
from grpc import aio

from services.api.image_classifier_pb2 import AnnotationRequest, AnnotationResponse
from services.api.image_classifier_service_pb2_grpc import ImageClassifierServiceStub
from services.errors import AnnotatorError, AnnotatorUnavailable, InvalidImageError
from services.server import SERVICE_NAME

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
DEFAULT_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_RECONNECT_BACKOFF_MS = 5000


@dataclass(frozen=True)
class GrpcSettings:
    targets: tuple[str, ...]
    tls: bool = False
    root_certificates: bytes | None = None
    client_certificate: tuple[bytes, bytes] | None = None  # (key, cert) for mutual TLS
    authorization: str | None = field(default=None, repr=False)  # "Api-Key …" or "Bearer …"
    extra_metadata: tuple[tuple[str, str], ...] = ()
    deadline_seconds: float = 10.0
    max_in_flight: int = 16
    retry_for_seconds: float = 60.0
    max_backoff_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("at least one gRPC target is needed")


def service_config() -> str:
    retryable = [code.name for code in RETRYABLE]
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": SERVICE_NAME}],
                    "retryPolicy": {
                        "maxAttempts": 5,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": retryable,
                    },
                }
            ],
        }
    )


def _open_channel(target: str, settings: GrpcSettings) -> aio.Channel:
    options = [
        ("grpc.service_config", service_config()),
        ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", DEFAULT_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", DEFAULT_MESSAGE_BYTES),
        # gRPC's reconnect backoff grows to 120 s by default: a service back after a long outage would sit unused
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]
    if not settings.tls:
        return aio.insecure_channel(target, options=options)
    key, cert = settings.client_certificate or (None, None)
    credentials = grpc.ssl_channel_credentials(settings.root_certificates, key, cert)
    return aio.secure_channel(target, credentials, options=options)


class GrpcAnnotator:
    def __init__(self, settings: GrpcSettings) -> None:
        self.settings = settings
        self._channels = [_open_channel(target, settings) for target in settings.targets]
        stubs = [ImageClassifierServiceStub(channel) for channel in self._channels]
        self._stubs = itertools.cycle(list(zip(settings.targets, stubs, strict=True)))
        self._in_flight = asyncio.Semaphore(settings.max_in_flight)
        metadata = list(settings.extra_metadata)
        if settings.authorization:
            metadata.append(("authorization", settings.authorization))
        self._metadata = tuple(metadata)

    @property
    def description(self) -> str:
        scheme = "grpcs" if self.settings.tls else "grpc"
        return ", ".join(f"{scheme}://{target}" for target in self.settings.targets)

    async def annotate(self, request: AnnotationRequest, *, patient: bool = True) -> AnnotationResponse:
        """Impatient calls give up after gRPC's own retries instead of waiting out an outage."""
        give_up_at = time.monotonic() + (self.settings.retry_for_seconds if patient else 0.0)
        backoff = 0.2
        async with self._in_flight:
            while True:
                target, stub = next(self._stubs)
                try:
                    response: AnnotationResponse = await stub.Annotate(
                        request, timeout=self.settings.deadline_seconds, metadata=self._metadata
                    )
                    return response
                except aio.AioRpcError as exc:
                    code = exc.code()
                    if code == grpc.StatusCode.INVALID_ARGUMENT:
                        raise InvalidImageError(exc.details() or "invalid argument") from None
                    if code not in RETRYABLE:
                        raise AnnotatorError(f"{target}: {code.name}: {exc.details()}", code.name) from None
                    if time.monotonic() + backoff > give_up_at:
                        raise AnnotatorUnavailable(
                            f"{target}: {code.name} for {self.settings.retry_for_seconds:g}s: {exc.details()}",
                            code.name,
                        ) from None
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not crypto
                backoff = min(backoff * 2, self.settings.max_backoff_seconds)

    async def wait_until_reachable(self, within_s: float) -> None:
        """Return once any target answers a connection; AnnotatorUnavailable naming them all if none does in time.

        Called at start-up, so that a wrong address or TLS setting is one clear error, not a replay
        that waits forever for a service that will never come."""
        ready = [asyncio.ensure_future(channel.channel_ready()) for channel in self._channels]
        try:
            done, _ = await asyncio.wait(ready, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in ready:
                waiter.cancel()
        if not done:
            tls = "TLS settings it does not accept" if self.settings.tls else "it wants TLS"
            raise AnnotatorUnavailable(
                f"cannot reach the Annotate service at {', '.join(self.settings.targets)} within {within_s:g} s "
                f"(not running, a wrong address, or {tls})",
                "UNAVAILABLE",
            )

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
