"""Incremental JSON stream parser that behaves like QEMU 7.2's QMP input.

Theory of operation
===================

QEMU reads QMP input through three layers, and a client can observe every
one of them (each error becomes one error reply), so we reproduce all three:

1. **Lexer** (qobject/json-lexer.c).  A byte-at-a-time DFA.  Its table is
   `_TABLE` below; `_LexState` names its states.  Token states that need to
   see the next byte to know a token ended (numbers, keywords) use
   *lookahead*: the byte is not consumed and is fed again from the start
   state.  A byte with no transition is a lexical error: the token so far,
   that byte included, is reported as ``stray '...'`` and the lexer enters
   *recovery*, which skips bytes until a structural character ``[]{}:,``,
   an ASCII control character other than TAB, or 0xFE/0xFF.  A token that
   grows beyond the size limit is cut off, reported, and lexing resumes from
   the start state in the middle of it.

2. **Streamer** (qobject/json-streamer.c).  Counts braces and brackets and
   collects tokens.  It hands the collected tokens to the parser when both
   counts are back to zero or either went negative; so a top-level scalar,
   or a stray ``}``, is a message of its own.  It enforces the token size,
   token count and nesting limits; exceeding one, or a lexical error,
   reports one error and throws the collected tokens away.  The rest of
   that message is then lexed as new input (which usually costs more
   errors: QEMU behaves the same way).

3. **Parser** (qobject/json-parser.c).  Recursive descent over one
   message's tokens; the first error wins.  Extensions over RFC 8259:
   single-quoted strings and the ``\\'`` escape.  Strings are "modified
   UTF-8" (``\\xC0\\x80`` is U+0000); surrogates, noncharacters and invalid
   sequences are rejected.  Integers become int when they fit int64 or
   uint64, otherwise float.  Duplicate keys are an error.

Speed, without giving up exactness:

* The streamer keeps no token objects, only the message's bytes: its tokens
  with whitespace gaps of at most 8 bytes (longer gaps shrink to one
  space), so memory stays within the token size and count limits.
* At the start of a message on ASCII input, the standard library's C
  decoder finds and decodes the whole message (`_take_whole_message`); its
  result stands only where QEMU provably agrees: no limit can trip inside
  the message, no ``\\u`` escape that needs QEMU's checks, and hooks that
  refuse ``0e5``, duplicate keys and NaN.
* Otherwise whole tokens are matched by regular expressions, up to 64 KiB
  at a time, and their bookkeeping runs in one tight loop (`_take_run`);
  long runs (string bodies, digits, whitespace, bytes skipped in recovery)
  are consumed in one step; only the edges of tokens and of input chunks go
  through the table byte by byte.
* A complete message goes to the C decoder too; if it refuses, the exact
  parser (`_MessageParser`) gives QEMU's value or first error.

Interpolation (``%d`` and friends) is off, as in QEMU's monitor, so ``%``
is a stray character.  Messages are never logged here: they may carry
secrets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import accumulate

# The C scanner (or its fallback) json.decoder uses; typeshed leaves it out.
from json.decoder import scanstring as _scanstring  # type: ignore[attr-defined]

__all__ = ["JSONStreamParser", "Parsed", "StreamError"]

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10

# parse_error() in json-parser.c formats into a char[1024].
_PARSER_MESSAGE_MAX = 1023


@dataclass(frozen=True)
class Parsed:
    """One complete top-level JSON value (not in the repr: it may hold secrets)."""

    value: object = field(repr=False)


@dataclass(frozen=True)
class StreamError:
    """A message that could not be parsed; the stream continues after it.

    ``desc`` is QEMU's text, e.g. ``JSON parse error, expecting value``.
    """

    desc: str


class _LexState(IntEnum):
    """Lexer states; values below `_Tok.LCURLY`, 0 is the error state."""

    ERROR = 0
    RECOVERY = 1
    DQ_ESCAPE = 2
    DQ_STRING = 3
    SQ_ESCAPE = 4
    SQ_STRING = 5
    ZERO = 6
    EXP_DIGITS = 7
    EXP_SIGN = 8
    EXP_E = 9
    MANTISSA = 10
    MANTISSA_DIGITS = 11
    DIGITS = 12
    SIGN = 13
    KEYWORD = 14
    START = 15


class _Tok(IntEnum):
    """Token types the lexer hands to the streamer."""

    LCURLY = 16
    RCURLY = 17
    LSQUARE = 18
    RSQUARE = 19
    COLON = 20
    COMMA = 21
    INTEGER = 22
    FLOAT = 23
    KEYWORD = 24
    STRING = 25


_LOOKAHEAD = 0x80  # transition does not consume the byte
_FIRST_TOKEN = int(_Tok.LCURLY)
# Plain ints for the hot paths (IntEnum construction and lookups are slow).
_ERROR, _RECOVERY, _START = int(_LexState.ERROR), int(_LexState.RECOVERY), int(_LexState.START)
_LCURLY, _RCURLY = int(_Tok.LCURLY), int(_Tok.RCURLY)
_LSQUARE, _RSQUARE = int(_Tok.LSQUARE), int(_Tok.RSQUARE)


def _build_table() -> list[list[int]]:
    """The lexer's transition table: table[state][byte] -> next | LOOKAHEAD."""
    S, T = _LexState, _Tok
    table = [[int(S.ERROR)] * 256 for _ in range(int(S.START) + 1)]

    def put(state, chars, target):
        for c in chars:
            table[state][c if isinstance(c, int) else ord(c)] = int(target)

    digits = b"0123456789"
    body = range(0x20, 0xFE)

    # Recovery: skip until a promising resynchronisation point.
    for b in range(256):
        resync = (b < 0x20 and b != 0x09) or b >= 0xFE or b in b"[]{}:,"
        table[S.RECOVERY][b] = (S.START | _LOOKAHEAD) if resync else S.RECOVERY

    for esc, string, quote in ((S.DQ_ESCAPE, S.DQ_STRING, b'"'), (S.SQ_ESCAPE, S.SQ_STRING, b"'")):
        put(esc, body, string)
        put(string, body, string)
        put(string, b"\\", esc)
        put(string, quote, T.STRING)

    def terminal(state, token):
        table[state] = [token | _LOOKAHEAD] * 256

    terminal(S.ZERO, T.INTEGER)
    put(S.ZERO, digits, S.ERROR)
    put(S.ZERO, b".", S.MANTISSA)

    terminal(S.EXP_DIGITS, T.FLOAT)
    put(S.EXP_DIGITS, digits, S.EXP_DIGITS)
    put(S.EXP_SIGN, digits, S.EXP_DIGITS)
    put(S.EXP_E, b"+-", S.EXP_SIGN)
    put(S.EXP_E, digits, S.EXP_DIGITS)

    terminal(S.MANTISSA_DIGITS, T.FLOAT)
    put(S.MANTISSA_DIGITS, digits, S.MANTISSA_DIGITS)
    put(S.MANTISSA_DIGITS, b"eE", S.EXP_E)
    put(S.MANTISSA, digits, S.MANTISSA_DIGITS)

    terminal(S.DIGITS, T.INTEGER)
    put(S.DIGITS, digits, S.DIGITS)
    put(S.DIGITS, b"eE", S.EXP_E)
    put(S.DIGITS, b".", S.MANTISSA)
    put(S.SIGN, b"0", S.ZERO)
    put(S.SIGN, b"123456789", S.DIGITS)

    terminal(S.KEYWORD, T.KEYWORD)
    put(S.KEYWORD, range(ord("a"), ord("z") + 1), S.KEYWORD)

    put(S.START, b'"', S.DQ_STRING)
    put(S.START, b"'", S.SQ_STRING)
    put(S.START, b"0", S.ZERO)
    put(S.START, b"123456789", S.DIGITS)
    put(S.START, b"-", S.SIGN)
    put(S.START, b"{", T.LCURLY)
    put(S.START, b"}", T.RCURLY)
    put(S.START, b"[", T.LSQUARE)
    put(S.START, b"]", T.RSQUARE)
    put(S.START, b",", T.COMMA)
    put(S.START, b":", T.COLON)
    put(S.START, range(ord("a"), ord("z") + 1), S.KEYWORD)
    put(S.START, b" \t\r\n", S.START)
    return table


