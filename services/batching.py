"""Dynamic batching: concurrent calls share one inference.

Each call prepares its own input (decode, preprocess) in a worker thread, then
waits here; the first input of a batch opens a window of `max_wait_ms`, and
the batch runs as soon as it is full or the window closes. Worth it only when
one batched inference costs less than the same inferences one by one — the
benchmark (`make bench`) shows whether it does for a given model and machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from services.classifier import Classifier
from services.model_families import Tensor


@dataclass(frozen=True)
class BatchingSettings:
    max_batch: int = 8
    max_wait_ms: float = 2.0


class Batcher:
    def __init__(
        self,
        classifier: Classifier,
        executor: Executor,
        settings: BatchingSettings,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """`on_batch` sees the size of every batch run (the metrics)."""
        self._classifier = classifier
        self._on_batch = on_batch
        self._executor = executor
        self._settings = settings
        self._waiting: list[tuple[Tensor, asyncio.Future[NDArray[np.float64]]]] = []
        self._window: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()  # a reference, so a batch is not collected mid-run

    async def confidences(self, prepared: Tensor) -> NDArray[np.float64]:
        loop = asyncio.get_running_loop()
        result: asyncio.Future[NDArray[np.float64]] = loop.create_future()
        self._waiting.append((prepared, result))
        if len(self._waiting) >= self._settings.max_batch:
            self._flush()
        elif self._window is None:
            self._window = loop.call_later(self._settings.max_wait_ms / 1000.0, self._flush)
        return await result

    def _flush(self) -> None:
        if self._window is not None:
            self._window.cancel()
            self._window = None
        batch, self._waiting = self._waiting, []
        if batch:
            if self._on_batch is not None:
                self._on_batch(len(batch))
            task = asyncio.create_task(self._run(batch), name=f"batch-{self._classifier.name}")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[Tensor, asyncio.Future[NDArray[np.float64]]]]) -> None:
        loop = asyncio.get_running_loop()
        inputs = np.stack([prepared for prepared, _ in batch])
        try:
            results = await loop.run_in_executor(self._executor, self._classifier.infer, inputs)
        except Exception as exc:  # every caller of the batch learns of the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), scores in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(scores)
