"""Differential test: qmpd's argument checking against qemu-storage-daemon 7.2.

Generated (often malformed) arguments go to both; whenever qmpd rejects, QEMU
must reject with the very same text, and whenever qmpd accepts, QEMU must not
report a parameter error. qmpd's enums are subsets of QEMU's, so the
generator only produces values both know.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpd.errors import QMPError
from qmpd.schema import Schema
from tests.oracles import require
from tests.schema.qsd_client import QemuStorageDaemon
from tests.schema.schema_values import values_for

pytestmark = pytest.mark.interop

SCHEMA = Schema.load()
# Commands qsd 7.2 has, minus those whose success would end or change the session.
COMMANDS = sorted(set(SCHEMA.commands) - {"quit", "qmp_capabilities", "blockdev-amend"})
# The texts of QEMU's input visitor (semantic checks also say "Parameter ...").
VISITOR_ERROR = re.compile(r"^(Parameter '[^']*' (is missing|is unexpected|does not accept value "
                           r"'.*'|expects u?int(8|16|32|64)(_t)?)|Invalid parameter type for '.*)$")


@pytest.fixture(scope="module")
def qsd():
    daemon = QemuStorageDaemon(require("qemu-storage-daemon"))
    yield daemon
    daemon.close()


cases = st.sampled_from(COMMANDS).flatmap(
    lambda name: st.tuples(st.just(name), values_for(
        SCHEMA.commands[name].arg_type or SCHEMA._empty, mistakes=True)
        .filter(lambda v: isinstance(v, dict))))


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cases)
def test_same_verdict_and_text_as_qemu(qsd, case):
    command, arguments = case
    try:
        SCHEMA.validate_arguments(command, arguments)
        ours = None
    except QMPError as error:
        ours = error.desc
    if ours is None and command == "blockdev-reopen" and arguments.get("options") == []:
        return  # qemu-storage-daemon 7.2 aborts (SIGABRT) on an empty reopen list
    reply = qsd.execute(command, arguments)
    theirs = reply.get("error", {}).get("desc")
    if ours is not None:
        assert theirs == ours
    else:
        assert not VISITOR_ERROR.match(theirs or ""), theirs