_TABLE = _build_table()

# Runs of bytes that leave a state unchanged, consumed in one step.
_STAY_RUN = {
    _LexState.START: re.compile(rb"[ \t\r\n]+"),
    _LexState.RECOVERY: re.compile(rb"[^\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]+"),
    _LexState.DQ_STRING: re.compile(rb'[^\x00-\x1f\xfe\xff"\\]+'),
    _LexState.SQ_STRING: re.compile(rb"[^\x00-\x1f\xfe\xff'\\]+"),
    _LexState.DIGITS: re.compile(rb"[0-9]+"),
    _LexState.MANTISSA_DIGITS: re.compile(rb"[0-9]+"),
    _LexState.EXP_DIGITS: re.compile(rb"[0-9]+"),
    _LexState.KEYWORD: re.compile(rb"[a-z]+"),
}
_STAY_RUN_BY_STATE = [_STAY_RUN.get(s) for s in _LexState]

# Whole tokens as the table would lex them.  A number is what the table
# accepts (no exponent right after a lone zero); the table ends numbers and
# keywords only on seeing the next byte, hence the lookaheads.
_DQ_STRING = rb'"[^\x00-\x1f\xfe\xff"\\]*(?:\\[\x20-\xfd][^\x00-\x1f\xfe\xff"\\]*)*"'
_NUMBER = (
    rb"-?(?:0(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?)?"
    rb"|[1-9][0-9]*(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"
)
_NUMBER_END = rb"(?=[^0-9.eE])"
_KEYWORD_END = rb"(?=[^a-z])"

