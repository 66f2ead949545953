"""`framelabel events`: the events stage on its own, until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import kafka_section
from pipeline.events.settings import EventsConfig, events_section
from pipeline.events.stage import EventsStage
from pipeline.kafka import KafkaSettings
from services.config import read_yaml, resolve_paths, validate
from services.runtime import STOP_SIGNALS

log = logging.getLogger("framelabel.events")


def load_events_config(path: Path | None, flags: Mapping[str, Any]) -> tuple[KafkaSettings, EventsConfig]:
    """A run config's `kafka:` and `events:` sections (or the defaults) with flags on top.

    flags: `bootstrap`; `input_topic`, `topic`, `group`, `delivery` of the events section.
    Without `events.input_topic`, the stage reads the topic the run config's `kafka.topic` names; without
    `events.classifiers_file`, it knows the classifiers of the run config's `annotator.classifiers_file`."""
    data = read_yaml(path) if path else {}
    where = str(path) if path else "events flags"
    base = path.parent if path else Path.cwd()
    kafka = validate(KafkaSettings, kafka_section(data.get("kafka"), base, flags), where)
    annotator = data.get("annotator")
    run_classifiers = resolve_paths(annotator, base, ("classifiers_file",)) if isinstance(annotator, dict) else {}
    events = events_section(data.get("events"), kafka.topic, base, run_classifiers.get("classifiers_file"))
    events |= {name: flags[name] for name in ("input_topic", "topic", "group", "delivery") if flags.get(name)}
    return kafka, validate(EventsConfig, events, f"{where}: events")


async def run_events(kafka: KafkaSettings, config: EventsConfig) -> int:
    """Run the stage until a stop signal: while starting it stops at once, later after the batch under way."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    stage = EventsStage(kafka, config)
    started = False

    def stop() -> None:
        if started:
            stage.stop()
        elif main is not None:
            main.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)
    try:
        async with stage:
            started = True
            await stage.run()
    except asyncio.CancelledError:
        log.info("events: stopped while starting")
        return 0
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    log.info("events: stopped after %d annotations, %d event messages", stage.processed, stage.published)
    return 0
