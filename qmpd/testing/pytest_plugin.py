"""pytest fixtures for integration tests against a real qmpd (registered as ``pytest11``).

Fixtures
--------
``qmpd``
    A running daemon (:class:`qmpd.testing.QmpdProcess`) on a private socket
    in its own temporary directory: ``qmpd.socket_path``, ``qmpd.log()``,
    ``qmpd.pid``. Arguments for it: ``@pytest.mark.qmpd_args("--object", ...)``.
``qmp``
    A connected, negotiated ``qemu.qmp.legacy.QEMUMonitorProtocol`` to ``qmpd``.
``qmp_client``
    A connected ``qemu.qmp.QMPClient`` for ``async def`` tests. With
    pytest-asyncio installed it is a pytest-asyncio fixture (mark the test
    ``asyncio`` or use asyncio_mode=auto); without it, this plugin runs
    ``async def`` tests that use ``qmp_client`` on asyncio itself.
``qmpd_factory``
    ``start(*args, pretty=False, env=None) -> QmpdProcess``, for tests that
    need several daemons or other arguments per call.

Every daemon a test started is stopped at teardown with SIGTERM; one that
needs SIGKILL, or that exited with an error (a crash during the test, a
failed shutdown), fails the teardown with its log. When a test fails, each daemon's log is
added to the report as a section ``qmpd log (...)``.

Options: ``--qmpd-command "CMD ARGS"`` or the ini key ``qmpd_command`` (default
``python -m qmpd`` of the running Python; also ``$QMPD_COMMAND``), and the ini
key ``qmpd_args`` (arguments added to every daemon, e.g. ``--log-level=info``).
"""

from __future__ import annotations

import asyncio
import inspect
import shlex
import signal
from collections.abc import Callable, Iterator

import pytest

from qmpd.testing import QmpdProcess, StartupError, default_command

_DAEMONS = pytest.StashKey[list]()

try:  # pragma: no cover - depends on what is installed
    import pytest_asyncio  # type: ignore[import-not-found, unused-ignore]
except ImportError:
    pytest_asyncio = None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qmpd", "qmpd daemon fixtures")
    group.addoption(
        "--qmpd-command",
        default=None,
        help="command that starts the daemon (default: python -m qmpd)",
    )
    parser.addini(
        "qmpd_command", "command that starts the daemon for the qmpd fixtures", default=""
    )
    parser.addini(
        "qmpd_args",
        "arguments added to every daemon the qmpd fixtures start",
        type="args",
        default=[],
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "qmpd_args(*args): daemon arguments for the qmpd fixture")


def _command(config: pytest.Config) -> list[str]:
    text = config.getoption("--qmpd-command") or config.getini("qmpd_command")
    return shlex.split(text) if text else default_command()


@pytest.fixture
def qmpd_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., QmpdProcess]]:
    """``start(*args, pretty=False, env=None) -> QmpdProcess``; all stopped at teardown."""
    config = request.config
    daemons = request.node.stash.setdefault(_DAEMONS, [])
    mine: list[QmpdProcess] = []

    def start(
        *args: str,
        pretty: bool = False,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> QmpdProcess:
        daemon = QmpdProcess(
            [*config.getini("qmpd_args"), *args],
            command=command or _command(config),
            pretty=pretty,
            env=env,
        )
        daemons.append(daemon)
        mine.append(daemon)
        try:
            return daemon.start()
        except StartupError as exc:
            failed_to_start.add(id(daemon))
            pytest.fail(str(exc), pytrace=False)

    failed_to_start: set[int] = set()
    yield start
    problems = []
    for daemon in mine:
        if id(daemon) in failed_to_start:
            daemon.stop()
            continue
        exited_before = daemon.process is not None and daemon.process.poll() is not None
        code = daemon.stop()
        if daemon.killed:
            problems.append(f"{daemon.describe()} ignored SIGTERM and was killed")
        elif code not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
            when = "during the test" if exited_before else "when stopped"
            problems.append(f"{daemon.describe()} exited with {code} {when}")
    if problems:
        logs = "\n".join(f"--- {d.describe()} ---\n{d.log()}" for d in mine)
        pytest.fail("; ".join(problems) + "\n" + logs, pytrace=False)


@pytest.fixture
def qmpd(qmpd_factory: Callable[..., QmpdProcess], request: pytest.FixtureRequest) -> QmpdProcess:
    """A running daemon on a private socket (arguments: ``@pytest.mark.qmpd_args``)."""
    marker = request.node.get_closest_marker("qmpd_args")
    return qmpd_factory(*(marker.args if marker else ()))


@pytest.fixture
def qmp(qmpd: QmpdProcess) -> Iterator:
    """A connected, negotiated qemu.qmp.legacy.QEMUMonitorProtocol to ``qmpd``."""
    client = qmpd.connect_sync()
    try:
        yield client
    finally:
        client.close()


if pytest_asyncio is not None:  # pragma: no cover - depends on what is installed

    @pytest_asyncio.fixture
    async def qmp_client(qmpd: QmpdProcess):
        """A connected qemu.qmp.QMPClient to ``qmpd`` (pytest-asyncio's loop)."""
        client = await qmpd.connect()
        try:
            yield client
        finally:
            await client.disconnect()
else:

    class _PendingClient:
        """Stands in for the client until the test's own loop runs (see below)."""

        def __init__(self, daemon: QmpdProcess) -> None:
            self.daemon = daemon

    @pytest.fixture
    def qmp_client(qmpd: QmpdProcess, request: pytest.FixtureRequest) -> _PendingClient:
        """A connected qemu.qmp.QMPClient to ``qmpd``, for ``async def`` tests."""
        if (
            not inspect.iscoroutinefunction(getattr(request.node, "obj", None))
            or request.node.get_closest_marker("trio") is not None
        ):
            pytest.fail(
                "qmp_client is an asyncio qemu.qmp.QMPClient for 'async def' tests "
                "run on asyncio; use the qmp fixture (sync) or "
                "qmpd.connect_sync() instead",
                pytrace=False,
            )
        return _PendingClient(qmpd)

    @pytest.hookimpl(tryfirst=True)
    def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
        """Run an ``async def`` test that uses qmp_client on asyncio, its client connected
        in that loop (nothing else here runs asyncio tests)."""
        if not inspect.iscoroutinefunction(pyfuncitem.obj):
            return None
        pending = pyfuncitem.funcargs.get("qmp_client")
        if not isinstance(pending, _PendingClient):
            return None
        names = pyfuncitem._fixtureinfo.argnames
        kwargs = {name: pyfuncitem.funcargs[name] for name in names}
        asyncio.run(_run_with_client(pyfuncitem.obj, kwargs, pending.daemon))
        return True

    async def _run_with_client(test, kwargs: dict, daemon: QmpdProcess) -> None:
        client = await daemon.connect()
        try:
            await test(**{**kwargs, "qmp_client": client})
        finally:
            await client.disconnect()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for daemon in item.stash.get(_DAEMONS, []):
        report.sections.append(
            (f"qmpd log ({daemon.describe()}, {report.when})", daemon.log() or "(empty)")
        )
