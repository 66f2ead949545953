"""`make bench`: every figure of the performance issue, measured side by side in one run.

Prints one table and writes bench/results/latest.json (one key per figure,
ratios included; a figure that could not be measured is null with a `why`).
Each figure is the median of repeated runs with its spread [min–max].

    python -m bench.run [--repeats N] [--live-seconds S] [--pairs N] [--cameras N …] [--actual-cameras N …]
        [--actual-seconds S] [--skip-peer] [--skip-live]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import simplejpeg

from bench.cluster import measure_failover, measure_scaling, measure_transactions
from bench.encode_size import measure_encode_size
from bench.events import measure_events
from bench.int8 import measure_int8
from bench.live_cameras import measure_live
from bench.peer_roboflow import CACHE, MODEL, cached_clip, looped_clip, measure_peer
from bench.replay import ReplayResult, run_naive, run_replay
from bench.sampled import ACTUAL_COUNTS, measure_sampled
from bench.service_load import capped_catalog, measure_service, serving_as_in_process
from bench.stages import SMALL, cores, measure_stages
from bench.timing import Sample, paired, summarise
from pipeline.broker import EmbeddedBroker

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
CONCURRENCIES = (1, 4, 16)


def small_clip(clip: Path) -> Path:
    """The looped clip transcoded to 640×360, for the small-resolution replay."""
    scale = ["-vf", f"scale={SMALL[0]}:{SMALL[1]}", "-c:v", "libx264", "-preset", "fast", "-crf", "20", "-an"]
    return cached_clip(CACHE / f"{clip.stem}_640x360.mp4", ["-i", str(clip), *scale])


def replays(measure: Callable[[], ReplayResult], repeats: int) -> dict[str, Any]:
    results = [measure() for _ in range(repeats)]
    fps = Sample.of([r.fps for r in results])
    steady = [r.steady_fps for r in results if r.steady_fps is not None]
    return {
        "fps": fps.as_json(2),
        "steady_fps": Sample.of(steady).as_json(2) if steady else None,
        "cpu_utilisation": Sample.of([r.cpu_utilisation for r in results]).as_json(),
        "peak_rss_mb": Sample.of([r.peak_rss_mb for r in results]).as_json(1),
        "frames": results[0].frames,
    }


def replay_rates(broker: EmbeddedBroker, clip: Path, cores: int, *extra_args: str, **source: Any) -> dict[str, float]:
    """One replay's steady-state rate as `fps` (its start-to-end rate when the steady one is missing), and the
    process's CPU per frame (start-up included)."""
    result = run_replay(broker, clip, cores, *extra_args, **source)
    return {
        "fps": result.steady_fps or result.fps,
        "start_to_end_fps": result.fps,
        "cpu_ms_per_frame": result.cpu_seconds / result.frames * 1000,
    }


def naive_rate(broker: EmbeddedBroker, clip: Path) -> dict[str, float]:
    return {"fps": run_naive(broker, clip, 300)}


def peer_rate(clip: Path) -> dict[str, float]:
    """One run of the Roboflow peer over `clip`: its rate from first inference to last sink (no start-up)."""
    result = measure_peer(clip, MODEL, repeats=1)
    if result.get("fps") is None:
        raise RuntimeError(result.get("why", "the peer gave no rate"))
    return {"fps": float(result["fps"])}


