"""Image folders and globs, replayed losslessly: each image file is one frame, in name order.

A directory yields its files with an image suffix (sorted by name); a glob
(`frames/*.png`, `shots/**/*.jpg`) yields every file it matches (sorted by
path). Name frames with zero-padded numbers for numeric order. An image that
cannot be decoded is logged, counted in `stats.errors` and skipped. Images have
no media position. `realtime`, `loop` and the offsets apply to video files only.
"""

from __future__ import annotations

import functools
import glob
import logging
from pathlib import Path

import cv2
from cv2.typing import MatLike

from pipeline.frames import DeliveryPolicy
from pipeline.sampler import SamplingSettings
from pipeline.sources._threaded import FrameHandoff, ThreadedSource
from pipeline.sources._types import SourceError, SourceSettings

log = logging.getLogger("framelabel.sources")

# Formats cv2.imread decodes; other files in a directory are not frames (a glob takes whatever it matches).
IMAGE_SUFFIXES = frozenset(
    {".bmp", ".jpg", ".jpeg", ".jpe", ".jp2", ".png", ".webp", ".avif", ".pbm", ".pgm", ".ppm", ".pnm", ".tif", ".tiff"}
)
GLOB_CHARACTERS = frozenset("*?[")


def is_glob(pattern: str) -> bool:
    return not GLOB_CHARACTERS.isdisjoint(pattern)


def read_image(path: str) -> MatLike:
    """Decode an image file as 3-channel BGR, whatever it holds; SourceError names the file and the problem."""
    try:
        pixels = cv2.imread(path, cv2.IMREAD_COLOR)
    except cv2.error as exc:  # e.g. over OpenCV's pixel limit
        raise SourceError(f"{path}: {str(exc).strip()}") from exc
    if pixels is None:
        raise SourceError(f"{path}: cannot decode image")
    return pixels


class ImageFolderSource(ThreadedSource):
    policy = DeliveryPolicy.REPLAY

    def __init__(self, source_id: str, pattern: str, settings: SourceSettings, sampling: SamplingSettings) -> None:
        super().__init__(source_id, settings, sampling)  # every image is a keyframe: the sampler does the rest
        self.pattern = pattern

    @functools.cached_property
    def total_frames(self) -> int | None:
        """The number of image files (bad ones included), from a listing of the folder."""
        try:
            return len(self._images)
        except SourceError:
            return None  # frames() raises it

    @functools.cached_property
    def _images(self) -> list[str]:
        return self._list_images()

    def _start(self, handoff: FrameHandoff) -> None:
        self._start_thread("reader", self._replay, handoff)

    def _replay(self, handoff: FrameHandoff) -> None:
        for path in self._images:
            if handoff.stopped:
                return
            try:
                pixels = read_image(path)
            except SourceError as exc:
                log.warning("source %s: skipping %s", self.source_id, exc)
                self.stats.errors += 1
                self.stats.skipped += 1
                self.stats.last_error = str(exc)
                continue
            if not handoff.put(self._new_frame(pixels, file_name=path)):
                return
        handoff.end()

    def _list_images(self) -> list[str]:
        if is_glob(self.pattern):
            paths = sorted(path for path in glob.glob(self.pattern, recursive=True) if Path(path).is_file())
        else:
            folder = Path(self.pattern)
            try:
                entries = list(folder.iterdir())
            except OSError as exc:
                raise SourceError(f"image folder {self.pattern}: {exc.strerror or exc}") from exc
            paths = sorted(
                str(entry) for entry in entries if entry.suffix.lower() in IMAGE_SUFFIXES and entry.is_file()
            )
        if not paths:
            raise SourceError(f"image folder {self.pattern}: no image files found")
        return paths
