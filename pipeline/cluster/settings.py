"""A run's `group:` section: run as one worker of a group sharing the sources of a topic."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from pipeline.kafka import GROUP_SESSION_TIMEOUT_MS
from services.config import StrictModel

SOURCES_TOPIC = "framelabel.sources"  # compacted: key = source id, value = its config; a tombstone removes it
PROGRESS_TOPIC = "framelabel.progress"  # compacted: key = source id, value = its replay's last published frame
STATUS_TOPIC = "framelabel.status"  # compacted: key = worker id, value = its latest heartbeat
SOURCES_PARTITIONS = 12  # the most workers a group can keep busy


class GroupConfig(StrictModel):
    name: Annotated[str, Field(min_length=1, pattern=r"^[\w.\-]+$", description="the consumer group of the workers")]
    sources_topic: str = SOURCES_TOPIC
    progress_topic: str = PROGRESS_TOPIC
    status_topic: str = STATUS_TOPIC
    # exactly-once: each replay's records and progress commit together (brokers with transactions);
    # auto: so where the broker allows it, at least once elsewhere
    delivery: Literal["auto", "exactly-once", "at-least-once"] = "auto"
    session_timeout_ms: Annotated[int, Field(ge=1000)] = GROUP_SESSION_TIMEOUT_MS
    # run every source of the topic without joining the group: for brokers whose groups do not settle after a
    # member dies (noida-db); one such worker at a time
    sole_worker: bool = False
    status_interval_seconds: Annotated[float, Field(gt=0)] = 2.0
