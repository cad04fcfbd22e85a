#!/usr/bin/env python3
"""Set up the checkout and run its main jobs; needs nothing but python3 (3.11+).

    python3 dev.py demo    # start qmpd, rotate a key through QMP, stop it
    python3 dev.py test    # the whole test suite (extra arguments go to pytest)
    python3 dev.py bench   # the benchmarks against qemu-storage-daemon

The first run creates .venv inside the checkout and installs qmpd into it
(editable, with the test dependencies); later runs reuse it and reinstall
only when pyproject.toml changed.  Packages come from whatever index pip is
configured to use on this machine; dev.py names none.  A python3 without
ensurepip (Debian's, without python3-venv) gets a venv without pip, and the
machine's own pip (python3 -m pip) installs pip into it; with neither,
dev.py says which Debian package to install.

With CI=true, `test` also runs the unit tests under every other Python of
3.11, 3.12 and 3.13 found on the machine (on PATH or under pyenv), each in
its own .venv-3.X, one after the other beside the full suite (which leaves
a core mostly idle); a version that is not there is skipped with a note.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP_NAME = ".qmpd-installed"

#: The versions CI tests on; the default python3 runs the full suite.
SUPPORTED = ((3, 11), (3, 12), (3, 13))
#: What CI runs under the other versions: fast, and no external tools needed.
UNIT_TESTS = [
    "tests/qmp",
    "tests/schema",
    "tests/crypto",
    "tests/jobs",
    "tests/block",
    "tests/test_keyval.py",
    "-m",
    "not interop",
]
PYENV_ROOTS = (Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")), Path("/root/.pyenv"))

NO_PIP = (
    "dev.py: {python} has neither ensurepip nor pip to set up {venv}; "
    "install Debian's python3-venv (apt install python3-venv) and run again"
)


def _quiet(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _has_pip(python: Path) -> bool:
    return _quiet([str(python), "-m", "pip", "--version"]).returncode == 0


def _machine_pip_version() -> tuple[int, ...] | None:
    """The version of the pip of the python3 running dev.py, None if it has none."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, text=True
    )
    m = re.match(r"pip (\d+)\.(\d+)", result.stdout) if result.returncode == 0 else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def _bootstrap_pip(python: Path, venv: Path) -> None:
    """Give a venv made without pip its own pip, from nothing but this machine.

    ensurepip (if the interpreter has it now) needs no download; otherwise
    the machine's pip installs pip into the venv, from the index pip is
    configured with: through ``--python`` (pip 22.3 and later) or
    ``--target`` the venv's site-packages.
    """
    if _quiet([str(python), "-m", "ensurepip", "--default-pip"]).returncode == 0:
        return
    version = _machine_pip_version()
    if version is None:
        sys.exit(NO_PIP.format(python=Path(sys.executable).name, venv=venv.name))
    print(
        f"dev.py: {venv.name} has no pip; installing it with {Path(sys.executable).name} -m pip",
        flush=True,
    )
    quiet = ["--quiet", "--disable-pip-version-check"]
    if version >= (22, 3):
        cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", *quiet, "pip"]
    else:
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        cmd = [sys.executable, "-m", "pip", "install", *quiet, "--target", site, "pip"]
    subprocess.run(cmd, check=True)


