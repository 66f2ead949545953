"""The sampling stage: which of a source's frames go on to be annotated.

`fps` keeps frames at a target rate, measured on the media clock for files and
streams with timestamps (so a replay samples the same frames however fast it
runs) and on the capture clock otherwise: the first frame at or after each
sample time. `every_nth` keeps frames 0, N, 2N, … by index. `keyframes` keeps
the stream's keyframes only (with `fps`, at most that many of them).

Sources decoded with PyAV apply `fps` and `keyframes` before decoding (see
`pipeline.sources._pyav`), so the frames they skip are never decoded; this
stage then keeps every frame they deliver.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from pipeline.frames import FrameInfo
from services.config import StrictModel


class SamplingSettings(StrictModel):
    fps: Annotated[float, Field(gt=0)] | None = None
    every_nth: Annotated[int, Field(ge=1)] | None = None
    keyframes: bool = False  # keep keyframes only (one frame per GOP): decoding everything else is skipped

    @model_validator(mode="after")
    def _one_rule(self) -> SamplingSettings:
        if self.fps is not None and self.every_nth is not None:
            raise ValueError("give at most one of `fps` and `every_nth`")
        if self.keyframes and self.every_nth is not None:
            raise ValueError("`keyframes` cannot be combined with `every_nth` (use `fps` to thin keyframes out)")
        return self

    @property
    def skips_decoding(self) -> bool:
        """Whether a source decoding with PyAV can leave frames undecoded: with `fps` or `keyframes`."""
        return self.fps is not None or self.keyframes


class FpsSchedule:
    """Sample times `period` apart: a frame is taken when it is at or after the next one."""

    def __init__(self, fps: float) -> None:
        self._period_ms = 1000.0 / fps
        self._previous_ms: float | None = None
        self.due_ms: float | None = None  # the next sample time; None: the next frame is taken

    def wants(self, now_ms: float) -> bool:
        """Whether a frame at `now_ms` would be taken (without taking it)."""
        return (
            self.due_ms is None
            or now_ms >= self.due_ms
            or (self._previous_ms is not None and now_ms < self._previous_ms)
        )

    def take(self, now_ms: float) -> bool:
        """Whether the frame at `now_ms` is taken; if so, the schedule moves on to the next sample time."""
        if self._previous_ms is not None and now_ms < self._previous_ms:
            self.due_ms = None  # the clock went back (a looping replay started over): a new schedule
        self._previous_ms = now_ms
        if self.due_ms is not None and now_ms < self.due_ms:
            return False
        # schedule from the due time, not from now, so the rate does not drift down;
        # but never let a stall build up a burst of catch-up frames
        due = self.due_ms if self.due_ms is not None else now_ms
        self.due_ms = due + self._period_ms if due + self._period_ms > now_ms else now_ms + self._period_ms
        return True


class Sampler:
    def __init__(self, settings: SamplingSettings) -> None:
        self._every_nth = settings.every_nth
        self._schedule = FpsSchedule(settings.fps) if settings.fps is not None else None

    def keep(self, info: FrameInfo) -> bool:
        if self._every_nth is not None:
            return info.index % self._every_nth == 0
        if self._schedule is None:
            return True
        now_ms = info.media_position_ms if info.media_position_ms is not None else info.captured_at * 1000.0
        return self._schedule.take(now_ms)
