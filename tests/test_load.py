"""The Annotate service under load: 16 clients calling back to back for a few seconds (tools/load.py, shortened)."""

from __future__ import annotations

from tests.helpers import ServiceProcess, rss_mb
from tools.load import frame_jpeg, load

CLIENTS = 16
SECONDS = 6.0
RSS_GROWTH_LIMIT_MB = 40.0


async def test_sixteen_clients_get_every_answer_and_memory_stays_flat(
    imagenet_service: ServiceProcess, figures: dict[str, object]
) -> None:
    content = frame_jpeg()
    await load(imagenet_service.address, CLIENTS, 1.0, content)  # warm-up: threads, allocator, channel
    before = rss_mb(imagenet_service.process.pid)
    result = await load(imagenet_service.address, CLIENTS, SECONDS, content)
    grew = rss_mb(imagenet_service.process.pid) - before
    figures[f"load, {CLIENTS} clients for {SECONDS:g} s: calls, errors"] = (result.calls, sum(result.errors.values()))
    figures[f"load, {CLIENTS} clients: p50, p99 ms"] = (round(result.percentile(50)), round(result.percentile(99)))
    figures[f"load, {CLIENTS} clients: service RSS growth MB"] = grew
    assert dict(result.errors) == {}
    assert len(result.latencies_ms) >= CLIENTS
    assert grew < RSS_GROWTH_LIMIT_MB
