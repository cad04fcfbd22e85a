"""dev.py: no package index named anywhere, pip from the machine when the
venv has none, and the unit tests under the other Pythons in CI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dev():
    spec = importlib.util.spec_from_file_location("dev_under_test", CHECKOUT / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder:
    """Stands in for subprocess.run; answers the sysconfig question."""

    def __init__(self, returncode=0):
        self.commands: list[list[str]] = []
        self.returncode = returncode

    def __call__(self, cmd, *args, **kwargs):
        cmd = [str(c) for c in cmd]
        self.commands.append(cmd)
        stdout = "/venv/lib/python3.x/site-packages\n" if "sysconfig" in " ".join(cmd) else ""
        return subprocess.CompletedProcess(cmd, self.returncode, stdout=stdout, stderr="")


def test_no_package_index_is_named(dev):
    source = (CHECKOUT / "dev.py").read_text()
    assert "://" not in source and "pypi" not in source.lower()
    assert "urllib" not in source


def _without_ensurepip(dev, monkeypatch, pip_version):
    monkeypatch.setattr(dev, "_quiet", lambda cmd: subprocess.CompletedProcess(cmd, 1))
    monkeypatch.setattr(dev, "_machine_pip_version", lambda: pip_version)
    recorder = Recorder()
    monkeypatch.setattr(dev.subprocess, "run", recorder)
    return recorder


def test_a_venv_without_pip_gets_it_from_the_machines_pip(dev, monkeypatch):
    recorder = _without_ensurepip(dev, monkeypatch, (23, 0))
    dev._bootstrap_pip(Path("/venv/bin/python"), Path("/venv"))
    [cmd] = recorder.commands
    assert cmd[:5] == [sys.executable, "-m", "pip", "--python", "/venv/bin/python"]
    assert cmd[5] == "install" and cmd[-1] == "pip"
    assert not any(arg.startswith(("--index", "-i", "--extra-index")) for arg in cmd)


def test_an_older_machine_pip_installs_pip_with_target(dev, monkeypatch):
    recorder = _without_ensurepip(dev, monkeypatch, (21, 3))
    dev._bootstrap_pip(Path("/venv/bin/python"), Path("/venv"))
    query, cmd = recorder.commands
    assert query[0] == "/venv/bin/python" and "sysconfig" in query[-1]
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
    assert cmd[cmd.index("--target") + 1] == "/venv/lib/python3.x/site-packages"
    assert cmd[-1] == "pip"


def test_without_any_pip_one_line_names_the_debian_package(dev, monkeypatch):
    recorder = _without_ensurepip(dev, monkeypatch, None)
    with pytest.raises(SystemExit) as stop:
        dev._bootstrap_pip(Path("/venv/bin/python"), Path("/venv"))
    message = str(stop.value.code)
    assert "\n" not in message and "python3-venv" in message and "apt install" in message
    assert recorder.commands == []


def test_reinstalls_only_when_pyproject_changes(dev, monkeypatch, tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    monkeypatch.setattr(dev, "ROOT", tmp_path)
    monkeypatch.setattr(dev, "_has_pip", lambda python: True)
    recorder = Recorder()
    monkeypatch.setattr(dev.subprocess, "run", recorder)
    assert dev.ensure_venv(venv, sys.executable) == venv / "bin" / "python"
    assert len(recorder.commands) == 1 and "-e" in recorder.commands[0]
    dev.ensure_venv(venv, sys.executable)
    assert len(recorder.commands) == 1
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'y'\n")
    dev.ensure_venv(venv, sys.executable)
    assert len(recorder.commands) == 2


def _script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def test_interpreters_are_found_on_path_or_under_pyenv_and_must_run(dev, monkeypatch, tmp_path):
    # On PATH a pyenv shim of a version not selected: it exists but fails.
    _script(tmp_path / "bin" / "python3.12", "echo 'pyenv: python3.12: command not found' >&2; exit 127")
    _script(tmp_path / "pyenv" / "versions" / "3.12.2" / "bin" / "python3", "echo 3.12")
    _script(tmp_path / "pyenv" / "versions" / "3.12.10" / "bin" / "python3", "echo 3.12")
    _script(tmp_path / "pyenv" / "versions" / "3.13.0" / "bin" / "python3", "echo 3.11")  # lies
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(dev, "PYENV_ROOTS", (tmp_path / "pyenv",))
    assert dev.find_interpreter((3, 12)) == str(tmp_path / "pyenv/versions/3.12.10/bin/python3")
    assert dev.find_interpreter((3, 13)) is None
    assert dev.find_interpreter((3, 11)) is None


@pytest.mark.parametrize("ci", ["true", ""])
def test_test_job_adds_the_other_pythons_in_ci(dev, monkeypatch, capsys, ci):
    monkeypatch.setenv("CI", ci)
    others = [v for v in dev.SUPPORTED if v != sys.version_info[:2]]
    present, missing = others[0], others[1:]
    monkeypatch.setattr(dev, "ensure_venv",
                        lambda venv=dev.VENV, interpreter=None: venv / "bin" / "python")
    monkeypatch.setattr(dev, "find_interpreter",
                        lambda version: "/usr/bin/python%d.%d" % version if version == present else None)
    recorder = Recorder()
    monkeypatch.setattr(dev.subprocess, "run", recorder)
    assert dev.main(["test", "-k", "stream"]) == 0
    main_run = next(c for c in recorder.commands if c[0] == str(dev.PYTHON))
    assert main_run[-2:] == ["-k", "stream"]
    extras = [c for c in recorder.commands if c[0] != str(dev.PYTHON)]
    out = capsys.readouterr().out
    if not ci:
        assert extras == [] and "skipping" not in out
        return
    [extra] = extras       # run beside the full suite, in a thread
    label = "%d.%d" % present
    assert extra[0] == str(dev.ROOT / f".venv-{label}" / "bin" / "python")
    assert extra[extra.index("-m", 2) + 1] == "not interop"
    assert "tests/qmp" in extra and "tests/schema" in extra and "-k" not in extra
    for version in missing:
        assert f"Python {'%d.%d' % version} not found on PATH or under pyenv; skipping it" in out
    assert f"unit tests under Python {label}: passed" in out
    assert f"unit tests under Python {label} run beside the full suite" in out
