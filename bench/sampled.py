"""Sampled sources: what decoding only the sampled frames saves, on a file and on RTSP cameras.

Every ratio comes from interleaved pairs — ours (PyAV, decoding only what
`fps: 1` keeps), then the baseline (OpenCV decoding every frame, the sampler
keeping one a second: what framelabel did before), then ours … — and is
reported as the median over the pairs with its spread [min–max], since the
machine's speed drifts while other work shares it.

- `decode`: decode CPU per sample in this process, reading the source alone
  (no inference), of the file sampled at 1 fps.
- `replay`: `framelabel run` of the same file at 1 fps: samples/s start to end,
  and the run's CPU per sample; the share of the run's CPU that is not decoding
  (inference, encoding, Kafka) follows from the two.
- `cameras`: `framelabel run` of N RTSP cameras at 1 fps: the run's CPU per
  camera over a window after a warm-up, its RSS, and the records published;
  from two counts, the CPU and RSS per added camera and the cameras that the
  machine's cores would hold if nothing else ran on them.
- `most_cameras`: actual runs beside the camera server, ours and the baseline,
  at each of `--actual-cameras` in turn (8, 16, … 64), each side until its
  first count that fails; the figure is the last count that held. A count holds
  when, over `--actual-seconds` (120) after a warm-up, followed record by record
  by a consumer (bench.live_cameras.follow_run): p99 capture→consumer ≤ 1 s
  (an upper bound on capture→ack), no sample lost (no gap of more than one
  sample period in a camera's frame indices, and every camera publishing about
  one sample a second), and no growth (p50 of the last third of the window at
  most GROWTH_LIMIT_MS above the first third's, and for PyAV cameras a reader
  no further behind its camera's clock by that much either).

The clip: bigbuckbunny.mp4 looped to 60 s and encoded once (bench/.cache/) as
1280×720 H.264 at 25 fps with a keyframe every second and no B-frames, as many
cameras send; the cameras play it repeated (without re-encoding) to outlast
the actual runs. Each camera is one client of tools/rtsp_camera.py, which plays
the pre-encoded file to every client (no encoding on the server side).

    .venv/bin/python -m bench.sampled [--pairs 5] [--cameras 1 4] [--window 15]
        [--actual-cameras 8 16 …] [--actual-seconds 120] [--actual-only]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench.live_cameras import (
    FRAMELABEL,
    ROOT,
    START_MARGIN_S,
    Camera,
    LiveError,
    follow_run,
    parse_summary,
    rtsp_camera,
    run_config,
)
from bench.live_cameras import WARMUP_S as FOLLOW_WARMUP_S
from bench.peer_roboflow import CACHE, cached_clip, source_clip
from bench.replay import run_replay
from bench.timing import paired, summarise
from pipeline.broker import EmbeddedBroker
from pipeline.processes import stop_process
from pipeline.sampler import Sampler, SamplingSettings
from pipeline.sources import SourceSettings, open_source

CLIP_SECONDS = 60
FPS = 25
SAMPLE_FPS = 1.0
OURS = {"fps": SAMPLE_FPS}  # decoder auto: PyAV, decoding only the sampled frames
BASELINE = {"fps": SAMPLE_FPS, "decoder": "opencv"}  # every frame decoded, the sampler keeps one a second
FRAMES_PER_SAMPLE = round(FPS / SAMPLE_FPS)
WARMUP_S = 8.0  # model load, connections, the first inferences
ACTUAL_COUNTS = list(range(8, 65, 8))  # up to the dedicated 2-core host's goal
P99_LIMIT_MS = 1000.0
GROWTH_LIMIT_MS = 200.0  # falling behind grows by seconds within 2 minutes; a busy machine wobbles by less
STOP_TIMEOUT_S = 30.0
RSS_POLL_S = 0.1


def keyframe_every_second_clip() -> Path:
    """bigbuckbunny.mp4 looped to 60 s: 1280×720 H.264, 25 fps, a keyframe every second, no B-frames; cached."""
    args = ["-stream_loop", str(CLIP_SECONDS * FPS // 132), "-i", str(source_clip()), "-an", "-t", str(CLIP_SECONDS)]
    args += ["-c:v", "libx264", "-preset", "veryfast", "-bf", "0", "-g", str(FPS), "-keyint_min", str(FPS)]
    args += ["-sc_threshold", "0", "-pix_fmt", "yuv420p", "-movflags", "+faststart"]
    return cached_clip(CACHE / f"bunny_720p25_gop1s_{CLIP_SECONDS}s.mp4", args)


def cameras_clip(actual_s: float) -> Path:
    """The keyframe-every-second clip repeated without re-encoding to outlast an actual run of `actual_s`; cached."""
    loops = math.ceil((FOLLOW_WARMUP_S + actual_s + START_MARGIN_S) / CLIP_SECONDS)
    args = ["-stream_loop", str(loops - 1), "-i", str(keyframe_every_second_clip()), "-c", "copy"]
    return cached_clip(CACHE / f"bunny_720p25_gop1s_{loops * CLIP_SECONDS}s.mp4", [*args, "-movflags", "+faststart"])


def decode_once(clip: Path, source: dict[str, Any]) -> dict[str, float]:
    """Read the clip through its source and the sampler, nothing else; CPU ms per sample and frames decoded."""
    settings = SourceSettings.model_validate({k: v for k, v in source.items() if k != "fps"})
    sampling = SamplingSettings(fps=source["fps"])

    async def read() -> tuple[int, int]:
        reader = open_source("clip", str(clip), settings, sampling)
        sampler = Sampler(sampling)
        kept = sum([sampler.keep(frame.info) async for frame in reader.frames()])
        return kept, reader.stats.decoded

    started = time.process_time()
    samples, decoded = asyncio.run(read())
    cpu_ms = (time.process_time() - started) * 1000
    return {"cpu_ms_per_sample": cpu_ms / samples, "samples": samples, "decoded": decoded}


def replay_once(broker: EmbeddedBroker, clip: Path, cores: int, source: dict[str, Any]) -> dict[str, float]:
    result = run_replay(broker, clip, cores, **source)
    return {
        "samples_per_s": result.fps,
        "run_cpu_ms_per_sample": result.cpu_seconds * 1000 / result.frames,
        "samples": result.frames,
    }


def cameras_once(
    broker: EmbeddedBroker, url: str, count: int, source: dict[str, Any], window_s: float
) -> dict[str, float]:
    """`framelabel run` of `count` cameras (each its own connection to `url`); CPU and RSS over a window."""
    config = {
        "sources": [{"id": f"cam{i}", "uri": url, **source} for i in range(1, count + 1)],
        "kafka": {"bootstrap_servers": broker.address, "enable_idempotence": False, "topic": "bench.sampled"},
    }
    with tempfile.TemporaryDirectory(prefix="framelabel-sampled-") as workdir:
        path = Path(workdir) / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        with (Path(workdir) / "out").open("w+b") as out, (Path(workdir) / "err").open("w+b") as err:
            child = psutil.Popen([str(FRAMELABEL), "run", str(path)], stdout=out, stderr=err, cwd=ROOT)
            try:
                time.sleep(WARMUP_S)  # a benchmark's warm-up: measured from here, whatever came before
                before, started = child.cpu_times(), time.monotonic()
                peak_rss = 0
                while time.monotonic() - started < window_s and child.poll() is None:
                    peak_rss = max(peak_rss, child.memory_info().rss)
                    time.sleep(RSS_POLL_S)
                after, elapsed = child.cpu_times(), time.monotonic() - started
                load = psutil.getloadavg()[0]
                child.send_signal(signal.SIGINT)
                child.wait(STOP_TIMEOUT_S)
            finally:
                stop_process(child, STOP_TIMEOUT_S)
            out.seek(0)
            rows = parse_summary(out.read().decode(errors="replace"))
            if len(rows) != count:
                err.seek(0)
                raise RuntimeError(f"{count} cameras: the run summarised {len(rows)}: {err.read()[-600:]!r}")
    cpu_s = (after.user + after.system) - (before.user + before.system)
    published = [int(row.get("published", "0")) for row in rows.values()]
    return {
        "cpu_ms_per_camera_s": cpu_s * 1000 / elapsed / count,
        "run_cpu_cores": cpu_s / elapsed,
        "peak_rss_mb": peak_rss / 2**20,
        "min_published_per_camera": min(published),
        "dropped": sum(int(row.get("dropped", "0")) for row in rows.values()),
        "worst_p95_ms": max(float(row.get("p95_ms", "nan")) for row in rows.values()),  # capture→ack, whole run
        "load_average": load,
    }


def actual_run(camera: Camera, count: int, source: dict[str, Any], seconds: float) -> dict[str, Any]:
    """`count` cameras for `seconds` after the warm-up, a broker of their own, followed by a consumer."""
    try:
        with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="framelabel-actual-") as workdir:
            config = run_config([camera.url] * count, broker.address, source)
            setup_pids = [camera.pid, broker.pid or 0, os.getpid()]
            figures = asyncio.run(
                follow_run(config, seconds, setup_pids, Path(workdir), frames_per_sample=FRAMES_PER_SAMPLE)
            )
    except LiveError as exc:
        return {"cameras": count, "shortfalls": [f"the run broke: {exc}"]}
    run = condensed(figures)
    run["shortfalls"] = shortfalls(run, count)
    return run


def condensed(figures: dict[str, Any]) -> dict[str, Any]:
    """follow_run's figures summed over the cameras (its per-camera rows are too many to print)."""
    cameras = list(figures["per_camera"].values())
    return {
        "cameras": figures["cameras"],
        "window_s": figures["window_s"],
        "samples_per_s": figures["fps"],
        "capture_to_consumer_ms": {key: figures[key] for key in ("p50_ms", "p99_ms", "max_ms")},
        "growth": figures["growth"],
        "samples_lost_in_window": sum(camera["dropped_in_window"] for camera in cameras),
        "fewest_samples_of_a_camera": min(camera["published_in_window"] for camera in cameras),
        **{key: sum(camera[key] for camera in cameras) for key in ("run_dropped", "run_failed", "run_reconnects")},
        **{key: figures[key] for key in ("run_cpu_cores", "setup_cpu_cores", "other_cpu_cores", "load_average")},
        "run_exit_code": figures["run_exit_code"],
    }


