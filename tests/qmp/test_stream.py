"""qmp/stream: QEMU 7.2's JSON lexer, streamer and parser, byte for byte.

Expected texts and error counts were checked against qemu-storage-daemon
7.2 (see test_stream_interop.py, which replays random streams against it).
"""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import given, settings, strategies as st

from qmpd.qmp.stream import JSONStreamParser, Parsed, StreamError

RESYNC = b"\xff\n"  # forces an error in any lexer state, then recovery ends


def parse(data: bytes, **limits) -> list:
    return JSONStreamParser(**limits).feed(data)


def parse_bytewise(data: bytes, **limits) -> list:
    parser = JSONStreamParser(**limits)
    out = []
    for i in range(len(data)):
        out += parser.feed(data[i:i + 1])
    return out


def values(items: list) -> list:
    assert all(isinstance(i, Parsed) for i in items), items
    return [i.value for i in items]


def descs(items: list) -> list:
    return [i.desc if isinstance(i, StreamError) else ("value", i.value) for i in items]


def err(text: str) -> str:
    return "JSON parse error, " + text


# -- framing -------------------------------------------------------------------

def test_message_split_over_feeds_and_several_in_one_feed():
    parser = JSONStreamParser()
    assert parser.feed(b'{"execute": "qu') == []
    assert parser.pending_bytes() > 0
    assert values(parser.feed(b'ery-version"}  \n{"a": [1, 2]}\r\n\t[]')) == [
        {"execute": "query-version"}, {"a": [1, 2]}, []]
    assert parser.pending_bytes() == 0


def test_number_and_keyword_wait_for_their_terminating_byte():
    parser = JSONStreamParser()
    assert parser.feed(b"12") == []
    assert parser.feed(b"3") == []
    assert values(parser.feed(b" ")) == [123]
    assert parser.feed(b"tru") == []
    assert values(parser.feed(b"e\n")) == [True]


def test_top_level_scalars_are_messages_of_their_own():
    # QMP then answers "QMP input must be a JSON object" for each.
    assert values(parse(b'42 "x" \'y\' null 1.5 ')) == [42, "x", "y", None, 1.5]


def test_stray_closers_are_one_error_each():
    assert descs(parse(b"} ]")) == [err("expecting value")] * 2


def test_closer_that_goes_negative_ends_the_message_at_once():
    # QEMU 7.2 emits as soon as either count is negative: "[}" then "]".
    assert descs(parse(b"[}]")) == [err("expecting value"), err("expecting value")]
    assert descs(parse(b'{"a":1]')) == [err("expected separator in dict")]


# -- lexer errors and recovery -------------------------------------------------

def test_stray_byte_reports_the_token_so_far_and_recovers_at_a_structural_char():
    # 01: the zero cannot be followed by a digit; recovery skips " " and
    # stops at "}", which is then a stray closer.
    assert descs(parse(b'{"execute": 01}')) == [err("stray '01'"), err("expecting value")]


def test_recovery_skips_until_newline_and_good_message_survives():
    data = b'{"a": @garbage "still skipped" \n{"execute": "x"}'
    assert descs(parse(data)) == [err("stray '@'"), ("value", {"execute": "x"})]


def test_recovery_ends_at_control_chars_and_impossible_bytes_but_not_tab():
    assert descs(parse(b"@ \t 7 \r 8 ")) == [err("stray '@'"), ("value", 8)]
    # A control character ends recovery and is then a stray of its own.
    assert descs(parse(b"@ 7 \x01 9 ")) == [err("stray '@'"), err("stray '\x01'")]
    assert descs(parse(b"@ 7 \xff")) == [err("stray '@'"), err("stray '\ufffd'")]


def test_percent_is_stray_because_interpolation_is_off():
    assert descs(parse(b'%d\n"%d"')) == [err("stray '%'"), ("value", "%d")]


def test_control_character_inside_string_is_a_stray_with_the_string_so_far():
    assert descs(parse(b'"abc\x01def" {}')) == [err("stray '\"abc\x01'"), ("value", {})]


def test_stray_text_stops_at_nul_and_replaces_bad_utf8_like_qemus_writer():
    assert descs(parse(b'"ab\x00')) == [err("stray '\"ab'")]
    assert descs(parse(b'"\xc3\xa9\xff')) == [err("stray '\"\u00e9\ufffd'")]
    assert descs(parse(b'"\xc0\x80\n')) == [err("stray '\"\x00\n'")]


def test_keyword_followed_by_uppercase():
    assert descs(parse(b"trueA\n")) == [("value", True), err("stray 'A'")]


