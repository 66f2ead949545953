"""The events stage inside `framelabel run`: it reads what the run publishes, and ends its sources' events.

When the run's sources are done, the stage is given until it has read each source's last published
frame, then the open events end with SOURCE_ENDED (the replays ran to their end) or RUN_STOPPED (a
signal stopped the run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping

from pipeline.events.settings import EventsConfig
from pipeline.events.stage import EventsStage
from pipeline.kafka import KafkaSettings
from services.api.event_pb2 import AnnotationEvent

log = logging.getLogger("framelabel.events")

CATCH_UP_S = 30.0  # how long the end of a run waits for the stage to read the last records
POLL_S = 0.05


class RunEvents:
    def __init__(self, stage: EventsStage) -> None:
        self._stage = stage
        self._task = asyncio.create_task(stage.run(), name="events")

    async def finish(self, last_published: Mapping[str, int], stopped: bool) -> None:
        """Wait until the stage has read `last_published` (source → frame index), end the sources, stop it."""
        deadline = time.monotonic() + CATCH_UP_S
        while not self._task.done() and not self._caught_up(last_published):
            if time.monotonic() > deadline:
                log.warning("events: not caught up with the run after %.0f s; ending its sources anyway", CATCH_UP_S)
                break
            await asyncio.sleep(POLL_S)
        self._stage.stop()
        await self._task  # its error, if it failed, surfaces here
        reason = AnnotationEvent.RUN_STOPPED if stopped else AnnotationEvent.SOURCE_ENDED
        await self._stage.close_sources(last_published, reason)
        log.info("events: %d event messages written to %s", self._stage.published, self._stage.topic)

    def recent(self, source_id: str) -> list[AnnotationEvent]:
        return self._stage.recent_events(source_id)

    def _caught_up(self, last_published: Mapping[str, int]) -> bool:
        seen = self._stage.last_frame
        return all(seen.get(source_id, -1) >= index for source_id, index in last_published.items())

    async def cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def events_in_run(settings: KafkaSettings, config: EventsConfig | None) -> AsyncIterator[RunEvents | None]:
    """The stage running beside the run (None without an `events:` section), stopped at the end."""
    if config is None:
        yield None
        return
    # the run's own reader: no group to join (and wait for) at start, nor rebalances while it runs
    async with EventsStage(settings, config, sole_reader=True) as stage:
        events = RunEvents(stage)
        try:
            yield events
        finally:
            await events.cancel()
