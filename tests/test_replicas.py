"""Replicas of the Annotate service: one dies, and neither the calls nor a run notice.

Real `framelabel serve` processes on 127.0.0.1 (SIGKILLed, SIGTERMed, started again), a real broker
and a real clip; the health protocol alone is flipped on a service run in the test's own process.
How soon a dead replica is skipped and how many calls moved to the other are figures (tests/figures.py).
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

from grpc_health.v1 import health_pb2

from pipeline.annotators.grpc_client import GrpcAnnotator, GrpcSettings
from services.classifier import load_classifier
from services.config import ServiceConfig
from services.server import AnnotateServer
from tests.faults import TopicWatcher, delivery_figures, eventually, pipeline_run, write_run_config
from tests.helpers import ServiceProcess, jpeg, photo, request
from tests.kafka import kafka_broker, read_topic
from tests.test_faults import log_time
from tests.test_run import BIKES, frame_count

SKIPPED_WITHIN_S = 10.0  # a liveness bound only: how soon is the figure
BACK_WITHIN_S = 30.0  # gRPC reconnects with a backoff of at most 5 s
WORKERS = 8
COFFEE = request(jpeg(photo("coffee")))
DOWN = re.compile(r"Annotate target (?P<target>\S+) is down .*; (?P<moved>\d+) calls in flight on it are sent again")


async def replicas(service_factory: Callable[..., ServiceProcess], count: int = 2) -> list[ServiceProcess]:
    """`count` imagenet services, started side by side (each loads its model)."""
    starting = (asyncio.to_thread(service_factory, "--classifier", "imagenet") for _ in range(count))
    return list(await asyncio.gather(*starting))


def kill(service: ServiceProcess) -> float:
    """SIGKILL (service_factory reaps it at the end); the time.time() of the kill."""
    service.process.kill()
    return time.time()


def terminate(service: ServiceProcess) -> float:
    """SIGTERM: the service says NOT_SERVING, finishes its calls and closes its port; the time.time() of the signal."""
    service.process.send_signal(signal.SIGTERM)
    return time.time()


async def calls_through(annotator: GrpcAnnotator, codes: list[str], fault: Callable[[], float], gone: str) -> float:
    """Impatient calls back to back from WORKERS tasks, as live frames make them, while `fault` takes the target
    `gone` away: the seconds until it was skipped. A call that fails fails the test (the task group raises it)."""
    stop = asyncio.Event()

    async def caller() -> None:
        while not stop.is_set():
            response = await annotator.annotate(COFFEE, patient=False)
            assert response.annotations[0].label.name == "espresso"

    async with asyncio.TaskGroup() as callers:
        for _ in range(WORKERS):
            callers.create_task(caller())
        answered = codes.count("OK")
        await eventually(lambda: codes.count("OK") >= answered + 4 * WORKERS, "calls to every replica")
        fault_at = fault()
        await eventually(lambda: gone not in annotator.live_targets, f"{gone} to be skipped", SKIPPED_WITHIN_S)
        skipped_after_s = time.time() - fault_at
        answered = codes.count("OK")
        await eventually(lambda: codes.count("OK") >= answered + 4 * WORKERS, "calls to the replica left")
        stop.set()
    return skipped_after_s


async def test_a_dead_replica_is_skipped_its_calls_move_at_once_and_it_is_taken_back(
    service_factory: Callable[..., ServiceProcess], figures: dict[str, object]
) -> None:
    doomed, survivor = await replicas(service_factory)
    codes: list[str] = []
    settings = GrpcSettings(targets=(doomed.address, survivor.address), max_in_flight=WORKERS)
    async with GrpcAnnotator(settings, on_call=lambda code, _: codes.append(code)) as annotator:
        await eventually(lambda: len(annotator.live_targets) == 2, "both replicas to be live", BACK_WITHIN_S)
        skipped_after_s = await calls_through(annotator, codes, lambda: kill(doomed), doomed.address)
        assert annotator.live_targets == (survivor.address,)
        moved = codes.count("UNAVAILABLE")
        figures["replica SIGKILLed: seconds until the client skips it"] = skipped_after_s
        figures["replica SIGKILLed: calls in flight sent again to the other replica"] = moved
        assert moved > 0  # calls were in flight on it when it died: each was answered by the other

        back = await asyncio.to_thread(service_factory, "--classifier", "imagenet", "--port", str(doomed.port))
        await eventually(lambda: back.address in annotator.live_targets, "it to be taken back", BACK_WITHIN_S)
        # taken back for real: with the other one shutting down, every call goes to it
        skipped_after_s = await calls_through(annotator, codes, lambda: terminate(survivor), survivor.address)
        assert annotator.live_targets == (back.address,)
        figures["replica SIGTERMed (NOT_SERVING): seconds until the client skips it"] = skipped_after_s
    # each call that met a replica going away was sent again (a service shutting down may cancel it first)
    assert set(codes) - {"CANCELLED"} == {"OK", "UNAVAILABLE"}


async def test_a_replica_saying_not_serving_is_skipped_though_connected_and_taken_back_when_serving() -> None:
    """The standard health protocol itself, not only the connection: the health flips while the port stays open."""
    classifier = await asyncio.to_thread(load_classifier, "imagenet")
    async with AnnotateServer(ServiceConfig(port=0), classifier) as server:
        target = f"127.0.0.1:{server.port}"
        async with GrpcAnnotator(GrpcSettings(targets=(target,))) as annotator:
            await eventually(lambda: annotator.live_targets == (target,), "the replica to be live")
            await server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            await eventually(lambda: annotator.live_targets == (), "NOT_SERVING to be skipped", SKIPPED_WITHIN_S)
            await server.health.set("", health_pb2.HealthCheckResponse.SERVING)
            await eventually(lambda: annotator.live_targets == (target,), "it to be taken back", BACK_WITHIN_S)
            assert (await annotator.annotate(COFFEE, patient=False)).annotations[0].label.name == "espresso"


async def test_a_replica_killed_mid_replay_costs_the_run_nothing(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path, figures: dict[str, object]
) -> None:
    doomed, survivor = await replicas(service_factory)
    expected = list(range(frame_count(BIKES)))
    source = {"id": "clip", "uri": str(BIKES)}  # as fast as it goes: frames are always in flight
    annotator = {"kind": "grpc", "targets": [doomed.address, survivor.address]}
    async with kafka_broker() as broker:
        config = write_run_config(tmp_path, broker.address, [source], annotator=annotator)
        async with TopicWatcher(broker.address) as watcher:
            with pipeline_run(config) as run:
                await eventually(lambda: watcher.count("clip") >= 10, "the first records")
                killed_at = kill(doomed)
                await eventually(lambda: DOWN.search(run.log()) is not None, "the run to skip the dead replica")
                code = await run.end()
        assert code == 0, run.log()
        records = [r for r in await read_topic(broker.address, "frames") if r.source_id == "clip"]
    assert [r.frame_index for r in records] == expected
    assert all(len(r.response.annotations) > 0 for r in records)
    found = delivery_figures(records, expected)
    assert (found.lost, found.duplicates) == (0, 0)
    summary = run.summary("clip")
    assert summary["published"] == summary["annotated"] == len(expected)
    assert (summary["failed"], summary["dropped"]) == (0, 0)  # dropped counts frames skipped while unavailable
    assert killed_at < watcher.arrivals[-1].at  # the replay went on after the kill
    down = next(line for line in run.stderr if DOWN.search(line))
    match = DOWN.search(down)
    assert match is not None
    assert match["target"] == doomed.address
    figures["replica SIGKILLed mid-replay: seconds until the run skips it"] = log_time(down) - killed_at
    figures["replica SIGKILLed mid-replay: calls in flight sent again to the other replica"] = int(match["moved"])
    assert int(match["moved"]) > 0  # the kill did cut calls off, and their frames are in the topic all the same