def shortfalls(run: dict[str, Any], count: int) -> list[str]:
    """Why the run does not hold `count` cameras (see the module's docstring); empty when it does."""
    problems = []
    if run["cameras"] != count:
        problems.append(f"the run summarised {run['cameras']} of {count} cameras")
    p99 = run["capture_to_consumer_ms"]["p99_ms"]
    if p99 is None or p99 > P99_LIMIT_MS:
        problems.append(f"p99 {p99} ms > {P99_LIMIT_MS:.0f} ms")
    if run["samples_lost_in_window"]:
        problems.append(f"{run['samples_lost_in_window']} samples lost")
    expected = math.floor(run["window_s"] * SAMPLE_FPS) - 1
    if run["fewest_samples_of_a_camera"] < expected:
        problems.append(f"a camera published {run['fewest_samples_of_a_camera']} samples in {run['window_s']} s")
    first, last = run["growth"]["p50_first_third_ms"], run["growth"]["p50_last_third_ms"]
    if first is not None and last is not None and last - first > GROWTH_LIMIT_MS:
        problems.append(f"p50 grew from {first} to {last} ms")
    backlog = run["growth"]["camera_backlog_ms"]
    if backlog is not None and backlog > GROWTH_LIMIT_MS:
        problems.append(f"a reader fell {backlog} ms further behind its camera")
    return problems


