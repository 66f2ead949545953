"""Annotate over gRPC: our own service or Yandex's `vision.api.cloud.yandex.net:443`.

Retries belong to gRPC itself: the channel's service config carries a
`retryPolicy` for UNAVAILABLE and RESOURCE_EXHAUSTED (exponential backoff with
jitter, at most 5 attempts). Since 5 attempts cannot wait out a service being
redeployed, a patient call goes on retrying those two codes under the run's
retry policy until `retry_for_seconds` has passed, then raises
`AnnotatorUnavailable`: this is the only wait for the service, and it is
bounded. Several targets share the load in turn; each channel also balances
`round_robin` over every address its name resolves to.

`start()` opens the channels and waits up to `connect_timeout_seconds` for one
target to accept a connection, so that a wrong address or TLS setting is one
clear error at start, not a run that waits for a service that will never come.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc import aio

from pipeline.annotators import AnnotatorLifetime
from pipeline.retry import RetryPolicy, saying_while_waiting
from services.api.image_classifier_pb2 import AnnotationRequest, AnnotationResponse
from services.api.image_classifier_service_pb2_grpc import ImageClassifierServiceStub
from services.api_names import SERVICE_NAME
from services.errors import AnnotatorError, AnnotatorUnavailable, InvalidImageError

log = logging.getLogger("framelabel.annotate")

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
DEFAULT_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_RECONNECT_BACKOFF_MS = 5000

CallObserver = Callable[[str, float], None]  # each call's status code name and its duration in seconds


@dataclass(frozen=True)
class GrpcSettings:
    targets: tuple[str, ...]
    tls: bool = False
    root_certificates: bytes | None = None
    client_certificate: tuple[bytes, bytes] | None = None  # (key, cert) for mutual TLS
    authorization: str | None = field(default=None, repr=False)  # "Api-Key …" or "Bearer …"
    extra_metadata: tuple[tuple[str, str], ...] = ()
    deadline_seconds: float = 10.0  # per call
    max_in_flight: int = 16
    retry_for_seconds: float = 60.0  # how long a patient call waits out an unavailable service
    connect_timeout_seconds: float = 10.0  # how long start() waits for a first connection
    max_backoff_seconds: float = 5.0

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(0.2, self.max_backoff_seconds, deadline_s=self.retry_for_seconds)


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


class GrpcAnnotator(AnnotatorLifetime):
    def __init__(self, settings: GrpcSettings, on_call: CallObserver | None = None) -> None:
        """No I/O: start() opens the channels. `on_call` sees every call, retries included (the metrics)."""
        self.settings = settings
        self._on_call = on_call
        self._channels: list[aio.Channel] = []
        self._stubs: itertools.cycle[tuple[str, ImageClassifierServiceStub]] | None = None
        self._in_flight = asyncio.Semaphore(settings.max_in_flight)
        metadata = list(settings.extra_metadata)
        if settings.authorization:
            metadata.append(("authorization", settings.authorization))
        self._metadata = tuple(metadata)

    @property
    def description(self) -> str:
        scheme = "grpcs" if self.settings.tls else "grpc"
        return ", ".join(f"{scheme}://{target}" for target in self.settings.targets)

    @property
    def ready(self) -> bool:
        return self._stubs is not None

    async def start(self) -> None:
        """Open the channels; AnnotatorUnavailable naming every target if none connects in time."""
        settings = self.settings
        self._channels = [_open_channel(target, settings) for target in settings.targets]
        within_s = settings.connect_timeout_seconds
        log.info("connecting to the Annotate service at %s", self.description)
        waiters = [asyncio.ensure_future(channel.channel_ready()) for channel in self._channels]
        try:
            async with saying_while_waiting(log, f"the Annotate service at {self.description}", within_s):
                done, _ = await asyncio.wait(waiters, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if not done:
            await self.close()
            tls = "TLS settings it does not accept" if settings.tls else "it wants TLS"
            raise AnnotatorUnavailable(
                f"cannot reach the Annotate service at {', '.join(settings.targets)} within {within_s:g} s "
                f"(not running, a wrong address, or {tls})",
                "UNAVAILABLE",
            )
        stubs = [ImageClassifierServiceStub(channel) for channel in self._channels]
        self._stubs = itertools.cycle(list(zip(settings.targets, stubs, strict=True)))

    async def annotate(self, request: AnnotationRequest, *, patient: bool = True) -> AnnotationResponse:
        """Impatient calls give up after gRPC's own retries instead of waiting out an outage."""
        if self._stubs is None:
            raise AnnotatorError(f"the gRPC annotator for {self.description} is not started")
        attempts = self.settings.retry_policy.start()
        async with self._in_flight:
            while True:
                target, stub = next(self._stubs)
                started = time.monotonic()
                try:
                    response: AnnotationResponse = await stub.Annotate(
                        request, timeout=self.settings.deadline_seconds, metadata=self._metadata
                    )
                    self._observe("OK", started)
                    return response
                except aio.AioRpcError as exc:
                    code = exc.code()
                    self._observe(code.name, started)
                    if code == grpc.StatusCode.INVALID_ARGUMENT:
                        raise InvalidImageError(exc.details() or "invalid argument") from None
                    if code not in RETRYABLE:
                        raise AnnotatorError(f"{target}: {code.name}: {exc.details()}", code.name) from None
                    delay = attempts.failed()
                    if not patient or attempts.expired:
                        waited = f" for {attempts.failing_for_s:.0f} s" if patient else ""
                        raise AnnotatorUnavailable(
                            f"{target}: {code.name}{waited}: {exc.details()}", code.name
                        ) from None
                await asyncio.sleep(delay)

    def _observe(self, code: str, started: float) -> None:
        if self._on_call is not None:
            self._on_call(code, time.monotonic() - started)

    async def close(self) -> None:
        self._stubs = None
        channels, self._channels = self._channels, []
        for channel in channels:
            await channel.close()