@pytest.mark.parametrize("data, expected", [
    (b"1.}", [err("stray '1.}'")]),
    (b"-a", [err("stray '-a'")]),
    (b"1e+x\n", [err("stray '1e+x'")]),
    (b"1.5.3\n", [("value", 1.5), err("stray '.'")]),
    (b"1-2 ", [("value", 1), ("value", -2)]),
    (b"0e5 ", [("value", 0), err("invalid keyword 'e'"), ("value", 5)]),
])
def test_number_lexing(data, expected):
    assert descs(parse(data)) == expected


# -- parser ------------------------------------------------------------------------

@pytest.mark.parametrize("data, message", [
    (b"[1,]", "expecting value"),
    (b"[1 2]", "expected separator in list"),
    (b'{"a" 1}', "missing : in object pair"),
    (b'{"a":1 "b":2}', "expected separator in dict"),
    (b"{1:2}", "key is not a string in object"),
    (b'{"a":}', "expecting value"),
    (b'{"a":1,"a":2}', "duplicate key"),
    (b"[nul]", "invalid keyword 'nul'"),
    (b'{"a":0e5}', "expected separator in dict"),
    (b'["\\x"]', "invalid escape sequence in string"),
    (b'["\xc3"]', "invalid UTF-8 sequence in string"),
    (b'["\xed\xa0\x80"]', "invalid UTF-8 sequence in string"),
    (b'["\xef\xbf\xbf"]', "invalid UTF-8 sequence in string"),
    (b'["\xe0\x80\xaf"]', "invalid UTF-8 sequence in string"),
    # The escape runs past the closing quote; QEMU's %.*s stops at the NUL.
    (b'["\\u12"]', '\\u12" is not a valid Unicode character'),
    (b'["\\uzzzz"]', "\\uzzzz is not a valid Unicode character"),
    (b'["\\uDC00"]', "\\uDC00 is not a valid Unicode character"),
    (b'["\\uD83D"]', "\\uD83D is not a valid Unicode character"),
    (b'["\\uD83D\\u0041"]', "\\uD83D is not a valid Unicode character"),
    (b'["\\uFFFF"]', "\\uFFFF is not a valid Unicode character"),
    (b'["\\ufdd0"]', "\\ufdd0 is not a valid Unicode character"),
    (b'["\\uD83F\\uDFFE"]', "\\uD83F\\uDFFE is not a valid Unicode character"),
])
def test_parse_errors_carry_qemus_text(data, message):
    assert descs(parse(data)) == [err(message)]
    assert descs(parse_bytewise(data)) == [err(message)]


def test_first_error_wins():
    assert descs(parse(b'[{"a" 1}, nul]')) == [err("missing : in object pair")]
    assert descs(parse(b'{{"x":1,"x":1}:1}')) == [err("duplicate key")]
    assert descs(parse(b'[{"a":1,}]')) == [err("expecting value")]


def test_invalid_keyword_message_is_cut_like_qemus_1024_byte_buffer():
    word = b"x" * 2000
    (item,) = parse(b"[" + word + b"]")
    assert item.desc == err(("invalid keyword '" + "x" * 2000)[:1023])


def test_strings():
    assert values(parse(
        b'["a\\"b\\\\c\\/d\\b\\f\\n\\r\\t", \'it\\\'s "quoted"\', "\\u00e9\\uD83D\\uDE00", '
        b'"\\u0000", "\xc0\x80", "\xc3\xa9\xf0\x9f\x98\x80", "\x7f", "\\\'"]')) == [[
            'a"b\\c/d\b\f\n\r\t', 'it\'s "quoted"', "\u00e9\U0001F600",
            "\x00", "\x00", "\u00e9\U0001F600", "\x7f", "'"]]


def test_integers_keep_int64_and_uint64_then_become_floats():
    data = (b"[9223372036854775807, -9223372036854775808, 18446744073709551615, "
            b"18446744073709551616, -9223372036854775809, " + b"9" * 5000 + b", -0, 0]")
    (item,) = parse(data)
    v = item.value
    assert v[:3] == [2**63 - 1, -2**63, 2**64 - 1]
    assert all(type(x) is int for x in v[:3])
    assert v[3] == 18446744073709551616.0 and type(v[3]) is float
    assert v[4] == -9223372036854775809.0 and type(v[4]) is float
    assert v[5] == float("inf")
    assert v[6:] == [0, 0] and type(v[6]) is int


