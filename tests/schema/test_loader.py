"""Loading schema files: the bundled schema, and clear errors for broken ones."""

from __future__ import annotations

import json
import pathlib
import time

import pytest

from qmpd.schema import Schema, SchemaError
from qmpd.schema.model import ObjectType
from qmpd.schema.schema import bundled_schema_directory


def write(directory: pathlib.Path, name: str, content) -> None:
    text = content if isinstance(content, str) else json.dumps(content)
    (directory / name).write_text(text)


def load_error(tmp_path: pathlib.Path, *files: tuple[str, object]) -> str:
    for name, content in files:
        write(tmp_path, name, content)
    with pytest.raises(SchemaError) as caught:
        Schema.load(tmp_path)
    return str(caught.value)


def test_bundled_schema_loads_quickly():
    Schema.load()  # warm the imports and file cache
    start = time.perf_counter()
    schema = Schema.load()
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"loading took {elapsed * 1000:.0f} ms (budget 100 ms on an idle machine)"
    assert {"qmp_capabilities", "query-version", "query-commands", "query-qmp-schema", "quit",
            "object-add", "object-del", "blockdev-add", "blockdev-del", "blockdev-reopen",
            "blockdev-create", "blockdev-amend", "x-blockdev-amend", "query-named-block-nodes",
            "query-jobs", "job-pause", "job-resume", "job-cancel", "job-complete",
            "job-dismiss", "job-finalize", "block_resize", "nbd-server-start",
            "nbd-server-stop", "nbd-server-add", "nbd-server-remove", "block-export-add",
            "block-export-del", "query-block-exports"} == set(schema.commands)
    assert {"SHUTDOWN", "JOB_STATUS_CHANGE", "BLOCK_EXPORT_DELETED"} == set(schema.events)


def test_bundled_directory_is_the_source_schema_or_the_package():
    directory = bundled_schema_directory()
    assert (directory / "block-core.json").is_file()


def test_command_definitions():
    schema = Schema.load()
    add = schema.commands["blockdev-add"]
    assert add.boxed and add.arg_type.name == "BlockdevOptions" and add.ret_type is None
    amend = schema.commands["x-blockdev-amend"]
    assert amend.features == ["unstable"] and not amend.allow_oob
    assert schema.commands["blockdev-amend"].features == []
    version = schema.commands["query-version"]
    assert version.arg_type is None and version.ret_type.name == "VersionInfo"
    assert schema.commands["query-jobs"].ret_type.name == "[JobInfo]"
    assert not any(c.allow_oob for c in schema.commands.values())


def test_union_without_branch_gets_empty_variant():
    schema = Schema.load()
    amend = schema.types["BlockdevAmendOptions"]
    assert isinstance(amend, ObjectType)
    assert [v.case for v in amend.variants] == ["luks", "qcow2", "file", "raw"]
    assert amend.variant_for("file").all_members() == []
    assert amend.variant_for("raw").all_members() == []


def test_sample_schema_with_every_kind(tmp_path):
    write(tmp_path, "a.json", [
        {"enum": "Colour", "data": ["red", {"name": "x-blue", "features": ["unstable"]}]},
        {"struct": "Base", "data": {"kind": "Colour", "*n": "uint8"}},
        {"struct": "Red", "data": {"shade": "int"}},
        {"union": "Paint", "base": "Base", "discriminator": "kind", "data": {"red": "Red"}},
        {"alternate": "PaintOrName", "data": {"paint": "Paint", "name": "str", "none": "null"}},
        {"command": "paint", "data": {"what": "PaintOrName", "*more": ["Paint"]},
         "returns": "Red", "allow-oob": True, "features": ["deprecated"]},
        {"event": "PAINTED", "data": "Red"},
    ])
    schema = Schema.load(tmp_path)
    schema.validate_arguments("paint", {"what": {"kind": "red", "shade": 3}})
    schema.validate_arguments("paint", {"what": None, "more": [{"kind": "x-blue", "n": 255}]})
    from qmpd.errors import QMPError
    with pytest.raises(QMPError, match="Parameter 'n' expects uint8_t"):
        schema.validate_arguments("paint", {"what": "w", "more": [{"kind": "red", "shade": 1,
                                                                   "n": 256}]})
    with pytest.raises(QMPError, match="Parameter 'n' expects uint8_t"):
        schema.validate_arguments("paint", {"what": "w", "more": [{"kind": "red", "shade": 1,
                                                                   "n": -1}]})
    assert schema.commands["paint"].allow_oob
    entry = next(e for e in schema.introspect() if e["name"] == "paint")
    assert entry["allow-oob"] is True and entry["features"] == ["deprecated"]


@pytest.mark.parametrize("files,expected", [
    ([("a.json", "[{")], "a.json: not valid JSON"),
    ([("a.json", {"struct": "A"})], "a.json: a schema file must be a JSON array"),
    ([("a.json", [1])], "a.json: definition #0: a definition must be a JSON object"),
    ([("a.json", [{"data": {}}])], "a.json: definition #0: a definition needs exactly one of"),
    ([("a.json", [{"struct": "A", "enum": "B", "data": {}}])], "(found: struct, enum)"),
    ([("a.json", [{"struct": "A", "data": {}, "bogus": 1}])],
     "a.json: struct 'A' (definition #0): Additional properties are not allowed ('bogus'"),
    ([("a.json", [{"struct": "A", "data": {"Bad Name": "str"}}])], "a.json: struct 'A'"),
    ([("a.json", [{"struct": "lower", "data": {}}])], "a.json: struct 'lower'"),
    ([("a.json", [{"enum": "E", "data": []}])], "a.json: enum 'E'"),
    ([("a.json", [{"command": "c", "data": {"x": "int"}, "boxed": "yes"}])], "a.json: command 'c'"),
    ([("a.json", '[{"struct": "A", "data": {"x": "int", "x": "str"}}]')], "duplicate key 'x'"),
])
def test_malformed_files(tmp_path, files, expected):
    assert expected in load_error(tmp_path, *files)


