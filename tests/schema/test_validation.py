"""Argument checking: QEMU 7.2's error texts, as qemu-storage-daemon 7.2 replied
to the same requests (recorded by hand; test_interop_qsd.py compares live)."""

from __future__ import annotations

import pytest

from qmpd.errors import QMPError
from qmpd.schema import Schema

AMEND = {"job-id": "j", "node-name": "n"}

CASES = [
    # top level: missing, unexpected, types
    ("query-version", {"x": 1}, "Parameter 'x' is unexpected"),
    ("query-version", {"x": 1, "y": 2, "z": 3}, "Parameter 'z' is unexpected"),
    ("job-pause", None, "Parameter 'id' is missing"),
    ("job-pause", {}, "Parameter 'id' is missing"),
    ("job-pause", {"id": 1}, "Invalid parameter type for 'id', expected: string"),
    ("job-pause", {"id": None}, "Invalid parameter type for 'id', expected: string"),
    ("job-pause", {"id": "a", "b": 1}, "Parameter 'b' is unexpected"),
    ("job-pause", {"id": "a", **{k: 1 for k in "bcdefghij"}}, "Parameter 'b' is unexpected"),
    ("job-pause", {"id": "a", "node-name": 1, "driver": 2, "filename": 3},
     "Parameter 'driver' is unexpected"),
    ("query-named-block-nodes", {"flat": "yes"},
     "Invalid parameter type for 'flat', expected: boolean"),
    # boxed union: discriminator first, then the branch
    ("blockdev-add", {}, "Parameter 'driver' is missing"),
    ("blockdev-add", {"driver": "bogus"}, "Parameter 'driver' does not accept value 'bogus'"),
    ("blockdev-add", {"driver": 1}, "Invalid parameter type for 'driver', expected: string"),
    ("blockdev-add", {"driver": "luks"}, "Parameter 'file' is missing"),
    # alternates: bare member name and the alternate's type name
    ("blockdev-add", {"driver": "luks", "file": 1},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "backing": 1},
     "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": 3},
     "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": "bad"},
     "Parameter 'overlap-check' does not accept value 'bad'"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": {"template": 1}},
     "Invalid parameter type for 'overlap-check.template', expected: string"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": {"bogus": 1}},
     "Parameter 'overlap-check.bogus' is unexpected"),
    ("blockdev-add", {"driver": "luks", "file": {"driver": "file"}},
     "Parameter 'file.filename' is missing"),
    ("blockdev-add", {"driver": "luks", "file": {"driver": "file", "filename": "x", "bogus": 1}},
     "Parameter 'file.bogus' is unexpected"),
    # enum values: bare name; enum given a non-string: full name
    ("blockdev-add", {"driver": "luks", "file": {"driver": "file", "filename": "x", "aio": "bad"}},
     "Parameter 'aio' does not accept value 'bad'"),
    ("blockdev-add", {"driver": "file", "filename": "x", "aio": None},
     "Invalid parameter type for 'aio', expected: string"),
    ("blockdev-add", {"driver": "luks",
                      "file": {"driver": "file", "filename": "x", "aio-max-batch": 1.0}},
     "Invalid parameter type for 'file.aio-max-batch', expected: integer"),
    ("blockdev-add", {"driver": "luks", "cache": {"direct": 1}, "file": "x"},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    # a member visited earlier wins over an unexpected member of a later struct
    ("blockdev-add", {"driver": "luks", "cache": {"foo": 1}, "file": "x", "node-name": 3},
     "Invalid parameter type for 'node-name', expected: string"),
    ("blockdev-add", {"driver": "file", "filename": "x", "read-only": 1,
                      "cache": {"direct": True, "x": 1}},
     "Parameter 'cache.x' is unexpected"),
    ("blockdev-add", {"driver": "file", "filename": "x", "cache": []},
     "Invalid parameter type for 'cache', expected: object"),
    ("blockdev-add", {"driver": "luks", "file": {"driver": "file", "filename": "x"},
                      "bogus": 1, "key-secret": 5},
     "Invalid parameter type for 'key-secret', expected: string"),
    ("blockdev-add", {"driver": "luks", "file": {"driver": "file", "filename": "x"},
                      "zzz": 1, "aaa": 2, "mmm": 3},
     "Parameter 'mmm' is unexpected"),
    # members of another branch are unexpected
    ("blockdev-add", {"driver": "qcow2", "file": "x",
                      "encrypt": {"format": "luks", "key-secret": "s", "state": "active"}},
     "Parameter 'encrypt.state' is unexpected"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "encrypt": {"format": "aes", "key-secret": 3}},
     "Invalid parameter type for 'encrypt.key-secret', expected: string"),
    # lists
    ("blockdev-reopen", {"options": [{"driver": "file"}]},
     "Parameter 'options[0].filename' is missing"),
    ("blockdev-reopen", {"options": [{"driver": "file", "filename": "a"}, {"driver": "luks"}]},
     "Parameter 'options[1].file' is missing"),
    ("blockdev-reopen", {"options": [1]},
     "Invalid parameter type for 'options[0]', expected: object"),
    ("blockdev-reopen", {"options": {}}, "Invalid parameter type for 'options', expected: array"),
    ("blockdev-reopen", {"options": [{"driver": "qcow2",
                                      "file": {"driver": "file", "filename": "a", "locking": "x"}}]},
     "Parameter 'locking' does not accept value 'x'"),
    ("blockdev-reopen", {"options": [{"driver": "qcow2",
                                      "file": {"driver": "file", "filename": "a", "locking": 1}}]},
     "Invalid parameter type for 'options[0].file.locking', expected: string"),
    ("blockdev-reopen", {"options": [{"driver": "qcow2",
                                      "file": {"driver": "file", "filename": "a", "bogus": 1}}]},
     "Parameter 'options[0].file.bogus' is unexpected"),
    ("blockdev-reopen", {"options": [{"driver": "qcow2", "file": 3}]},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-reopen", {"options": [{"driver": "qcow2", "file": {"driver": "file", "filename": "a"},
                                      "backing": {"driver": "file"}}]},
     "Parameter 'options[0].backing.filename' is missing"),
    ("qmp_capabilities", {"enable": ["bad"]}, "Parameter 'null' does not accept value 'bad'"),
    ("qmp_capabilities", {"enable": [1]}, "Invalid parameter type for 'enable[0]', expected: string"),
    ("qmp_capabilities", {"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
    # nested unions of the amend command
    ("x-blockdev-amend", {**AMEND, "options": {}}, "Parameter 'options.driver' is missing"),
    ("x-blockdev-amend", {**AMEND, "options": {"driver": "luks"}},
     "Parameter 'options.state' is missing"),
    ("x-blockdev-amend", {**AMEND, "options": {"driver": "luks", "state": 1}},
     "Invalid parameter type for 'options.state', expected: string"),
    ("x-blockdev-amend", {**AMEND, "options": {"driver": "luks", "state": "bogus"}},
     "Parameter 'state' does not accept value 'bogus'"),
    ("x-blockdev-amend", {**AMEND, "options": {"driver": "luks", "state": "active", "keyslot": "1"}},
     "Invalid parameter type for 'options.keyslot', expected: integer"),
    ("x-blockdev-amend", {**AMEND, "options": {"driver": "luks", "state": "active",
                                               "keyslot": 9223372036854775808}},
     "Invalid parameter type for 'options.keyslot', expected: integer"),
    ("x-blockdev-amend", {**AMEND, "options": {"driver": "luks", "state": "active",
                                               "keyslot": 99999999999999999999}},
     "Invalid parameter type for 'options.keyslot', expected: integer"),
    ("x-blockdev-amend", {**AMEND, "options": {"driver": "qcow2", "encrypt": {
        "format": "luks", "state": "active", "keyslot": "1"}}},
     "Invalid parameter type for 'options.encrypt.keyslot', expected: integer"),
    ("x-blockdev-amend", {**AMEND, "options": {"driver": "qcow2", "encrypt": {
        "format": "qcow", "state": "active"}}},
     "Parameter 'options.encrypt.state' is unexpected"),
    ("x-blockdev-amend", {**AMEND, "options": {"driver": "file", "state": "active"}},
     "Parameter 'options.state' is unexpected"),
    ("x-blockdev-amend", {"job-id": "j", "options": {"driver": "luks"}},
     "Parameter 'node-name' is missing"),
    ("x-blockdev-amend", {"options": {"driver": "luks"}, "node-name": "n"},
     "Parameter 'job-id' is missing"),
    ("x-blockdev-amend", {**AMEND, "options": {"driver": "luks", "state": "active", "bogus": 1},
                          "force": "no"},
     "Parameter 'options.bogus' is unexpected"),
    ("x-blockdev-amend", {**AMEND, "options": {"driver": "luks", "state": "active"}, "bogus": 1,
                          "force": "no"},
     "Invalid parameter type for 'force', expected: boolean"),
    ("blockdev-amend", {**AMEND, "options": {"driver": "luks", "state": "active", "iter-time": 1.5}},
     "Invalid parameter type for 'options.iter-time', expected: integer"),
    # size / uint64: negative int64 accepted, the rest "expects uint64"
    ("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": "x",
                                                    "size": 18446744073709551616}},
     "Parameter 'options.size' expects uint64"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": "x", "size": 1.5}},
     "Parameter 'options.size' expects uint64"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": "x", "size": "1"}},
     "Parameter 'options.size' expects uint64"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2", "file": "x", "size": 1,
                                                    "refcount-bits": 1.5}},
     "Invalid parameter type for 'options.refcount-bits', expected: integer"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "luks", "file": 1, "size": 1}},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "luks", "file": None, "size": 1}},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "luks", "file": "f", "size": 1,
                                                    "cipher-alg": "x"}},
     "Parameter 'cipher-alg' does not accept value 'x'"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "luks", "file": "f", "size": 1,
                                                    "cipher-alg": 3}},
     "Invalid parameter type for 'options.cipher-alg', expected: string"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "luks", "size": 1,
                                                    "file": {"driver": "file", "filename": 3}}},
     "Invalid parameter type for 'options.file.filename', expected: string"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2", "file": "f", "size": 1,
                                                    "encrypt": {}}},
     "Parameter 'options.encrypt.format' is missing"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2", "file": "f", "size": 1,
                                                    "encrypt": "x"}},
     "Invalid parameter type for 'options.encrypt', expected: object"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2", "file": "f", "size": 1,
                                                    "encrypt": {"format": 7}}},
     "Invalid parameter type for 'options.encrypt.format', expected: string"),
    # object-add
    ("object-add", {"qom-type": "secret", "id": "s", "format": "hex"},
     "Parameter 'format' does not accept value 'hex'"),
    ("object-add", {"qom-type": "secret", "id": "s", "data": "x", "bogus": 1},
     "Parameter 'bogus' is unexpected"),
    ("object-add", {"qom-type": "secret"}, "Parameter 'id' is missing"),
    ("object-add", {"id": "s"}, "Parameter 'qom-type' is missing"),
    ("object-add", {"qom-type": "nope", "id": "s"}, "Parameter 'qom-type' does not accept value 'nope'"),
    ("object-add", {"qom-type": "secret", "id": "s", "format": 1},
     "Invalid parameter type for 'format', expected: string"),
]


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load()


