"""The pytest plugin installed with qmpd, used as its users use it.

This file imports nothing from qmpd: the fixtures come from the plugin that
``pip install`` registered (entry point ``pytest11``). Tests of ``async def``
fixtures run in a separate pytest (this suite runs async tests under trio,
qemu.qmp needs asyncio), in a directory of their own as a user's project.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def test_qmp_fixture_talks_to_a_fresh_daemon(qmpd, qmp) -> None:
    version = qmp.cmd("query-version")
    assert version["package"].startswith("qmpd ")
    assert qmp.cmd("query-block-exports") == []
    assert os.path.dirname(qmpd.socket_path) == str(qmpd.workdir)
    assert len(qmpd.socket_path) < 108


@pytest.mark.qmpd_args("--object", "secret,id=s0,data=pw")
def test_qmpd_args_marker(qmp) -> None:
    reply = qmp.cmd_obj({"execute": "object-add",
                         "arguments": {"qom-type": "secret", "id": "s0", "data": "x"}})
    assert "duplicate property 's0'" in reply["error"]["desc"]


@pytest.fixture
def disk_in_tmp(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return path


def test_factory_starts_several_daemons(qmpd_factory, disk_in_tmp) -> None:
    a = qmpd_factory("--blockdev", f"driver=file,node-name=a,filename={disk_in_tmp},"
                                   "read-only=on")
    b = qmpd_factory(pretty=True)
    assert a.socket_path != b.socket_path and a.pid != b.pid
    qmp = a.connect_sync()
    try:
        assert {n["node-name"] for n in qmp.cmd("query-named-block-nodes")} == {"a"}
    finally:
        qmp.close()
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(b.socket_path)
    s.settimeout(10)
    greeting = b""
    while not greeting.endswith(b"\r\n}\r\n"):
        greeting += s.recv(4096)
    assert greeting.startswith(b"{\r\n    \"QMP\": {")
    s.close()
    assert a.stop() == 0 and not a.running()
    assert not os.path.exists(a.workdir)   # its directory is gone, its log kept
    assert isinstance(a.log(), str)


# -- as a user's project: a pytest of its own -------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    """The example test of README's section on the plugin, as a user would copy it."""
    text = README.read_text()
    section = text[text.index("## Testing against qmpd: the pytest plugin"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


USER_TESTS = '''
import os
import pytest

async def test_events_of_a_job(qmp_client, qmpd):
    from qemu.qmp import EventListener
    listener = EventListener(("JOB_STATUS_CHANGE",))
    with qmp_client.listen(listener):
        await qmp_client.execute("blockdev-create", {"job-id": "j0", "options": {
            "driver": "file", "filename": os.path.join(str(qmpd.workdir), "new.img"),
            "size": 1 << 20}})
        while (await listener.get())["data"]["status"] != "concluded":
            pass

def test_record_pid(qmpd):
    with open(os.environ["PIDS_FILE"], "a") as f:
        f.write(f"{qmpd.pid}\\n")

def test_failure_shows_the_log(qmpd):
    with open(os.environ["PIDS_FILE"], "a") as f:
        f.write(f"{qmpd.pid}\\n")
    assert False, "on purpose"

@pytest.mark.qmpd_args("--blockdev", "driver=file,node-name=x,filename=/nonexistent/x.img")
def test_startup_failure_is_reported(qmp):
    pass

def test_crash_is_reported(qmpd):
    import signal
    os.kill(qmpd.pid, signal.SIGKILL)
    qmpd.process.wait()

def test_sync_test_may_not_use_the_async_client(qmp_client):
    pass
'''


def test_plugin_in_a_users_project(tmp_path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\nqmpd_args = --log-level=info\n")
    (tmp_path / "test_readme.py").write_text(readme_example())
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    pids = tmp_path / "pids"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PIDS_FILE"] = str(pids)
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v",
                          "test_readme.py", "test_user.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    text = out.stdout + out.stderr
    summary = text.strip().splitlines()[-1]
    # the crash test passes its call and errors at teardown
    # (under heavy load the startup failure may also error at teardown: 3 or 4 errors)
    assert re.search(r"1 failed, 5 passed, [34] errors", summary), text
    for name in ("test_daemon_answers", "test_no_exports_yet"):   # README's example
        assert f"test_readme.py::{name} PASSED" in text, text
    for name in ("test_events_of_a_job", "test_record_pid"):
        assert f"test_user.py::{name} PASSED" in text, text
    # a failing test's report carries the daemon's log
    assert re.search(r"qmpd log \(.* call\)", text), text
    assert "QMP monitor on" in text
    assert "Could not open '/nonexistent/x.img'" in text
    assert re.search(r"exited with -9 during the test", text), text
    assert "qmp_client is an asyncio qemu.qmp.QMPClient" in text
    # every daemon was stopped
    for pid in pids.read_text().split():
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue            # gone
        assert b"qmpd" not in cmdline, (pid, cmdline)   # (the number may be reused)
