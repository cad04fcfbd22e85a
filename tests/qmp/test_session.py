"""The sans-IO session: QEMU's dispatch checks, in QEMU's order, without sockets."""

import pytest

from qmpd.errors import QMPError
from qmpd.qmp.session import Call, Session


class FakeCommand:
    def __init__(self, allow_oob=False):
        self.allow_oob = allow_oob


class FakeCommands:
    def __init__(self):
        self.commands = {"qmp_capabilities": FakeCommand(), "query-version": FakeCommand(),
                         "oob-ok": FakeCommand(allow_oob=True)}

    def validate_arguments(self, name, arguments):
        if name == "query-version" and arguments:
            raise QMPError.generic(f"Parameter '{next(iter(arguments))}' is unexpected")


def dispatch_all(session, data: bytes):
    return [session.dispatch(item) for item in session.receive(data)]


def negotiated(oob=False):
    session = Session(FakeCommands())
    session.negotiate(["oob"] if oob else [])
    return session


def test_commands_before_negotiation_are_refused():
    session = Session(FakeCommands())
    [reply] = dispatch_all(session, b'{"execute": "query-version", "id": 3}')
    assert reply == {"id": 3, "error": {"class": "CommandNotFound",
                                        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    [reply] = dispatch_all(session, b'{"execute": "nonexistent"}')
    assert reply["error"]["desc"] == "Expecting capabilities negotiation with 'qmp_capabilities'"


def test_negotiation_then_commands_work():
    session = Session(FakeCommands())
    [call] = dispatch_all(session, b'{"execute": "qmp_capabilities"}')
    assert isinstance(call, Call) and call.command == "qmp_capabilities"
    session.negotiate([])
    [call] = dispatch_all(session, b'{"execute": "query-version", "id": "x"}')
    assert isinstance(call, Call) and call.id == "x" and call.arguments == {}
    with pytest.raises(QMPError) as info:
        session.negotiate([])
    assert info.value.error_class == "CommandNotFound"
    assert info.value.desc == "Capabilities negotiation is already complete, command ignored"


@pytest.mark.parametrize("data, desc, has_id", [
    (b'[]', "QMP input must be a JSON object", False),
    (b'42\n', "QMP input must be a JSON object", False),
    (b'{"execute": 3, "id": 1}', "QMP input member 'execute' must be a string", True),
    (b'{"execute": "query-version", "arguments": [], "id": 1}',
     "QMP input member 'arguments' must be an object", True),
    (b'{"execute": "query-version", "arguments": null}',
     "QMP input member 'arguments' must be an object", False),
    (b'{"id": 5}', "QMP input lacks member 'execute'", True),
    (b'{"execute": "query-version", "bogus": 1}', "QMP input member 'bogus' is unexpected", False),
    # QEMU visits members in QDict order: 'x' comes before 'arguments'.
    (b'{"execute": "q", "id": 1, "x": 2, "arguments": 3}', "QMP input member 'x' is unexpected", True),
    (b'{"exec-oob": "query-version"}', "QMP input member 'exec-oob' is unexpected", False),
    (b'{"execute": "nope"}', "The command nope has not been found", False),
    (b'{"execute": "query-version", "arguments": {"a": 1}}', "Parameter 'a' is unexpected", False),
])
def test_envelope_errors_have_qemu_texts(data, desc, has_id):
    [reply] = dispatch_all(negotiated(), data)
    assert reply["error"]["desc"] == desc
    assert ("id" in reply) == has_id


def test_oob_rules_when_enabled():
    session = negotiated(oob=True)
    items = session.receive(b'{"exec-oob": "query-version", "id": 1}{"exec-oob": "oob-ok"}'
                            b'{"execute": "x", "exec-oob": "y"}{"exec-oob": 3}')
    assert [i.oob for i in items] == [True, True, False, True]
    replies = [session.dispatch(i) for i in items]
    assert replies[0]["error"]["desc"] == "The command query-version does not support OOB"
    assert isinstance(replies[1], Call) and replies[1].oob
    assert replies[2]["error"]["desc"] == "QMP input member 'execute' clashes with 'exec-oob'"
    assert replies[3]["error"]["desc"] == "QMP input member 'exec-oob' must be a string"


@pytest.mark.parametrize("request_id", [1, -2.5, "s", None, True, [1, {"a": 2}], {"k": []}])
def test_any_id_is_echoed_in_replies_and_errors(request_id):
    import json
    session = negotiated()
    data = json.dumps({"execute": "query-version", "id": request_id}).encode()
    [call] = dispatch_all(session, data)
    assert Session.reply({"x": 1}, call) == {"return": {"x": 1}, "id": request_id}
    data = json.dumps({"execute": "nope", "id": request_id}).encode()
    [reply] = dispatch_all(session, data)
    assert reply["id"] == request_id


def test_parse_error_costs_one_reply_and_later_messages_still_work():
    session = negotiated()
    replies = dispatch_all(session, b'{"execute": ]}\n{"execute": "query-version"}')
    assert any(isinstance(r, dict) and r["error"]["desc"].startswith("JSON parse error")
               for r in replies)
    assert isinstance(replies[-1], Call) and replies[-1].command == "query-version"


def test_reply_without_id_has_no_id_member():
    [call] = dispatch_all(negotiated(), b'{"execute": "query-version"}')
    assert Session.reply(None, call) == {"return": {}}
