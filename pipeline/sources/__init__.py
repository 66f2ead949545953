"""The capture stage: where frames come from, and how each kind of source delivers them.

    open_source(id, uri, settings) ──▶ Source.frames() ──Frame──▶ sampler …

The URI picks the kind and with it the delivery policy:

    rtsp(s)://, rtmp(s)://, srt://, udp://, rtp://, tcp://,
    http(s)://, /dev/videoN, N                             camera.CameraSource            LIVE
    a directory, or a glob with * ? [                      image_folder.ImageFolderSource REPLAY
    file:///path, or any other path                        video_file.VideoFileSource     REPLAY
    any other scheme://                                    refused, naming the known schemes

Video files and streams decode with PyAV when the source samples with `fps`
or `keyframes`, so that the frames sampled out are never decoded, and with
OpenCV otherwise (cheaper per frame decoded); `decoder` overrides the choice. Local devices always use OpenCV.

A source is an async context manager that owns its reader threads: leaving
the block closes it. open_source() does no I/O: a missing or unreadable input raises `SourceError`
from the first step of `frames()`. `total_frames` probes a file or lists a
folder on first use, a short blocking call. Cameras never raise for being
unreachable; they reconnect until closed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from typing import Protocol, Self

from pipeline.frames import DeliveryPolicy, Frame
from pipeline.sampler import SamplingSettings
from pipeline.sources._types import SourceError, SourceSettings, SourceStats
from pipeline.sources.camera import LIVE_SCHEMES, CameraSource, is_camera, mask_credentials
from pipeline.sources.image_folder import ImageFolderSource, is_glob
from pipeline.sources.video_file import VideoFileSource
from services.config import PACKAGE_SCHEME, package_file
from services.errors import ConfigError


class Source(Protocol):
    source_id: str
    policy: DeliveryPolicy
    stats: SourceStats

    @property
    def total_frames(self) -> int | None:
        """Expected frame count for progress (file without loop, folder); None otherwise."""
        ...

    def frames(self) -> AsyncGenerator[Frame, None]:
        """The frames; iterate once. Its aclose(), like close(), stops the source."""
        ...

    async def close(self) -> None:
        """Idempotent; makes frames() end soon and joins the reader threads."""
        ...

    async def __aenter__(self) -> Self:
        """The source as it is; reading starts with frames()."""
        ...

    async def __aexit__(self, *exc_info: object) -> None:
        """close()."""
        ...


def check_uri(uri: str) -> str:
    """The URI as a source reads it (`file://` dropped, `package://PKG/FILE` the installed file's path);
    ValueError for an empty one, an unknown scheme or a package that is not installed."""
    if not uri.strip():
        raise ValueError("a source URI must not be empty")
    scheme, separator, rest = uri.partition("://")
    if not separator or scheme.lower() in LIVE_SCHEMES:
        return uri
    if scheme.lower() == "file":
        return rest
    if f"{scheme.lower()}://" == PACKAGE_SCHEME:  # as a sources catalog keeps it, for each worker to find
        try:
            return str(package_file(uri))
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    known = ", ".join(f"{name}://" for name in sorted(LIVE_SCHEMES | {"file", "package"}))
    raise ValueError(f"unknown scheme {scheme}:// in {mask_credentials(uri)}: known ones are {known}, or a path")


def _source_class(uri: str) -> type[CameraSource | ImageFolderSource | VideoFileSource]:
    if is_camera(uri):
        return CameraSource
    if is_glob(uri) or uri.endswith(("/", os.sep)) or os.path.isdir(uri):
        return ImageFolderSource
    return VideoFileSource


def source_policy(uri: str) -> DeliveryPolicy:
    """LIVE for cameras, REPLAY for video files and image folders."""
    return _source_class(check_uri(uri)).policy


def open_source(source_id: str, uri: str, settings: SourceSettings, sampling: SamplingSettings | None = None) -> Source:
    """The source for `uri`, not yet reading: iterate `frames()` to start it, `close()` to stop it.

    `sampling` lets a video file or a stream decode only the frames it keeps (see `SourceSettings.decoder`);
    ConfigError if the decoder cannot apply it (keyframes from a local device, say)."""
    if not source_id:
        raise ValueError("a source id must not be empty")
    uri = check_uri(uri)
    return _source_class(uri)(source_id, uri, settings, sampling or SamplingSettings())


__all__ = ["Source", "SourceError", "SourceSettings", "SourceStats", "check_uri", "open_source", "source_policy"]
