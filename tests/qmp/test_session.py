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


class BuggyCommands(FakeCommands):
    def validate_arguments(self, name, arguments):
        if name == "query-version" and arguments:
            raise AssertionError(f"validators disagree on {arguments['secret']}")


def test_a_bug_in_argument_checking_costs_one_reply_not_the_session(caplog):
    session = Session(BuggyCommands())
    session.negotiate([])
    with caplog.at_level("ERROR", logger="qmpd.session"):
        replies = dispatch_all(session, b'{"execute": "query-version", "id": 7,'
                                        b' "arguments": {"secret": "hunter2"}}'
                                        b'{"execute": "query-version", "id": 8}')
    assert replies[0] == {"id": 7, "error": {"class": "GenericError", "desc": (
        "The arguments of command 'query-version' could not be validated "
        "(an internal error in qmpd, see its log)")}}
    assert isinstance(replies[1], Call) and replies[1].id == 8
    assert "AssertionError at " in caplog.text and "hunter2" not in caplog.text


class _SchemaOnlyDaemon:
    """What a Connection asks of its daemon, with the real schema and two commands."""

    def __init__(self):
        from types import SimpleNamespace

        from qmpd.schema import Schema
        self.schema = Schema.load()
        self.limits = SimpleNamespace(max_queued_bytes=1 << 20, max_message_bytes=1 << 20)
        self.connections = set()

    def greeting(self):
        return {"QMP": {"version": {}, "capabilities": ["oob"]}}

    async def execute(self, call, session, connection=None):
        if call.command == "qmp_capabilities":
            session.negotiate(call.arguments.get("enable", []))
            return Session.reply(None, call)
        return Session.reply({"qemu": {"major": 7, "minor": 2, "micro": 0}}, call)


async def test_validators_that_disagree_leave_the_connection_serving(monkeypatch):
    """Over a stream, with the real schema: the forced disagreement is
    answered, and the next command on the same connection still runs."""
    import json

    import trio
    import trio.testing

    import qmpd.schema.schema as schema_module
    from qmpd.qmp.server import Connection

    monkeypatch.setattr(schema_module, "first_error", lambda typ, value: None)
    client, server = trio.testing.memory_stream_pair()
    received = b""

    async def reply() -> dict:
        nonlocal received
        while b"\r\n" not in received:
            received += await client.receive_some()
        line, received = received.split(b"\r\n", 1)
        return json.loads(line)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(Connection(_SchemaOnlyDaemon(), server, 1).run)
        with trio.fail_after(10):
            assert "QMP" in await reply()
            await client.send_all(b'{"execute": "qmp_capabilities"}\n')
            assert await reply() == {"return": {}}
            await client.send_all(b'{"execute": "query-version", "arguments": {"x": 1}, "id": 1}\n')
            assert await reply() == {"id": 1, "error": {"class": "GenericError", "desc": (
                "The arguments of command 'query-version' could not be validated "
                "(an internal error in qmpd, see its log)")}}
            await client.send_all(b'{"execute": "query-version", "id": 2}\n')
            answer = await reply()
            assert answer["id"] == 2 and "qemu" in answer["return"]
        await client.aclose()
