"""Turn one source's stream of annotated frames into event messages: pure, synchronous, deterministic.

`EventTracker.observe` takes a frame's scores and returns the messages that frame causes (START,
UPDATE, END), following `pipeline.events.rules`. The same frames give the same messages with the
same ids, so a stage that reads its input twice publishes repeats a consumer can recognise.
A frame not newer than the last one of its source (a repeated record) changes nothing.
The tracker's state per source can be saved (`snapshot`) and restored, so a restarted stage goes on
where it stopped. A source annotated by another classifier than before begins again, as a restarted
source does: the new classifier's labels and scores are not the old one's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeAlias

from pipeline.events.record import event_id
from pipeline.events.rules import EventRules, seconds_ms
from services.api.event_pb2 import AnnotationEvent
from services.config import LabelRule, Rule

EndReason: TypeAlias = AnnotationEvent.EndReason.ValueType


@dataclass(frozen=True, slots=True)
class Observation:
    """One annotated frame as the tracker needs it."""

    source_id: str
    frame_index: int
    capture_time_ms: int
    multi_class: bool  # the classifier's type: which default rule applies
    scores: Mapping[str, float]  # label → confidence; a label not here scores 0 on this frame
    classifier: str | None = None  # the classifier that annotated it, when the record says


@dataclass(slots=True)
class _Event:
    """An event under way: from its first frame at or above the enter threshold."""

    first_frame_index: int
    start_time_ms: int
    last_frame_index: int
    end_time_ms: int
    peak_confidence: float
    peak_frame_index: int
    peak_time_ms: int
    frames: int = 1
    started: bool = False  # it has passed min_start (until then it is a candidate)
    published: bool = False  # its START went out (it has passed min_duration)
    sequence: int = 0
    last_message_ms: int = 0


@dataclass(slots=True)
class _LabelState:
    samples: deque[tuple[int, float]] = field(default_factory=deque)  # (capture ms, score) of frames with the label
    event: _Event | None = None


@dataclass(slots=True)
class _SourceState:
    last_frame_index: int
    last_time_ms: int
    frame_times: deque[int] = field(default_factory=deque)  # recent capture times: the smoothing windows' frames
    labels: dict[str, _LabelState] = field(default_factory=dict)
    multi_class: bool = True
    classifier: str = ""


class EventTracker:
    def __init__(
        self,
        rules: EventRules,
        classifier: str,
        *,
        fixed_name: str | None = None,
        event_defaults: Mapping[str, Sequence[LabelRule]] | None = None,
    ) -> None:
        """`classifier`: of the frames that name none (and of state saved before frames named theirs);
        `fixed_name`: the classifier every event names, instead of the frame's;
        `event_defaults`: classifier name → the `event_defaults` it declares (see `EventRules.rule_for`)."""
        self._rules = rules
        self._classifier = classifier
        self._fixed_name = fixed_name
        self._event_defaults = event_defaults or {}
        self._sources: dict[str, _SourceState] = {}
        self._rule_cache: dict[tuple[str, str, bool], Rule | None] = {}
        declared = [rule for defaults in self._event_defaults.values() for rule in defaults]
        every_rule = [rules.multi_class, rules.multi_label, *rules.rules, *declared]
        # how many frame times a source keeps: enough for the longest window of either kind
        self._history_frames = max(rule.window_frames or 1 for rule in every_rule)
        self._history_ms = max(seconds_ms(rule.window_seconds or 0) for rule in every_rule)

    @property
    def sources(self) -> list[str]:
        return list(self._sources)

    def observe(self, frame: Observation) -> list[AnnotationEvent]:
        source = self._sources.get(frame.source_id)
        classifier = frame.classifier or self._classifier
        messages: list[AnnotationEvent] = []
        if source is not None and frame.frame_index <= source.last_frame_index:
            if frame.capture_time_ms <= source.last_time_ms:
                return messages  # a repeat of a frame already seen
            source = None
        if source is None or classifier != source.classifier:
            messages = self.close_source(frame.source_id, AnnotationEvent.SOURCE_RESTARTED)
            source = self._sources[frame.source_id] = _SourceState(
                frame.frame_index, frame.capture_time_ms, classifier=classifier
            )
        source.last_frame_index, source.last_time_ms = frame.frame_index, frame.capture_time_ms
        source.multi_class = frame.multi_class
        self._remember_time(source, frame.capture_time_ms)
        for label, score in frame.scores.items():
            if score > 0 and label not in source.labels and self._rule(label, source) is not None:
                source.labels[label] = _LabelState()
        for label in list(source.labels):
            state = source.labels[label]
            rule = self._rule(label, source)
            if rule is None:  # the classifier's type changed under a rule set that ignores this label now
                del source.labels[label]
                continue
            score = frame.scores.get(label, 0.0)
            if score > 0:
                state.samples.append((frame.capture_time_ms, score))
            smoothed = _smoothed(state.samples, source.frame_times, rule)
            message = self._step(frame, source, label, state, rule, score, smoothed)
            if message is not None:
                messages.append(message)
            if state.event is None and not state.samples:
                del source.labels[label]  # nothing left that could matter: a later frame starts afresh
        return messages

    def close_source(self, source_id: str, reason: EndReason) -> list[AnnotationEvent]:
        """End every published event of the source with `reason`, and forget the source."""
        source = self._sources.pop(source_id, None)
        if source is None:
            return []
        return [
            self._message(source_id, label, state.event, AnnotationEvent.END, reason, source)
            for label, state in source.labels.items()
            if state.event is not None and state.event.published
        ]

    def close_silent(self, source_id: str, silent_ms: int) -> list[AnnotationEvent]:
        """A source that sent nothing for `silent_ms`: its events whose grace time has passed end as offline.

        The source is forgotten once none of its events is left open."""
        source = self._sources.get(source_id)
        if source is None:
            return []
        messages = []
        for label, state in list(source.labels.items()):
            rule = self._rule(label, source)
            if state.event is None or rule is None or silent_ms <= seconds_ms(rule.grace_seconds):
                continue
            if state.event.published:
                messages.append(
                    self._message(
                        source_id, label, state.event, AnnotationEvent.END, AnnotationEvent.SOURCE_OFFLINE, source
                    )
                )
            state.event = None
        if all(state.event is None for state in source.labels.values()):
            del self._sources[source_id]
        return messages

    def open_events(self, source_id: str) -> int:
        source = self._sources.get(source_id)
        return 0 if source is None else sum(1 for state in source.labels.values() if state.event is not None)

    def snapshot(self, source_id: str) -> dict[str, Any] | None:
        """The source's state as plain JSON-ready data; None once the source is forgotten."""
        source = self._sources.get(source_id)
        if source is None:
            return None
        return {
            "last_frame_index": source.last_frame_index,
            "last_time_ms": source.last_time_ms,
            "multi_class": source.multi_class,
            "classifier": source.classifier,
            "frame_times": list(source.frame_times),
            "labels": {
                label: {
                    "samples": [list(sample) for sample in state.samples],
                    "event": None if state.event is None else asdict(state.event),
                }
                for label, state in source.labels.items()
            },
        }

    def restore(self, source_id: str, snapshot: Mapping[str, Any] | None) -> None:
        """Put back what `snapshot` saved (None: the source has no state)."""
        if snapshot is None:
            self._sources.pop(source_id, None)
            return
        source = _SourceState(
            snapshot["last_frame_index"],
            snapshot["last_time_ms"],
            deque(snapshot["frame_times"]),
            multi_class=snapshot["multi_class"],
            classifier=snapshot.get("classifier", self._classifier),  # saved before frames named their classifier
        )
        for label, saved in snapshot["labels"].items():
            event = None if saved["event"] is None else _Event(**saved["event"])
            source.labels[label] = _LabelState(deque((time_ms, score) for time_ms, score in saved["samples"]), event)
        self._sources[source_id] = source

    def _rule(self, label: str, source: _SourceState) -> Rule | None:
        key = (source.classifier, label, source.multi_class)
        if key not in self._rule_cache:
            defaults = self._event_defaults.get(source.classifier, ())
            self._rule_cache[key] = self._rules.rule_for(label, source.multi_class, defaults)
        return self._rule_cache[key]

    def _remember_time(self, source: _SourceState, time_ms: int) -> None:
        times = source.frame_times
        times.append(time_ms)
        while len(times) > self._history_frames and time_ms - times[0] >= self._history_ms:
            times.popleft()

    def _step(
        self,
        frame: Observation,
        source: _SourceState,
        label: str,
        state: _LabelState,
        rule: Rule,
        score: float,
        smoothed: float,
    ) -> AnnotationEvent | None:
        now, index = frame.capture_time_ms, frame.frame_index
        event = state.event
        if event is None or not event.started:
            if smoothed < rule.enter_threshold:
                state.event = None  # a candidate that did not last
                return None
            if event is None:
                event = state.event = _Event(index, now, index, now, score, index, now, frames=0)
            _seen(event, index, now, score)
            if event.frames < rule.min_start_frames or now - event.start_time_ms < seconds_ms(rule.min_start_seconds):
                return None
            event.started = True
        elif smoothed >= rule.exit:
            _seen(event, index, now, score)
        elif now - event.end_time_ms > seconds_ms(rule.grace_seconds):
            state.event = None
            if not event.published:
                return None  # shorter than min_duration: never published
            return self._message(
                frame.source_id, label, event, AnnotationEvent.END, AnnotationEvent.SCORE_BELOW_EXIT, source
            )
        if not event.published:
            if event.end_time_ms - event.start_time_ms < seconds_ms(rule.min_duration_seconds):
                return None
            event.published = True
            event.last_message_ms = now
            return self._message(frame.source_id, label, event, AnnotationEvent.START, None, source)
        interval = rule.update_interval_seconds
        if interval is not None and now - event.last_message_ms >= seconds_ms(interval):
            event.last_message_ms = now
            return self._message(frame.source_id, label, event, AnnotationEvent.UPDATE, None, source)
        return None

    def _message(
        self,
        source_id: str,
        label: str,
        event: _Event,
        state: AnnotationEvent.State.ValueType,
        reason: EndReason | None,
        source: _SourceState,
    ) -> AnnotationEvent:
        """The message about `event`, produced at the source's latest frame."""
        if state != AnnotationEvent.START:
            event.sequence += 1
        classifier = self._fixed_name or source.classifier
        return AnnotationEvent(
            event_id=event_id(source_id, label, classifier, event.first_frame_index, event.start_time_ms),
            sequence=event.sequence,
            state=state,
            source_id=source_id,
            label=label,
            classifier=classifier,
            first_frame_index=event.first_frame_index,
            last_frame_index=event.last_frame_index,
            start_time_ms=event.start_time_ms,
            end_time_ms=event.end_time_ms,
            duration_ms=event.end_time_ms - event.start_time_ms,
            peak_confidence=event.peak_confidence,
            peak_frame_index=event.peak_frame_index,
            peak_time_ms=event.peak_time_ms,
            frames=event.frames,
            end_reason=reason or AnnotationEvent.END_REASON_UNSPECIFIED,
            at_frame_index=source.last_frame_index,
            at_time_ms=source.last_time_ms,
        )


