#!/usr/bin/python3
"""A real RTSP camera for tests and demos: serves an H.264 MP4 clip at rtsp://127.0.0.1:PORT/cam.

Run it with Debian's /usr/bin/python3 (a venv lacks the GObject bindings). Each
client gets its own playback from the start of the clip, and the stream ends
with the file, like a camera that goes away. Prints one line
`ready rtsp://127.0.0.1:PORT/cam` on stdout once it is listening (`--port 0`
picks a free port); SIGTERM or SIGINT stops it.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", type=Path, help="an MP4 file with an H.264 video track")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    args = parser.parse_args()
    clip: Path = args.clip.resolve()
    if not clip.is_file():
        parser.error(f"no such clip: {clip}")

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(HOST)
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f'( filesrc location="{clip}" ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )'
    )
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
