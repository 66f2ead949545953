"""Load on the Annotate service: N concurrent clients calling as fast as they get answers, for a bounded time.

    python tools/load.py [--clients 16] [--seconds 60] [--target HOST:PORT]

Without --target it starts `framelabel serve --classifier imagenet` on a free
loopback port and stops it at the end. Prints calls, errors by status, p50/p99
latency and (for the service it started) RSS before and after. `make soak` runs it
for 60 s; tests/test_load.py runs a short version with the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from services.api.image_classifier_service_pb2_grpc import ImageClassifierServiceStub
from tests.helpers import jpeg, photo, request, rss_mb, start_service

CALL_DEADLINE_S = 30.0


@dataclass
class LoadResult:
    clients: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def calls(self) -> int:
        return len(self.latencies_ms) + sum(self.errors.values())

    def percentile(self, percent: float) -> float:
        return float(np.percentile(self.latencies_ms, percent)) if self.latencies_ms else float("nan")

    def lines(self) -> list[str]:
        return [
            f"{self.clients} clients for {self.seconds:.1f} s: {self.calls} calls, {self.calls / self.seconds:.1f}/s",
            f"errors: {dict(self.errors) or 0}",
            f"latency ms: p50 {self.percentile(50):.1f}, p99 {self.percentile(99):.1f}, "
            f"max {max(self.latencies_ms, default=0):.1f}",
        ]


async def load(address: str, clients: int, seconds: float, content: bytes) -> LoadResult:
    """`clients` concurrent callers, each calling again as soon as it has an answer, until `seconds` have passed."""
    result = LoadResult(clients, seconds)
    message = request(content)
    async with aio.insecure_channel(address) as channel:
        stub = ImageClassifierServiceStub(channel)
        stop_at = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < stop_at:
                began = time.perf_counter()
                try:
                    await stub.Annotate(message, timeout=CALL_DEADLINE_S)
                except aio.AioRpcError as exc:
                    result.errors[exc.code().name] += 1
                    continue
                result.latencies_ms.append((time.perf_counter() - began) * 1000)

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        result.seconds = time.monotonic() - started
    return result


def frame_jpeg() -> bytes:
    """A 640×427 photo: the size the pipeline sends by default (max_side 640)."""
    return jpeg(cv2.resize(photo("coffee"), (640, 427)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--target", help="HOST:PORT of a running service (default: start one)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        pid = None
        address = args.target
        if address is None:
            service = start_service("--classifier", "imagenet")
            stack.callback(service.stop)
            address, pid = service.address, service.process.pid
        content = frame_jpeg()
        asyncio.run(load(address, args.clients, 2.0, content))  # warm-up: threads, allocator, channel
        before = rss_mb(pid) if pid else None
        result = asyncio.run(load(address, args.clients, args.seconds, content))
        for line in result.lines():
            print(line)
        if pid and before is not None:
            print(f"service RSS MB: {before:.1f} before, {rss_mb(pid):.1f} after")
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
