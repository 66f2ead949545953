"""`framelabel sources add|remove|list` and `framelabel status`: the catalog and the workers, as a user sees them."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from pipeline.cluster.catalog import (
    Catalog,
    ensure_compacted_topic,
    put_sources,
    read_sources,
    remove_sources,
)
from pipeline.cluster.status import SourceStatus, WorkerStatus, read_status
from pipeline.config import SourceConfig
from pipeline.kafka import KafkaConnection
from pipeline.sources.camera import mask_credentials

WIDE = 100  # columns the tables need before they squeeze their cells; narrower terminals get one block per row
HEALTH_ORDER = {"alive": 0, "silent": 1, "stopped": 2}


async def add(connection: KafkaConnection, topic: str, partitions: int, sources: Sequence[SourceConfig]) -> str:
    """Put the sources on the topic (created compacted if missing); says which were new and which replaced."""
    await ensure_compacted_topic(connection, topic, partitions)
    held = (await read_sources(connection, topic)).sources
    await put_sources(connection, topic, sources)
    added = [source.id for source in sources if source.id not in held]
    replaced = [source.id for source in sources if source.id in held]
    return f"{topic}: " + "; ".join(
        f"{verb} {', '.join(ids)}" for verb, ids in (("added", added), ("replaced", replaced)) if ids
    )


async def remove(connection: KafkaConnection, topic: str, source_ids: Sequence[str]) -> str:
    await remove_sources(connection, topic, source_ids)
    return f"{topic}: removed {', '.join(source_ids)}"


def settings_of(source: SourceConfig) -> dict[str, object]:
    """The settings given for the source, beside its id and URI."""
    return {
        name: value
        for name, value in source.model_dump(mode="json", exclude_unset=True).items()
        if name not in ("id", "uri")
    }


def catalog_lines(catalog: Catalog) -> list[str]:
    """`sources list --json`: one JSON object per source, then one per record that is not a source."""
    lines = [
        json.dumps(
            {
                "id": source_id,
                "uri": mask_credentials(entry.config.uri),
                "partition": entry.partition,
                "settings": settings_of(entry.config),
            },
            ensure_ascii=False,
        )
        for source_id, entry in catalog.sources.items()
    ]
    return lines + [json.dumps({"id": key, "invalid": why}, ensure_ascii=False) for key, why in catalog.invalid.items()]


def catalog_view(catalog: Catalog, topic: str, width: int) -> RenderableType:
    """`sources list`: a table (a block per source on a narrow terminal); unreadable records below, with why."""
    rows = [
        (source_id, mask_credentials(entry.config.uri), _settings_text(entry.config), str(entry.partition))
        for source_id, entry in catalog.sources.items()
    ]
    parts: list[RenderableType] = [Text(f"{topic}: {_sources(len(rows))}")]
    if rows and width >= WIDE:
        table = Table()
        for column in ("id", "uri", "settings", "partition"):
            table.add_column(column, justify="right" if column == "partition" else "left", overflow="fold")
        for row in rows:
            table.add_row(*row)
        parts.append(table)
    for source_id, uri, settings, partition in rows if width < WIDE else ():
        parts += [Text(f"{source_id}  (partition {partition})", style="bold"), Text(f"  {uri}", overflow="fold")]
        parts += [Text(f"  {settings}")] if settings else []
    if catalog.invalid:
        parts.append(Text("records that are not sources (`framelabel sources remove KEY` drops one):"))
        parts += [Text(f"  {key}: {why}", overflow="fold") for key, why in catalog.invalid.items()]
    return Group(*parts)


def _settings_text(source: SourceConfig) -> str:
    return " ".join(f"{name}={json.dumps(value)}" for name, value in settings_of(source).items())


async def read_cluster(
    connection: KafkaConnection, status_topic: str, sources_topic: str, group: str | None
) -> tuple[list[WorkerStatus], Catalog]:
    """The workers' last heartbeats (of one group, if given; alive first) and the catalog they run."""
    workers = [worker for worker in await read_status(connection, status_topic) if group in (None, worker.group)]
    now_ms = _now_ms()
    workers.sort(key=lambda worker: (HEALTH_ORDER[worker.health(now_ms)], worker.group, worker.worker))
    return workers, await read_sources(connection, sources_topic)


def unassigned(workers: Sequence[WorkerStatus], catalog: Catalog, now_ms: int) -> list[str]:
    """The catalog's sources that no alive worker runs."""
    running = {source.id for worker in workers if worker.health(now_ms) == "alive" for source in worker.sources}
    return [source_id for source_id in catalog.sources if source_id not in running]


def status_json(workers: Sequence[WorkerStatus], catalog: Catalog) -> str:
    now_ms = _now_ms()
    return json.dumps(
        {
            "workers": [worker.model_dump(mode="json") | {"health": worker.health(now_ms)} for worker in workers],
            "unassigned": unassigned(workers, catalog, now_ms),
            "invalid_sources": catalog.invalid,
        },
        ensure_ascii=False,
    )


STATUS_COLUMNS = ("worker", "group", "health", "seen", "source", "state", "fps", "published", "dropped", "last frame")


def status_view(workers: Sequence[WorkerStatus], catalog: Catalog, width: int) -> RenderableType:
    """`framelabel status`: one row per worker and source (a block per worker on a narrow terminal), the
    sources' errors, then the catalog's sources no alive worker runs."""
    now_ms = _now_ms()
    parts: list[RenderableType] = []
    if not workers:
        parts.append(Text("no worker has sent a heartbeat"))
    elif width >= WIDE:
        table = Table()
        for column in STATUS_COLUMNS:
            table.add_column(
                column, justify="right" if column in ("fps", "published", "dropped", "last frame") else "left"
            )
        for worker in workers:
            head = (worker.worker, worker.group, worker.health(now_ms), _ago(now_ms - worker.at_ms))
            for index, source in enumerate(worker.sources or [None]):
                table.add_row(*(head if index == 0 else ("",) * len(head)), *_source_cells(source))
        parts.append(table)
    else:
        for worker in workers:
            parts.append(
                Text(
                    f"{worker.worker}  group {worker.group}  {worker.health(now_ms)}, "
                    f"seen {_ago(now_ms - worker.at_ms)}, {_sources(len(worker.sources))}",
                    style="bold",
                )
            )
            for source in worker.sources:
                source_id, state, fps, published, dropped, last = _source_cells(source)
                parts += [
                    Text(f"  {source_id}: {state}, {fps} fps"),
                    Text(f"    published {published}  dropped {dropped}  last frame {last}"),
                ]
    parts += [
        Text(f"{source.id} on {worker.worker}: {source.error}", overflow="fold")
        for worker in workers
        for source in worker.sources
        if source.error
    ]
    missing = unassigned(workers, catalog, now_ms)
    parts.append(Text(f"unassigned: {', '.join(missing) if missing else 'none'}", overflow="fold"))
    if catalog.invalid:
        parts.append(Text(f"not sources, in the catalog: {', '.join(catalog.invalid)} (`framelabel sources list`)"))
    return Group(*parts)


def _source_cells(source: SourceStatus | None) -> tuple[str, str, str, str, str, str]:
    if source is None:
        return ("(none)", "", "", "", "", "")
    last = "-" if source.last_frame is None else str(source.last_frame)
    return (source.id, source.state, f"{source.fps:.1f}", str(source.published), str(source.dropped), last)


def _sources(count: int) -> str:
    return {0: "no sources", 1: "1 source"}.get(count, f"{count} sources")


def _ago(ms: int) -> str:
    seconds = max(ms, 0) / 1000
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def _now_ms() -> int:
    return int(time.time() * 1000)
