"""The live view and JSON status of a run, on its monitoring port (README, "Monitor").

    /                              the page: one tile per source (assets in pipeline/web, shipped with the package)
    /api/sources                   every source's status as JSON, for scripts
    /api/sources/{id}/frame.jpg    the source's latest published frame, the JPEG that was annotated
                                   (?frame=N: that frame, while it is among the last few)
    /api/stream                    the same status pushed as server-sent events, every `PUSH_INTERVAL_S`

With an events stage in the run, each source's status also lists its last few events.

The page fetches a tile's image only when its frame changed, so each source costs at most one
JPEG per push interval whatever its fps. Nothing here shows a camera's URI: a source is its id.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from aiohttp import web

from pipeline.report import RunReports, SourceReport
from pipeline.sources.camera import mask_credentials
from services.api.event_pb2 import AnnotationEvent

PUSH_INTERVAL_S = 0.5
TOP_LABELS = 5
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


RecentEvents = Callable[[str], Sequence[AnnotationEvent]]  # a source's last few events, newest first


def source_status(report: SourceReport, events: Sequence[AnnotationEvent] = ()) -> dict[str, Any]:
    stats = report.source_stats
    p50, p95 = report.latency_percentile(50), report.latency_percentile(95)
    error = report.error or stats.last_error
    status: dict[str, Any] = {
        "id": report.source_id,
        "kind": report.policy.value,
        "state": report.state.value,
        "fps": round(report.fps(), 2),
        "read": stats.read,
        "sampled": report.sampled,
        "annotated": report.annotated,
        "published": report.published,
        "dropped": report.dropped,
        "failed": report.failed,
        "lost": report.lost,
        "skipped": stats.skipped,
        "reconnects": stats.reconnects,
        "latency_ms": {"p50": _rounded(p50), "p95": _rounded(p95)},
        "last_error": None if error is None else mask_credentials(error),
        "frame": None,
        "labels": [],
        "events": [_event_status(event) for event in events],
    }
    if (latest := report.latest) is not None:
        info = latest.info
        status["frame"] = {
            "index": info.index,
            "capture_time_ms": info.capture_time_ms,
            "media_position_ms": info.media_position_ms,
            "width": latest.width,
            "height": latest.height,
        }
        ranked = sorted(latest.response.annotations, key=lambda a: a.confidence, reverse=True)
        status["labels"] = [{"label": a.label.name, "confidence": round(a.confidence, 4)} for a in ranked[:TOP_LABELS]]
    return status


def _event_status(event: AnnotationEvent) -> dict[str, Any]:
    ended = event.state == AnnotationEvent.END
    return {
        "label": event.label,
        "state": "ended" if ended else "open",
        "start_time_ms": event.start_time_ms,
        "duration_ms": event.duration_ms,
        "peak_confidence": round(event.peak_confidence, 4),
        "end_reason": AnnotationEvent.EndReason.Name(event.end_reason) if ended else None,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class LiveView:
    def __init__(self, reports: RunReports) -> None:
        self._reports = reports
        self.events: RecentEvents | None = None  # set when the run has an events stage

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._asset)
        app.router.add_get("/api/sources", self._sources)
        app.router.add_get("/api/sources/{source_id}/frame.jpg", self._frame)
        app.router.add_get("/api/stream", self._stream)

    def _statuses(self) -> list[dict[str, Any]]:
        events = self.events or (lambda source_id: ())
        return [source_status(report, events(report.source_id)) for report in self._reports.by_source.values()]

    async def _sources(self, request: web.Request) -> web.Response:
        return web.json_response(self._statuses())

    async def _frame(self, request: web.Request) -> web.Response:
        report = self._reports.by_source.get(request.match_info["source_id"])
        if report is None:
            raise web.HTTPNotFound(text="no such source\n")
        wanted = request.query.get("frame", "")
        frame = report.recent_frame(int(wanted)) if wanted.isdigit() else report.latest
        if frame is None or not frame.jpeg:
            raise web.HTTPNotFound(text="no such frame among the last published\n")
        return web.Response(body=frame.jpeg, content_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await response.prepare(request)
        try:
            while True:
                await response.write(f"data: {json.dumps(self._statuses())}\n\n".encode())
                await asyncio.sleep(PUSH_INTERVAL_S)
        except ConnectionResetError:  # the page was closed
            pass
        return response

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=_web_file("index.html"), content_type="text/html")

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.Response(text=_web_file(name), content_type=ASSETS[name])


def _web_file(name: str) -> str:
    return resources.files("pipeline").joinpath("web", name).read_text(encoding="utf-8")
