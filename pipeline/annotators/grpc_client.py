"""Annotate over gRPC: our own service or Yandex's `vision.api.cloud.yandex.net:443`.

Retries belong to gRPC itself: the channel's service config carries a
`retryPolicy` for UNAVAILABLE and RESOURCE_EXHAUSTED (exponential backoff with
jitter, at most 5 attempts). Since 5 attempts cannot wait out a service being
redeployed, a patient call goes on retrying those two codes under the run's
retry policy until `retry_for_seconds` has passed, then raises
`AnnotatorUnavailable`: this is the only wait for the service, and it is
bounded. Several targets share the load in turn; each channel also balances
`round_robin` over every address its name resolves to.

Each target's channel runs gRPC's client-side health checking (the standard
`grpc.health.v1.Health/Watch`, on every connection): a channel is READY only
while it is connected to a server that says SERVING; a server without the
health service counts as serving. A `Replica` follows its channel's state, and
calls go only to READY targets in turn while there is one. When a target leaves
READY (killed, port closed, shutting down) the calls in flight on it are
cancelled and sent at once to a READY target, without counting a failure; it is
taken back when its channel is READY again (gRPC reconnects with a backoff of at
most `MAX_RECONNECT_BACKOFF_MS`). With no target READY, calls go to each in turn
as before, and the wait above applies.

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
from services.model_families import InputSize

log = logging.getLogger("framelabel.annotate")

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# a call cut off by its target going away: a service shutting down cancels what it still runs
GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
DEFAULT_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_RECONNECT_BACKOFF_MS = 5000

Metadata = tuple[tuple[str, str], ...]
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
    # gRPC health checking of each connection; off for a service that answers it with an error (a service
    # without the health service at all counts as serving)
    health_check: bool = True

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(0.2, self.max_backoff_seconds, deadline_s=self.retry_for_seconds)


def service_config(health_check: bool = True) -> str:
    retryable = [code.name for code in RETRYABLE]
    # "": the server as a whole, which every health service answers for (ours too, NOT_SERVING on shutdown)
    health = {"healthCheckConfig": {"serviceName": ""}} if health_check else {}
    return json.dumps(
        health
        | {
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
        ("grpc.service_config", service_config(settings.health_check)),
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


class ReplicaDown(Exception):
    """The target left READY while a call was in flight on it: the call was cancelled."""


class Replica:
    """One target: its channel, and whether it takes calls now (READY: connected, and SERVING by its health check)."""

    def __init__(self, target: str, channel: aio.Channel) -> None:
        self.target = target
        self.channel = channel
        self.stub = ImageClassifierServiceStub(channel)
        self.state = grpc.ChannelConnectivity.IDLE
        self.in_flight = 0
        self._went_down = False
        self._down: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def live(self) -> bool:
        return self.state is grpc.ChannelConnectivity.READY

    async def follow(self) -> None:
        """Track the channel's state until cancelled. IDLE is asked to connect: an idle target is not a dead one."""
        state = self.channel.get_state(try_to_connect=True)
        while True:
            self._enter(state)
            await self.channel.wait_for_state_change(state)
            state = self.channel.get_state(try_to_connect=True)

    def _enter(self, state: grpc.ChannelConnectivity) -> None:
        was_live, self.state = self.live, state
        if was_live and not self.live:
            log.warning(
                "Annotate target %s is down (%s): skipped until it is back; %d calls in flight on it are sent again",
                self.target,
                state.name,
                self.in_flight,
            )
            self._went_down = True
            self._down.set_result(None)
            self._down = asyncio.get_running_loop().create_future()
        elif self.live and not was_live and self._went_down:
            log.info("Annotate target %s is back", self.target)

    async def annotate(self, request: AnnotationRequest, deadline_s: float, metadata: Metadata) -> AnnotationResponse:
        """The call; ReplicaDown as soon as the target leaves READY with it in flight (not after gRPC's retries)."""
        down = self._down
        call = asyncio.ensure_future(self.stub.Annotate(request, timeout=deadline_s, metadata=metadata))
        self.in_flight += 1
        try:
            done, _ = await asyncio.wait([call, down], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.in_flight -= 1
            if not call.done():
                call.cancel()
        if call not in done:
            raise ReplicaDown(self.target)
        response: AnnotationResponse = call.result()
        return response


class GrpcAnnotator(AnnotatorLifetime):
    def __init__(self, settings: GrpcSettings, on_call: CallObserver | None = None) -> None:
        """No I/O: start() opens the channels. `on_call` sees every call, retries included (the metrics)."""
        self.settings = settings
        self._on_call = on_call
        self._replicas: list[Replica] = []
        self._followers: list[asyncio.Task[None]] = []
        self._turn = itertools.count()
        self._started = False
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
        return self._started

    @property
    def input_size(self) -> InputSize | None:
        return None  # the service's model is not known here

    @property
    def live_targets(self) -> tuple[str, ...]:
        """The targets taking calls now: connected and serving."""
        return tuple(replica.target for replica in self._replicas if replica.live)

    async def start(self) -> None:
        """Open the channels; AnnotatorUnavailable naming every target if none connects in time."""
        settings = self.settings
        self._replicas = [Replica(target, _open_channel(target, settings)) for target in settings.targets]
        within_s = settings.connect_timeout_seconds
        log.info("connecting to the Annotate service at %s", self.description)
        waiters = [asyncio.ensure_future(replica.channel.channel_ready()) for replica in self._replicas]
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
        self._followers = [
            asyncio.create_task(replica.follow(), name=f"health of {replica.target}") for replica in self._replicas
        ]
        self._started = True

    async def annotate(self, request: AnnotationRequest, *, patient: bool = True) -> AnnotationResponse:
        """Impatient calls give up after gRPC's own retries instead of waiting out an outage.

        A call cut off by its target going down is sent again at once while another target is live:
        a replica's death costs no frame and no backoff."""
        if not self._started:
            raise AnnotatorError(f"the gRPC annotator for {self.description} is not started")
        attempts = self.settings.retry_policy.start()
        cut_off: set[str] = set()  # targets that failed this call: the next try goes to another, if one is live
        async with self._in_flight:
            while True:
                replica = self._next_replica(avoid=cut_off)
                started = time.monotonic()
                try:
                    response = await replica.annotate(request, self.settings.deadline_seconds, self._metadata)
                    self._observe("OK", started)
                    return response
                except aio.AioRpcError as exc:
                    code, details = exc.code(), exc.details()
                except ReplicaDown:
                    code, details = grpc.StatusCode.UNAVAILABLE, "went down with the call in flight"
                self._observe(code.name, started)
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidImageError(details or "invalid argument") from None
                cut_off.add(replica.target)
                if code in GONE and set(self.live_targets) - cut_off:
                    # its target died, or is shutting down and cancelled the call before its state says so;
                    # another is up and untried: no failure to count, no backoff to wait
                    continue
                if code not in RETRYABLE:
                    raise AnnotatorError(f"{replica.target}: {code.name}: {details}", code.name) from None
                delay = attempts.failed()
                if not patient or attempts.expired:
                    waited = f" for {attempts.failing_for_s:.0f} s" if patient else ""
                    raise AnnotatorUnavailable(f"{replica.target}: {code.name}{waited}: {details}", code.name) from None
                await asyncio.sleep(delay)

    def _next_replica(self, avoid: set[str]) -> Replica:
        """The next live target in turn, not one in `avoid` if another is live; with none live, the next in turn
        (its call then fails or waits)."""
        turn = next(self._turn)
        count = len(self._replicas)
        in_turn = [self._replicas[(turn + offset) % count] for offset in range(count)]
        live = [replica for replica in in_turn if replica.live]
        return next((replica for replica in live if replica.target not in avoid), live[0] if live else in_turn[0])

    def _observe(self, code: str, started: float) -> None:
        if self._on_call is not None:
            self._on_call(code, time.monotonic() - started)

    async def close(self) -> None:
        self._started = False
        followers, self._followers = self._followers, []
        for follower in followers:
            follower.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        replicas, self._replicas = self._replicas, []
        for replica in replicas:
            await replica.channel.close()
