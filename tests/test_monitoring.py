"""The monitoring port of a real run: metrics, health, the JSON status and the live view in Chromium.

One run for the module, as an operator starts it: `framelabel run` with a recorded clip and a live
RTSP camera (whose URL carries credentials that must never show), publishing to a real broker,
its monitoring port on 127.0.0.1. The tests read it in order: ready, the clip replayed, a scrape
that agrees with the topic, a real Prometheus scraping it, the page in a real browser while the
camera is killed and brought back, and at last the summary the run prints when stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from pipeline.annotators.grpc_client import GrpcAnnotator, GrpcSettings
from pipeline.consumer import consume
from pipeline.metrics import PipelineMetrics
from pipeline.records import DecodedRecord
from services.api.image_classifier_pb2 import AnnotationRequest
from services.api.image_pb2 import Image
from services.config import MonitoringSettings
from services.errors import ConfigError, InvalidImageError
from services.monitoring import MonitoringServer
from tests.cameras import CLIPS, Camera, free_port, listening, rtsp_camera, wait_until
from tests.faults import PipelineRun, pipeline_run, write_run_config
from tests.helpers import FRAMELABEL, Samples, ServiceProcess, http_get, jpeg, parse_metrics, photo, scrape
from tests.kafka import connection

CLIP = CLIPS / "bigbuckbunny.mp4"
CLIP_FRAMES = 132
SECRET = "s3cret-word"  # the camera URL's password: it must appear nowhere the run shows
ARTEFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "live-view"
PROMETHEUS_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "prometheus.yml"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
WAIT_S = 60.0


@dataclass
class MonitoredRun:
    run: PipelineRun
    url: str  # the monitoring port
    broker: str
    camera_port: int
    camera: Camera | None
    camera_clip: Path

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.url + path)

    def sources(self) -> dict[str, dict[str, Any]]:
        status, body = self.get("/api/sources")
        assert status == 200, body
        return {source["id"]: source for source in json.loads(body)}

    def metrics(self) -> Samples:
        return scrape(self.url)

    def wait_for_the_clip(self) -> None:
        """Until the clip is read to its end and Kafka has acknowledged every record of it."""

        def done() -> bool:
            clip = self.sources()["clip"]
            return bool(clip["state"] == "ended" and clip["published"] + clip["lost"] == clip["annotated"])

        wait_until(done, "the clip's records to be acknowledged", WAIT_S)

    def kill_camera(self) -> None:
        assert self.camera is not None
        self.camera.stop()
        self.camera = None


def _broker(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([FRAMELABEL, "broker", "--port", str(port)], stderr=subprocess.DEVNULL)
    wait_until(lambda: listening(port) or process.poll() is not None, "the broker to listen")
    return process


@pytest.fixture(scope="module")
def monitored() -> Iterator[MonitoredRun]:
    with tempfile.TemporaryDirectory() as folder:
        # a camera that stays up for the whole module: the clip repeated, its packets copied, not encoded
        long_clip = Path(folder) / "camera.mp4"
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-stream_loop",
                "20",
                "-i",
                str(CLIPS / "bikes.mp4"),
                "-c",
                "copy",
                str(long_clip),
            ],
            check=True,
        )
        broker_port, camera_port, metrics_port = free_port(), free_port(), free_port()
        broker = _broker(broker_port)
        try:
            with rtsp_camera(long_clip, camera_port) as camera:
                sources = [
                    {"id": "clip", "uri": str(CLIP)},
                    {
                        "id": "gate",
                        "uri": camera.url.replace("rtsp://", f"rtsp://viewer:{SECRET}@"),
                        "fps": 5,
                        "read_timeout_ms": 2000,
                        "open_timeout_ms": 2000,
                        "stall_seconds": 3,
                        "backoff_max_seconds": 1,
                    },
                ]
                config = write_run_config(
                    Path(folder), f"127.0.0.1:{broker_port}", sources, metrics={"port": metrics_port}
                )
                with pipeline_run(config) as run:
                    url = f"http://127.0.0.1:{metrics_port}"
                    monitored = MonitoredRun(run, url, f"127.0.0.1:{broker_port}", camera_port, camera, long_clip)
                    wait_until(lambda: monitored.get("/healthz")[0] == 200, "the monitoring port to answer", WAIT_S)
                    yield monitored
        finally:
            broker.terminate()
            broker.wait(10)


def test_ready_once_every_source_opened_and_healthy(monitored: MonitoredRun) -> None:
    wait_until(lambda: monitored.get("/readyz")[0] == 200, "/readyz to say ready", WAIT_S)
    body = monitored.get("/readyz")[1]
    assert json.loads(body) == {"ready": True, "checks": {"kafka": True, "annotator": True, "sources": True}}
    assert monitored.get("/healthz") == (200, "ok\n")
    assert f"monitoring on {monitored.url}: " in monitored.run.log()  # loopback: no host was given


def test_status_lists_every_source_with_its_state(monitored: MonitoredRun) -> None:
    monitored.wait_for_the_clip()
    sources = monitored.sources()
    assert sources["clip"]["kind"] == "replay"
    assert sources["clip"]["published"] == CLIP_FRAMES
    assert sources["gate"]["kind"] == "live"
    assert sources["gate"]["state"] == "live"
    assert sources["gate"]["labels"], "the camera's latest labels"
    assert sources["gate"]["frame"]["width"] > 0
    # the image of the frame whose labels the status shows, even once newer frames have come
    frame_url = f"{monitored.url}/api/sources/clip/frame.jpg?frame={sources['clip']['frame']['index']}"
    with urllib.request.urlopen(frame_url, timeout=5) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        assert response.read()[:2] == b"\xff\xd8"
    assert monitored.get("/api/sources/clip/frame.jpg?frame=99999")[0] == 404


def test_a_scrape_agrees_with_the_topic_and_the_status(monitored: MonitoredRun) -> None:
    monitored.wait_for_the_clip()
    metrics = monitored.metrics()
    clip = (("source", "clip"),)
    # the camera keeps the topic busy, so read the clip's records by count: each frame once, in order
    records = asyncio.run(clip_records(monitored.broker))
    assert [record.frame_index for record in records] == list(range(CLIP_FRAMES))
    assert metrics[("framelabel_frames_published_total", clip)] == len(records)
    status = monitored.sources()["clip"]
    for counter in ("read", "sampled", "annotated", "failed"):
        assert metrics[(f"framelabel_frames_{counter}_total", clip)] == status[counter], counter
    assert metrics[("framelabel_capture_to_published_seconds_count", clip)] == CLIP_FRAMES
    for stage in ("encode", "annotate", "kafka_ack"):
        assert metrics[("framelabel_stage_seconds_count", (("source", "clip"), ("stage", stage)))] == CLIP_FRAMES
    # every frame read is decoded, sampled or not
    assert metrics[("framelabel_stage_seconds_count", (("source", "clip"), ("stage", "decode")))] == status["read"]
    assert metrics[("framelabel_source_up", (("source", "gate"),))] == 1.0
    assert metrics[("framelabel_source_last_published_age_seconds", clip)] > 0.0
    assert metrics[("framelabel_kafka_delivery_failures_total", ())] == 0.0
    assert metrics[("framelabel_kafka_resends_total", ())] == 0.0
    assert metrics[("framelabel_kafka_records_unsettled", ())] >= 0.0


async def clip_records(broker: str) -> list[DecodedRecord]:
    async with asyncio.timeout(WAIT_S):
        stream = consume(connection(broker, "frames"), from_beginning=True, source_id="clip", max_records=CLIP_FRAMES)
        return [record async for record in stream]


def test_prometheus_scrapes_it_with_the_stacks_config(monitored: MonitoredRun, tmp_path: Path) -> None:
    monitored.wait_for_the_clip()
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    pipeline_job = next(job for job in config["scrape_configs"] if job["job_name"] == "framelabel-pipeline")
    # the stack's job, pointed at this run and scraping often enough for a test
    pipeline_job["static_configs"] = [{"targets": [monitored.url.removeprefix("http://")]}]
    config["scrape_configs"] = [pipeline_job]
    config["global"]["scrape_interval"] = "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        "prometheus",
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    prometheus = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        query = 'framelabel_frames_published_total{job="framelabel-pipeline",source="clip"}'

        def published() -> float | None:
            status, body = http_get(f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(query)}")
            result = json.loads(body)["data"]["result"] if status == 200 else []
            return float(result[0]["value"][1]) if result else None

        wait_until(lambda: published() is not None, "Prometheus's first scrape", 30.0)
        assert published() == CLIP_FRAMES
    finally:
        prometheus.terminate()
        prometheus.wait(10)


def test_live_view_in_chromium(monitored: MonitoredRun) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    up = ("framelabel_source_up", (("source", "gate"),))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(monitored.url + "/")
            clip, gate = page.locator('[data-source="clip"]'), page.locator('[data-source="gate"]')
            expect(clip).to_be_visible(timeout=10_000)
            expect(gate).to_have_attribute("data-state", "live", timeout=20_000)
            first = gate.locator(".labels").inner_text()
            frame_of = gate.locator("img")
            first_src = frame_of.get_attribute("src")
            wait_until(lambda: frame_of.get_attribute("src") != first_src, "the camera's tile to show a new frame")
            wait_until(lambda: gate.locator(".labels").inner_text() != first, "the camera's labels to change")
            page.screenshot(path=str(ARTEFACTS / "1-live.png"))

            monitored.kill_camera()
            expect(gate).to_have_attribute("data-state", "reconnecting", timeout=10_000)
            expect(gate.locator(".badge")).to_have_text("offline")
            page.screenshot(path=str(ARTEFACTS / "2-camera-offline.png"))
            assert monitored.metrics()[up] == 0.0
            assert SECRET not in page.content()  # the tile shows the camera's error now

            with rtsp_camera(monitored.camera_clip, monitored.camera_port):
                expect(gate).to_have_attribute("data-state", "live", timeout=20_000)
                expect(gate.locator(".labels li").first).to_be_visible()
                page.screenshot(path=str(ARTEFACTS / "3-camera-back.png"))
                metrics = monitored.metrics()
                assert metrics[up] == 1.0
                assert metrics[("framelabel_source_reconnects_total", (("source", "gate"),))] >= 1
                phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
                phone.goto(monitored.url + "/")
                expect(phone.locator('[data-source="gate"]')).to_be_visible(timeout=10_000)
                phone.screenshot(path=str(ARTEFACTS / "4-phone.png"), full_page=True)
        finally:
            browser.close()
    # no CDN: the page, its script, style, stream and images all come from the run itself
    assert requested
    assert all(url.startswith(monitored.url + "/") for url in requested), requested


def test_credentials_in_a_camera_url_show_nowhere(monitored: MonitoredRun) -> None:
    for path in ("/metrics", "/api/sources", "/", "/static/app.js"):
        assert SECRET not in monitored.get(path)[1], path
    assert SECRET not in monitored.run.log()


def test_the_summary_agrees_with_the_last_scrape(monitored: MonitoredRun) -> None:
    monitored.wait_for_the_clip()
    metrics = monitored.metrics()
    assert monitored.run.finish(signal.SIGINT) == 0, monitored.run.log()
    row = monitored.run.summary("clip")
    clip = (("source", "clip"),)
    for column in ("read", "sampled", "annotated", "published", "failed", "lost"):
        name = f"framelabel_frames_{column}_total" if column != "lost" else "framelabel_frames_dropped_total"
        labels = clip if column != "lost" else (("cause", "lost"), ("source", "clip"))
        assert row[column] == metrics[(name, labels)], column
    assert SECRET not in "".join(monitored.run.stdout)


def test_not_ready_while_kafka_is_not_there(tmp_path: Path) -> None:
    """The port answers from the start: alive, and not ready while the run still waits for its broker."""
    metrics_port = free_port()
    sources = [{"id": "clip", "uri": str(CLIP)}]
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    kafka = {"connect_timeout_ms": 120_000}
    config = write_run_config(tmp_path, nobody, sources, kafka=kafka, metrics={"port": metrics_port})
    url = f"http://127.0.0.1:{metrics_port}"
    with pipeline_run(config) as run:
        wait_until(lambda: listening(metrics_port), "the monitoring port to answer", WAIT_S)
        assert http_get(url + "/healthz") == (200, "ok\n")
        status, body = http_get(url + "/readyz")
        assert status == 503, body
        assert json.loads(body) == {"ready": False, "checks": {"kafka": False, "annotator": False, "sources": False}}
        run.finish(signal.SIGTERM)


def test_off_loopback_without_a_token_is_refused() -> None:
    env = {name: value for name, value in os.environ.items() if name != "FRAMELABEL_HTTP_TOKEN"}
    result = subprocess.run(
        [FRAMELABEL, "run", "--metrics-port", str(free_port()), "--metrics-host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert "FRAMELABEL_HTTP_TOKEN is not set" in result.stderr
    assert "metrics.allow_unauthenticated" in result.stderr


async def test_the_service_counts_requests_and_the_client_its_calls(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    metrics_port = free_port()
    service = service_factory("--classifier", "imagenet", "--metrics-port", str(metrics_port))
    url = f"http://127.0.0.1:{metrics_port}"
    assert http_get(url + "/healthz") == (200, "ok\n")
    assert http_get(url + "/readyz")[0] == 200  # the factory returns a service that answers
    run = PipelineMetrics()  # what a run's /metrics serves of its gRPC client
    settings = GrpcSettings(targets=(service.address,), connect_timeout_seconds=WAIT_S)
    async with GrpcAnnotator(settings, on_call=run.grpc_call) as annotator:
        await annotator.annotate(AnnotationRequest(image=Image(content=jpeg(photo("coffee")), image_type=Image.JPEG)))
        with pytest.raises(InvalidImageError):
            await annotator.annotate(AnnotationRequest(image=Image(content=b"not an image", image_type=Image.JPEG)))
    client = parse_metrics(generate_latest(run.registry).decode())
    assert client[("framelabel_grpc_client_calls_total", (("code", "OK"),))] == 1
    assert client[("framelabel_grpc_client_calls_total", (("code", "INVALID_ARGUMENT"),))] == 1
    assert client[("framelabel_grpc_client_call_seconds_count", ())] == 2
    answered = ("framelabel_service_request_seconds_count", ())
    # the service counts a call as it returns, a moment after the client has its answer
    wait_until(lambda: scrape(url)[answered] == 2, "the service to count both calls")
    service_metrics = scrape(url)
    assert service_metrics[("framelabel_service_requests_total", (("code", "OK"),))] == 1
    assert service_metrics[("framelabel_service_requests_total", (("code", "INVALID_ARGUMENT"),))] == 1
    assert service_metrics[("framelabel_service_requests_in_flight", ())] == 0


async def test_a_token_guards_everything_but_the_metrics_and_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAMELABEL_HTTP_TOKEN", "right-token")
    server = MonitoringServer(MonitoringSettings(port=free_port()), CollectorRegistry(), dict)

    async def private(request: web.Request) -> web.Response:
        return web.Response(text="camera images")

    server.app.router.add_get("/api/private", private)
    cookies = aiohttp.CookieJar(unsafe=True)  # keeps cookies of a numeric address such as 127.0.0.1
    async with server, aiohttp.ClientSession(server.url, cookie_jar=cookies) as client:
        for path in ("/metrics", "/healthz", "/readyz"):
            async with client.get(path) as response:
                assert response.status == 200, path
        async with client.get("/api/private") as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
        async with client.get("/api/private", headers={"Authorization": "Bearer wrong-token"}) as response:
            assert response.status == 401
        async with client.get("/api/private", headers={"Authorization": "Bearer right-token"}) as response:
            assert await response.text() == "camera images"
        async with client.get("/api/private?token=right-token", allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == "/api/private"  # the token leaves the address bar
        async with client.get("/api/private") as response:  # the cookie it set
            assert await response.text() == "camera images"


def test_off_loopback_needs_a_token_or_an_explicit_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FRAMELABEL_HTTP_TOKEN", raising=False)
    exposed = MonitoringSettings(port=9100, host="0.0.0.0")
    with pytest.raises(ConfigError, match="FRAMELABEL_HTTP_TOKEN is not set"):
        MonitoringServer(exposed, CollectorRegistry(), dict)
    chosen = exposed.model_copy(update={"allow_unauthenticated": True})
    assert MonitoringServer(chosen, CollectorRegistry(), dict).port == 9100  # constructed, not bound


def test_the_live_view_keeps_up_with_16_sources(tmp_path: Path, figures: dict[str, object]) -> None:
    """16 replays at 2 frames a second each, all on one page: every tile gets its frames and labels."""
    from playwright.sync_api import sync_playwright

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    metrics_port = free_port()
    clip = str(CLIPS / "bikes.mp4")
    sources = [{"id": f"cam{n:02d}", "uri": clip, "fps": 2, "realtime": True, "loop": True} for n in range(16)]
    config = write_run_config(tmp_path, "embedded", sources, metrics={"port": metrics_port})
    url = f"http://127.0.0.1:{metrics_port}"
    with pipeline_run(config) as run, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            # the page's long tasks (over 50 ms of script or layout at once), as Chromium reports them
            page.add_init_script(
                "window.longTasks = [];"
                "new PerformanceObserver(list => window.longTasks.push(...list.getEntries().map(e => e.duration)))"
                ".observe({entryTypes: ['longtask']});"
            )
            wait_until(lambda: http_get(url + "/healthz")[0] == 200, "the run's monitoring port", WAIT_S)
            page.goto(url + "/")
            tiles = page.locator("[data-source]")
            wait_until(lambda: tiles.count() == 16, "16 tiles", WAIT_S)

            def frames_shown() -> list[str | None]:
                return [tile.locator("img").get_attribute("src") for tile in tiles.all()]

            wait_until(lambda: all(frames_shown()), "every tile to show a frame", WAIT_S)
            first = frames_shown()
            wait_until(
                lambda: all(now != before for now, before in zip(frames_shown(), first, strict=True)),
                "every tile to show a newer frame",
                WAIT_S,
            )
            assert all(tile.locator(".labels li").count() > 0 for tile in tiles.all())
            page.screenshot(path=str(ARTEFACTS / "5-sixteen-sources.png"))
            long_tasks = page.evaluate("window.longTasks")
            figures["live view, 16 sources: longest task in the page, ms"] = float(max(long_tasks, default=0.0))
        finally:
            browser.close()
        assert run.finish(signal.SIGTERM) == 0, run.log()
