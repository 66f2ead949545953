"""The HTTP port a process is watched on: `/metrics` for Prometheus, `/healthz` and `/readyz` for orchestrators.

`framelabel serve` serves these; `framelabel run` adds its live view and JSON status on the same
port (`pipeline.live_view`). Camera images are sensitive: the port binds to loopback unless told
otherwise, and every other route needs the bearer token from `token_env` whenever one is set; off
loopback one must be set, unless `allow_unauthenticated` says otherwise. The metrics and the probes
stay open: they hold counts, never images, and Prometheus and orchestrators call them without
credentials.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Self

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.config import MonitoringSettings, is_loopback
from services.errors import ConfigError

log = logging.getLogger("framelabel.monitoring")

OPEN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
TOKEN_COOKIE = "framelabel_token"

Readiness = Callable[[], dict[str, bool]]  # each check's name → whether it passes; ready when all do
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class MonitoringServer:
    """An aiohttp server in the process's own event loop: its handlers read live state without locks."""

    def __init__(self, settings: MonitoringSettings, registry: CollectorRegistry, readiness: Readiness) -> None:
        if settings.port is None:
            raise ValueError("the monitoring server needs a port")
        self.settings = settings
        self.port = settings.port
        token = os.environ.get(settings.token_env)
        self._token = token.encode() if token else None
        if self._token is None and not is_loopback(settings.host) and not settings.allow_unauthenticated:
            raise ConfigError(
                f"metrics.host {settings.host} is not loopback and {settings.token_env} is not set: the live view "
                f"shows camera images, so set a token in {settings.token_env}, or set "
                "metrics.allow_unauthenticated: true"
            )
        self._registry = registry
        self._readiness = readiness
        self.app = web.Application(middlewares=[self._guard])
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> Self:
        # a page's open event stream must not hold the process's exit up for long
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            address = f"{self.settings.host}:{self.settings.port}"
            raise ConfigError(f"metrics: cannot listen on {address}: {exc.strerror or exc}") from None
        self.port = self._runner.addresses[0][1]
        guarded = "token required" if self._token else "no token"
        log.info("monitoring on %s: /metrics /healthz /readyz (%s for the rest)", self.url, guarded)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is None or request.path in OPEN_PATHS:
            return await handler(request)
        if self._accepts(_bearer(request.headers.get("Authorization", ""))) or self._accepts(
            request.cookies.get(TOKEN_COOKIE, "")
        ):
            return await handler(request)
        if self._accepts(request.query.get("token", "")):  # a link with the token: keep it in a cookie, not the URL
            rest = {key: value for key, value in request.query.items() if key != "token"}
            redirect = web.HTTPSeeOther(request.rel_url.with_query(rest))
            redirect.set_cookie(TOKEN_COOKIE, request.query["token"], httponly=True, samesite="Strict")
            raise redirect
        return web.Response(
            status=401,
            text=f"a token is needed: `Authorization: Bearer <token>`, or open {request.path}?token=<token> once\n",
            headers={"WWW-Authenticate": "Bearer"},
        )

    def _accepts(self, given: str) -> bool:
        return self._token is not None and bool(given) and hmac.compare_digest(given.encode(), self._token)

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self._registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")  # answered from the event loop, so the loop turns

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = self._readiness()
        ready = all(checks.values())
        body = json.dumps({"ready": ready, "checks": checks})
        return web.Response(status=200 if ready else 503, text=body, content_type="application/json")


def _bearer(authorization: str) -> str:
    scheme, _, credentials = authorization.partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""
