"""Event rules: when a label's score makes an event start, last and end, per label or label pattern.

A rule reads one label's confidences on one source's frames:

    smoothed score   the median of the last `window_frames` frames, or of the frames of the last
                     `window_seconds` of capture time; a frame without the label counts as 0
    start            the smoothed score at or above `enter_threshold` on `min_start_frames` frames
                     in a row spanning at least `min_start_seconds`; the event starts at the first
    end              the first frame more than `grace_seconds` after the last frame at or above
                     `exit_threshold` ends it; it ends at that last frame
    min_duration     an event shorter than `min_duration_seconds` is never published
    updates          every `update_interval_seconds` while it lasts, with the running peak

Times are seconds of capture time, so sources at different frame rates behave alike.
A label that no rule names follows the defaults of its classifier's type.
"""

from __future__ import annotations

import fnmatch
from typing import Annotated, Literal

from pydantic import Field, model_validator

from services.config import StrictModel

GLOB_CHARACTERS = frozenset("*?[")


class Rule(StrictModel):
    enter_threshold: Annotated[float, Field(gt=0, le=1)] = 0.5
    exit_threshold: Annotated[float, Field(gt=0, le=1)] | None = Field(None, description="default: enter_threshold")
    window_frames: Annotated[int, Field(ge=1)] | None = Field(None, description="median of the last N frames, or")
    window_seconds: Annotated[float, Field(gt=0)] | None = Field(None, description="of the last T seconds")
    min_start_frames: Annotated[int, Field(ge=1)] = 1
    min_start_seconds: Annotated[float, Field(ge=0)] = 0.0
    grace_seconds: Annotated[float, Field(ge=0)] = 1.0
    min_duration_seconds: Annotated[float, Field(ge=0)] = 0.0
    update_interval_seconds: Annotated[float, Field(gt=0)] | None = 10.0

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if self.window_frames is not None and self.window_seconds is not None:
            raise ValueError("give one of `window_frames` and `window_seconds`, not both")
        if self.exit_threshold is not None and self.exit_threshold > self.enter_threshold:
            raise ValueError(
                f"`exit_threshold` ({self.exit_threshold}) must not exceed `enter_threshold` ({self.enter_threshold})"
            )
        return self

    @property
    def exit(self) -> float:
        return self.enter_threshold if self.exit_threshold is None else self.exit_threshold


class LabelRule(Rule):
    match: Annotated[str, Field(min_length=1, description="a label, or a pattern with * ? [ ]; `*`: every label")]


# MULTI_CLASS: labels compete (softmax), so a label leads once it holds half the mass;
# MULTI_LABEL: each label is judged alone, and sigmoid scores sit near 0.5 when unsure.
MULTI_CLASS_DEFAULT = Rule(
    enter_threshold=0.5, exit_threshold=0.3, window_seconds=1.0, min_start_seconds=0.5, grace_seconds=1.0
)
MULTI_LABEL_DEFAULT = Rule(
    enter_threshold=0.7, exit_threshold=0.5, window_seconds=1.0, min_start_seconds=0.5, grace_seconds=1.0
)


class EventRules(StrictModel):
    """The `rules:` of the events stage; the first rule whose `match` fits a label applies."""

    rules: tuple[LabelRule, ...] = ()
    multi_class: Rule = MULTI_CLASS_DEFAULT
    multi_label: Rule = MULTI_LABEL_DEFAULT
    other_labels: Literal["defaults", "ignore"] = "defaults"

    def rule_for(self, label: str, multi_class: bool) -> Rule | None:
        """The rule for `label`; None when the label is to be ignored."""
        for rule in self.rules:
            if _matches(rule.match, label):
                return rule
        if self.other_labels == "ignore":
            return None
        return self.multi_class if multi_class else self.multi_label


def _matches(match: str, label: str) -> bool:
    if GLOB_CHARACTERS.isdisjoint(match):
        return match == label
    return fnmatch.fnmatchcase(label, match)


def seconds_ms(seconds: float) -> int:
    """Rule times become whole milliseconds, the unit of capture times, so boundaries are exact."""
    return round(seconds * 1000)
