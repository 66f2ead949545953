"""One retry policy for every loop that waits for something to come back.

Camera reconnects, the wait for an unavailable annotator and the publisher's
re-sends all back off the same way: a first delay that grows by `multiplier`
up to `cap_s`, each delay scaled by a random factor in [1 - jitter, 1] so that
sources that failed together do not retry in step, and an optional deadline.
A policy without a deadline retries until its owner is stopped; the owner says
so in its docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

SAY_EVERY_S = 5.0


@dataclass(frozen=True)
class RetryPolicy:
    first_s: float
    cap_s: float
    multiplier: float = 2.0
    jitter: float = 0.5  # the share of each delay that is random
    deadline_s: float | None = None  # measured from the first failure; None: no deadline

    def delay(self, failures: int) -> float:
        """The wait after `failures` failures in a row (1 = the first)."""
        step = min(self.cap_s, self.first_s * self.multiplier ** min(max(failures - 1, 0), 64))
        return step * random.uniform(1.0 - self.jitter, 1.0)  # noqa: S311 - jitter, not crypto

    def start(self) -> Attempts:
        return Attempts(self)


class Attempts:
    """One run of retries under a policy: how many failed so far, and whether to try again."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.failures = 0
        self._first_failure_at: float | None = None
        self.expired = False  # the next attempt would come after the deadline: time to give up

    def failed(self) -> float:
        """Count a failure; the delay before the next attempt (and whether it would pass the deadline, `expired`)."""
        now = time.monotonic()
        if self._first_failure_at is None:
            self._first_failure_at = now
        self.failures += 1
        delay = self.policy.delay(self.failures)
        deadline = self.policy.deadline_s
        self.expired = deadline is not None and now + delay - self._first_failure_at > deadline
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self._first_failure_at = None
        self.expired = False

    @property
    def failing_for_s(self) -> float:
        """Seconds since the first failure of this run (0 before any)."""
        return 0.0 if self._first_failure_at is None else time.monotonic() - self._first_failure_at


@contextlib.asynccontextmanager
async def saying_while_waiting(
    log: logging.Logger, what: str, within_s: float, every_s: float = SAY_EVERY_S
) -> AsyncIterator[None]:
    """Log "still waiting for WHAT (N s of M)" every few seconds until the block ends: a wait at start
    (for a broker, a service) is never silent, whether it ends in success or in an error."""
    started = time.monotonic()

    async def say() -> None:
        while True:
            await asyncio.sleep(every_s)
            log.info("still waiting for %s (%.0f s of %g)", what, time.monotonic() - started, within_s)

    saying = asyncio.create_task(say(), name=f"waiting for {what}")
    try:
        yield
    finally:
        saying.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await saying