def test_floats():
    (item,) = parse(b"[1.5, 1e2, 1E-2, -0.0, 2.5e+3, 1e400, 0.1]")
    assert item.value == [1.5, 100.0, 0.01, -0.0, 2500.0, float("inf"), 0.1]
    assert all(type(x) is float for x in item.value)


def test_nan_and_infinity_are_not_keywords():
    assert descs(parse(b"[NaN]\n")) == [err("stray 'N'"), err("expecting value")]
    assert descs(parse(b"[-Infinity]\n")) == [err("stray '-I'"), err("expecting value")]


# -- limits --------------------------------------------------------------------

def test_nesting_1024_is_fine_1025_is_not():
    deep = b"[" * 1024 + b"]" * 1024
    (value,) = values(parse(deep))
    for _ in range(1023):   # == on such deep lists would exhaust Python's stack
        (value,) = value
    assert value == []
    items = parse(b"[" * 1025 + b"]" * 1025)
    # One error, then the closers left over are each a stray message.
    assert descs(items) == ["JSON nesting depth limit exceeded"] + [err("expecting value")] * 1025


def test_nesting_error_then_rest_of_message_is_lexed_afresh():
    items = parse(b'{"a":' * 5 + b"[[]]" + b"}" * 5, max_nesting=4)
    # The fifth "{" trips the limit; what follows it is new input.
    assert descs(items) == ["JSON nesting depth limit exceeded", ("value", "a"),
                            err("expecting value"), ("value", [[]])] + [err("expecting value")] * 5


def test_deep_objects_and_mixed_nesting_parse_without_recursion():
    data = b'{"a":' * 600 + b"[" * 424 + b"]" * 424 + b"}" * 600
    (item,) = parse(data)
    assert isinstance(item, Parsed)
    depth, v = 0, item.value
    while isinstance(v, (dict, list)) and v:
        v = v["a"] if isinstance(v, dict) else v[0]
        depth += 1
    assert depth == 600 + 423


@pytest.mark.parametrize("recursion_limit", [None, 50_000])
def test_nesting_limit_does_not_depend_on_the_interpreter(recursion_limit):
    # How deep the C decoder of the fast path goes is the interpreter's
    # business (3.13's goes deeper than 3.12's, a raised recursion limit
    # lets any go deeper): the limit must hold whatever it is.
    saved = sys.getrecursionlimit()
    if recursion_limit is not None:
        sys.setrecursionlimit(recursion_limit)
    try:
        arrays = parse(b"[" * 1025 + b"]" * 1025)
        objects = parse(b'{"a":' * 1025 + b"1" + b"}" * 1025 + b"\n")
        mixed = parse(b'{"a":' * 600 + b"[" * 425 + b"]" * 425 + b"}" * 600)
    finally:
        sys.setrecursionlimit(saved)
    assert descs(arrays)[0] == "JSON nesting depth limit exceeded"
    assert descs(objects)[0] == "JSON nesting depth limit exceeded"
    assert descs(mixed)[0] == "JSON nesting depth limit exceeded"


def test_far_too_deep_input_is_refused_without_a_crash():
    items = parse(b"[" * 30_000 + b"]" * 30_000)
    # Each 1025th opener trips the limit; the 275 openers left make a
    # message with their closers, and the closers left over are strays.
    inner: list = []
    for _ in range(274):
        inner = [inner]
    assert descs(items) == (["JSON nesting depth limit exceeded"] * 29 + [("value", inner)]
                            + [err("expecting value")] * (30_000 - 275))


def test_brackets_in_strings_do_not_count_as_nesting():
    data = b"[" * 1023 + b'"' + b"[{" * 2000 + b'\\"[' + b'"' + b"]" * 1023
    (value,) = values(parse(data))
    for _ in range(1022):
        (value,) = value
    assert value == ["[{" * 2000 + '"[']
    assert values(parse(b'["[[[[", {"a": "{{{{"}]', max_nesting=2)) == [["[[[[", {"a": "{{{{"}]]
    assert descs(parse(b"[[[1]]]", max_nesting=2))[0] == "JSON nesting depth limit exceeded"


def test_many_shallow_containers_keep_the_fast_path(monkeypatch):
    # More openers than the nesting limit, but only three deep: the whole
    # message is still the C decoder's (the token-by-token path is not used).
    message = b'{"execute": "x", "arguments": {"l": [' + b", ".join([b'{"a": [1]}'] * 2000) + b"]}}"
    monkeypatch.setattr(JSONStreamParser, "_take_run",
                        lambda *args: pytest.fail("left the whole-message fast path"))
    (value,) = values(parse(message))
    assert value == {"execute": "x", "arguments": {"l": [{"a": [1]}] * 2000}}