# One cleanly terminated token from the start state, after optional
# whitespace.  Anything it does not match goes through the table.
_QUICK_TOKEN = re.compile(
    rb"[ \t\r\n]*(?:([{}\[\],:])|("
    + _DQ_STRING
    + rb")|([a-z]+)"
    + _KEYWORD_END
    + rb"|("
    + _NUMBER
    + rb")"
    + _NUMBER_END
    + rb")"
)

# Bulk path: a run of whole tokens, with whitespace gaps of at most 8 bytes
# (kept in the message buffer, so memory stays within the limits), scanned
# in one match of at most _BULK_WINDOW bytes (Python's matcher slows down on
# longer runs).  The window cuts a number or keyword short only by failing
# its lookahead, so the run ends before it.  _BULK_TOKENS splits the run
# again; there the run's end stands in for the byte already checked.
_BULK_WINDOW = 1 << 16
_BULK_ITEM = rb"[{}\[\],:]|" + _DQ_STRING + rb"|[a-z]+%s|" + _NUMBER + rb"%s"
_BULK_RUN = re.compile(
    rb"(?:[ \t\r\n]{0,8}(?:" + _BULK_ITEM % (_KEYWORD_END, _NUMBER_END) + rb"))+"
)
_BULK_TOKENS = re.compile(
    rb"([ \t\r\n]*)(" + _BULK_ITEM % (rb"(?=[^a-z]|\Z)", rb"(?=[^0-9.eE]|\Z)") + rb")"
)
_BULK_TOKENS_ONLY = re.compile(_BULK_ITEM % (rb"(?=[^a-z]|\Z)", rb"(?=[^0-9.eE]|\Z)"))

_STRUCTURAL = {
    ord("{"): _Tok.LCURLY,
    ord("}"): _Tok.RCURLY,
    ord("["): _Tok.LSQUARE,
    ord("]"): _Tok.RSQUARE,
    ord(":"): _Tok.COLON,
    ord(","): _Tok.COMMA,
}

# Re-lexing a complete message: its tokens are all well formed, and where two
# touch (as in "1true" or "0e5") the table split them where these greedy
# patterns do.
_MESSAGE_TOKEN = re.compile(
    rb"[ \t\r\n]*(?:([{}\[\],:])"
    rb'|("[^"\\]*(?:\\.[^"\\]*)*"|\'[^\'\\]*(?:\\.[^\'\\]*)*\')'
    rb"|([a-z]+)"
    rb"|(" + _NUMBER + rb"))",
    re.S,
)

# \u escapes on which the C decoder is more lenient than QEMU: surrogates
# (even well-paired ones go the exact way) and noncharacters.
_RISKY_ESCAPE = re.compile(rb"\\u(?:[dD][89a-fA-F]|[fF][dD][dDeE]|[fF]{3}[eEfF])")


# Unicode noncharacters, which QEMU refuses inside strings.
_NONCHARACTER = re.compile(
    "[\ufdd0-\ufdef"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
    + "]"
)
# What a decoded string must not contain for QEMU to accept it.
_REFUSED_CHARACTER = re.compile(_NONCHARACTER.pattern[:-1] + "\ud800-\udfff]")


