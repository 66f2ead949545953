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

Which rule applies to a label, the first that has one:
    1. the events config's `rules:`, the first whose `match` fits the label
    2. (`other_labels: ignore`: none, the label is ignored)
    3. the classifier's own `event_defaults:` in its classifiers file, the first that fits
    4. the defaults of the classifier's type, `multi_class:` or `multi_label:`
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Literal

from services.config import LabelRule, Rule, StrictModel

GLOB_CHARACTERS = frozenset("*?[")


# MULTI_CLASS: labels compete (softmax), so a label leads once it holds half the mass;
# MULTI_LABEL: each label is judged alone, and sigmoid scores sit near 0.5 when unsure.
MULTI_CLASS_DEFAULT = Rule(
    enter_threshold=0.5, exit_threshold=0.3, window_seconds=1.0, min_start_seconds=0.5, grace_seconds=1.0
)
MULTI_LABEL_DEFAULT = Rule(
    enter_threshold=0.7, exit_threshold=0.5, window_seconds=1.0, min_start_seconds=0.5, grace_seconds=1.0
)


class EventRules(StrictModel):
    """The rules of the events stage: its `rules:`, then the classifier's defaults, then the type's."""

    rules: tuple[LabelRule, ...] = ()
    multi_class: Rule = MULTI_CLASS_DEFAULT
    multi_label: Rule = MULTI_LABEL_DEFAULT
    other_labels: Literal["defaults", "ignore"] = "defaults"

    def rule_for(self, label: str, multi_class: bool, classifier_defaults: Sequence[LabelRule] = ()) -> Rule | None:
        """The rule for `label`; None when the label is to be ignored.

        `classifier_defaults`: the `event_defaults` of the classifier that annotated the frame."""
        if (rule := _first_match(self.rules, label)) is not None:
            return rule
        if self.other_labels == "ignore":
            return None
        if (rule := _first_match(classifier_defaults, label)) is not None:
            return rule
        return self.multi_class if multi_class else self.multi_label


def _first_match(rules: Iterable[LabelRule], label: str) -> LabelRule | None:
    return next((rule for rule in rules if _matches(rule.match, label)), None)


def _matches(match: str, label: str) -> bool:
    if GLOB_CHARACTERS.isdisjoint(match):
        return match == label
    return fnmatch.fnmatchcase(label, match)


def seconds_ms(seconds: float) -> int:
    """Rule times become whole milliseconds, the unit of capture times, so boundaries are exact."""
    return round(seconds * 1000)
