"""Repeated measurements and their spread: every figure is a median over repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Sample:
        return cls(statistics.median(values), min(values), max(values))

    def as_json(self, digits: int = 3) -> dict[str, float]:
        return {"median": round(self.median, digits), "min": round(self.low, digits), "max": round(self.high, digits)}

    def __str__(self) -> str:
        return f"{self.median:.3g} [{self.low:.3g}–{self.high:.3g}]"


def repeat(measure: Callable[[], float], repeats: int) -> Sample:
    return Sample.of([measure() for _ in range(repeats)])


def cpu_ms_per_call(call: Callable[[], object], calls: int) -> float:
    """Process CPU time per call, in ms: counts the library threads a call uses (FFmpeg, onnxruntime)."""
    started = time.process_time()
    for _ in range(calls):
        call()
    return (time.process_time() - started) / calls * 1000.0


def wall_ms_per_call(call: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1000.0
