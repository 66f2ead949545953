"""Test doubles that fail the calls a test chooses: a Kafka producer and an annotator.

They stand in for the network only, in unit tests of the publisher's ordering
and of a lane; the end-to-end tests use a real broker and real models.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from pipeline.annotators import AnnotatorLifetime
from services.api.image_classifier_pb2 import AnnotationRequest, AnnotationResponse, ClassAnnotation, Label
from services.model_families import InputSize

# (source id, frame index, attempt starting at 1) → the error that send's delivery fails with, or None
SendOutcome = Callable[[str, int, int], BaseException | None]


class ScriptedProducer:
    """A `Producer` that stores what it acknowledges, per source, in the order it acknowledged it.

    `outcome` decides each attempt; `hold` keeps every delivery pending (a broker that never answers).
    As a Kafka partition's batch does, a failed record fails the records of its source sent after it
    in the same turn of the event loop (the publisher hands a batch over without yielding)."""

    def __init__(self, outcome: SendOutcome | None = None, *, hold: bool = False) -> None:
        self.outcome = outcome or (lambda source_id, index, attempt: None)
        self.hold = hold
        self.stored: dict[str, list[int]] = {}
        self.attempts: dict[tuple[str, int], int] = {}
        self.pending: list[asyncio.Future[Any]] = []
        self.stopped = False
        self._failing: dict[str, BaseException] = {}  # per source: why its batch of this turn failed
        self._sent = asyncio.Event()
        self._send_count = 0

    async def sends(self, count: int) -> None:
        """Return once `count` sends have been made."""
        while self._send_count < count:
            self._sent.clear()
            await self._sent.wait()

    async def start(self) -> None:
        pass

    async def send(
        self, topic: str, value: bytes, *, key: bytes, timestamp_ms: int, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[Any]:
        source_id, index = key.decode(), int(dict(headers)["frame_index"])
        attempt = self.attempts[source_id, index] = self.attempts.get((source_id, index), 0) + 1
        self._send_count += 1
        self._sent.set()
        delivery: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.hold:
            self.pending.append(delivery)
            return delivery
        error = self._failing.get(source_id) or self.outcome(source_id, index, attempt)
        if error is not None and source_id not in self._failing:
            self._failing[source_id] = error
            asyncio.get_running_loop().call_soon(self._failing.pop, source_id)
        if error is None:
            self.stored.setdefault(source_id, []).append(index)
            delivery.set_result(None)
        else:
            delivery.set_exception(error)
        return delivery

    async def stop(self) -> None:
        self.stopped = True


# frame index → what annotate does for it: raise the exception, or answer
AnnotateOutcome = Callable[[int], BaseException | None]


class ScriptedAnnotator(AnnotatorLifetime):
    """An `Annotator` that answers "cat" at 0.9, except where `outcome` makes a call fail.

    `index_of` tells which frame a request holds (tests paint the index into the pixels)."""

    def __init__(self, index_of: Callable[[AnnotationRequest], int], outcome: AnnotateOutcome) -> None:
        self._index_of = index_of
        self._outcome = outcome
        self.calls: list[int] = []
        self.started = self.closed = False

    @property
    def description(self) -> str:
        return "scripted annotator"

    @property
    def ready(self) -> bool:
        return self.started and not self.closed

    @property
    def input_size(self) -> InputSize | None:
        return None  # frames are encoded at max_side, as for a service

    async def start(self) -> None:
        self.started = True

    async def annotate(self, request: AnnotationRequest, *, patient: bool = True) -> AnnotationResponse:
        index = self._index_of(request)
        self.calls.append(index)
        error = self._outcome(index)
        if error is not None:
            raise error
        return AnnotationResponse(
            request_id=str(index), annotations=[ClassAnnotation(label=Label(name="cat"), confidence=0.9)]
        )

    async def close(self) -> None:
        self.closed = True