def _depth(value) -> int:
    deepest, pending = 0, [(value, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            pending += [(v, depth + 1) for v in (value.values() if isinstance(value, dict) else value)]
    return deepest


_TRICKY_TEXT = st.text(alphabet='[]{}"\\/ a\n', max_size=6)
_JSON_VALUES = st.recursive(
    st.none() | st.integers(-3, 3) | _TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TRICKY_TEXT, inner, max_size=4),
    max_leaves=60)


@settings(max_examples=300, deadline=None)
@given(value=_JSON_VALUES.map(lambda v: [[v]]), limit=st.integers(0, 12))
def test_nesting_is_measured_outside_strings(value, limit):
    from qmpd.qmp.stream import _deeper_than
    data = b" " + json.dumps(value).encode() + b" "
    assert _deeper_than(limit, data, 1, len(data) - 1) == (_depth(value) > limit)
    items = parse(data, max_nesting=limit)
    if _depth(value) > limit:
        assert isinstance(items[0], StreamError)
    else:
        assert items == [Parsed(value)]


def test_token_count_limit():
    assert values(parse(b"[1,2]", max_token_count=5)) == [[1, 2]]
    items = parse(b"[1,2,3]\n[4]", max_token_count=5)
    # The 6th token ("3") trips the limit; "]" is then a stray closer.
    assert descs(items) == ["JSON token count limit exceeded", err("expecting value"), ("value", [4])]


def test_token_size_limit_counts_token_bytes_plus_one():
    data = b'["' + b"a" * 6 + b'"]'     # tokens of 1, 8 and 1 bytes
    assert values(parse(data, max_token_size=11)) == [["a" * 6]]
    # The check is "size so far + this token + 1 > limit".
    assert descs(parse(data, max_token_size=10)) == ["JSON token size limit exceeded"]
    assert descs(parse(data, max_token_size=9)) == ["JSON token size limit exceeded",
                                                    err("expecting value")]


def test_overlong_token_is_cut_and_the_rest_lexed_from_the_start_state():
    data = b'"' + b"a" * 20 + b'" {}'
    items = parse(data, max_token_size=10)
    # The lexer cuts the string after 11 bytes; the other ten a's are a
    # keyword of 10 bytes, too big too; '" {}' opens a string still pending.
    assert descs(items) == ["JSON token size limit exceeded"] * 2
    assert descs(parse(b'"' + b"a" * 15 + b'" {}', max_token_size=10)) == [
        "JSON token size limit exceeded", err("invalid keyword 'aaaaa'")]
    assert descs(parse_bytewise(data, max_token_size=10)) == descs(items)


def test_message_after_an_overlong_token_in_the_same_chunk():
    # 14 digits: the lexer cuts after 11, "234" is a number of its own; the
    # stray "@" and the newline bring the lexer back to its start state
    # right before the object (a path that once raised TypeError).
    data = b'12345678901234 @\n{"a":1}'
    expected = ["JSON token size limit exceeded", ("value", 234), err("stray '@'"),
                ("value", {"a": 1})]
    assert descs(parse(data, max_token_size=10)) == expected
    assert descs(parse_bytewise(data, max_token_size=10)) == expected


def test_memory_stays_bounded_by_the_limits():
    parser = JSONStreamParser(max_token_size=1000)
    out = []
    out += parser.feed(b'"')
    for _ in range(100):
        out += parser.feed(b"x" * 97)
        assert parser.pending_bytes() <= 1001
    assert out and all(i == StreamError("JSON token size limit exceeded") for i in out)
    parser = JSONStreamParser(max_token_size=1000)
    parser.feed(b"[" + b" " * 100_000)     # whitespace is not buffered
    assert parser.pending_bytes() <= 2


def test_repr_does_not_show_buffered_bytes():
    parser = JSONStreamParser()
    parser.feed(b'{"arguments": {"data": "s3cr3t')
    assert "s3cr3t" not in repr(parser)
    (item,) = parser.feed(b'"}}')
    assert item == Parsed({"arguments": {"data": "s3cr3t"}})
    assert "s3cr3t" not in repr(item)


# -- properties ----------------------------------------------------------------

_NONCHARACTERS = {c for c in range(0xFDD0, 0xFDF0)} | {
    p << 16 | low for p in range(17) for low in (0xFFFE, 0xFFFF)}
_text = st.text(st.characters(blacklist_categories=("Cs",)).filter(
    lambda c: ord(c) not in _NONCHARACTERS))
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(_text, children, max_size=5),
    max_leaves=30)