def most_cameras(camera: Camera, counts: list[int], seconds: float) -> dict[str, Any]:
    """Actual runs at each count in turn, ours then the baseline, each side until its first count that fails."""
    runs: dict[str, dict[str, Any]] = {}
    held = {"ours": 0, "baseline": 0}  # 0: not even the first count
    failed_at: dict[str, str] = {}
    for count in counts:
        for side, source in (("ours", OURS), ("baseline", BASELINE)):
            if side in failed_at:
                continue
            run = actual_run(camera, count, source, seconds)
            runs.setdefault(str(count), {})[side] = run
            # a run takes minutes: its figures as they come, should the rest be cut short
            print(f"… {count} cameras, {side}: {json.dumps(run)}", file=sys.stderr, flush=True)
            if run["shortfalls"]:
                failed_at[side] = f"{count} cameras: " + "; ".join(run["shortfalls"])
            else:
                held[side] = count
        if len(failed_at) == len(held):
            break
    return {
        "holds_when": f"p99 capture→consumer ≤ {P99_LIMIT_MS:.0f} ms, no sample lost, p50 and camera backlog "
        f"growing ≤ {GROWTH_LIMIT_MS:.0f} ms over {seconds:g} s",
        **held,
        "ratio": round(held["ours"] / held["baseline"], 2) if held["baseline"] else None,
        "first_failure": {side: failed_at.get(side, f"none up to {counts[-1]}") for side in held},
        "runs": runs,
    }


def measure_most_cameras(counts: list[int], seconds: float) -> dict[str, Any]:
    """most_cameras() alone, with its camera server."""
    with rtsp_camera(cameras_clip(seconds)) as camera:
        return most_cameras(camera, counts, seconds)