def _is_valid_codepoint(cp: int) -> bool:
    if cp < 0 or cp > 0x10FFFF:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False
    return not 0xD800 <= cp <= 0xDFFF


def _decode_mod_utf8(raw: bytes) -> str | None:
    """Decode modified UTF-8 as QEMU's parser does; None if QEMU refuses it.

    U+0000 arrives as C0 80 (C0 never starts a valid UTF-8 sequence, so the
    replacement cannot misfire); the rest is strict UTF-8 without
    noncharacters.
    """
    if raw.isascii():
        return raw.decode("ascii")
    try:
        text = raw.replace(b"\xc0\x80", b"\x00").decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _NONCHARACTER.search(text):
        return None
    return text


def _mod_utf8_codepoint(raw: bytes, i: int) -> tuple[int, int]:
    """(codepoint or -1, end) of the sequence at raw[i], like QEMU's decoder."""
    byte = raw[i]
    if byte < 0x80:
        return byte, i + 1
    if byte >= 0xFE or not byte & 0x40:
        return -1, i + 1
    length, mask = 0, 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    p = i + 1
    for _ in range(1, length):
        nxt = raw[p] if p < len(raw) else 0
        if nxt & 0xC0 != 0x80:
            return -1, p
        p += 1
        cp = cp << 6 | (nxt & 0x3F)
    if not _is_valid_codepoint(cp):
        return -1, p
    if cp < (0x80, 0x800, 0x10000, 0x200000, 0x4000000)[length - 2] and not (
        cp == 0 and length == 2
    ):
        return -1, p
    return cp, p


def _text_as_qemu_writes_it(raw: bytes) -> str:
    """The str a QMP client sees for a C string QEMU puts into a reply.

    QEMU's JSON writer stops at NUL and turns each invalid modified UTF-8
    sequence into U+FFFD.
    """
    raw = raw.split(b"\x00", 1)[0]
    text = _decode_mod_utf8(raw)
    if text is not None:
        return text
    out = []
    i = 0
    while i < len(raw):
        cp, i = _mod_utf8_codepoint(raw, i)
        out.append(chr(cp) if cp >= 0 else "\ufffd")
    return "".join(out)


def _integer(text: str) -> int | float:
    """JSON_INTEGER: int64, else uint64, else double (as QEMU's QNum)."""
    if len(text) < 19:  # at most 18 digits always fit int64
        return int(text)
    if len(text) <= 20:
        value = int(text)
        if -(1 << 63) <= value < (1 << 64):
            return value
    return float(text)


class _ParseError(Exception):
    """First error of a message; ``message`` follows "JSON parse error, "."""

    def __init__(self, message: bytes | str) -> None:
        super().__init__()
        if isinstance(message, str):
            message = message.encode()
        self.message = message[:_PARSER_MESSAGE_MAX]

    def desc(self) -> str:
        return "JSON parse error, " + _text_as_qemu_writes_it(self.message)


class _RefuseFastPath(Exception):
    """The C decoder would differ from QEMU here; use the exact parser."""


def _fast_float(text: str) -> float:
    # QEMU lexes "0e5" as 0, e, 5 (no exponent after a lone zero).
    if text[0] == "0" and text[1] in "eE" or text[:2] == "-0" and text[2] in "eE":
        raise _RefuseFastPath
    return float(text)