@pytest.mark.parametrize("command,arguments,expected", CASES)
def test_qemu_error_text(schema, command, arguments, expected):
    with pytest.raises(QMPError) as caught:
        schema.validate_arguments(command, arguments)
    assert caught.value.error_class == "GenericError"
    assert caught.value.desc == expected


VALID = [
    ("query-version", None),
    ("query-version", {}),
    ("qmp_capabilities", {"enable": ["oob"]}),
    ("blockdev-add", {"driver": "luks", "node-name": "l0", "key-secret": "s0",
                      "file": {"driver": "file", "filename": "/x.img", "locking": "auto",
                               "x-check-cache-dropped": False}}),
    ("blockdev-add", {"driver": "qcow2", "file": "f0", "backing": None,
                      "overlap-check": {"template": "all", "main-header": True},
                      "encrypt": {"format": "luks", "key-secret": "s0"}}),
    ("blockdev-add", {"driver": "qcow2", "file": "f0", "backing": "b0", "overlap-check": "none"}),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": "x", "size": -1}}),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": "x",
                                                    "size": 18446744073709551615}}),
    ("blockdev-create", {"job-id": "j", "options": {
        "driver": "qcow2", "file": "f", "size": 1 << 20, "cluster-size": 65536,
        "encrypt": {"format": "luks", "key-secret": "s", "iter-time": 10,
                    "cipher-alg": "aes-256", "hash-alg": "sha256"}}}),
    ("x-blockdev-amend", {**AMEND, "options": {"driver": "luks", "state": "inactive", "keyslot": 1},
                          "force": True}),
    ("blockdev-amend", {**AMEND, "options": {"driver": "qcow2", "encrypt": {
        "format": "luks", "state": "active", "new-secret": "s1", "iter-time": 10}}}),
    ("object-add", {"qom-type": "secret", "id": "s0", "data": "cGFzcw==", "format": "base64"}),
    ("object-add", {"qom-type": "secret", "id": "s0", "loaded": True}),
    ("blockdev-reopen", {"options": []}),
]


