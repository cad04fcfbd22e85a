"""Properties over generated arguments: only QMPError escapes, and the compiled
JSON Schema accepts exactly what the QEMU-order walk accepts."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpd.errors import QMPError
from qmpd.schema import Schema
from qmpd.schema.input_visitor import first_error
from tests.schema.schema_values import ANY_JSON, NAMES, values_for

SCHEMA = Schema.load()
COMMANDS = sorted(SCHEMA.commands)


def _arguments_for(name: str) -> st.SearchStrategy:
    arg_type = SCHEMA.commands[name].arg_type or SCHEMA._empty
    return values_for(arg_type, mistakes=True).filter(lambda v: isinstance(v, dict))


commands_and_arguments = st.sampled_from(COMMANDS).flatmap(
    lambda name: st.tuples(st.just(name), st.one_of(
        _arguments_for(name), st.dictionaries(NAMES, ANY_JSON, max_size=4))))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands_and_arguments)
def test_only_qmp_errors_escape(case):
    command, arguments = case
    try:
        SCHEMA.validate_arguments(command, arguments)
    except QMPError as error:
        assert error.error_class == "GenericError"
        assert error.desc.startswith(("Parameter '", "Invalid parameter type for '"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands_and_arguments)
def test_json_schema_and_visitor_agree(case):
    command, arguments = case
    check = SCHEMA._arguments[command]
    assert check.validator.is_valid(arguments) == (first_error(check.type, arguments) is None)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(COMMANDS).flatmap(
    lambda name: st.tuples(st.just(name), values_for(SCHEMA.commands[name].arg_type
                                                     or SCHEMA._empty, mistakes=False))))
def test_well_formed_arguments_pass(case):
    command, arguments = case
    SCHEMA.validate_arguments(command, arguments)
