"""Annotate with a `Classifier` in this process, in a thread pool off the event loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from services.api.image_classifier_pb2 import AnnotationRequest, AnnotationResponse
from services.classifier import Classifier


class InProcessAnnotator:
    def __init__(self, classifier: Classifier, threads: int = 2) -> None:
        self._classifier = classifier
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=f"annotate-{classifier.name}")

    @property
    def description(self) -> str:
        return f"in-process classifier {self._classifier.name}"

    async def annotate(self, request: AnnotationRequest, *, patient: bool = True) -> AnnotationResponse:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._classifier.annotate, request)

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
