"""The events rules on synthetic annotation streams: exact boundaries of every rule, and properties."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.events.rules import MULTI_LABEL_DEFAULT, EventRules
from pipeline.events.settings import EventsConfig
from pipeline.events.stage import event_defaults
from pipeline.events.tracker import EventTracker, Observation
from services.api.event_pb2 import AnnotationEvent
from services.config import LabelRule, Rule, load_catalog

START, UPDATE, END = AnnotationEvent.START, AnnotationEvent.UPDATE, AnnotationEvent.END
T0 = 1_760_000_000_000


def only(rule: Rule, **others: object) -> EventRules:
    """Rules where every label follows `rule`."""
    return EventRules.model_validate({"rules": [LabelRule(match="*", **rule.model_dump())], **others})


def frames(
    scores: Sequence[float], fps: float = 10, label: str = "dog", source: str = "cam", first: int = 0
) -> list[Observation]:
    period_ms = 1000 / fps
    return [
        Observation(source, first + i, T0 + round((first + i) * period_ms), True, {label: score} if score else {})
        for i, score in enumerate(scores)
    ]


def run(tracker: EventTracker, observations: Iterable[Observation]) -> list[AnnotationEvent]:
    return [message for frame in observations for message in tracker.observe(frame)]


def summary(messages: Sequence[AnnotationEvent]) -> list[tuple[str, int, int, int]]:
    """(state, first frame, last frame, frame that produced it) of each message."""
    return [
        (AnnotationEvent.State.Name(m.state), m.first_frame_index, m.last_frame_index, m.at_frame_index)
        for m in messages
    ]


def test_an_event_starts_after_min_start_frames_and_ends_after_the_grace_time() -> None:
    rule = Rule(
        enter_threshold=0.5, exit_threshold=0.3, min_start_frames=3, grace_seconds=0.2, update_interval_seconds=None
    )
    # frames 0-5 above the enter threshold, 6-9 below exit: frame 5 (t=500) is the last seen; 7 is at
    # exactly 200 ms after it (still in grace), 8 is past it
    messages = run(EventTracker(only(rule), "imagenet"), frames([0.6] * 6 + [0.1] * 4))
    assert summary(messages) == [("START", 0, 2, 2), ("END", 0, 5, 8)]
    end = messages[-1]
    assert (end.start_time_ms, end.end_time_ms, end.duration_ms) == (T0, T0 + 500, 500)
    assert end.end_reason == AnnotationEvent.SCORE_BELOW_EXIT
    assert end.frames == 6
    assert [m.sequence for m in messages] == [0, 1]
    assert messages[0].event_id == end.event_id


def test_min_start_seconds_is_measured_in_capture_time() -> None:
    rule = Rule(enter_threshold=0.5, min_start_seconds=0.3, update_interval_seconds=None)
    messages = run(EventTracker(only(rule), "c"), frames([0.6] * 5))
    assert summary(messages) == [("START", 0, 3, 3)]  # t = 300 ms after the first frame, not 200


def test_a_dip_below_enter_before_the_start_resets_the_count() -> None:
    rule = Rule(enter_threshold=0.5, min_start_frames=3, update_interval_seconds=None)
    messages = run(EventTracker(only(rule), "c"), frames([0.6, 0.6, 0.4, 0.6, 0.6, 0.6]))
    assert summary(messages) == [("START", 3, 5, 5)]


def test_between_exit_and_enter_an_event_goes_on() -> None:
    rule = Rule(enter_threshold=0.8, exit_threshold=0.4, grace_seconds=0, update_interval_seconds=None)
    messages = run(EventTracker(only(rule), "c"), frames([0.9, 0.5, 0.5, 0.3]))
    assert summary(messages) == [("START", 0, 0, 0), ("END", 0, 2, 3)]


def test_the_median_ignores_single_spikes_and_single_drops() -> None:
    rule = Rule(enter_threshold=0.5, window_frames=3, grace_seconds=0, update_interval_seconds=None)
    spikes = [0.0, 0.9, 0.0, 0.0, 0.9, 0.0]
    assert run(EventTracker(only(rule), "c"), frames(spikes)) == []
    steady = [0.9, 0.9, 0.0, 0.9, 0.9, 0.0, 0.0, 0.0]
    # a source's first frames have a shorter window (frame 0: itself); the drop on frame 2 is outvoted;
    # the median falls on frame 6
    assert summary(run(EventTracker(only(rule), "c"), frames(steady))) == [("START", 0, 0, 0), ("END", 0, 5, 6)]


def test_a_time_window_behaves_alike_at_different_frame_rates() -> None:
    rule = Rule(
        enter_threshold=0.5, exit_threshold=0.5, window_seconds=0.4, grace_seconds=0.4, update_interval_seconds=None
    )

    def times_at(fps: int) -> tuple[int, int, int]:
        # the label is present from 1 s to 3 s of capture time
        count = 5 * fps
        scores = [0.9 if fps <= i < 3 * fps else 0.0 for i in range(count)]
        start, end = run(EventTracker(only(rule), "c"), frames(scores, fps=fps))
        return start.start_time_ms - T0, end.end_time_ms - T0, end.at_time_ms - T0

    # the median needs more than half of the last 0.4 s: 2 frames of 2 at 5 fps, 6 of 10 at 25 fps, so
    # both start at 1.2 s; the ends differ by less than the window (the median's lag at each rate)
    assert times_at(5) == (1200, 2800, 3400)
    assert times_at(25) == (1200, 3120, 3560)


def test_a_gap_in_a_sources_frames_is_judged_by_capture_time() -> None:
    rule = Rule(enter_threshold=0.5, window_seconds=0.4, grace_seconds=1.0, update_interval_seconds=None)
    seen = frames([0.9] * 5)  # frames 0-4, t = 0-400 ms at 10 fps; then nothing until frame 35 (t = 3.5 s)
    # the first frame after a gap longer than the grace time ends the event, at the last frame before the gap
    gone = run(EventTracker(only(rule), "c"), seen + frames([0.0] * 2, first=35))
    assert summary(gone) == [("START", 0, 0, 0), ("END", 0, 4, 35)]
    assert gone[-1].end_time_ms == T0 + 400
    # the label there again after the gap: the same event goes on; the window (0.4 s) holds only frames after
    # the gap, so it still holds the label on frame 38 (3 of 4) and not on 39 (2 of 4); 49 is 1.1 s after 38
    back = run(EventTracker(only(rule), "c"), seen + frames([0.9] * 3, first=35) + frames([0.0] * 12, first=38))
    assert summary(back) == [("START", 0, 0, 0), ("END", 0, 38, 49)]
    assert back[-1].frames == 9
    # a gap shorter than the grace time ends nothing by itself: the end comes 1 s after frame 4, on frame 15
    short = run(EventTracker(only(rule), "c"), seen + frames([0.0] * 6, first=12))
    assert summary(short) == [("START", 0, 0, 0), ("END", 0, 4, 15)]


def test_an_event_shorter_than_min_duration_is_never_published() -> None:
    rule = Rule(enter_threshold=0.5, grace_seconds=0, min_duration_seconds=0.5, update_interval_seconds=None)
    assert run(EventTracker(only(rule), "c"), frames([0.9] * 5 + [0.0])) == []
    messages = run(EventTracker(only(rule), "c"), frames([0.9] * 7 + [0.0]))
    # published once 500 ms have passed since its first frame, which it still starts at
    assert summary(messages) == [("START", 0, 5, 5), ("END", 0, 6, 7)]
    assert messages[0].start_time_ms == T0


def test_updates_carry_the_running_peak() -> None:
    rule = Rule(enter_threshold=0.5, grace_seconds=0, update_interval_seconds=0.3)
    scores = [0.6, 0.7, 0.95, 0.8, 0.6, 0.6, 0.6, 0.0]
    messages = run(EventTracker(only(rule), "c"), frames(scores))
    assert summary(messages) == [("START", 0, 0, 0), ("UPDATE", 0, 3, 3), ("UPDATE", 0, 6, 6), ("END", 0, 6, 7)]
    assert [m.sequence for m in messages] == [0, 1, 2, 3]
    assert [round(m.peak_confidence, 2) for m in messages] == [0.6, 0.95, 0.95, 0.95]
    assert messages[-1].peak_frame_index == 2
    assert messages[-1].peak_time_ms == T0 + 200


def test_a_source_that_ends_closes_its_events_with_that_reason() -> None:
    tracker = EventTracker(only(Rule(enter_threshold=0.5, min_duration_seconds=0.3)), "c")
    run(tracker, frames([0.9] * 5))  # published at frame 3
    run(tracker, frames([0.9] * 2, label="cat", source="cam", first=5))  # cat too short to be published
    ended = tracker.close_source("cam", AnnotationEvent.SOURCE_ENDED)
    assert [(m.label, m.state, m.end_reason, m.at_frame_index) for m in ended] == [
        ("dog", END, AnnotationEvent.SOURCE_ENDED, 6)
    ]
    assert tracker.sources == []
    assert tracker.close_source("cam", AnnotationEvent.SOURCE_ENDED) == []


def test_a_silent_source_ends_its_events_as_offline_after_the_grace_time() -> None:
    tracker = EventTracker(only(Rule(enter_threshold=0.5, grace_seconds=2)), "c")
    run(tracker, frames([0.9] * 3))
    assert tracker.close_silent("cam", 2000) == []  # exactly the grace time: not yet
    (end,) = tracker.close_silent("cam", 2001)
    assert (end.end_reason, end.last_frame_index) == (AnnotationEvent.SOURCE_OFFLINE, 2)
    assert tracker.sources == []


def test_repeated_frames_change_nothing_and_a_restarted_source_closes_its_events() -> None:
    rule = Rule(enter_threshold=0.5, grace_seconds=0, update_interval_seconds=None)
    tracker = EventTracker(only(rule), "c")
    stream = frames([0.9] * 4)
    assert summary(run(tracker, stream)) == [("START", 0, 0, 0)]
    assert run(tracker, stream[1:]) == []  # redelivered records
    restarted = [Observation("cam", 0, T0 + 10_000, True, {"dog": 0.9})]
    assert [(m.state, m.end_reason) for m in run(tracker, restarted)] == [
        (END, AnnotationEvent.SOURCE_RESTARTED),
        (START, AnnotationEvent.END_REASON_UNSPECIFIED),
    ]


def test_rules_by_label_pattern_and_classification_type() -> None:
    rules = EventRules.model_validate(
        {
            "rules": [{"match": "dog", "enter_threshold": 0.9}, {"match": "*cat", "enter_threshold": 0.8}],
            "multi_label": {"enter_threshold": 0.6},
        }
    )
    assert rules.rule_for("dog", True) == LabelRule(match="dog", enter_threshold=0.9)
    assert rules.rule_for("tabby cat", False) == LabelRule(match="*cat", enter_threshold=0.8)
    assert rules.rule_for("car", True) == rules.multi_class
    assert rules.rule_for("car", False) == Rule(enter_threshold=0.6)
    assert rules.multi_class.enter_threshold == 0.5  # MULTI_CLASS defaults
    ignoring = rules.model_copy(update={"other_labels": "ignore"})
    assert ignoring.rule_for("car", True) is None
    messages = run(EventTracker(ignoring, "c"), frames([0.95] * 12, label="car"))
    assert messages == []


def test_rules_come_from_the_config_then_the_classifier_then_the_type() -> None:
    declared = (LabelRule(match="person", enter_threshold=0.3), LabelRule(match="*", enter_threshold=0.5))
    rules = EventRules.model_validate(
        {"rules": [{"match": "dog", "enter_threshold": 0.9}], "multi_label": {"enter_threshold": 0.6}}
    )
    assert rules.rule_for("dog", False, declared) == LabelRule(match="dog", enter_threshold=0.9)  # the config's own
    assert rules.rule_for("person", False, declared) == declared[0]  # the classifier's, first match
    assert rules.rule_for("car", False, declared) == declared[1]
    assert rules.rule_for("car", False) == Rule(enter_threshold=0.6)  # a classifier without: the type's, overridden
    ignoring = rules.model_copy(update={"other_labels": "ignore"})
    assert ignoring.rule_for("person", False, declared) is None  # `ignore` leaves only the config's rules


def test_a_frame_names_its_classifier_whose_defaults_and_name_the_events_take() -> None:
    defaults = {"objects": (LabelRule(match="person", enter_threshold=0.3, grace_seconds=0),)}
    stream = frames([0.4] * 3 + [0.0] * 2, label="person")  # MULTI_CLASS frames: the type's 0.5 would not start
    named = [replace(frame, classifier="objects") for frame in stream]
    tracker = EventTracker(EventRules(), "topic", event_defaults=defaults)
    assert run(tracker, stream) == []  # frames that name no classifier are the topic's: the type's defaults
    tracker = EventTracker(EventRules(), "topic", event_defaults=defaults)
    messages = run(tracker, named)
    assert [(m.state, m.classifier) for m in messages] == [(START, "objects"), (END, "objects")]
    fixed = run(EventTracker(EventRules(), "gate", fixed_name="gate", event_defaults=defaults), named)
    assert [(m.state, m.classifier) for m in fixed] == [(START, "gate"), (END, "gate")]
    assert {m.event_id for m in fixed}.isdisjoint(m.event_id for m in messages)


def test_another_classifier_on_a_source_begins_it_again() -> None:
    tracker = EventTracker(only(Rule(enter_threshold=0.5, update_interval_seconds=None)), "c")
    first = [replace(frame, classifier="imagenet") for frame in frames([0.9] * 3)]
    then = [replace(frame, classifier="objects") for frame in frames([0.9] * 3, first=3)]
    messages = run(tracker, first + then)
    assert [(m.state, m.classifier, m.end_reason) for m in messages] == [
        (START, "imagenet", AnnotationEvent.END_REASON_UNSPECIFIED),
        (END, "imagenet", AnnotationEvent.SOURCE_RESTARTED),
        (START, "objects", AnnotationEvent.END_REASON_UNSPECIFIED),
    ]


def test_state_saved_before_frames_named_their_classifier_restores_as_the_fallbacks() -> None:
    rule = Rule(enter_threshold=0.5, grace_seconds=0.2, update_interval_seconds=None)
    stream = frames([0.9] * 4 + [0.0] * 4)
    whole = run(EventTracker(only(rule), "topic"), stream)
    first = EventTracker(only(rule), "topic")
    before = run(first, stream[:4])
    saved = first.snapshot("cam")
    assert saved is not None
    del saved["classifier"]  # as an older stage wrote it
    second = EventTracker(only(rule), "topic")
    second.restore("cam", saved)
    assert before + run(second, stream[4:]) == whole
    assert [m.state for m in whole] == [START, END]


def test_the_objects_classifier_declares_a_low_person_threshold_and_a_higher_one_for_the_rest() -> None:
    declared = load_catalog().classifiers["objects"].event_defaults
    person = EventRules().rule_for("person", False, declared)
    car = EventRules().rule_for("car", False, declared)
    assert person is not None
    assert car is not None
    assert (person.enter_threshold, person.exit, person.window_seconds, person.min_start_seconds) == (0.3, 0.2, 1, 0.5)
    assert person.enter_threshold < car.enter_threshold < MULTI_LABEL_DEFAULT.enter_threshold
    assert load_catalog().classifiers["imagenet"].event_defaults == ()


def test_the_stage_knows_the_event_defaults_of_its_classifiers_file_and_the_built_in_ones(tmp_path: Path) -> None:
    mine = {"family": "open_nsfw", "classification_type": "MULTI_CLASS", "model": "m.onnx", "labels": [{"name": "a"}]}
    path = tmp_path / "classifiers.yaml"
    path.write_text(json.dumps({"classifiers": {"mine": mine | {"event_defaults": [{"match": "a"}]}, "plain": mine}}))
    known = event_defaults(EventsConfig(classifiers_file=path))
    assert known["mine"] == (LabelRule(match="a"),)
    assert known["objects"] == load_catalog().classifiers["objects"].event_defaults
    assert "plain" not in known


def test_multi_class_and_multi_label_defaults_apply_by_the_records_type() -> None:
    rules = EventRules()
    scores = {"dog": 0.6}  # above MULTI_CLASS's enter threshold, below MULTI_LABEL's
    for multi_class, expected in ((True, [START]), (False, [])):
        tracker = EventTracker(rules, "c")
        stream = [Observation("cam", i, T0 + i * 40, multi_class, scores) for i in range(20)]
        assert [m.state for m in run(tracker, stream)] == expected


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ({"enter_threshold": 0.5, "exit_threshold": 0.6}, "must not exceed `enter_threshold`"),
        ({"window_frames": 3, "window_seconds": 1}, "not both"),
        ({"enter_threshold": 0}, "greater than 0"),
        ({"grace_seconds": -1}, "greater than or equal to 0"),
        ({"enter": 0.5}, "Extra inputs are not permitted"),
    ],
)
def test_impossible_rules_are_refused_with_the_reason(rule: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        Rule.model_validate(rule)


def test_a_restored_tracker_goes_on_as_if_never_stopped() -> None:
    rule = Rule(
        enter_threshold=0.5, exit_threshold=0.3, window_frames=3, grace_seconds=0.3, update_interval_seconds=0.5
    )
    scores = [0.2, 0.7, 0.8, 0.6, 0.2, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0]
    stream = frames(scores)
    whole = run(EventTracker(only(rule), "c"), stream)
    for cut in range(1, len(stream)):
        first = EventTracker(only(rule), "c")
        before = run(first, stream[:cut])
        second = EventTracker(only(rule), "c")
        second.restore("cam", json.loads(json.dumps(first.snapshot("cam"))))
        assert before + run(second, stream[cut:]) == whole, f"cut at frame {cut}"
    assert len(whole) >= 4


def test_the_same_input_gives_the_same_ids() -> None:
    rule = Rule(enter_threshold=0.5, grace_seconds=0, update_interval_seconds=0.2)
    stream = frames([0.9] * 6 + [0.0] + [0.9] * 3 + [0.0])
    first = run(EventTracker(only(rule), "imagenet"), stream)
    again = run(EventTracker(only(rule), "imagenet"), stream)
    assert first == again
    assert len({m.event_id for m in first}) == 2  # two events
    assert len({(m.event_id, m.sequence) for m in first}) == len(first)
    other_classifier = run(EventTracker(only(rule), "moderation"), stream)
    assert {m.event_id for m in other_classifier}.isdisjoint(m.event_id for m in first)


score_values = st.sampled_from([0.0, 0.1, 0.35, 0.5, 0.65, 0.9, 1.0])
rule_values = st.builds(
    Rule,
    enter_threshold=st.sampled_from([0.5, 0.65, 0.9]),
    exit_threshold=st.sampled_from([0.1, 0.35, 0.5]),
    window_frames=st.sampled_from([None, 1, 3, 4]),
    min_start_frames=st.integers(1, 3),
    min_start_seconds=st.sampled_from([0.0, 0.1, 0.25]),
    grace_seconds=st.sampled_from([0.0, 0.1, 0.3]),
    min_duration_seconds=st.sampled_from([0.0, 0.2]),
    update_interval_seconds=st.sampled_from([None, 0.2]),
)
streams = st.lists(
    st.tuples(
        st.sampled_from(["cam1", "cam2"]),
        st.integers(1, 200),
        st.dictionaries(st.sampled_from(["dog", "cat"]), score_values),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(rule=rule_values, stream=streams, ending=st.sampled_from(["ended", "offline"]))
def test_every_start_has_exactly_one_end_and_events_never_overlap(
    rule: Rule, stream: list[tuple[str, int, dict[str, float]]], ending: str
) -> None:
    tracker = EventTracker(only(rule), "c")
    clock = {"cam1": (0, T0), "cam2": (0, T0)}
    messages = []
    for source, step_ms, scores in stream:
        index, time_ms = clock[source]
        clock[source] = (index + 1, time_ms + step_ms)
        messages += tracker.observe(Observation(source, index, time_ms, True, scores))
    for source in ("cam1", "cam2"):
        messages += tracker.close_source(source, 2) if ending == "ended" else tracker.close_silent(source, 10_000)
    assert tracker.sources == []
    by_event: dict[str, list[AnnotationEvent]] = {}
    for message in messages:
        by_event.setdefault(message.event_id, []).append(message)
    for event_messages in by_event.values():
        states = [m.state for m in event_messages]
        assert states[0] == START
        assert states[-1] == END
        assert states.count(START) == states.count(END) == 1
        assert [m.sequence for m in event_messages] == list(range(len(event_messages)))
        times = [m.at_time_ms for m in event_messages]
        assert times == sorted(times)
        end = event_messages[-1]
        assert end.start_time_ms <= end.peak_time_ms <= end.end_time_ms <= end.at_time_ms
    for source in ("cam1", "cam2"):
        for label in ("dog", "cat"):
            spans = sorted(
                (m.start_time_ms, m.end_time_ms)
                for m in messages
                if m.state == END and m.source_id == source and m.label == label
            )
            assert all(earlier[1] < later[0] for earlier, later in itertools.pairwise(spans)), spans
