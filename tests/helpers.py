"""Helpers for the tests: real photos, JPEG bytes, a real `framelabel serve` process, a liveness bound."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shlex
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from prometheus_client.parser import text_string_to_metric_families
from skimage import data

from pipeline.cli import build_parser
from services.api.image_classifier_pb2 import AnnotationRequest
from services.api.image_pb2 import Image

FRAMELABEL = str(Path(sys.executable).with_name("framelabel"))
READY = re.compile(r"serving classifier \S+ .* on [\w.:]+:(\d+)")
START_TIMEOUT = 60.0


def http_get(url: str) -> tuple[int, str]:
    """The status and body of a GET on 127.0.0.1; (0, the reason) while nothing listens there yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except urllib.error.URLError as error:
        return 0, str(error.reason)
    except ConnectionError as error:  # a server still starting may reset the connection
        return 0, str(error)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (name, sorted labels) → value


def parse_metrics(exposition: str) -> Samples:
    """Prometheus's text format, read by prometheus-client's own parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def scrape(url: str) -> Samples:
    """GET `url`/metrics, parsed."""
    status, body = http_get(url + "/metrics")
    assert status == 200, body
    return parse_metrics(body)


def parsed_by_the_cli(argv: Sequence[str], where: str) -> argparse.Namespace:
    """framelabel's own parser's reading of `argv` (what follows `framelabel`); the test fails if it refuses it."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: the CLI refuses {shlex.join(argv)}")


def photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as H×W×3 RGB."""
    return np.asarray(getattr(data, name)())


def jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    return bytes(simplejpeg.encode_jpeg(rgb, quality=quality))


def request(content: bytes, image_type: int = Image.JPEG) -> AnnotationRequest:
    return AnnotationRequest(image=Image(content=content, image_type=image_type))


@dataclass
class ServiceProcess:
    """A `framelabel serve` child process; its log is collected by a reader thread."""

    process: subprocess.Popen[str]
    port: int = 0
    log: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_service(*args: str, env: dict[str, str] | None = None) -> ServiceProcess:
    """Start `framelabel serve --port 0 ARGS` and wait for its ready line."""
    process = subprocess.Popen(
        [FRAMELABEL, "serve", "--port", "0", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    service = ServiceProcess(process)
    ready = threading.Event()

    def read_log() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            service.log.append(line)
            if not ready.is_set() and (match := READY.search(line)):
                service.port = int(match.group(1))
                ready.set()
        ready.set()  # the process ended: stop waiting

    threading.Thread(target=read_log, daemon=True).start()
    if not ready.wait(START_TIMEOUT) or not service.port:
        service.stop()
        raise RuntimeError("framelabel serve did not start:\n" + "".join(service.log))
    return service


def rss_mb(pid: int) -> float:
    """A process's resident memory, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@contextlib.asynccontextmanager
async def within(seconds: float, what: str) -> AsyncIterator[None]:
    """Fail the test, naming `what`, if the block has not finished after `seconds`.

    A liveness bound for something that must end (a hang), set well past what any machine needs: not a speed check.
    """
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            yield
    except TimeoutError:
        if deadline.expired():
            pytest.fail(f"{what}: still waiting after {seconds:g} s")
        raise
