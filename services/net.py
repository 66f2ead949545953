"""Checking a listening address before a server takes it."""

from __future__ import annotations

import socket


def probe_bind(host: str, port: int) -> int:
    """Bind `host:port` once and let go; the port it got (any free one for 0). OSError if it is taken.

    Servers check first because their own failures say too little, too late: gRPC logs a raw
    C-core line before raising, and Tansu panics while a readiness poll would reach whoever
    holds the port. The probe sets SO_REUSEADDR, so a port left in TIME_WAIT counts as free."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host.strip("[]"), port))
        return int(probe.getsockname()[1])