def measure_sampled(
    pairs: int, camera_counts: list[int], window_s: float, cores: int, actual_counts: list[int], actual_s: float
) -> dict[str, Any]:
    clip = keyframe_every_second_clip()
    results: dict[str, Any] = {
        "clip": f"{clip.name}: 1280x720 H.264 25 fps, keyframe every 1 s, {CLIP_SECONDS} s",
        "sampling": f"fps {SAMPLE_FPS:g}; ours: PyAV (decoder auto), baseline: OpenCV decoding every frame",
        "pairs": pairs,
        "load_average_at_start": psutil.getloadavg(),
    }
    decode = paired(lambda: decode_once(clip, OURS), lambda: decode_once(clip, BASELINE), pairs)
    results["decode_cpu_ms_per_sample"] = summarise(decode, "cpu_ms_per_sample")
    results["decoded_frames"] = {"ours": decode[0][0]["decoded"], "baseline": decode[0][1]["decoded"]}
    with EmbeddedBroker() as broker:
        replay = paired(
            lambda: replay_once(broker, clip, cores, OURS), lambda: replay_once(broker, clip, cores, BASELINE), pairs
        )
        results["replay_samples_per_s"] = summarise(replay, "samples_per_s", 2)
        results["replay_run_cpu_ms_per_sample"] = summarise(replay, "run_cpu_ms_per_sample", 1)
        decode_ms = results["decode_cpu_ms_per_sample"]["ours"]["median"]
        run_ms = results["replay_run_cpu_ms_per_sample"]["ours"]["median"]
        results["replay_cpu_share_not_decoding"] = round(1 - decode_ms / run_ms, 3) if run_ms else None
        with rtsp_camera(cameras_clip(actual_s)) as camera:
            for count in camera_counts:
                measured = paired(
                    lambda count=count: cameras_once(broker, camera.url, count, OURS, window_s),
                    lambda count=count: cameras_once(broker, camera.url, count, BASELINE, window_s),
                    pairs if count == camera_counts[0] else 1,
                )
                results[f"rtsp_{count}_cameras"] = {
                    "cpu_ms_per_camera_s": summarise(measured, "cpu_ms_per_camera_s", 1),
                    "run_cpu_cores": summarise(measured, "run_cpu_cores", 2),
                    "peak_rss_mb": summarise(measured, "peak_rss_mb", 1),
                    "min_published_per_camera": [
                        (o["min_published_per_camera"], b["min_published_per_camera"]) for o, b in measured
                    ],
                    "dropped": [(o["dropped"], b["dropped"]) for o, b in measured],
                    "worst_p95_capture_to_ack_ms": [(o["worst_p95_ms"], b["worst_p95_ms"]) for o, b in measured],
                    "load_average": [round(o["load_average"], 2) for o, _ in measured],
                }
            results["cameras_per_host"] = cameras_per_host(results, camera_counts, cores)
            results["most_cameras"] = most_cameras(camera, actual_counts, actual_s)
    results["load_average_at_end"] = psutil.getloadavg()
    return results


def cameras_per_host(results: dict[str, Any], camera_counts: list[int], cores: int) -> dict[str, Any]:
    """What a camera costs the run and how many `cores` dedicated cores would hold.

    The cost of an added camera (CPU and RSS) is the difference between the first two counts run, divided
    by the cameras added; the run's fixed cost is what one camera costs beyond that. The implied count is
    (cores − fixed) ÷ added CPU per camera.
    """
    if len(camera_counts) < 2:
        return {"value": None, "why": "needs two camera counts"}
    fewer, more = camera_counts[0], camera_counts[1]
    low, high = results[f"rtsp_{fewer}_cameras"], results[f"rtsp_{more}_cameras"]
    figures: dict[str, Any] = {"cores": cores, "from_counts": [fewer, more]}
    for side in ("ours", "baseline"):
        cores_low, cores_high = low["run_cpu_cores"][side]["median"], high["run_cpu_cores"][side]["median"]
        added = (cores_high - cores_low) / (more - fewer)
        fixed = cores_low - added * fewer
        figures[f"{side}_cpu_ms_per_added_camera_s"] = round(added * 1000, 1)
        figures[f"{side}_fixed_cpu_cores"] = round(fixed, 3)
        figures[f"{side}_implied_cameras"] = int((cores - fixed) / added) if added > 0 else None
        rss_low, rss_high = low["peak_rss_mb"][side]["median"], high["peak_rss_mb"][side]["median"]
        figures[f"{side}_rss_mb_per_added_camera"] = round((rss_high - rss_low) / (more - fewer), 1)
    ours, baseline = figures["ours_implied_cameras"], figures["baseline_implied_cameras"]
    figures["implied_ratio"] = round(ours / baseline, 2) if ours and baseline else None
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description="Sampled decoding: a file and RTSP cameras at 1 fps.")
    parser.add_argument("--pairs", type=int, default=5, help="interleaved pairs per ratio")
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 4], help="camera counts for CPU per camera")
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured per camera run")
    parser.add_argument(
        "--actual-cameras", type=int, nargs="+", default=ACTUAL_COUNTS, help="counts tried in turn for the most held"
    )
    parser.add_argument("--actual-seconds", type=float, default=120.0, help="seconds measured per actual run")
    parser.add_argument("--actual-only", action="store_true", help="only the actual runs (the most cameras held)")
    args = parser.parse_args()
    if args.actual_only:
        results = measure_most_cameras(args.actual_cameras, args.actual_seconds)
    else:
        cores = psutil.cpu_count() or 1
        results = measure_sampled(
            args.pairs, args.cameras, args.window, cores, args.actual_cameras, args.actual_seconds
        )
    with contextlib.suppress(BrokenPipeError):
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
