"""qsd's key=value option syntax."""

import pytest

from qmpd import keyval
from qmpd.errors import QMPError


def test_nested_keys_and_escaped_commas():
    assert keyval.parse("driver=luks,file.driver=file,file.filename=a,,b.img") == {
        "driver": "luks", "file": {"driver": "file", "filename": "a,b.img"}}


def test_implied_key_and_lists():
    assert keyval.parse("secret,id=s0,data=x", implied_key="qom-type") == {
        "qom-type": "secret", "id": "s0", "data": "x"}
    assert keyval.parse("opts.0.a=1,opts.1.a=2") == {"opts": [{"a": "1"}, {"a": "2"}]}


def test_json_form():
    assert keyval.parse('{"driver": "file", "filename": "x"}') == {"driver": "file", "filename": "x"}


@pytest.mark.parametrize("text", ["noequals", "a=1,a.b=2", "=x", "a..b=1"])
def test_malformed_options_are_refused(text):
    with pytest.raises(keyval.KeyvalError):
        keyval.parse(text)


def test_coerce_converts_strings_the_schema_wants_as_scalars():
    def validate(args):
        for key, kind in (("n", "integer"), ("ro", "boolean")):
            if isinstance(args[key], str):
                raise QMPError.generic(f"Invalid parameter type for '{key}', expected: {kind}")
    assert keyval.coerce({"n": "42", "ro": "on"}, validate) == {"n": 42, "ro": True}
    with pytest.raises(QMPError):
        keyval.coerce({"n": "forty", "ro": "on"}, validate)
