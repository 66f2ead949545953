"""The figures the reliability tests measure, printed at the end of the run (a pytest plugin: `-p tests.figures`).

A test takes the `figures` fixture and records what it measured, e.g.
`figures["kafka link cut: duplicates"] = 3`; docs/reliability.md quotes them.
"""

from __future__ import annotations

import pytest

MEASURED: dict[str, object] = {}


@pytest.fixture(scope="session")
def figures() -> dict[str, object]:
    return MEASURED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not MEASURED:
        return
    terminalreporter.section("reliability figures")
    for name, value in sorted(MEASURED.items()):
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        terminalreporter.write_line(f"{name}: {shown}")
