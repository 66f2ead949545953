"""The values every source kind shares: its settings, its counters and its error.

Kept apart from `pipeline.sources` (which re-exports them) so the source
modules can import them without an import cycle through the factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.retry import RetryPolicy
from services.config import StrictModel
from services.errors import FramelabelError


class SourceError(FramelabelError):
    """A source cannot deliver: missing, unreadable or not a video; the message names the path and the problem."""


@dataclass
class SourceStats:
    """Counters a source updates as it reads, for the runner's progress and summary."""

    read: int = 0  # frames read from the source
    decoded: int = 0  # frames decoded; with PyAV and sampling, only those kept and the ones they refer to
    dropped: int = 0  # LIVE only: frames overwritten before anyone took them (freshness policy)
    errors: int = 0  # corrupt frames / undecodable images skipped, failed opens
    skipped: int = 0  # images that could not be read, left out of the replay (each named in the log)
    reconnects: int = 0  # LIVE only
    streaming: bool = False  # frames are coming: set by each frame, cleared when a camera reconnects
    last_error: str | None = None


class SourceSettings(StrictModel):
    """Per-source options, validated once where the run config is read (a source's YAML entry holds them)."""

    realtime: bool = False  # files: pace frames at the file's own fps
    loop: bool = False  # files: start again at the end
    start_ms: Annotated[float, Field(ge=0)] = 0.0  # files: start offset
    end_ms: Annotated[float, Field(gt=0)] | None = None  # files: end offset (exclusive)
    # files: only the frames after this media position, numbered as in a whole replay (a worker resuming a
    # replay after its last published frame): the file is demuxed from its start, not seeked, to count them
    resume_after_ms: Annotated[float, Field(ge=0)] | None = None
    queue_size: Annotated[int, Field(ge=1)] = 8  # REPLAY read-ahead bound (backpressure beyond it)
    open_timeout_ms: Annotated[int, Field(gt=0)] = 5000  # cameras: CAP_PROP_OPEN_TIMEOUT_MSEC
    read_timeout_ms: Annotated[int, Field(gt=0)] = 5000  # cameras: CAP_PROP_READ_TIMEOUT_MSEC
    # cameras: no frame for this long → reopen (watchdog); also bounds close()
    stall_seconds: Annotated[float, Field(gt=0)] = 10.0
    backoff_initial_seconds: Annotated[float, Field(gt=0)] = 0.5  # cameras: first wait before a reopen
    backoff_max_seconds: Annotated[float, Field(gt=0)] = 10.0  # cameras: the longest wait between reopens
    rtsp_transport: Literal["tcp", "udp", "udp_multicast", "http", "https"] = "tcp"  # FFmpeg's values
    # FFmpeg decoder threads: 1 spends the least CPU per frame (~16 % less than 2 at 720p H.264 here),
    # which matters when decoding shares the cores with inference; 0 lets FFmpeg choose
    decode_threads: Annotated[int, Field(ge=0)] = 1
    # pyav: decode only the frames the sampling keeps (see _pyav); opencv: decode every frame (cheaper per
    # frame decoded); auto: pyav with `fps` or `keyframes`, opencv otherwise
    decoder: Literal["auto", "pyav", "opencv"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> SourceSettings:
        if self.end_ms is not None and self.end_ms <= self.start_ms:
            raise ValueError("`end_ms` must be after `start_ms`")
        # The watchdog exists for native calls that overrun their own timeouts, so it must wait longer than they do.
        if self.stall_seconds * 1000 <= max(self.open_timeout_ms, self.read_timeout_ms):
            raise ValueError("`stall_seconds` must exceed `open_timeout_ms` and `read_timeout_ms`")
        if self.backoff_initial_seconds > self.backoff_max_seconds:
            raise ValueError("`backoff_initial_seconds` must not exceed `backoff_max_seconds`")
        return self

    @property
    def reconnect_policy(self) -> RetryPolicy:
        """Cameras reopen under it until closed: no deadline, since a camera may come back at any time."""
        return RetryPolicy(self.backoff_initial_seconds, self.backoff_max_seconds)