def paired_replays(
    ours: Callable[[], dict[str, float]], baseline: Callable[[], dict[str, float]], pairs: int, ceiling: float
) -> dict[str, Any]:
    """`summarise` of interleaved steady-state replays, their CPU per frame, and ours ÷ `ceiling` pair by pair."""
    measured = paired(ours, baseline, pairs)
    return summarise(measured, "fps") | {
        "ours_to_ceiling": Sample.of([o["fps"] / ceiling for o, _ in measured]).as_json(3),
        "load_average": os.getloadavg(),
        "cpu_ms_per_frame": summarise(measured, "cpu_ms_per_frame", 2)
        if all("cpu_ms_per_frame" in b for _, b in measured)
        else None,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def figure(name: str, measure: Callable[[], Any]) -> Any:
    """Measure one figure; a failure becomes null with a `why`, and the others still run."""
    print(f"… {name}", flush=True)
    try:
        return measure()
    except Exception as exc:  # a benchmark reports, it does not stop at the first broken part
        return {"value": None, "why": f"{type(exc).__name__}: {exc}"}


def median_fps(entry: Any, rate: str = "fps") -> float | None:
    """The median start-to-end rate (`fps`) or steady-state rate (`steady_fps`) of a replay figure."""
    try:
        return float(entry[rate]["median"])
    except (KeyError, TypeError):
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    repeats, pairs = args.repeats, args.pairs
    core_count = cores()
    clip = looped_clip(500)
    clip_4x = looped_clip(2000)
    clip_small = small_clip(clip)
    results: dict[str, Any] = {
        "machine": {"cores": core_count, "load_average_at_start": os.getloadavg(), "clip": clip.name},
    }
    stages = measure_stages(clip, repeats)
    results["int8_variant"] = figure("INT8 imagenet against fp32", lambda: measure_int8(clip, 300, repeats))
    results["encode_size"] = figure("encoding at the classifier's size against 640 px", measure_encode_size)
    results["stage_cpu_ms"] = {name: sample.as_json() for name, sample in stages.per_stage_ms.items()}
    results["cpu_per_frame_ms"] = {r: round(stages.cpu_per_frame_ms(r), 3) for r in stages.pipeline_stages}
    results["ceiling_fps"] = {r: round(stages.ceiling_fps(r, core_count), 1) for r in stages.pipeline_stages}

    with EmbeddedBroker() as broker:
        results["replay_720p_full_frames"] = figure(
            "replay 720p, full frames",
            lambda: replays(lambda: run_replay(broker, clip, core_count, max_side=None), repeats),
        )
        results["replay_720p_classifier_size"] = figure(
            "replay 720p, encoded at the classifier's size (the default)",
            lambda: replays(lambda: run_replay(broker, clip, core_count), repeats),
        )
        results["replay_720p_downscaled"] = figure(
            "replay 720p, downscaled to 640 (size: max_side)",
            lambda: replays(lambda: run_replay(broker, clip, core_count, size="max_side"), repeats),
        )
        results["replay_720p_downscaled_int8"] = figure(
            "replay 720p, downscaled, imagenet-int8",
            lambda: replays(lambda: run_replay(broker, clip, core_count, "--classifier", "imagenet-int8"), repeats),
        )
        results["replay_720p_downscaled_objects"] = figure(
            "replay 720p, downscaled, objects",
            lambda: replays(lambda: run_replay(broker, clip, core_count, "--classifier", "objects"), repeats),
        )
        results["replay_640x360_source"] = figure(
            "replay of a 640×360 clip", lambda: replays(lambda: run_replay(broker, clip_small, core_count), repeats)
        )
        results["replay_rss_4x_longer_clip"] = figure(
            "replay of a 4× longer clip", lambda: replays(lambda: run_replay(broker, clip_4x, core_count), 1)
        )
        results["naive_loop_fps"] = figure(
            "naive loop", lambda: Sample.of([run_naive(broker, clip, 300) for _ in range(repeats)]).as_json(2)
        )
        ceiling = results["ceiling_fps"]["455x256"]
        results["paired_replay_to_naive_loop"] = figure(
            "replay and naive loop, interleaved pairs",
            lambda: paired_replays(
                lambda: replay_rates(broker, clip, core_count), lambda: naive_rate(broker, clip), pairs, ceiling
            ),
        )
        results["paired_classifier_size_to_max_side"] = figure(
            "replays at the classifier's size and at 640 px, interleaved pairs",
            lambda: paired_replays(
                lambda: replay_rates(broker, clip, core_count),
                lambda: replay_rates(broker, clip, core_count, size="max_side"),
                pairs,
                ceiling,
            ),
        )
        results["paired_replay_to_peer"] = (
            {"value": None, "why": "skipped (--skip-peer)"}
            if args.skip_peer
            else figure(
                "replay and the Roboflow peer, interleaved pairs",
                lambda: paired_replays(
                    lambda: replay_rates(broker, clip, core_count), lambda: peer_rate(clip), pairs, ceiling
                ),
            )
        )
        with serving_as_in_process() as address:
            results["replay_grpc_720p_downscaled"] = figure(
                "replay through the gRPC service",
                lambda: replays(lambda: run_replay(broker, clip, core_count, "--target", address), repeats),
            )
            # both at 640 px: the client does not know the service's model, so it sends max_side
            results["paired_grpc_to_in_process"] = figure(
                "gRPC and in-process replays, interleaved pairs",
                lambda: paired_replays(
                    lambda: replay_rates(broker, clip, core_count, "--target", address),
                    lambda: replay_rates(broker, clip, core_count, size="max_side"),
                    pairs,
                    results["ceiling_fps"]["640x360"],
                ),
            )

    jpeg = sample_jpeg(clip)
    for mode, batching in (("unbatched", False), ("batched", True)):
        results[f"service_{mode}"] = figure(
            f"service alone, {mode}",
            lambda batching=batching: {
                str(c): r.as_json() for c, r in measure_service(jpeg, CONCURRENCIES, 5.0, batching).items()
            },
        )
    with capped_catalog() as catalog:  # answering the top 5, as `framelabel run` asks in-process
        results["service_unbatched_top5"] = figure(
            "service alone, unbatched, top 5",
            lambda: {
                str(c): r.as_json()
                for c, r in measure_service(jpeg, CONCURRENCIES, 5.0, False, f"classifiers_file: {catalog}\n").items()
            },
        )
    results["live_4_rtsp_cameras"] = (
        {"value": None, "why": "skipped (--skip-live)"}
        if args.skip_live
        else figure("live cameras", lambda: measure_live(args.live_seconds))
    )
    results["sampled"] = (
        {"value": None, "why": "skipped (--skip-live)"}
        if args.skip_live
        else figure(
            "sampled decoding: a file and RTSP cameras at 1 fps, the most cameras held",
            lambda: measure_sampled(pairs, args.cameras, 15.0, core_count, args.actual_cameras, args.actual_seconds),
        )
    )
    results["peer_roboflow"] = (
        {"value": None, "why": "skipped (--skip-peer)"}
        if args.skip_peer
        else figure("Roboflow peer", lambda: measure_peer(clip, MODEL))
    )
    results["events_stage"] = figure("events stage: throughput, lag at 10 × 25 fps", lambda: measure_events())
    results["cluster"] = {
        "two_workers_to_one": figure("scale out: 1 and 2 workers", lambda: measure_scaling(1)),
        "exactly_once_to_at_least_once": figure("scale out: transactions", lambda: measure_transactions(1)),
        "failover": figure("scale out: a worker killed", measure_failover),
    }
    add_ratios(results)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    return results


def sample_jpeg(clip: Path) -> bytes:
    capture = cv2.VideoCapture(str(clip))
    for _ in range(30):
        capture.read()
    _, frame = capture.read()
    capture.release()
    return bytes(simplejpeg.encode_jpeg(cv2.resize(frame, SMALL), 85, "BGR"))


def add_ratios(results: dict[str, Any]) -> None:
    full, downscaled = median_fps(results["replay_720p_full_frames"]), median_fps(results["replay_720p_downscaled"])
    default = median_fps(results["replay_720p_classifier_size"], "steady_fps")
    naive = results["naive_loop_fps"].get("median") if isinstance(results["naive_loop_fps"], dict) else None
    peer = results["peer_roboflow"].get("fps") if isinstance(results["peer_roboflow"], dict) else None
    service = results["service_batched"], results["service_unbatched"]
    results["ratios"] = {
        "replay_720p_full_frames_to_ceiling": ratio(full, results["ceiling_fps"]["720p"]),
        "replay_720p_downscaled_to_ceiling": ratio(downscaled, results["ceiling_fps"]["640x360"]),
        "downscaled_to_naive_loop": ratio(downscaled, naive),
        "downscaled_to_roboflow_peer": ratio(downscaled, peer),
        "downscaled_int8_to_roboflow_peer": ratio(median_fps(results["replay_720p_downscaled_int8"]), peer),
        "replay_objects_to_imagenet": ratio(median_fps(results["replay_720p_downscaled_objects"]), downscaled),
        "replay_objects_to_ceiling": ratio(
            median_fps(results["replay_720p_downscaled_objects"]), results["ceiling_fps"]["640x360_objects"]
        ),
        "grpc_to_in_process": ratio(median_fps(results["replay_grpc_720p_downscaled"]), downscaled),
        "service_batched_c16_to_c1": _service_ratio(service[0]),
        "service_unbatched_c16_to_c1": _service_ratio(service[1]),
        "service_unbatched_top5_c16_to_c1": _service_ratio(results["service_unbatched_top5"]),
        "steady_state_replay_720p_classifier_size_to_ceiling": ratio(default, results["ceiling_fps"]["455x256"]),
        "steady_state_classifier_size_to_naive_loop": ratio(default, naive),
        "steady_state_classifier_size_to_roboflow_peer": ratio(default, peer),
        "steady_state_replay_720p_downscaled_to_ceiling": ratio(
            median_fps(results["replay_720p_downscaled"], "steady_fps"), results["ceiling_fps"]["640x360"]
        ),
        "steady_state_downscaled_to_naive_loop": ratio(
            median_fps(results["replay_720p_downscaled"], "steady_fps"), naive
        ),
        "steady_state_grpc_to_in_process": ratio(
            median_fps(results["replay_grpc_720p_downscaled"], "steady_fps"),
            median_fps(results["replay_720p_downscaled"], "steady_fps"),
        ),
        "peak_rss_4x_clip_to_1x": ratio(
            _peak_rss(results["replay_rss_4x_longer_clip"]), _peak_rss(results["replay_720p_downscaled"])
        ),
    }


def _service_ratio(entry: Any) -> float | None:
    try:
        return ratio(entry["16"]["requests_per_s"], entry["1"]["requests_per_s"])
    except (KeyError, TypeError):
        return None


def _peak_rss(entry: Any) -> float | None:
    try:
        return float(entry["peak_rss_mb"]["median"])
    except (KeyError, TypeError):
        return None


def print_table(results: dict[str, Any]) -> None:
    def line(name: str, value: Any) -> None:
        print(f"  {name:44} {value}")

    print("\nframelabel benchmark —", time.strftime("%Y-%m-%d %H:%M"), "—", results["machine"])
    print("1. stage CPU per frame, ms, median [min–max]:")
    for name, sample in results["stage_cpu_ms"].items():
        line(name, f"{sample['median']} [{sample['min']}–{sample['max']}]")
    print("2. CPU per frame and ceiling:")
    for resolution, value in results["cpu_per_frame_ms"].items():
        line(f"{resolution}", f"{value} ms/frame → ceiling {results['ceiling_fps'][resolution]} frames/s")
    line("int8_variant", results["int8_variant"])
    line("encode_size", results["encode_size"])
    print("3–5. replays (frames/s, CPU utilisation of all cores, peak RSS MB):")
    for key in (
        "replay_720p_full_frames",
        "replay_720p_classifier_size",
        "replay_720p_downscaled",
        "replay_720p_downscaled_int8",
        "replay_720p_downscaled_objects",
        "replay_640x360_source",
        "replay_rss_4x_longer_clip",
        "replay_grpc_720p_downscaled",
    ):
        entry = results[key]
        if median_fps(entry) is None:
            line(key, entry)
        else:
            line(
                key,
                f"{entry['fps']} fps start to end, {entry['steady_fps']} steady, "
                f"cpu {entry['cpu_utilisation']['median']}, rss {entry['peak_rss_mb']['median']}",
            )
    line("naive_loop_fps", results["naive_loop_fps"])
    print("6. service alone (requests/s, p50/p99 ms):")
    for mode in ("service_unbatched", "service_batched", "service_unbatched_top5"):
        line(mode, results[mode])
    print("7. live:")
    line("live_4_rtsp_cameras", results["live_4_rtsp_cameras"])
    print("7b. sampled at 1 fps (ours: PyAV decoding only what is kept; baseline: OpenCV decoding every frame);")
    print("    median [min–max] over interleaved pairs, ratio = ours / baseline pair by pair:")
    for key, value in results["sampled"].items():
        if key == "most_cameras" and isinstance(value, dict):
            print_most_cameras(value)
        else:
            line(key, value)
    print("8. peer:")
    line("peer_roboflow", results["peer_roboflow"])
    print("9. events stage (annotations/s on one core, wall and CPU; annotation → event lag at 10 × 25 fps):")
    line("events_stage", results["events_stage"])
    print_cluster(results["cluster"])
    print("ratios from interleaved pairs (steady-state replays), median [min–max] of ours / baseline:")
    for key in (
        "paired_replay_to_naive_loop",
        "paired_replay_to_peer",
        "paired_classifier_size_to_max_side",
        "paired_grpc_to_in_process",
    ):
        line(key, results[key])
    print("ratios of medians (not paired; replays at the steady state where it says so):")
    for name, value in results["ratios"].items():
        line(name, value)


def print_most_cameras(most: dict[str, Any]) -> None:
    """The most cameras held (see bench.sampled), then one line per actual run."""
    print(f"  most_cameras: a count holds when {most['holds_when']}")
    print(
        f"  {'  most cameras held, ours / baseline':44} {most['ours']} / {most['baseline']}, ratio {most['ratio']}"
        f"; first failures: {most['first_failure']}"
    )
    for count, sides in most["runs"].items():
        for side, run in sides.items():
            if "capture_to_consumer_ms" not in run:
                print(f"  {f'    {count} cameras, {side}':44} {run['shortfalls']}")
                continue
            latency, growth = run["capture_to_consumer_ms"], run["growth"]
            print(
                f"  {f'    {count} cameras, {side}':44} p50 {latency['p50_ms']} p99 {latency['p99_ms']} ms, "
                f"p50 {growth['p50_first_third_ms']}→{growth['p50_last_third_ms']} ms, "
                f"backlog {growth['camera_backlog_ms']} ms, lost {run['samples_lost_in_window']}, "
                f"cores run {run['run_cpu_cores']} set-up {run['setup_cpu_cores']} other {run['other_cpu_cores']}, "
                f"load {run['load_average']}" + (f" — {'; '.join(run['shortfalls'])}" if run["shortfalls"] else "")
            )


def print_cluster(cluster: dict[str, Any]) -> None:
    print("10. scale out (workers of a group, 4 replays of a 320×180 clip, imagenet on 1 thread per worker),")
    print("    frames/s published while every source runs; 1 and 2 workers on Tansu, transactions on noida-db:")
    for key, ours, baseline in (
        ("two_workers_to_one", "2 workers", "1 worker"),
        ("exactly_once_to_at_least_once", "exactly once", "at least once"),
    ):
        entry = cluster[key]
        if "ratio" not in entry:
            print(f"  {key:44} {entry}")
            continue
        print(
            f"  {key:44} {ours} {entry['ours']['median']}, {baseline} {entry['baseline']['median']}, "
            f"ratio {entry['ratio']['median']}" + (f" ({entry['note']})" if "note" in entry else "")
        )
    print(f"  {'failover (SIGKILL, at least once)':44} {cluster['failover']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--live-seconds", type=float, default=60.0)
    parser.add_argument("--skip-peer", action="store_true", help="skip the Roboflow peer (its venv takes a while)")
    parser.add_argument("--skip-live", action="store_true", help="skip the live cameras and the sampled figures")
    parser.add_argument("--pairs", type=int, default=5, help="interleaved pairs for the sampled figures' ratios")
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 4], help="RTSP camera counts: CPU per camera")
    parser.add_argument(
        "--actual-cameras", type=int, nargs="+", default=ACTUAL_COUNTS, help="counts tried in turn for the most held"
    )
    parser.add_argument("--actual-seconds", type=float, default=120.0, help="seconds measured per actual run")
    args = parser.parse_args()
    results = run(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print_table(results)
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