@pytest.mark.parametrize("command,arguments", VALID)
def test_valid_arguments_pass(schema, command, arguments):
    schema.validate_arguments(command, arguments)


def test_unknown_command_is_command_not_found(schema):
    with pytest.raises(QMPError) as caught:
        schema.validate_arguments("no-such-command", {})
    assert caught.value.error_class == "CommandNotFound"
    assert caught.value.desc == "The command no-such-command has not been found"


def test_bool_is_not_an_integer(schema):
    with pytest.raises(QMPError, match="expected: integer"):
        schema.validate_arguments("blockdev-amend", {**AMEND, "options": {
            "driver": "luks", "state": "active", "keyslot": True}})


def test_events_are_checked(schema):
    schema.validate_event("JOB_STATUS_CHANGE", {"id": "j", "status": "concluded"})
    schema.validate_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    with pytest.raises(QMPError, match="Parameter 'status' does not accept value 'done'"):
        schema.validate_event("JOB_STATUS_CHANGE", {"id": "j", "status": "done"})
    with pytest.raises(QMPError, match="Parameter 'guest' is missing"):
        schema.validate_event("SHUTDOWN", {"reason": "host-signal"})


def test_error_texts_never_echo_string_values(schema):
    """QEMU's texts quote member names and enum values only, so a secret given
    as a string member never reaches an error text."""
    secret = "hunter2-secret"
    for options in ({"driver": "luks", "state": "active", "new-secret": secret, "keyslot": "x"},
                    {"driver": "luks", "state": "bogus", "new-secret": secret},
                    {"driver": "luks", "state": "active", "old-secret": secret, "x": 1}):
        with pytest.raises(QMPError) as caught:
            schema.validate_arguments("blockdev-amend", {**AMEND, "options": options})
        assert secret not in caught.value.desc


