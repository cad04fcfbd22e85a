"""query-qmp-schema: shape, consistency, and agreement with QEMU 7.2's own."""

from __future__ import annotations

import pytest

from qmpd.schema import Schema
from tests.oracles import require
from tests.schema.qsd_client import QemuStorageDaemon


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load()


@pytest.fixture(scope="module")
def entries(schema) -> list[dict]:
    return schema.introspect()


def by_name(entries: list[dict]) -> dict[str, dict]:
    return {e["name"]: e for e in entries}


def referenced_names(entry: dict) -> list[str]:
    meta = entry["meta-type"]
    if meta in ("command",):
        return [entry["arg-type"], entry["ret-type"]]
    if meta == "event":
        return [entry["arg-type"]]
    if meta == "array":
        return [entry["element-type"]]
    if meta == "alternate":
        return [m["type"] for m in entry["members"]]
    if meta == "object":
        return [m["type"] for m in entry["members"]] + [v["type"] for v in entry.get("variants", [])]
    return []


def test_every_referenced_type_is_defined_once(entries):
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names))
    defined = set(names)
    for entry in entries:
        for name in referenced_names(entry):
            assert name in defined, f"{entry['name']} refers to undefined {name}"


def test_every_type_is_used(entries):
    used = {name for e in entries for name in referenced_names(e)}
    for entry in entries:
        if entry["meta-type"] not in ("command", "event"):
            assert entry["name"] in used


def test_commands_and_events_come_first_in_declaration_order(schema, entries):
    head = [e["name"] for e in entries if e["meta-type"] in ("command", "event")]
    assert entries[:len(head)] == [e for e in entries if e["meta-type"] in ("command", "event")]
    assert [n for n in head if n in schema.commands] == list(schema.commands)
    assert set(head) == set(schema.commands) | set(schema.events)


def test_masking_and_builtins(entries):
    names = by_name(entries)
    for entry in entries:
        meta = entry["meta-type"]
        if meta == "builtin":
            assert entry["name"] in ("str", "int", "number", "bool", "null", "any")
        elif meta == "array":
            assert entry["name"] == f"[{entry['element-type']}]"
        elif meta not in ("command", "event"):
            assert entry["name"].isdigit()
    assert names["int"] == {"name": "int", "meta-type": "builtin", "json-type": "int"}
    empty = names["query-version"]["arg-type"]
    assert names[empty] == {"name": empty, "meta-type": "object", "members": []}
    assert names["quit"]["ret-type"] == empty
    assert names["0"]["name"] == "0"  # numbering starts at 0
    # the size and uint32 members show as plain int, as QEMU shows them
    assert "uint32" not in names and "size" not in names


def test_command_entries(entries):
    names = by_name(entries)
    amend = names["x-blockdev-amend"]
    assert amend["features"] == ["unstable"] and "allow-oob" not in amend
    assert "features" not in names["blockdev-amend"]
    assert names["query-jobs"]["ret-type"].startswith("[")
    arg = names[names["blockdev-add"]["arg-type"]]
    assert arg["tag"] == "driver"
    assert [v["case"] for v in arg["variants"]] == ["file", "luks", "qcow2", "raw"]
    assert arg["members"][0] == {"name": "driver", "type": arg["members"][0]["type"]}
    assert arg["members"][1] == {"name": "node-name", "type": "str", "default": None}
    enum = names[arg["members"][0]["type"]]
    assert enum["values"] == ["file", "luks", "qcow2", "raw"]
    assert enum["members"] == [{"name": name} for name in ("file", "luks", "qcow2", "raw")]
    file_options = names[next(v["type"] for v in arg["variants"] if v["case"] == "file")]
    assert file_options["features"] == ["dynamic-auto-read-only"]
    assert file_options["members"][-1] == {"name": "x-check-cache-dropped", "type": "bool",
                                           "default": None, "features": ["unstable"]}


def test_introspection_validates_against_its_own_schema(schema, entries):
    """query-qmp-schema's reply is a valid [SchemaInfo]."""
    from qmpd.schema.compiler import compile_validator
    ret_type = schema.commands["query-qmp-schema"].ret_type
    assert compile_validator(ret_type).is_valid(entries)


def test_introspect_returns_a_copy(schema):
    schema.introspect()[0]["name"] = "changed"
    assert schema.introspect()[0]["name"] != "changed"


#: Features that mark qmpd's own extensions (members qsd 7.2 has not).
QMPD_EXTENSIONS = {"luks2", "detached-header"}


#: Members qsd 7.2 requires that an extension made optional: blockdev-create
#: luks takes no ``file`` with a detached ``header`` (QEMU 9.0 made it
#: optional too). Introspection shows the default; the input visitor still
#: gives 7.2's "Parameter 'options.file' is missing" without a header.
MADE_OPTIONAL = {("blockdev-create:arg-type.options(luks)", "file")}


def _qsd_members(members: list[dict]) -> list[dict]:
    return [m for m in members if not QMPD_EXTENSIONS & set(m.get("features", ()))]


def _has_default(member: dict, where: str) -> bool:
    """Whether qsd 7.2 would show a default, for a member of ours."""
    if (where, member["name"]) in MADE_OPTIONAL:
        assert "default" in member, where
        return False
    return "default" in member