def _fast_object(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _RefuseFastPath  # duplicate key
    return obj


def _refuse_constant(text: str):
    raise _RefuseFastPath  # NaN, Infinity


_FAST_DECODER = json.JSONDecoder(
    object_pairs_hook=_fast_object,
    parse_int=_integer,
    parse_float=_fast_float,
    parse_constant=_refuse_constant,
)


def _parse_string(token: bytes) -> str:
    """A STRING token's value, per json-parser.c's parse_string()."""
    if token[0] == 0x22:  # double quotes: try the C decoder first
        text = _decode_mod_utf8(token)
        if text is not None:
            try:
                value, end = _scanstring(text, 1, True)
            except ValueError:
                pass
            else:
                if end == len(text) and not _REFUSED_CHARACTER.search(value):
                    return value
    out: list[str] = []
    pos = 1
    end = len(token) - 1
    while pos < end:
        backslash = token.find(b"\\", pos, end)
        stop = end if backslash < 0 else backslash
        if stop > pos:
            text = _decode_mod_utf8(token[pos:stop])
            if text is None:
                raise _ParseError("invalid UTF-8 sequence in string")
            out.append(text)
            pos = stop
            continue
        # token[pos] is a backslash; the lexer guarantees a byte follows.
        begin = pos
        escape = token[pos + 1]
        pos += 2
        simple = _SIMPLE_ESCAPES.get(escape)
        if simple is not None:
            out.append(simple)
            continue
        if escape != ord("u"):
            raise _ParseError("invalid escape sequence in string")
        cp = _hex4(token, pos)
        pos += 4
        if 0xD800 <= cp <= 0xDBFF and token[pos : pos + 2] == b"\\u":
            trailing = _hex4(token, pos + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) | (trailing & 0x3FF)
                pos += 6
            else:
                cp = -1
        if not _is_valid_codepoint(cp):
            # Slicing stops at the token's end as C's %.*s stops at its NUL.
            raise _ParseError(token[begin:pos] + b" is not a valid Unicode character")
        out.append(chr(cp))
    return "".join(out)


_SIMPLE_ESCAPES = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_HEX = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}


def _hex4(token: bytes, pos: int) -> int:
    cp = 0
    for i in range(pos, pos + 4):
        digit = _HEX.get(token[i]) if i < len(token) else None
        if digit is None:
            return -1
        cp = cp << 4 | digit
    return cp


class _MessageParser:
    """json-parser.c over one message's tokens, without recursion.

    The stack holds the open containers; each frame is [list] or
    [dict, key-or-None].  The error checks happen in the same order as in
    QEMU's recursive descent, so the first error reported is QEMU's.
    """

    def __init__(self, tokens: list[tuple[_Tok, bytes]]) -> None:
        self._tokens = tokens
        self._pos = 0

    def _peek(self):
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def _pop(self):
        token = self._peek()
        if token is None:
            raise _ParseError("premature EOI")
        self._pos += 1
        return token

    def parse(self) -> object:
        stack: list[list] = []
        while True:
            # parse_value()
            token = self._peek()
            if token is None:
                raise _ParseError("premature EOI")
            kind, text = token
            if kind == _Tok.LCURLY or kind == _Tok.LSQUARE:
                self._pos += 1
                closer = _Tok.RCURLY if kind == _Tok.LCURLY else _Tok.RSQUARE
                container: object = {} if kind == _Tok.LCURLY else []
                following = self._peek()
                if following is None:
                    raise _ParseError("premature EOI")
                if following[0] != closer:
                    stack.append([container, None] if kind == _Tok.LCURLY else [container])
                    continue  # parse the first key or element
                self._pos += 1
                value = container
            elif kind == _Tok.STRING:
                self._pos += 1
                value = _parse_string(text)
            elif kind == _Tok.INTEGER:
                self._pos += 1
                value = _integer(text.decode())
            elif kind == _Tok.FLOAT:
                self._pos += 1
                value = float(text)
            elif kind == _Tok.KEYWORD:
                self._pos += 1
                if text not in _KEYWORDS:
                    raise _ParseError(b"invalid keyword '" + text + b"'")
                value = _KEYWORDS[text]
            else:
                raise _ParseError("expecting value")

            # A value is complete: hand it to the innermost container.
            while True:
                if not stack:
                    return value
                frame = stack[-1]
                if len(frame) == 1:  # array
                    frame[0].append(value)
                    separator = self._pop()[0]
                    if separator == _Tok.RSQUARE:
                        value = stack.pop()[0]
                        continue
                    if separator != _Tok.COMMA:
                        raise _ParseError("expected separator in list")
                    break
                if frame[1] is None:  # object, value is a key
                    if not isinstance(value, str):
                        raise _ParseError("key is not a string in object")
                    if self._pop()[0] != _Tok.COLON:
                        raise _ParseError("missing : in object pair")
                    frame[1] = value
                    break
                obj, key = frame
                if key in obj:
                    raise _ParseError("duplicate key")
                obj[key] = value
                frame[1] = None
                separator = self._pop()[0]
                if separator == _Tok.RCURLY:
                    value = stack.pop()[0]
                    continue
                if separator != _Tok.COMMA:
                    raise _ParseError("expected separator in dict")
                if self._peek() is None:
                    raise _ParseError("premature EOI")
                break


_KEYWORDS = {b"true": True, b"false": False, b"null": None}


