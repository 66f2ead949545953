"""Figure 6: the Annotate service alone — requests/s and p50/p99 latency at several concurrencies.

`framelabel serve` runs in a child process (with and without dynamic
batching); the load comes from grpc.aio clients in this process, each
sending the same 640×360 JPEG back to back for a fixed time. The client shares
the machine's cores with the service, as a sidecar would.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from grpc import aio

from bench.stages import PIPELINE_CAPS
from services.api.image_classifier_pb2 import AnnotationRequest
from services.api.image_classifier_service_pb2_grpc import ImageClassifierServiceStub
from services.api.image_pb2 import Image
from services.config import load_catalog

FRAMELABEL = str(Path(sys.executable).with_name("framelabel"))
READY = re.compile(r"serving classifier .* on [\d.]+:(\d+)")


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int

    def as_json(self) -> dict[str, float]:
        return {
            "requests_per_s": round(self.requests_per_s, 1),
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "errors": self.errors,
        }


@contextmanager
def serving(config_yaml: str) -> Iterator[str]:
    """`framelabel serve` on a free port with this config; yields its address."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as config:
        config.write(config_yaml)
        config.flush()
        process = subprocess.Popen(
            [FRAMELABEL, "serve", "--port", "0", "--config", config.name], stderr=subprocess.PIPE, text=True
        )
        try:
            if process.stderr is None:
                raise RuntimeError("no stderr pipe")
            for line in process.stderr:
                if match := READY.search(line):
                    break
            else:
                raise RuntimeError("framelabel serve did not start")
            yield f"127.0.0.1:{match.group(1)}"
        finally:
            process.terminate()
            process.wait(30)


@contextmanager
def capped_catalog() -> Iterator[str]:
    """A classifiers file with imagenet capped as `framelabel run` caps it in-process: the top 5, only their labels
    in the specification (the service answers all 1,000 otherwise, as the upstream API does)."""
    entry = load_catalog(None).classifiers["imagenet"].model_dump(mode="json", exclude_unset=True) | PIPELINE_CAPS
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as catalog:
        yaml.safe_dump({"classifiers": {"imagenet": entry}}, catalog)
        catalog.flush()
        yield catalog.name


@contextmanager
def serving_as_in_process() -> Iterator[str]:
    """`framelabel serve` of imagenet capped as in-process, so that a replay through it gets the same response
    and differs by the transport alone."""
    with capped_catalog() as catalog, serving(f"classifier: imagenet\nclassifiers_file: {catalog}\n") as address:
        yield address


async def load(address: str, request: AnnotationRequest, concurrency: int, seconds: float) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    async with aio.insecure_channel(address) as channel:
        stub = ImageClassifierServiceStub(channel)
        await stub.Annotate(request, timeout=30)  # warm up the connection and the model
        stop_at = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                try:
                    await stub.Annotate(request, timeout=30)
                except aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - started) * 1000.0)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    values = np.array(latencies)
    return LoadResult(
        concurrency, len(values) / elapsed, float(np.percentile(values, 50)), float(np.percentile(values, 99)), errors
    )


def measure_service(
    jpeg: bytes, concurrencies: tuple[int, ...], seconds: float, batching: bool, extra_config: str = ""
) -> dict[int, LoadResult]:
    config = "inference_threads: 2\n" + extra_config
    if batching:
        config += "batching: {max_batch: 8, max_wait_ms: 2}\n"
    request = AnnotationRequest(image=Image(content=jpeg, image_type=Image.JPEG))
    with serving(config) as address:
        return {c: asyncio.run(load(address, request, c, seconds)) for c in concurrencies}
