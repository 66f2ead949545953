"""`framelabel serve`'s Prometheus metrics (README, "Monitor"): requests by status code, their
latency, the requests in flight, and the batch sizes when batching is on."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "framelabel_service_requests",
            "Annotate requests answered, by status code",
            ["code"],
            registry=self.registry,
        )
        self._seconds = Histogram(
            "framelabel_service_request_seconds",
            "Time to answer one Annotate request",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "framelabel_service_requests_in_flight", "Annotate requests being answered", registry=self.registry
        )
        self._batch_size = Histogram(
            "framelabel_service_batch_size",
            "Images per inference when batching is on",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        for code in ("OK", "INVALID_ARGUMENT", "INTERNAL", "UNAUTHENTICATED"):  # what Annotate answers, from zero
            self._requests.labels(code)

    @asynccontextmanager
    async def request(self) -> AsyncIterator[RequestOutcome]:
        """Count and time one request; the body sets `outcome.code` when it does not succeed."""
        outcome = RequestOutcome()
        started = time.monotonic()
        self._in_flight.inc()
        try:
            yield outcome
        finally:
            self._in_flight.dec()
            self._seconds.observe(time.monotonic() - started)
            self._requests.labels(outcome.code).inc()

    def denied(self) -> None:
        """A request refused for its credentials, before it reached Annotate."""
        self._requests.labels("UNAUTHENTICATED").inc()

    def batch(self, size: int) -> None:
        self._batch_size.observe(size)


class RequestOutcome:
    code = "OK"
