"""The events stage's figures: annotations per second on one core, and annotation → event lag at full rate.

    python -m bench.events [--sources 10] [--fps 25] [--seconds 20]

Throughput: records of `sources` sources already on a Tansu topic, read by one in-process stage (one
asyncio thread) from the start until every one is processed; annotations/s of wall time and of process
CPU time. Lag: `sources` sources published live at `fps` each, the leading label changing every 50 frames;
the lag of an event is when a reader got it minus the capture time of the frame that produced it
(publisher linger, the stage's batch and the reader's fetch included); p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.timing import Sample
from pipeline.broker import EmbeddedBroker
from pipeline.events.record import decode_event
from pipeline.events.settings import EventsConfig
from pipeline.events.stage import EventsStage
from pipeline.frames import AnnotatedFrame, FrameInfo
from pipeline.kafka import KafkaSettings, ensure_topic
from pipeline.records import encode_record
from services.api.image_classifier_pb2 import AnnotationResponse, ClassAnnotation, ClassifierSpecification, Label

TOPIC = "bench.annotations"  # the backlog for the throughput
LIVE_TOPIC = "bench.live"  # the live sources for the lag
LABELS = ("dog", "cat", "car", "person", "bird")  # top-5 of a MULTI_CLASS classifier
CHANGE_EVERY = 50  # frames: 2 s at 25 fps, longer than the default rules need to start and end an event


def frame(source: int, index: int, capture_time_ms: int) -> AnnotatedFrame:
    leader = LABELS[(index // CHANGE_EVERY) % len(LABELS)]
    scores = {label: (0.8 if label == leader else 0.05) for label in LABELS}
    response = AnnotationResponse(
        request_id=f"{source}/{index}",
        classifier_specification=ClassifierSpecification(classification_type=ClassifierSpecification.MULTI_CLASS),
        annotations=[ClassAnnotation(label=Label(name=name), confidence=score) for name, score in scores.items()],
    )
    return AnnotatedFrame(FrameInfo(f"cam{source}", index, capture_time_ms, 0.0), response, 640, 360)


async def send(producer: AIOKafkaProducer, annotated: AnnotatedFrame, topic: str = TOPIC) -> asyncio.Future[Any]:
    record = encode_record(annotated, "protobuf")
    future: asyncio.Future[Any] = await producer.send(
        topic, record.value, key=record.key, timestamp_ms=record.timestamp_ms, headers=record.headers
    )
    return future


def config(group: str, topic: str = TOPIC) -> EventsConfig:
    return EventsConfig.model_validate({"input_topic": topic, "topic": f"{group}.events", "group": group})


async def publish_backlog(address: str, sources: int, frames_each: int) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=address, enable_idempotence=False, linger_ms=20)
    await producer.start()
    now = int(time.time() * 1000)
    deliveries = [await send(producer, frame(s, i, now + i * 40)) for i in range(frames_each) for s in range(sources)]
    await asyncio.gather(*deliveries)
    await producer.stop()
    return len(deliveries)


async def throughput(address: str, total: int, group: str) -> dict[str, float]:
    """One stage reading the backlog of `total` records from the start (a new group each time)."""
    async with EventsStage(KafkaSettings(bootstrap_servers=address), config(group), sole_reader=True) as stage:
        wall, cpu = time.perf_counter(), time.process_time()
        task = asyncio.create_task(stage.run())
        while stage.processed < total:  # noqa: ASYNC110  # the stage has no progress event; a bench may poll
            await asyncio.sleep(0.01)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stage.stop()
        await task
    return {"per_s_wall": round(total / wall), "per_s_cpu": round(total / cpu)}


async def lag(address: str, sources: int, fps: float, seconds: float) -> dict[str, Any]:
    events_topic = "lag.events"
    # a reader that asks often, so that the figure is the stage's lag rather than the reader's fetch wait
    reader = AIOKafkaConsumer(bootstrap_servers=address, auto_offset_reset="latest", fetch_max_wait_ms=20)
    producer = AIOKafkaProducer(bootstrap_servers=address, enable_idempotence=False, linger_ms=20)
    await producer.start()
    lags: list[float] = []
    stage = EventsStage(KafkaSettings(bootstrap_servers=address), config("lag", LIVE_TOPIC), sole_reader=True)
    async with stage:
        task = asyncio.create_task(stage.run())
        await reader.start()
        reader.subscribe([events_topic])

        async def read() -> None:
            while True:
                for records in (await reader.getmany(timeout_ms=50)).values():
                    got = time.time() * 1000
                    for record in records:
                        lags.append(got - decode_event(record.key, record.value, record.headers).at_time_ms)

        reading = asyncio.create_task(read())
        await asyncio.sleep(3)  # the reader's assignment
        started, index = time.monotonic(), 0
        while time.monotonic() - started < seconds:
            now = int(time.time() * 1000)
            for source in range(sources):
                await send(producer, frame(source, index, now), LIVE_TOPIC)
            index += 1
            await asyncio.sleep(max(0.0, started + index / fps - time.monotonic()))
        await asyncio.sleep(2)  # the last events
        reading.cancel()
        stage.stop()
        await task
    await producer.stop()
    await reader.stop()
    lags.sort()
    if not lags:
        return {"value": None, "why": "no event arrived"}
    return {
        "events": len(lags),
        "annotations_per_s": sources * fps,
        "lag_ms_p50": round(lags[len(lags) // 2]),
        "lag_ms_p99": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))]),
        "lag_ms_max": round(lags[-1]),
    }


def measure_events(sources: int = 10, fps: float = 25.0, seconds: float = 20.0, repeats: int = 3) -> dict[str, Any]:
    async def measure() -> dict[str, Any]:
        async with EmbeddedBroker() as broker:
            for topic in (TOPIC, LIVE_TOPIC):
                await ensure_topic(KafkaSettings(bootstrap_servers=broker.address, topic=topic, partitions=3))
            total = await publish_backlog(broker.address, sources, 500)
            runs = [await throughput(broker.address, total, f"throughput{n}") for n in range(repeats)]
            return {
                "throughput_per_s_wall": Sample.of([r["per_s_wall"] for r in runs]).as_json(0),
                "throughput_per_s_cpu": Sample.of([r["per_s_cpu"] for r in runs]).as_json(0),
                "annotations_per_run": total,
                "lag_at_full_rate": await lag(broker.address, sources, fps, seconds),
            }

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=10)
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    print(json.dumps(measure_events(args.sources, args.fps, args.seconds), indent=2))


if __name__ == "__main__":
    main()
