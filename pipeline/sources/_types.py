"""The values every source kind shares: its settings, its counters and its error.

Kept apart from `pipeline.sources` (which re-exports them) so the source
modules can import them without an import cycle through the factory.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.errors import FramelabelError

RTSP_TRANSPORTS = frozenset({"tcp", "udp", "udp_multicast", "http", "https"})  # FFmpeg's rtsp_transport values


class SourceError(FramelabelError):
    """A source cannot deliver: missing, unreadable or not a video; the message names the path and the problem."""


@dataclass
class SourceStats:
    """Counters a source updates as it reads, for the runner's progress and summary."""

    read: int = 0  # frames read from the source
    dropped: int = 0  # LIVE only: frames overwritten before anyone took them (freshness policy)
    errors: int = 0  # corrupt frames / undecodable images skipped, failed opens
    reconnects: int = 0  # LIVE only
    last_error: str | None = None


@dataclass(frozen=True)
class SourceSettings:
    """Per-source options; the YAML config maps onto these fields."""

    realtime: bool = False  # files: pace frames at the file's own fps
    loop: bool = False  # files: start again at the end
    start_ms: float = 0.0  # files: start offset
    end_ms: float | None = None  # files: end offset (exclusive)
    queue_size: int = 8  # REPLAY read-ahead bound (backpressure beyond it)
    open_timeout_ms: int = 5000  # cameras: CAP_PROP_OPEN_TIMEOUT_MSEC
    read_timeout_ms: int = 5000  # cameras: CAP_PROP_READ_TIMEOUT_MSEC
    stall_seconds: float = 10.0  # cameras: no frame for this long → reopen (watchdog); also bounds close()
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 10.0
    rtsp_transport: str = "tcp"
    # FFmpeg decoder threads: 1 spends the least CPU per frame (~16 % less than 2 at 720p H.264 here),
    # which matters when decoding shares the cores with inference; 0 lets FFmpeg choose
    decode_threads: int = 1

    def __post_init__(self) -> None:
        if self.start_ms < 0:
            raise ValueError(f"start_ms must be >= 0, got {self.start_ms}")
        if self.end_ms is not None and self.end_ms <= self.start_ms:
            raise ValueError(f"end_ms must be after start_ms ({self.start_ms}), got {self.end_ms}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        if self.open_timeout_ms <= 0 or self.read_timeout_ms <= 0:
            raise ValueError("open_timeout_ms and read_timeout_ms must be > 0")
        # The watchdog exists for native calls that overrun their own timeouts, so it must wait longer than they do.
        if self.stall_seconds * 1000 <= max(self.open_timeout_ms, self.read_timeout_ms):
            raise ValueError(
                f"stall_seconds ({self.stall_seconds}) must exceed open_timeout_ms and read_timeout_ms "
                f"({self.open_timeout_ms}, {self.read_timeout_ms})"
            )
        if not 0 < self.backoff_initial_seconds <= self.backoff_max_seconds:
            raise ValueError("backoff_initial_seconds must be > 0 and <= backoff_max_seconds")
        if self.decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 0, got {self.decode_threads}")
        if self.rtsp_transport not in RTSP_TRANSPORTS:
            raise ValueError(f"rtsp_transport must be one of {sorted(RTSP_TRANSPORTS)}, got {self.rtsp_transport!r}")