def ensure_venv(venv: Path = VENV, interpreter: str = sys.executable) -> Path:
    """Make `venv` with `interpreter` if needed, install qmpd[test]; its python."""
    python = venv / "bin" / "python"
    stamp = venv / STAMP_NAME
    if not python.exists():
        print(f"dev.py: creating {venv.name}", flush=True)
        made = subprocess.run(
            [interpreter, "-m", "venv", str(venv)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if made.returncode != 0:  # no ensurepip (Debian without python3-venv)
            subprocess.run(
                [interpreter, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True
            )
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return python
    if not _has_pip(python):
        _bootstrap_pip(python, venv)
    print(f"dev.py: installing qmpd and its test dependencies into {venv.name}", flush=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-e",
            f"{ROOT}[test]",
        ],
        check=True,
    )
    stamp.write_text(wanted)
    return python


def _version_of(interpreter: str) -> tuple[int, int] | None:
    """(major, minor) of an interpreter that runs; None for one that does not
    (a pyenv shim of a version that is installed but not selected fails)."""
    try:
        result = subprocess.run(
            [interpreter, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.fullmatch(r"(\d+)\.(\d+)\s*", result.stdout) if result.returncode == 0 else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_interpreter(version: tuple[int, int]) -> str | None:
    """python3.X on PATH, else the newest pyenv 3.X.*; only one that really runs."""
    name = "python%d.%d" % version
    candidates = [shutil.which(name)]
    for root in dict.fromkeys(PYENV_ROOTS):
        found = glob.glob(str(root / "versions" / ("%d.%d.*" % version) / "bin" / "python3"))
        found.sort(
            key=lambda p: [int(n) for n in re.findall(r"\d+", Path(p).parents[1].name)],
            reverse=True,
        )
        candidates += found
    for candidate in candidates:
        if candidate and _version_of(candidate) == version:
            return candidate
    return None


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _other_versions_runs(env: dict) -> list[tuple[str, list[str], dict]]:
    """The unit-test runs under each supported version other than this
    python3's, their venvs made (one after the other) before anything runs."""
    runs: list[tuple[str, list[str], dict]] = []
    for version in SUPPORTED:
        if version == sys.version_info[:2]:
            continue
        label = "%d.%d" % version
        interpreter = find_interpreter(version)
        if interpreter is None:
            print(
                f"dev.py: Python {label} not found on PATH or under pyenv; skipping it", flush=True
            )
            continue
        python = ensure_venv(ROOT / f".venv-{label}", interpreter)
        run_env = dict(env, PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}")
        runs.append(
            (
                label,
                [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q", *UNIT_TESTS],
                run_env,
            )
        )
    return runs


class _Background(threading.Thread):
    """The other versions' unit tests, one after the other, beside the full run.

    The full suite keeps about one of the machine's cores busy (its
    integration tests wait on daemons and tools), so the unit runs use the
    other one instead of adding their time after it; each run's output is
    kept and shown once the full suite has ended.
    """

    def __init__(self, runs: list[tuple[str, list[str], dict]]) -> None:
        super().__init__(daemon=True)
        self.runs = runs
        self.results: list[tuple[str, int, bytes]] = []

    def run(self) -> None:
        for label, cmd, run_env in self.runs:
            with tempfile.TemporaryFile() as output:
                code = subprocess.run(
                    cmd, cwd=ROOT, env=run_env, stdout=output, stderr=subprocess.STDOUT
                ).returncode
                output.seek(0)
                self.results.append((label, code, output.read()))

    def report(self) -> int:
        self.join()
        status = 0
        for label, code, output in self.results:
            print(
                f"dev.py: -- unit tests under Python {label}: "
                + ("passed" if code == 0 else f"FAILED ({code})"),
                flush=True,
            )
            sys.stdout.buffer.write(output)
            sys.stdout.flush()
            status = status or code
        return status


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "bench"):
        print(__doc__)
        return 2
    if sys.version_info < (3, 11):
        sys.exit("qmpd needs Python 3.11 or newer")
    python = ensure_venv()
    job, rest = argv[0], argv[1:]
    env = dict(os.environ)
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    if job == "demo":
        cmd = [str(python), str(ROOT / "examples" / "quickstart.py"), *rest]
    elif job == "test":
        cmd = [str(python), "-m", "pytest", "-p", "no:cacheprovider", *rest]
    else:
        cmd = [str(python), str(ROOT / "tests" / "benchmarks" / "run.py"), *rest]
    background = None
    if job == "test" and _in_ci():
        background = _Background(_other_versions_runs(env))
        if background.runs:
            labels = ", ".join(label for label, _, _ in background.runs)
            print(f"dev.py: unit tests under Python {labels} run beside the full suite", flush=True)
        background.start()
    status = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if background is not None:
        status = background.report() or status
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
