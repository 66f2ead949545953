"""The events stage's settings: the `events:` section of a run config, or `framelabel events`' config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from pipeline.events.record import DEFAULT_EVENTS_TOPIC
from pipeline.events.rules import EventRules
from pipeline.kafka import DEFAULT_TOPIC
from services.config import resolve_paths
from services.errors import ConfigError

Delivery = Literal["auto", "exactly-once", "at-least-once"]


class EventsConfig(EventRules):
    """The rules (`rules`, `multi_class`, `multi_label`, `other_labels`) and where events come from and go."""

    input_topic: Annotated[str, Field(min_length=1, description="the annotations topic")] = DEFAULT_TOPIC
    topic: Annotated[str, Field(min_length=1)] = DEFAULT_EVENTS_TOPIC
    group: Annotated[str, Field(min_length=1, description="the consumer group that reads the annotations")] = (
        "framelabel-events"
    )
    classifier: str | None = Field(
        None, description="named in every event; default: the records' `classifier` header, else the input topic"
    )
    classifiers_file: Path | None = Field(
        None, description="your own classifiers, whose `event_defaults` apply, added to the built-in ones"
    )
    delivery: Delivery = "auto"  # auto: exactly once where the broker has transactions, else at least once
    value_format: Literal["protobuf", "json"] = "protobuf"
    partitions: Annotated[int, Field(ge=1, description="of the events topic, when it is created")] = 3
    batch_records: Annotated[int, Field(ge=1, description="annotations read, and committed, at once")] = 500
    # no record from a source for this long (on the stage's clock) ends its events past their grace time
    # as SOURCE_OFFLINE: longer than the gaps batching and fetching put between a live source's records
    offline_after_seconds: Annotated[float, Field(gt=0)] = 5.0

    @property
    def state_topic(self) -> str:
        """The changelog of the stage's state, one record per source, compacted."""
        return f"{self.topic}.state"

    @property
    def classifier_name(self) -> str:
        """The classifier of records that do not name theirs."""
        return self.classifier or self.input_topic


def events_section(raw: Any, input_topic: str, base: Path, classifiers_file: str | None = None) -> dict[str, Any]:
    """The `events:` mapping ready to validate: by default it reads `input_topic`, the topic the run publishes to,
    and knows the classifiers of `classifiers_file` (the run's); its own `classifiers_file` is relative to `base`."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"events: expected a mapping, got {type(raw).__name__}")
    defaults = {"input_topic": input_topic} | ({"classifiers_file": classifiers_file} if classifiers_file else {})
    return defaults | resolve_paths(dict(raw or {}), base, ("classifiers_file",))
