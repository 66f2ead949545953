"""Shared fixtures: real classifiers, a real `framelabel serve` process, and the configs the CLI would start with."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from services.classifier import Classifier, load_classifier
from tests.helpers import ServiceProcess, start_service

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from services.config import ServiceConfig


@pytest.fixture(scope="session")
def classifiers() -> dict[str, Classifier]:
    return {name: load_classifier(name) for name in ("imagenet", "moderation", "nudity")}


@pytest.fixture
def service_factory() -> Iterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> ServiceProcess:
        service = start_service(*args, env=env)
        started.append(service)
        return service

    yield factory
    for service in started:
        service.stop()


@pytest.fixture(scope="session")
def imagenet_service() -> Iterator[ServiceProcess]:
    """One service for every test that only calls it; a test that stops, limits or reconfigures one starts its own."""
    service = start_service("--classifier", "imagenet")
    yield service
    service.stop()


@pytest.fixture
def started_configs(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The config `framelabel run` or `serve` would start with, under "run" or "serve": the CLI runs up to that
    point, and the run or the service returns at once."""
    import pipeline.job  # here, not above: importing them takes a third of a second, which most tests need not pay
    import services.server

    configs: dict[str, Any] = {}

    async def run_job(config: RunConfig, *args: object) -> int:
        configs["run"] = config
        return 0

    async def serve(config: ServiceConfig, *args: object) -> None:
        configs["serve"] = config

    monkeypatch.setattr(pipeline.job, "run_job", run_job)
    monkeypatch.setattr(services.server, "serve", serve)
    return configs