def _message_tokens(message: bytes) -> list[tuple[_Tok, bytes]]:
    tokens = []
    for m in _MESSAGE_TOKEN.finditer(message):
        if m.lastindex == 1:
            tokens.append((_STRUCTURAL[m.group(1)[0]], m.group(1)))
        elif m.lastindex == 2:
            tokens.append((_Tok.STRING, m.group(2)))
        elif m.lastindex == 3:
            tokens.append((_Tok.KEYWORD, m.group(3)))
        else:
            number = m.group(4)
            is_float = b"." in number or b"e" in number or b"E" in number
            tokens.append((_Tok.FLOAT if is_float else _Tok.INTEGER, number))
    return tokens


# _deeper_than(): the marks that matter for nesting, with {} folded into [].
_MARKS = bytes.maketrans(b"{}", b"[]")
_NOT_A_MARK = bytes(b for b in range(256) if b not in b'{}[]"')
_BRACKET_STEP = [1 if b == 0x5B else -1 if b == 0x5D else 0 for b in range(256)]
_STRIPPED_LEVELS = 8


def _deeper_than(limit: int, data: bytes, start: int, end: int) -> bool:
    """Whether the valid JSON text data[start:end] nests more than `limit` deep.

    Everything runs at C speed except the last step, which only deep input
    reaches.  Escaped backslashes and quotes are dropped (the others cannot
    end a string), then all but brackets and quotes.  No more openers than
    the limit settle it.  Otherwise only brackets outside strings count: an
    adjacent pair of quotes (an empty string, or two strings with nothing
    between them) is dropped, which leaves every bracket inside or outside
    a string as before, and the strings left (those holding brackets) go
    with a split.  Then the innermost containers are stripped a few times
    over (each time lowers the depth by one), and the depth of what is left
    is its highest running sum.
    """
    text = data[start:end]
    if b"\\" in text:  # only \\ and \" can move where a string ends
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = text.translate(_MARKS, _NOT_A_MARK)
    if marks.count(b"[") <= limit:
        return False
    marks = marks.replace(b'""', b"")
    if b'"' in marks:
        marks = b"".join(marks.split(b'"')[::2])
    stripped = 0
    while marks and stripped < _STRIPPED_LEVELS:
        marks = marks.replace(b"[]", b"")
        stripped += 1
    if not marks:
        return stripped > limit
    return stripped + max(accumulate(map(_BRACKET_STEP.__getitem__, marks))) > limit


def _parse_message(message: bytes) -> Parsed | StreamError:
    """One complete message (tokens separated by spaces) to a value or error."""
    if not _RISKY_ESCAPE.search(message):
        text = _decode_mod_utf8(message) if b"\xc0\x80" not in message else None
        if text is not None:
            try:
                return Parsed(_FAST_DECODER.decode(text))
            except (ValueError, RecursionError, _RefuseFastPath):
                pass
    try:
        return Parsed(_MessageParser(_message_tokens(message)).parse())
    except _ParseError as err:
        return StreamError(err.desc())


