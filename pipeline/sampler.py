"""The sampling stage: which of a source's frames go on to be annotated.

`fps` keeps frames at a target rate, measured on the media clock for files
(so a replay samples the same frames however fast it runs) and on the capture
clock for cameras; `every_nth` keeps frames 0, N, 2N, … by index.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from pipeline.frames import FrameInfo
from services.config import StrictModel


class SamplingSettings(StrictModel):
    fps: Annotated[float, Field(gt=0)] | None = None
    every_nth: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> SamplingSettings:
        if self.fps is not None and self.every_nth is not None:
            raise ValueError("give at most one of `fps` and `every_nth`")
        return self


class Sampler:
    def __init__(self, settings: SamplingSettings) -> None:
        self._settings = settings
        self._next_due_ms: float | None = None
        self._previous_ms: float | None = None

    def keep(self, info: FrameInfo) -> bool:
        if self._settings.every_nth is not None:
            return info.index % self._settings.every_nth == 0
        if self._settings.fps is None:
            return True
        now_ms = info.media_position_ms if info.media_position_ms is not None else info.captured_at * 1000.0
        period_ms = 1000.0 / self._settings.fps
        if self._previous_ms is not None and now_ms < self._previous_ms:
            self._next_due_ms = None  # the clock went back (a looping replay started over): a new schedule
        self._previous_ms = now_ms
        if self._next_due_ms is not None and now_ms < self._next_due_ms:
            return False
        # schedule from the due time, not from now, so the rate does not drift down;
        # but never let a stall build up a burst of catch-up frames
        due = self._next_due_ms if self._next_due_ms is not None else now_ms
        self._next_due_ms = due + period_ms if due + period_ms > now_ms else now_ms + period_ms
        return True
