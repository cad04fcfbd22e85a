"""Hypothesis strategies for argument values shaped by a schema type.

Values are mostly well-formed, with room for every kind of mistake QEMU
reports: wrong JSON types, unknown enum values, missing and unexpected
members, out-of-range integers, floats where integers belong.
"""

from __future__ import annotations

from hypothesis import strategies as st

from qmpd.schema.model import (
    AlternateType, ArrayType, BuiltinType, EnumType, ObjectType, Type,
)

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 65), max_value=1 << 65),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
)
NAMES = st.sampled_from(["x", "bogus", "driver", "file", "id", "a-b", "node-name", "zzz"])
ANY_JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(NAMES, inner, max_size=3)),
    max_leaves=6,
)


def _builtin(typ: BuiltinType, mistakes: bool) -> st.SearchStrategy:
    json_type = typ.json_type
    if json_type == "string":
        return st.text(alphabet="abc-_01", max_size=5)
    if json_type == "boolean":
        return st.booleans()
    if json_type == "int" and not mistakes:
        return st.integers(0, 255)
    if json_type == "int":
        edges = [0, 1, -1, 255, 256, (1 << 31), (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
                 1 << 64, -(1 << 63), -(1 << 63) - 1]
        return st.one_of(st.sampled_from(edges), st.integers(-1000, 1000))
    if json_type == "number":
        return st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False))
    if json_type == "null":
        return st.none()
    return ANY_JSON


_CACHE: dict[tuple[int, int, bool], st.SearchStrategy] = {}


def values_for(typ: Type, depth: int = 0, mistakes: bool = True) -> st.SearchStrategy:
    """Values for ``typ``; with ``mistakes`` some of them are wrong on purpose."""
    key = (id(typ), min(depth, 4), mistakes)
    if key not in _CACHE:
        _CACHE[key] = _values_for(typ, min(depth, 4), mistakes)
    return _CACHE[key]


def _values_for(typ: Type, depth: int, mistakes: bool) -> st.SearchStrategy:
    if isinstance(typ, BuiltinType):
        right: st.SearchStrategy = _builtin(typ, mistakes)
    elif isinstance(typ, EnumType):
        right = st.sampled_from([v.name for v in typ.values])
    elif isinstance(typ, ArrayType):
        right = st.lists(values_for(typ.element, depth + 1, mistakes), max_size=2)
    elif isinstance(typ, AlternateType):
        branches = typ.branches
        if depth >= 3:  # stop recursing through BlockdevRef and friends
            branches = [b for b in branches if not isinstance(b.type, ObjectType)] or branches
        right = st.one_of([values_for(b.type, depth + 1, mistakes) for b in branches])
    else:
        right = _object(typ, depth, mistakes)
    if not mistakes:
        return right
    wrong = st.one_of(JSON_SCALARS, st.text(max_size=4), st.just({}), st.just([]))
    return st.one_of(right, right, right, right, right, right, wrong)


def _object(typ: ObjectType, depth: int, mistakes: bool) -> st.SearchStrategy:
    @st.composite
    def build(draw):
        value: dict = {}
        members = typ.all_members()
        if typ.tag is not None:
            case = draw(st.sampled_from([v.case for v in typ.variants]))
            branch = typ.variant_for(case)
            members = members + (branch.all_members() if branch is not None else [])
        for member in members:
            if typ.tag is not None and member.name == typ.tag:
                present = not mistakes or draw(st.integers(0, 15)) > 0
                if present:
                    value[member.name] = (case if not mistakes or draw(st.integers(0, 9)) > 0
                                          else draw(values_for(member.type, depth + 1, mistakes)))
                continue
            if member.optional:
                present = depth < 3 and draw(st.booleans())
            else:
                present = not mistakes or draw(st.integers(0, 15)) > 0
            if present:
                value[member.name] = draw(values_for(member.type, depth + 1, mistakes))
        if mistakes and draw(st.integers(0, 7)) == 0:
            for name in draw(st.lists(NAMES, max_size=3)):
                value.setdefault(name, draw(JSON_SCALARS))
        if draw(st.booleans()):  # key order reaches QEMU's answer only through hash collisions
            items = list(value.items())
            value = dict(draw(st.permutations(items)))
        return value

    return build()