@pytest.mark.parametrize("definitions,expected", [
    ([{"struct": "A", "data": {"x": "Nope"}}], "a.json: struct 'A', member 'x': unknown type 'Nope'"),
    ([{"struct": "A", "data": {"*x": ["Nope"]}}], "a.json: struct 'A', member 'x': unknown type 'Nope'"),
    ([{"command": "c", "data": {"arg": "Missing"}}], "a.json: command 'c', member 'arg': unknown type"),
    ([{"command": "c", "returns": "Missing"}], "a.json: command 'c': unknown type 'Missing'"),
    ([{"event": "E", "data": "Missing"}], "a.json: event 'E': unknown data type 'Missing'"),
    ([{"struct": "A", "base": "Missing", "data": {}}], "a.json: struct 'A': unknown base type"),
    ([{"enum": "E", "data": ["a"]}, {"struct": "A", "base": "E", "data": {}}],
     "a.json: struct 'A': base type 'E' must be a struct or union"),
    ([{"struct": "A", "base": "B", "data": {}}, {"struct": "B", "base": "A", "data": {}}],
     "base types form a cycle"),
    ([{"struct": "B", "data": {"x": "int"}}, {"struct": "A", "base": "B", "data": {"x": "str"}}],
     "a.json: struct 'A', member 'x': member also defined by a base type"),
    ([{"enum": "E", "data": ["a", "a"]}], "a.json: enum 'E': value 'a' listed twice"),
    ([{"struct": "A", "data": {}}, {"enum": "A", "data": ["x"]}], "a.json: enum 'A': type name already"),
    ([{"struct": "str", "data": {}}], "struct 'str'"),
    ([{"command": "c"}, {"command": "c"}], "a.json: command 'c': already defined in a.json"),
    ([{"union": "U", "base": {"k": "str"}, "discriminator": "k", "data": {}}],
     "a.json: union 'U': discriminator 'k' must be a required member of an enum type"),
    ([{"union": "U", "base": {"x": "int"}, "discriminator": "k", "data": {}}],
     "a.json: union 'U': discriminator 'k' is not a member of the base"),
    ([{"enum": "K", "data": ["a"]}, {"struct": "S", "data": {}},
      {"union": "U", "base": {"k": "K"}, "discriminator": "k", "data": {"b": "S"}}],
     "a.json: union 'U': branch 'b' is not a value of enum 'K'"),
    ([{"enum": "K", "data": ["a"]},
      {"union": "U", "base": {"k": "K"}, "discriminator": "k", "data": {"a": "K"}}],
     "a.json: union 'U', member 'a': branch type 'K' must be a struct or union"),
    ([{"enum": "K", "data": ["a"]}, {"struct": "S", "data": {"k": "int"}},
      {"union": "U", "base": {"k": "K"}, "discriminator": "k", "data": {"a": "S"}}],
     "a.json: union 'U', member 'k': branch 'a' redefines a member of the base"),
    ([{"alternate": "Alt", "data": {"a": "int", "b": "number"}}],
     "a.json: alternate 'Alt', member 'b': branches 'a' and 'b' both take a JSON number"),
    ([{"alternate": "Alt", "data": {"a": "int", "b": "any"}}],
     "a.json: alternate 'Alt', member 'b': type 'any' cannot be a branch"),
    ([{"command": "c", "data": {"x": "int"}, "boxed": True}], "a.json: command 'c': 'boxed' needs"),
    ([{"enum": "K", "data": ["a"]},
      {"union": "U", "base": {"k": "K"}, "discriminator": "k", "data": {}},
      {"command": "c", "data": "U"}], "a.json: command 'c': a union as 'data' needs 'boxed'"),
])
def test_resolution_errors(tmp_path, definitions, expected):
    assert expected in load_error(tmp_path, ("a.json", definitions))


def test_error_names_the_right_file(tmp_path):
    write(tmp_path, "a.json", [{"struct": "A", "data": {"b": "B"}}])
    message = load_error(tmp_path, ("b.json", [{"struct": "B", "data": {"x": "Gone"}}]))
    assert message.startswith("b.json: struct 'B', member 'x'")


def test_cross_file_references_resolve(tmp_path):
    write(tmp_path, "a.json", [{"command": "c", "data": {"b": "B"}}])
    write(tmp_path, "b.json", [{"struct": "B", "data": {"x": "int"}}])
    Schema.load(tmp_path).validate_arguments("c", {"b": {"x": 1}})


def test_empty_or_missing_directory(tmp_path):
    with pytest.raises(SchemaError, match="no schema files"):
        Schema.load(tmp_path)
    with pytest.raises(SchemaError, match="not found"):
        Schema.load(tmp_path / "nope")