class JSONStreamParser:
    """Bytes in, complete JSON values and QEMU-worded errors out (sans-IO).

    Feed whatever arrived from the socket; each call returns the messages
    completed by it, in order.  A bad message yields the errors QEMU would
    report for it, and parsing resumes where QEMU's would.
    """

    def __init__(
        self,
        *,
        max_token_size: int = MAX_TOKEN_SIZE,
        max_token_count: int = MAX_TOKEN_COUNT,
        max_nesting: int = MAX_NESTING,
    ) -> None:
        self._max_token_size = max_token_size
        self._max_token_count = max_token_count
        self._max_nesting = max_nesting
        # Lexer: state and the bytes of the token being lexed.
        self._state = _START
        self._token = bytearray()
        # Streamer: the current message's tokens, each followed by a space.
        self._message = bytearray()
        self._token_size = 0
        self._token_count = 0
        self._braces = 0
        self._brackets = 0
        self._out: list[Parsed | StreamError] = []

    def __repr__(self) -> str:  # never show buffered bytes: they may be secret
        return f"<JSONStreamParser pending={self.pending_bytes()}>"

    def pending_bytes(self) -> int:
        """Bytes held for an unfinished message (lets the server bound memory)."""
        return len(self._message) + len(self._token)

    def feed(self, data: bytes | bytearray) -> list[Parsed | StreamError]:
        """Consume `data`; return the values and errors it completed."""
        data = bytes(data)
        i, n = 0, len(data)
        START, RECOVERY = _START, _RECOVERY
        quick = _QUICK_TOKEN.match
        bulk = _BULK_RUN.match
        whitespace = _STAY_RUN[_LexState.START].match
        ascii_text = data.decode("ascii") if data.isascii() else None
        while i < n:
            state = self._state
            if state == START:
                byte = data[i]
                if byte in b" \t\r\n":
                    space = whitespace(data, i)
                    assert space is not None  # data[i] is whitespace
                    i = space.end()
                    continue
                if (
                    ascii_text is not None
                    and (byte == 0x7B or byte == 0x5B)
                    and self._token_count == 0
                ):
                    taken = self._take_whole_message(ascii_text, data, i)
                    if taken:
                        i = taken
                        continue
                m = bulk(data, i, i + _BULK_WINDOW)
                if m is not None:
                    taken = self._take_run(data, i, m.end())
                    if taken > i:
                        i = taken
                        continue
                m = quick(data, i)
                if m is not None:
                    kind = m.lastindex
                    assert kind is not None  # every alternative is a group
                    token = m.group(kind)
                    if kind == 1:
                        self._process_token(_STRUCTURAL[token[0]], token)
                        i = m.end()
                        continue
                    if len(token) <= self._max_token_size:
                        if kind == 2:
                            tok = _Tok.STRING
                        elif kind == 3:
                            tok = _Tok.KEYWORD
                        elif b"." in token or b"e" in token or b"E" in token:
                            tok = _Tok.FLOAT
                        else:
                            tok = _Tok.INTEGER
                        self._process_token(tok, token)
                        i = m.end()
                        continue
            run = _STAY_RUN_BY_STATE[state]
            if run is not None:
                m = run.match(data, i)
                if m is not None:
                    j = m.end()
                    if state == START or state == RECOVERY:
                        i = j
                        continue
                    room = self._max_token_size + 1 - len(self._token)
                    if j - i >= room:
                        self._token += data[i : i + room]
                        i += room
                        self._cut_oversized_token()
                    else:
                        self._token += data[i:j]
                        i = j
                    continue
            self._feed_byte(data[i])
            i += 1
        out, self._out = self._out, []
        return out

    # -- lexer ---------------------------------------------------------------

    def _feed_byte(self, byte: int) -> None:
        """json_lexer_feed_char(): one byte through the table."""
        token = self._token
        while True:
            step = _TABLE[self._state][byte]
            consumed = not step & _LOOKAHEAD
            new = step & ~_LOOKAHEAD
            if consumed:
                token.append(byte)
            if new >= _FIRST_TOKEN:
                self._process_token(new, bytes(token))
                token.clear()
                new = _START
            elif new == _START:
                token.clear()
            elif new == _ERROR:
                self._process_error(bytes(token))
                token.clear()
                new = _RECOVERY
            elif new == _RECOVERY:
                token.clear()
            self._state = new
            if consumed:
                break
        if len(token) > self._max_token_size:
            self._cut_oversized_token()

    def _cut_oversized_token(self) -> None:
        """The lexer hands an overlong partial token on; the streamer refuses it."""
        self._token.clear()
        self._state = _START
        self._emit_and_reset(StreamError("JSON token size limit exceeded"))

    # -- streamer --------------------------------------------------------------

    def _process_error(self, text: bytes) -> None:
        self._emit_and_reset(
            StreamError("JSON parse error, stray '" + _text_as_qemu_writes_it(text) + "'")
        )

    def _process_token(self, kind: int, text: bytes) -> None:
        """json_message_process_token() for a token that is not an error."""
        if kind == _LCURLY:
            self._braces += 1
        elif kind == _RCURLY:
            self._braces -= 1
        elif kind == _LSQUARE:
            self._brackets += 1
        elif kind == _RSQUARE:
            self._brackets -= 1
        if self._token_size + len(text) + 1 > self._max_token_size:
            self._emit_and_reset(StreamError("JSON token size limit exceeded"))
            return
        if self._token_count + 1 > self._max_token_count:
            self._emit_and_reset(StreamError("JSON token count limit exceeded"))
            return
        if self._braces + self._brackets > self._max_nesting:
            self._emit_and_reset(StreamError("JSON nesting depth limit exceeded"))
            return
        message = self._message
        message += text
        message.append(0x20)
        self._token_size += len(text)
        self._token_count += 1
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return
        result = _parse_message(bytes(message))
        self._emit_and_reset(result)

    def _take_whole_message(self, text: str, data: bytes, start: int) -> int:
        """Let the C decoder find and decode a whole message; 0 if it may not.

        Only at a message's first token, on ASCII input.  For a valid JSON
        object or array the streamer ends the message exactly at its last
        closer; the result stands when no limit can trip inside it and the
        decoder's hooks found nothing QEMU treats differently.
        """
        try:
            value, end = _FAST_DECODER.raw_decode(text, start)
        except (ValueError, RecursionError, _RefuseFastPath):
            return 0
        span = end - start  # bounds both token bytes and token count
        if span + 1 > self._max_token_size or span > self._max_token_count:
            return 0
        # Nesting is checked here, not left to the decoder (whether it gives
        # up, and how deep, is the interpreter's business: 3.13 goes deeper
        # than 3.12).  Going deeper than the limit takes that many openers
        # and as many closers, so a shorter message cannot.
        if span > 2 * self._max_nesting and _deeper_than(self._max_nesting, data, start, end):
            return 0
        if _RISKY_ESCAPE.search(data, start, end):
            return 0
        self._out.append(Parsed(value))
        return end

    def _take_run(self, data: bytes, start: int, end: int) -> int:
        """_process_token() for each whole token in data[start:end], inlined.

        Token bytes are not copied one by one: the message buffer receives
        the slices of `data` that hold them, whitespace gaps included.
        Stops before a token the lexer would cut for its size; returns
        where it stopped.
        """
        max_size, max_count = self._max_token_size, self._max_token_count
        max_nesting = self._max_nesting
        braces, brackets = self._braces, self._brackets
        size, count = self._token_size, self._token_count
        if (
            (braces > 0 or brackets > 0)
            and braces >= 0
            and brackets >= 0
            and not any(data.count(c, start, end) for c in (b"{", b"}", b"[", b"]"))
        ):
            # Inside a container and no brackets: no count the streamer
            # acts on changes, so only the totals need checking.
            tokens = _BULK_TOKENS_ONLY.findall(data, start, end)
            run_size = sum(map(len, tokens))
            if count + len(tokens) <= max_count and size + run_size + 1 <= max_size:
                buffered = self._message
                buffered += data[start:end]
                buffered.append(0x20)
                self._token_size = size + run_size
                self._token_count = count + len(tokens)
                return end
        begun = count > 0  # tokens of the current message are buffered
        first = -1  # where the current message's bytes in data start
        pos = start
        for gap, token in _BULK_TOKENS.findall(data, start, end):
            pos += len(gap)
            token_start = pos
            length = len(token)
            if length > max_size:
                end = token_start
                break
            pos += length
            byte = token[0]
            if byte == 0x7B:
                braces += 1
            elif byte == 0x7D:
                braces -= 1
            elif byte == 0x5B:
                brackets += 1
            elif byte == 0x5D:
                brackets -= 1
            if size + length + 1 > max_size:
                error = "JSON token size limit exceeded"
            elif count + 1 > max_count:
                error = "JSON token count limit exceeded"
            elif braces + brackets > max_nesting:
                error = "JSON nesting depth limit exceeded"
            else:
                error = None
            if error is not None:
                self._out.append(StreamError(error))
                self._message = bytearray()
                braces = brackets = size = count = 0
                begun, first = False, -1
                continue
            if first < 0:
                first = token_start
            size += length
            count += 1
            if (braces > 0 or brackets > 0) and braces >= 0 and brackets >= 0:
                continue
            if begun:
                buffered = self._message
                buffered += data[first:pos]
                message = bytes(buffered)
            else:
                message = data[first:pos]
            self._out.append(_parse_message(message))
            self._message = bytearray()
            braces = brackets = size = count = 0
            begun, first = False, -1
        if first >= 0:
            buffered = self._message
            buffered += data[first:end]
            buffered.append(0x20)
        self._braces, self._brackets = braces, brackets
        self._token_size, self._token_count = size, count
        return end

    def _emit_and_reset(self, result: Parsed | StreamError) -> None:
        self._out.append(result)
        self._message = bytearray()
        self._token_size = 0
        self._token_count = 0
        self._braces = 0
        self._brackets = 0