@settings(max_examples=150, deadline=None)
@given(value=_json_values, ascii_only=st.booleans(), indent=st.sampled_from([None, 1]),
       cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_any_json_value_round_trips_at_any_split(value, ascii_only, indent, cuts):
    data = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode() + b"\n"
    parser = JSONStreamParser()
    out, last = [], 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        out += parser.feed(data[last:cut])
        last = cut
    out += parser.feed(data[last:])
    assert out == [Parsed(value)]
    assert parser.pending_bytes() == 0


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=200) | st.lists(st.sampled_from(
    [b"{", b"}", b"[", b"]", b":", b",", b'"', b"'", b"\\", b"u", b"0", b"1", b"-", b".", b"e",
     b"true", b"x", b" ", b"\n", b"\x00", b"\xc3\xa9", b"\xff", b"%", b'"a"', b"\\uD83D"]),
    max_size=40).map(b"".join), cut=st.integers(0, 300))
def test_garbage_never_raises_and_a_message_after_resync_is_parsed(garbage, cut):
    data = garbage + RESYNC + b'{"execute": "query-version"}'
    whole = JSONStreamParser().feed(data)
    assert all(isinstance(i, (Parsed, StreamError)) for i in whole)
    assert whole[-1] == Parsed({"execute": "query-version"})
    # The resync byte is always reported (alone, or ending the token so far).
    assert isinstance(whole[-2], StreamError) and whole[-2].desc.endswith("\ufffd'")
    parser = JSONStreamParser()
    cut = cut % (len(data) + 1)
    assert parser.feed(data[:cut]) + parser.feed(data[cut:]) == whole


# -- speed (generous bounds: the machine is shared) ------------------------------

def _timed(func) -> float:
    import time
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def test_ten_thousand_small_messages_take_well_under_a_second():
    data = b'{"execute": "query-version"}\n' * 10_000
    parser = JSONStreamParser()
    assert _timed(lambda: parser.feed(data)) < 1.0
    chunks = [data[i:i + 29] for i in range(0, len(data), 29)]
    assert _timed(lambda: [parser.feed(c) for c in chunks]) < 1.0


def test_one_megabyte_message_takes_well_under_a_second():
    nodes = [{"node-name": f"n{i}", "size": i, "read-only": False} for i in range(18_000)]
    data = json.dumps({"execute": "x", "arguments": {"nodes": nodes}}).encode()
    assert len(data) > 1 << 20
    out: list = []
    assert _timed(lambda: out.extend(JSONStreamParser().feed(data))) < 1.0
    parser = JSONStreamParser()
    chunked = _timed(lambda: [out.extend(parser.feed(data[i:i + 65536]))
                              for i in range(0, len(data), 65536)])
    assert chunked < 2.0
    assert out == [Parsed({"execute": "x", "arguments": {"nodes": nodes}})] * 2


_PIECES = [b"{", b"}", b"[", b"]", b":", b",", b'"', b"'", b"\\", b"u", b"0", b"1", b"-", b".",
           b"e", b"E", b"+", b"a", b"true", b"x", b"@", b" ", b"\n", b"\t", b"\x00", b"\x01",
           b"\xc0\x80", b"\xc3\xa9", b"\xef\xbf\xbf", b"\xff", b"%", b"\\uD83D", b"\\u0000",
           b'{"execute": "query-version", "id": 1}', b'[1, 2.5, -0, 0e5, "x"]',
           b"'sq'", b'{"a":1,"a":2}', b" " * 12, b"12345678901234"]


@settings(max_examples=300, deadline=None)
@given(payload=st.lists(st.sampled_from(_PIECES), max_size=40).map(b"".join),
       limits=st.sampled_from([{}, {"max_nesting": 3}, {"max_token_count": 7},
                               {"max_token_size": 12}]),
       sizes=st.lists(st.integers(1, 12), min_size=1, max_size=60))
def test_fast_and_exact_paths_agree_however_the_input_is_cut(payload, limits, sizes):
    whole = JSONStreamParser(**limits).feed(payload)
    assert parse_bytewise(payload, **limits) == whole
    parser, chunked, start = JSONStreamParser(**limits), [], 0
    for size in sizes * (len(payload) // len(sizes) + 1):
        if start >= len(payload):
            break
        chunked += parser.feed(payload[start:start + size])
        start += size
    assert chunked == whole
