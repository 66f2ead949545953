"""Shared fixtures: real classifiers and a real `framelabel serve` process."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from services.classifier import Classifier, load_classifier
from tests.helpers import ServiceProcess, start_service


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
