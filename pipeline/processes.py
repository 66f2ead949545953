"""Stopping a child process the same way everywhere: ask, wait, then insist."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def stop_process(process: subprocess.Popen[Any], timeout_s: float, sig: int = signal.SIGTERM) -> None:
    """Send `sig`, and SIGKILL if the process has not exited within `timeout_s`; returns once it is reaped."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
