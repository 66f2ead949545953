"""Reader threads and their hand-off to asyncio, shared by every source kind.

OpenCV's calls block, so each source reads in threads of its own and hands
frames to the asyncio consumer through a `FrameHandoff` bounded by the
source's delivery policy:

- REPLAY: up to `queue_size` frames wait; a full hand-off makes the reader wait (backpressure).
- LIVE: one slot; a new frame replaces one nobody took, and the drop is counted.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Self

import numpy as np
from cv2.typing import MatLike

from pipeline.frames import DeliveryPolicy, Frame, FrameInfo
from pipeline.sampler import SamplingSettings
from pipeline.sources._types import SourceSettings, SourceStats

log = logging.getLogger("framelabel.sources")


class FrameHandoff:
    """Frames from reader threads to one asyncio consumer; `put` is for threads, `get` for the event loop."""

    def __init__(self, policy: DeliveryPolicy, queue_size: int, stats: SourceStats) -> None:
        self._loop = asyncio.get_running_loop()
        self._keep_newest = policy is DeliveryPolicy.LIVE
        self._capacity = 1 if self._keep_newest else queue_size
        self._stats = stats
        self._frames: deque[Frame] = deque()
        self._changed = threading.Condition()  # guards the fields below; readers wait on it for room
        self._ended = False  # the reader is done: the consumer takes what is left, then ends
        self._error: Exception | None = None  # raised to the consumer once the frames before it are taken
        self._stop = threading.Event()  # close(): frames still waiting are discarded
        self._frame_waiting = asyncio.Event()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def wait_until_stopped(self, timeout: float) -> bool:
        """Block a reader for `timeout` seconds, or less if the source is closed; True if it was."""
        return self._stop.wait(timeout)

    def put(self, frame: Frame) -> bool:
        """Hand a frame over, waiting for room under REPLAY; False if the source was closed meanwhile."""
        with self._changed:
            if self._keep_newest and self._frames:
                self._frames.popleft()
                self._stats.dropped += 1
            while len(self._frames) >= self._capacity and not self.stopped:
                self._changed.wait()
            if self.stopped:
                return False
            self._frames.append(frame)
        self._wake_consumer()
        return True

    def end(self, error: Exception | None = None) -> None:
        """The reader is done; the consumer raises `error`, if any, after taking the frames already handed over."""
        with self._changed:
            if not self._ended:
                self._ended, self._error = True, error
        self._wake_consumer()

    def stop(self) -> None:
        """Discard waiting frames and wake everyone: readers see `stopped`, the consumer ends."""
        with self._changed:
            self._stop.set()
            self._frames.clear()
            self._changed.notify_all()
        self._wake_consumer()

    async def get(self) -> Frame | None:
        """The next frame, or None at the end of the stream; raises the reader's error."""
        while True:
            self._frame_waiting.clear()  # before looking, so a frame put after the look still wakes us
            with self._changed:
                if self._frames:
                    frame = self._frames.popleft()
                    self._changed.notify_all()
                    return frame
                if self.stopped:
                    return None
                if self._ended:
                    if self._error is not None:
                        raise self._error
                    return None
            await self._frame_waiting.wait()

    def _wake_consumer(self) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._frame_waiting.set)


class ThreadedSource(abc.ABC):
    """`frames()` and `close()` for a source whose reading happens in named threads."""

    policy: DeliveryPolicy

    def __init__(self, source_id: str, settings: SourceSettings, sampling: SamplingSettings) -> None:
        self.source_id = source_id
        self.stats = SourceStats()
        self.settings = settings
        self.sampling = sampling
        self._handoff: FrameHandoff | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._shutdown: asyncio.Task[None] | None = None
        self._cpu_mark = threading.local()  # per reader thread: its CPU time when it handed over its last frame

    @property
    def total_frames(self) -> int | None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def frames(self) -> AsyncGenerator[Frame, None]:
        """Every frame the policy delivers; ends at the end of the stream or on close(); iterate once."""
        if self._handoff is not None:
            raise RuntimeError(f"source {self.source_id}: frames() can only be iterated once")
        if self._closed:
            return
        self._handoff = handoff = FrameHandoff(self.policy, self.settings.queue_size, self.stats)
        self._start(handoff)
        try:
            while (frame := await handoff.get()) is not None:
                yield frame
        finally:  # also when the consuming task is cancelled: no reader outlives its consumer
            await self.close()

    async def close(self) -> None:
        """Stop reading and join the reader threads; safe to call more than once, and from several tasks."""
        self._closed = True
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._stop_and_join(), name=f"source-{self.source_id}-close")
        await asyncio.shield(self._shutdown)  # a cancelled caller must not cut the joining short for the others

    async def _stop_and_join(self) -> None:
        if self._handoff is not None:
            self._handoff.stop()
        # A thread blocked in a native call can only finish it; stall_seconds exceeds the calls' own timeouts.
        deadline = time.monotonic() + self.settings.stall_seconds
        while self._threads:  # a thread may start another before it sees the stop, so pop until none is left
            thread = self._threads.pop(0)
            await asyncio.to_thread(thread.join, max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("source %s: thread %s is still blocked; leaving it behind", self.source_id, thread.name)

    @abc.abstractmethod
    def _start(self, handoff: FrameHandoff) -> None:
        """Start the reader thread(s) with `_start_thread`."""

    def _start_thread(self, role: str, body: Callable[[FrameHandoff], None], handoff: FrameHandoff) -> None:
        """Run `body` in a daemon thread named after the source; an exception ends the stream with that error."""

        def run() -> None:
            try:
                body(handoff)
            except Exception as exc:
                handoff.end(exc)

        thread = threading.Thread(target=run, name=f"source-{self.source_id}-{role}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _new_frame(
        self,
        pixels: MatLike,
        media_position_ms: float | None = None,
        index: int | None = None,
        file_name: str | None = None,
    ) -> Frame:
        """Stamp a frame just read: its index (by default the next one), now as its capture time, and what
        reading it cost."""
        cpu_now = time.thread_time()  # counts from the thread's start, so a thread's first frame includes opening
        decode_seconds = cpu_now - getattr(self._cpu_mark, "seconds", 0.0)
        self._cpu_mark.seconds = cpu_now
        info = FrameInfo(
            source_id=self.source_id,
            index=self.stats.read if index is None else index,  # by default, the count of frames read so far
            capture_time_ms=time.time_ns() // 1_000_000,
            captured_at=time.monotonic(),
            media_position_ms=media_position_ms,
            file_name=file_name,
            decode_seconds=decode_seconds,
        )
        self.stats.read += 1
        self.stats.streaming = True
        return Frame(info, np.asarray(pixels, dtype=np.uint8))  # OpenCV decodes 8-bit BGR: no copy
