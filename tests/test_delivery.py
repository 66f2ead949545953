"""The publisher's delivery promises against a real broker frozen mid-stream: re-sent records keep frame order."""

from __future__ import annotations

import asyncio
import time

from pipeline.publisher import Publisher
from tests.faults import delivery_figures, eventually
from tests.helpers import within
from tests.kafka import annotated_frame, kafka_broker, paused, read_topic, settings_for

FRAMES_PER_SOURCE = 60
FLUSH_HANG_S = 30.0  # a liveness bound, far past request_timeout_ms (0.8 s) and the backoff: only a hang takes longer


async def test_records_re_sent_after_their_batches_expired_keep_frame_order(figures: dict[str, object]) -> None:
    async with kafka_broker() as broker:
        settings = settings_for(broker, partitions=1, request_timeout_ms=800, retry_backoff_ms=50)
        publisher = Publisher(settings)
        await publisher.start()
        try:
            for index in range(20):
                await publisher.publish(annotated_frame("cam-a", index))
                await publisher.publish(annotated_frame("cam-b", index))
            with paused(broker):  # requests go unanswered: batches expire and fail, while more frames come
                await eventually(lambda: publisher.stats.retried > 0, "a failed delivery")
                for index in range(20, FRAMES_PER_SOURCE):
                    await publisher.publish(annotated_frame("cam-a", index))
                    await publisher.publish(annotated_frame("cam-b", index))
                    await asyncio.sleep(0.02)  # frames keep arriving during the outage, as from a source
            began = time.monotonic()
            async with within(FLUSH_HANG_S, "flush() once the broker is back"):
                await publisher.flush()
            figures["broker frozen mid-stream: seconds for flush() once it is back"] = time.monotonic() - began
        finally:
            await publisher.stop()
        records = await read_topic(broker.address, settings.topic, expected=2 * FRAMES_PER_SOURCE)
    assert publisher.stats.lost == 0
    for source_id in ("cam-a", "cam-b"):
        found = delivery_figures([r for r in records if r.source_id == source_id], list(range(FRAMES_PER_SOURCE)))
        assert found.lost == 0, source_id
        assert found.in_order, source_id
