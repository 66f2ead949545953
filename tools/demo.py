"""`make demo`: start the Annotate service, annotate a few real photos through it, stop it.

Runs the CLI exactly as a user would: `framelabel serve` on a free loopback
port, then `framelabel annotate --target` on scikit-image's sample photos.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
from skimage import data

FRAMELABEL = str(Path(sys.executable).with_name("framelabel"))
READY = re.compile(r"serving classifier \S+ .* on [\d.]+:(\d+)")
PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")


def write_photos(folder: Path) -> list[Path]:
    paths = []
    for name in PHOTOS:
        path = folder / f"{name}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(getattr(data, name)(), cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def main() -> int:
    server = subprocess.Popen(
        [FRAMELABEL, "serve", "--port", "0", "--classifier", "imagenet"], stderr=subprocess.PIPE, text=True
    )
    assert server.stderr is not None
    port = None
    for line in server.stderr:
        print(line, end="", file=sys.stderr)
        if match := READY.search(line):
            port = match.group(1)
            break
    if port is None:
        print("the service did not start", file=sys.stderr)
        return 1
    try:
        with tempfile.TemporaryDirectory() as tmp:
            photos = write_photos(Path(tmp))
            result = subprocess.run(
                [FRAMELABEL, "annotate", "--target", f"127.0.0.1:{port}", "--top", "3", *map(str, photos)],
                capture_output=True,
                text=True,
                check=True,
            )
        print(f"\nframelabel annotate --target 127.0.0.1:{port} --top 3 <photos>:")
        for photo, line in zip(photos, result.stdout.splitlines(), strict=True):
            response = json.loads(line)
            best = ", ".join(f"{a['label']['name']} {a['confidence']:.2f}" for a in response["annotations"])
            print(f"  {photo.name:22} {best}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    print(f"\nservice stopped with exit code {server.returncode}")
    return server.returncode


if __name__ == "__main__":
    sys.exit(main())