NOT_VALIDATED = ("The arguments of command '{}' could not be validated "
                 "(an internal error in qmpd, see its log)")


def test_validators_that_disagree_are_a_logged_bug_not_the_clients_error(schema, monkeypatch,
                                                                        caplog):
    # Force a disagreement: jsonschema refuses, the QEMU-order walk finds nothing.
    import qmpd.schema.schema as schema_module
    monkeypatch.setattr(schema_module, "first_error", lambda typ, value: None)
    secret = "hunter2-secret"
    arguments = {**AMEND, "options": {"driver": "luks", "state": "active", "new-secret": secret,
                                      "bogus": secret}}
    with caplog.at_level("ERROR", logger="qmpd.schema"):
        with pytest.raises(QMPError) as caught:
            schema.validate_arguments("blockdev-amend", arguments)
    assert caught.value.error_class == "GenericError"
    assert caught.value.desc == NOT_VALIDATED.format("blockdev-amend")
    [record] = caplog.records
    logged = record.getMessage()
    assert "blockdev-amend" in logged and "ValidatorsDisagree at " in logged
    assert "schema.py" in logged  # the place, not the message
    assert secret not in logged and "BlockdevAmend" not in logged
    # Valid input takes the fast way and never reaches the walk.
    schema.validate_arguments("query-version", {})


def test_a_failing_validator_is_reported_as_such(schema, monkeypatch, caplog):
    import qmpd.schema.schema as schema_module

    def broken(typ, value):
        raise KeyError("s3cret")
    monkeypatch.setattr(schema_module, "first_error", broken)
    with caplog.at_level("ERROR", logger="qmpd.schema"):
        with pytest.raises(QMPError) as caught:
            schema.validate_arguments("job-pause", {"id": 1})
    assert caught.value.desc == NOT_VALIDATED.format("job-pause")
    assert "KeyError at " in caplog.text and "s3cret" not in caplog.text


def test_integer_ranges_come_from_the_model():
    from qmpd.schema.compiler import compile_type
    from qmpd.schema.input_visitor import InputVisitor, InvalidInput
    from qmpd.schema.model import INTEGER_RANGES, BuiltinType
    for name, integers in INTEGER_RANGES.items():
        typ = BuiltinType(name)
        assert compile_type(typ)["minimum"] == integers.low
        assert compile_type(typ)["maximum"] == integers.high
        for value in (integers.low, integers.high):
            InputVisitor().visit(typ, "v", value)
        for value in (integers.low - 1, integers.high + 1):
            with pytest.raises(InvalidInput):
                InputVisitor().visit(typ, "v", value)


def test_arguments_too_deep_for_the_validators_are_answered(schema):
    # jsonschema recurses; 400 nested luks nodes exhaust Python's stack. QEMU
    # would take them; qmpd answers instead of dropping the connection.
    options = {"driver": "file", "filename": "/x.img"}
    for _ in range(400):
        options = {"driver": "luks", "key-secret": "s", "file": options}
    with pytest.raises(QMPError) as caught:
        schema.validate_arguments("blockdev-add", options)
    assert caught.value.desc == NOT_VALIDATED.format("blockdev-add")
