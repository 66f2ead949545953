"""Repeated measurements and their spread: every figure is a median over repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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


def paired(
    ours: Callable[[], dict[str, float]], baseline: Callable[[], dict[str, float]], pairs: int
) -> list[tuple[dict[str, float], dict[str, float]]]:
    """`pairs` interleaved measurements — ours, the baseline, ours, … — so that drift hits both alike."""
    return [(ours(), baseline()) for _ in range(pairs)]


def summarise(pairs: list[tuple[dict[str, float], dict[str, float]]], key: str, digits: int = 3) -> dict[str, Any]:
    """Median [spread] of `key` for ours, for the baseline, and of the ratio ours/baseline pair by pair."""
    return {
        "ours": Sample.of([ours[key] for ours, _ in pairs]).as_json(digits),
        "baseline": Sample.of([baseline[key] for _, baseline in pairs]).as_json(digits),
        "ratio": Sample.of([ours[key] / baseline[key] for ours, baseline in pairs]).as_json(3),
    }
