"""ruff (lint and format) over the daemon's code, examples and dev.py (rules
in ruff.toml), and mypy over qmpd/ (its [tool.mypy] in pyproject.toml)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.oracles import IN_CI

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> Path:
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        found = shutil.which("ruff")
        if found is None:
            pytest.fail("ruff is not installed (it is a test dependency)")
        ruff = Path(found)
    return ruff


def test_ruff_finds_nothing():
    done = subprocess.run([str(_ruff()), "check", "qmpd", "examples", "dev.py"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-1000:]


def test_ruff_format_changes_nothing():
    """The code is in ruff format's style (run ``ruff format qmpd examples dev.py``)."""
    done = subprocess.run([str(_ruff()), "format", "--check", "qmpd", "examples", "dev.py"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-1000:]


def test_mypy_finds_nothing(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        message = "mypy is not installed (it is a test dependency)"
        if IN_CI:
            pytest.fail(message + " (CI=true: a missing checker is a failure)")
        pytest.skip(message)
    # The files and options are pyproject.toml's; the cache stays out of the tree.
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "pyproject.toml",
                           "--cache-dir", str(tmp_path / "mypy_cache")], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-1000:]
