"""The events stage's settings: the `events:` section of a run config, or `framelabel events`' config."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from pipeline.events.record import DEFAULT_EVENTS_TOPIC
from pipeline.events.rules import EventRules
from pipeline.kafka import DEFAULT_TOPIC

Delivery = Literal["auto", "exactly-once", "at-least-once"]


class EventsConfig(EventRules):
    """The rules (`rules`, `multi_class`, `multi_label`, `other_labels`) and where events come from and go."""

    input_topic: Annotated[str, Field(min_length=1, description="the annotations topic")] = DEFAULT_TOPIC
    topic: Annotated[str, Field(min_length=1)] = DEFAULT_EVENTS_TOPIC
    group: Annotated[str, Field(min_length=1, description="the consumer group that reads the annotations")] = (
        "framelabel-events"
    )
    classifier: str | None = Field(None, description="named in every event; default: the input topic")
    delivery: Delivery = "auto"  # auto: exactly once where the broker has transactions, else at least once
    value_format: Literal["protobuf", "json"] = "protobuf"
    partitions: Annotated[int, Field(ge=1, description="of the events topic, when it is created")] = 3
    batch_records: Annotated[int, Field(ge=1, description="annotations read, and committed, at once")] = 500

    @property
    def state_topic(self) -> str:
        """The changelog of the stage's state, one record per source, compacted."""
        return f"{self.topic}.state"

    @property
    def classifier_name(self) -> str:
        return self.classifier or self.input_topic
