"""Reliability suite: fast by default, soak sizes with ``--soak`` (tests/conftest.py).

``--soak`` raises the counts of every test here (messages fuzzed,
SIGKILLs, sessions, commands) and runs the tests marked ``soak``.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import qmpd_daemon, shared_qmpd_daemon  # noqa: F401 - fixtures


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--soak"))


@pytest.fixture
def scale(soak: bool):
    """``scale(fast, soak_count)``: the count for this run."""
    return lambda fast, slow: slow if soak else fast


_FIGURES: list[tuple[str, str]] = []


@pytest.fixture
def figures():
    """``figures(label, value)``: a measured figure, listed at the end of the run."""
    return lambda label, value: _FIGURES.append((label, str(value)))


def pytest_terminal_summary(terminalreporter) -> None:
    if _FIGURES:
        terminalreporter.section("reliability figures")
        for label, value in _FIGURES:
            terminalreporter.write_line(f"{label}: {value}")