def _same_shape(ours: dict, theirs: dict, o_name: str, t_name: str, seen: set, where: str) -> None:
    """Our type graph from o_name matches QEMU's from t_name; our enums and
    union branches may be subsets (qmpd offers fewer drivers and objects),
    and members marked with one of QMPD_EXTENSIONS are ours alone."""
    if (o_name, t_name) in seen:
        return
    seen.add((o_name, t_name))
    if o_name.startswith("["):
        assert t_name.startswith("["), where
        return _same_shape(ours, theirs, o_name[1:-1], t_name[1:-1], seen, where + "[]")
    o, t = ours[o_name], theirs[t_name]
    assert o["meta-type"] == t["meta-type"], where
    assert o.get("features") == t.get("features"), where
    meta = o["meta-type"]
    if meta == "builtin":
        assert o_name == t_name, where
    elif meta == "enum":
        assert [v for v in t["values"] if v in o["values"]] == o["values"], where
        t_members = {m["name"]: m for m in t["members"]}
        for m in o["members"]:
            assert m == t_members[m["name"]], where
    elif meta == "alternate":
        assert len(o["members"]) == len(t["members"]), where
        for om, tm in zip(o["members"], t["members"]):
            _same_shape(ours, theirs, om["type"], tm["type"], seen, where + "|")
    elif meta == "object":
        o_members = _qsd_members(o["members"])
        assert [(m["name"], _has_default(m, where), m.get("features")) for m in o_members] == \
               [(m["name"], "default" in m, m.get("features")) for m in t["members"]], where
        for om, tm in zip(o_members, t["members"], strict=True):
            _same_shape(ours, theirs, om["type"], tm["type"], seen, f"{where}.{om['name']}")
        assert o.get("tag") == t.get("tag"), where
        t_variants = {v["case"]: v["type"] for v in t.get("variants", [])}
        for v in o.get("variants", []):
            _same_shape(ours, theirs, v["type"], t_variants[v["case"]], seen,
                        f"{where}({v['case']})")
    else:
        for key in ("arg-type", "ret-type"):
            if key in o:
                _same_shape(ours, theirs, o[key], t[key], seen, f"{where}:{key}")
        assert o.get("allow-oob") == t.get("allow-oob"), where


@pytest.mark.interop
def test_same_shapes_as_qemu_storage_daemon(entries):
    binary = require("qemu-storage-daemon")
    qsd = QemuStorageDaemon(binary)
    try:
        theirs = by_name(qsd.execute("query-qmp-schema")["return"])
    finally:
        qsd.close()
    ours = by_name(entries)
    compared = 0
    for name, entry in ours.items():
        if entry["meta-type"] in ("command", "event") and name in theirs:
            _same_shape(ours, theirs, name, name, set(), name)
            compared += 1
    # qsd has neither SHUTDOWN nor the later blockdev-amend name
    assert compared == len([e for e in entries if e["meta-type"] in ("command", "event")]) - 2


def test_luks2_extension_is_marked(entries):
    """Every member qmpd adds for LUKS2 carries the luks2 feature, so that a
    client can tell qmpd's extension from QEMU's schema by introspection."""
    names = by_name(entries)
    wanted = {
        "QCryptoBlockAmendOptionsLUKS": ["pbkdf", "pbkdf-memory", "pbkdf-parallel"],
        "QCryptoBlockCreateOptionsLUKS": ["luks-version", "pbkdf", "pbkdf-memory",
                                          "pbkdf-parallel", "sector-size", "label"],
        "QCryptoBlockInfoLUKS": ["luks-version", "label", "sector-size"],
    }
    found = {}
    for entry in entries:
        if entry["meta-type"] != "object":
            continue
        for name, members in wanted.items():
            have = {m["name"]: m for m in entry["members"]}
            if set(members) <= set(have) and name not in found:
                found[name] = [have[m].get("features") for m in members]
    assert set(found) == set(wanted)
    for name, features in found.items():
        assert features == [["luks2"]] * len(wanted[name]), name
    pbkdf = [e for e in names.values() if e["meta-type"] == "enum"
             and e.get("values") == ["pbkdf2", "argon2i", "argon2id"]]
    assert pbkdf and pbkdf[0]["features"] == ["luks2"]


def test_detached_header_extension_is_marked(entries):
    """The detached LUKS header members (QEMU 9.0's, not qsd 7.2's) carry the
    detached-header feature, on blockdev-add and on blockdev-create."""
    names = by_name(entries)
    blockdev_add = names[names["blockdev-add"]["arg-type"]]
    luks_add = names[next(v["type"] for v in blockdev_add["variants"] if v["case"] == "luks")]
    create = names[names["blockdev-create"]["arg-type"]]
    options = names[next(m["type"] for m in create["members"] if m["name"] == "options")]
    luks_create = names[next(v["type"] for v in options["variants"] if v["case"] == "luks")]
    for obj in (luks_add, luks_create):
        header = [m for m in obj["members"] if m["name"] == "header"]
        assert len(header) == 1
        assert header[0]["features"] == ["detached-header"] and "default" in header[0]
        assert names[header[0]["type"]]["meta-type"] == "alternate"     # BlockdevRef
    marked = [m["name"] for e in entries if e["meta-type"] == "object"
              for m in e["members"] if "detached-header" in m.get("features", ())]
    assert sorted(marked) == ["header", "header"]
    file = next(m for m in luks_create["members"] if m["name"] == "file")
    assert "default" in file and "features" not in file
