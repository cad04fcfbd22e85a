#!/usr/bin/env python3
"""Set up the checkout and run its main jobs; needs nothing but python3 (3.11+).

    python3 dev.py demo    # start qmpd, rotate a key through QMP, stop it
    python3 dev.py test    # the whole test suite (extra arguments go to pytest)
    python3 dev.py bench   # the benchmarks against qemu-storage-daemon

The first run creates .venv inside the checkout and installs qmpd into it
(editable, with the test dependencies); later runs reuse it and reinstall
only when pyproject.toml changed. Debian's python3 without python3-venv
has no ensurepip: then the venv is made without pip and pip is fetched
from the package index.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".qmpd-installed"


def _bootstrap_pip() -> None:
    """Install pip into a venv made without it, from a wheel off the index."""
    index = os.environ.get("QMPD_PYPI_JSON", "https://pypi.org/pypi/pip/json")
    with urllib.request.urlopen(index, timeout=60) as response:
        release = json.load(response)
    wheel = next(u for u in release["urls"] if u["filename"].endswith(".whl"))
    target = VENV / wheel["filename"]
    with urllib.request.urlopen(wheel["url"], timeout=120) as response:
        target.write_bytes(response.read())
    subprocess.run([str(PYTHON), f"{target}/pip", "install", "--quiet", str(target)], check=True)
    target.unlink()


def ensure_venv() -> None:
    if sys.version_info < (3, 11):
        sys.exit("qmpd needs Python 3.11 or newer")
    if not PYTHON.exists():
        print("dev.py: creating .venv", flush=True)
        try:
            venv.EnvBuilder(with_pip=True).create(VENV)
        except Exception:  # no ensurepip (Debian without python3-venv)
            venv.EnvBuilder(with_pip=False, clear=True).create(VENV)
            _bootstrap_pip()
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    print("dev.py: installing qmpd and its test dependencies into .venv", flush=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "bench"):
        print(__doc__)
        return 2
    ensure_venv()
    job, rest = argv[0], argv[1:]
    env = dict(os.environ)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if job == "demo":
        cmd = [str(PYTHON), str(ROOT / "examples" / "quickstart.py"), *rest]
    elif job == "test":
        cmd = [str(PYTHON), "-m", "pytest", "-p", "no:cacheprovider", *rest]
    else:
        cmd = [str(PYTHON), str(ROOT / "tests" / "benchmarks" / "run.py"), *rest]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
