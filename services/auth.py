"""Checks the `authorization` metadata the way Yandex Cloud does.

Accepted forms: `Api-Key <key>` and `Bearer <token>`. Secrets are compared in
constant time and never logged. Health checks stay open so that load balancers
and orchestrators can probe the service without credentials.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc import aio

OPEN_METHOD_PREFIX = "/grpc.health.v1.Health/"
SCHEMES = ("Api-Key", "Bearer")


class Credentials:
    def __init__(self, api_keys: Iterable[str], bearer_tokens: Iterable[str]) -> None:
        self._secrets = {
            "Api-Key": [key.encode() for key in api_keys if key],
            "Bearer": [token.encode() for token in bearer_tokens if token],
        }

    @property
    def empty(self) -> bool:
        return not any(self._secrets.values())

    def accepts(self, authorization: str) -> bool:
        scheme, _, secret = authorization.strip().partition(" ")
        candidates = self._secrets.get(scheme, [])
        given = secret.strip().encode()
        # compare against every candidate so the time taken does not tell which one was close
        matches = [hmac.compare_digest(given, candidate) for candidate in candidates]
        return any(matches)


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that only refuses the call."""

    async def abort(request: object, context: aio.ServicerContext[object, object]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class AuthInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, credentials: Credentials, on_denied: Callable[[], None] | None = None) -> None:
        """`on_denied` is told of every call refused (the metrics)."""
        self._credentials = credentials
        self._on_denied = on_denied

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIX):
            return handler
        metadata = dict(details.invocation_metadata or ())
        authorization = metadata.get("authorization")
        if isinstance(authorization, str) and self._credentials.accepts(authorization):
            return handler
        if self._on_denied is not None:
            self._on_denied()
        if not isinstance(authorization, str):
            return _deny(handler, "missing authorization metadata: expected 'Api-Key <key>' or 'Bearer <token>'")
        return _deny(handler, "invalid credentials")
