"""The gRPC `yandex.cloud.ai.vision.v2.ImageClassifierService`, serving one classifier.

A thin shell around `Classifier.annotate`: inference runs in a thread pool off
the event loop; the standard health service and server reflection come with it;
SIGTERM/SIGINT mark the service NOT_SERVING, let in-flight calls finish within
the grace period, and return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Self

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.api import image_classifier_service_pb2_grpc
from services.api.image_classifier_pb2 import AnnotationRequest, AnnotationResponse
from services.api_names import SERVICE_NAME
from services.auth import AuthInterceptor, Credentials
from services.batching import Batcher, BatchingSettings
from services.classifier import Classifier
from services.config import ServiceConfig
from services.errors import ConfigError, InvalidImageError
from services.metrics import ServiceMetrics
from services.monitoring import MonitoringServer
from services.net import probe_bind
from services.runtime import STOP_SIGNALS, settle_heap

log = logging.getLogger("framelabel.serve")


class AnnotateServicer(image_classifier_service_pb2_grpc.ImageClassifierServiceServicer):
    def __init__(
        self, classifier: Classifier, executor: ThreadPoolExecutor, batcher: Batcher | None, metrics: ServiceMetrics
    ) -> None:
        self._classifier = classifier
        self._executor = executor
        self._batcher = batcher
        self._metrics = metrics

    async def _annotate(self, request: AnnotationRequest) -> AnnotationResponse:
        loop = asyncio.get_running_loop()
        if self._batcher is None:
            return await loop.run_in_executor(self._executor, self._classifier.annotate, request)
        prepared = await loop.run_in_executor(self._executor, self._classifier.prepare, request)
        return self._classifier.response(await self._batcher.confidences(prepared))

    async def Annotate(
        self, request: AnnotationRequest, context: aio.ServicerContext[AnnotationRequest, AnnotationResponse]
    ) -> AnnotationResponse:
        async with self._metrics.request() as outcome:
            try:
                return await self._annotate(request)
            except InvalidImageError as exc:
                outcome.code = grpc.StatusCode.INVALID_ARGUMENT.name
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except Exception:
                # the client gets no traceback; the log keeps it
                log.exception("Annotate failed")
                outcome.code = grpc.StatusCode.INTERNAL.name
                await context.abort(grpc.StatusCode.INTERNAL, "internal error while annotating")
        raise AssertionError("context.abort always raises")


def credentials_from_env(config: ServiceConfig) -> Credentials:
    def split(variable: str) -> list[str]:
        return [item.strip() for item in os.environ.get(variable, "").split(",") if item.strip()]

    credentials = Credentials(split(config.auth.api_keys_env), split(config.auth.iam_tokens_env))
    allow_anonymous = config.auth.allow_anonymous
    if allow_anonymous is None:
        allow_anonymous = config.on_loopback
    if credentials.empty and not allow_anonymous:
        raise ConfigError(
            f"auth: serving on {config.host} with no API keys or tokens; set {config.auth.api_keys_env} "
            f"or {config.auth.iam_tokens_env}, or set auth.allow_anonymous: true"
        )
    return credentials


def _server_credentials(config: ServiceConfig) -> grpc.ServerCredentials | None:
    if config.tls is None:
        return None
    try:
        key = config.tls.key_file.read_bytes()
        cert = config.tls.cert_file.read_bytes()
        client_ca = config.tls.client_ca_file.read_bytes() if config.tls.client_ca_file else None
    except OSError as exc:
        raise ConfigError(f"tls: cannot read {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=bool(client_ca))


class AnnotateServer:
    """Owns the grpc.aio server, its health service and its inference threads."""

    def __init__(self, config: ServiceConfig, classifier: Classifier, metrics: ServiceMetrics | None = None) -> None:
        self.config = config
        metrics = metrics or ServiceMetrics()
        self.classifier = classifier
        credentials = credentials_from_env(config)
        self.auth_enabled = not credentials.empty
        self.serving = False
        self._executor = ThreadPoolExecutor(config.inference_threads, thread_name_prefix="inference")
        self._server = aio.server(
            interceptors=[AuthInterceptor(credentials, metrics.denied)] if self.auth_enabled else [],
            maximum_concurrent_rpcs=config.max_concurrent_requests,
            options=[
                ("grpc.max_receive_message_length", config.message_limit),
                ("grpc.max_send_message_length", config.message_limit),
                # on by default in gRPC: a second server on a port in use would share its traffic, unnoticed
                ("grpc.so_reuseport", 0),
            ],
        )
        batcher = None
        if config.batching is not None:
            settings = BatchingSettings(config.batching.max_batch, config.batching.max_wait_ms)
            batcher = Batcher(classifier, self._executor, settings, metrics.batch)
        image_classifier_service_pb2_grpc.add_ImageClassifierServiceServicer_to_server(
            AnnotateServicer(classifier, self._executor, batcher, metrics), self._server
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        address = f"{config.host}:{config.port}"
        server_credentials = _server_credentials(config)
        if config.port:
            try:
                probe_bind(config.host, config.port)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        try:
            if server_credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, server_credentials)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc}") from None

    async def start(self) -> None:
        await self._server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.serving = True
        log.info(
            "serving classifier %s (%s, %d labels) on %s:%d tls=%s auth=%s batching=%s",
            self.classifier.name,
            self.classifier.specification.ClassificationType.Name(self.classifier.classification_type),
            len(self.classifier.labels),
            self.config.host,
            self.port,
            "on" if self.config.tls else "off",
            "on" if self.auth_enabled else "off",
            "off" if self.config.batching is None else f"≤{self.config.batching.max_batch}",
        )

    async def stop(self) -> None:
        """Refuse new calls, let in-flight ones finish within the grace period."""
        self.serving = False
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.config.grace_seconds)
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        log.info("stopped")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def serve(config: ServiceConfig, load: Callable[[], Classifier]) -> None:
    """Load the classifier, serve it until SIGTERM, SIGINT or SIGHUP, then shut down gracefully.

    The signal handlers are in place first: a signal while the model loads ends the process cleanly.
    The monitoring port, when set, answers from the start: /readyz says 503 until the service serves."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    metrics = ServiceMetrics()
    server: AnnotateServer | None = None

    def readiness() -> dict[str, bool]:
        return {"serving": server is not None and server.serving}

    async with contextlib.AsyncExitStack() as stack:
        if config.metrics.port is not None:
            await stack.enter_async_context(MonitoringServer(config.metrics, metrics.registry, readiness))
        loading = asyncio.ensure_future(asyncio.to_thread(load))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([loading, stopped], return_when=asyncio.FIRST_COMPLETED)
        if stopped.done():
            log.info("signal received while loading the classifier: not serving")
            loading.cancel()
            return
        server = await stack.enter_async_context(AnnotateServer(config, loading.result(), metrics))
        settle_heap()
        await stopped
        log.info("signal received: finishing in-flight calls (grace %.0fs)", config.grace_seconds)
