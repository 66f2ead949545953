"""Annotate with a `Classifier` in this process, in a thread pool off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pipeline.annotators import AnnotatorLifetime
from services.api.image_classifier_pb2 import AnnotationRequest, AnnotationResponse
from services.classifier import Classifier
from services.errors import AnnotatorError
from services.model_families import InputSize


class InProcessAnnotator(AnnotatorLifetime):
    def __init__(self, name: str, load: Callable[[], Classifier], threads: int = 2) -> None:
        """`load` builds the classifier; start() calls it in a thread, so a signal is handled while a model loads."""
        self._name = name
        self._load = load
        self._threads = threads
        self._classifier: Classifier | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def description(self) -> str:
        return f"in-process classifier {self._name}"

    @property
    def ready(self) -> bool:
        return self._classifier is not None and self._executor is not None

    @property
    def input_size(self) -> InputSize | None:
        return None if self._classifier is None else self._classifier.input_size

    async def start(self) -> None:
        self._classifier = await asyncio.to_thread(self._load)
        self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix=f"annotate-{self._name}")

    async def annotate(self, request: AnnotationRequest, *, patient: bool = True) -> AnnotationResponse:
        if self._classifier is None or self._executor is None:
            raise AnnotatorError(f"{self.description} is not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._classifier.annotate, request)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