def _seen(event: _Event, index: int, time_ms: int, score: float) -> None:
    event.last_frame_index, event.end_time_ms = index, time_ms
    event.frames += 1
    if score > event.peak_confidence:
        event.peak_confidence, event.peak_frame_index, event.peak_time_ms = score, index, time_ms


def _smoothed(samples: deque[tuple[int, float]], frame_times: deque[int], rule: Rule) -> float:
    """The median score over the rule's window, frames without the label counting as 0.

    Drops the samples that have left the window (as a side effect), so that `samples` stays bounded."""
    if rule.window_seconds is None:
        count = min(rule.window_frames or 1, len(frame_times))
    else:
        count = _frames_within(frame_times, seconds_ms(rule.window_seconds))
    oldest = frame_times[-count]
    while samples and samples[0][0] < oldest:
        samples.popleft()
    scores = sorted(score for _, score in samples)
    zeros = count - len(scores)

    def nth(position: int) -> float:
        return 0.0 if position < zeros else scores[position - zeros]

    middle = count // 2
    return nth(middle) if count % 2 else (nth(middle - 1) + nth(middle)) / 2


def _frames_within(frame_times: deque[int], window_ms: int) -> int:
    """How many of the newest frames lie less than `window_ms` before the newest (at least the newest itself)."""
    newest, count = frame_times[-1], 0
    for time_ms in reversed(frame_times):
        if newest - time_ms >= window_ms:
            break
        count += 1
    return max(count, 1)
