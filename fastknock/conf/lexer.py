"""Lexing and scalar parsing for letmein-format configuration files.

Design
------
The reference is letmein's own reader (``letmein-conf/src/ini.rs``, ``parse.rs``,
``parse_items.rs``, 12.x). Every rule here mirrors it unless a comment says otherwise.

* Lines are split on ``"\\n"`` only and one trailing ``"\\r"`` is dropped (Rust's
  ``str::lines``). Python's ``splitlines`` would also split on ``\\x0b``, ``\\x1c``, U+2028...
* "White space" is Unicode White_Space (Rust's ``char::is_whitespace``), not Python's
  ``str.isspace`` (which adds ``\\x1c``-``\\x1f``): see ``WS``.
* A non-blank line that starts with a space or tab and follows an option line (or one of
  its continuations) continues that option: its left-stripped text is appended after one
  space. A blank line, a comment or a section header ends the option, so an indented line
  after a blank line is an ordinary line again (letmein's ``test_parser_continuation_bad``).
  An indented ``name = value`` with no option before it is an ordinary option, as in
  letmein; an indented line without ``=`` there is reported as a stray continuation.
* ``[NAME]``: the line, stripped, must end in ``]``; the name is taken verbatim.
* ``name = value``: split at the first ``=``; the name is right-stripped; the value is kept
  raw (each interpreter strips what it uses).
* Resource and port values are "maps": split on ``/`` into items; an item with a ``:`` is
  ``key: v1, v2`` (key stripped, values split on ``,`` and stripped), otherwise a bare
  ``v1, v2`` list. Items keep the line they start on, so errors inside a multi-line
  resource point at the right line.

Stricter than letmein (deliberately): duplicate options in a section are an error
(letmein silently keeps the last one). Numbers are ASCII-only with a length cap, so no
Python ``int()`` surprises (underscores, Unicode digits, the 4300-digit limit).

Nothing here ever puts a raw value into an error message; ``show()`` is the one way to
quote user text (``show_section`` for a section name), and it refuses anything that could
be key material or a terminal escape: no message holds a control character or a run of
more than 8 hex digits from the file (tests/test_config_messages.py).
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NoReturn

from fastknock.errors import ConfigError

# Unicode White_Space, i.e. what Rust's str::trim() removes.
WS = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)

_MAX_NUMBER_LEN = 32
_DEC = re.compile(r"[0-9]+")
_HEX = re.compile(r"0x[0-9A-Fa-f]+")
_NUMBERISH = re.compile(r"[0-9]*|0x[0-9A-Fa-f]*")  # letmein's is_number()
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_ID = re.compile(r"[0-9A-Fa-f]{1,8}")
_HEX_RUN = re.compile(r"[0-9A-Fa-f]{9,}")
_SHOW_MAX = 32
_SECTION_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # nftables table and chain names
U32_MAX = 0xFFFFFFFF


def strip(s: str) -> str:
    return s.strip(WS)


def show(s: str) -> str:
    """Quote user text for an error message, unless it might be (part of) a key."""
    if len(s) > _SHOW_MAX or _HEX_RUN.search(s) or not s.isprintable():
        return f"<{len(s)} characters, not shown>"
    return repr(s)


def hex_id(value: int) -> str:
    """An id (user, resource) as the docs write it: 8 hex digits."""
    return f"{value:08X}"


def show_section(name: str) -> str:
    """``[NAME]`` for a plain section name (letters, digits, ``_``, ``-``), else ``show``."""
    if _SECTION_PLAIN.fullmatch(name) and not _HEX_RUN.search(name):
        return f"[{name}]"
    return show(f"[{name}]")


@dataclass(slots=True)
class RawOption:
    name: str
    value: str
    line: int
    # Offsets into value where each continuation line's text starts, and those lines
    # (ascending; line_at bisects them, so an item's line costs O(log n), not O(n)).
    starts: list[int] = field(default_factory=list)
    start_lines: list[int] = field(default_factory=list)

    def line_at(self, offset: int) -> int:
        i = bisect.bisect_right(self.starts, offset)
        return self.start_lines[i - 1] if i else self.line


class _Continued:
    """An option being read: its continuation lines are collected and joined once at the
    end (appending to a growing string per line is quadratic)."""

    __slots__ = ("length", "opt", "parts")

    def __init__(self, opt: RawOption) -> None:
        self.opt = opt
        self.parts = [opt.value]
        self.length = len(opt.value)

    def add(self, text: str, lineno: int) -> None:
        self.length += 1
        self.opt.starts.append(self.length)
        self.opt.start_lines.append(lineno)
        self.parts.append(text)
        self.length += len(text)

    def finish(self) -> None:
        if len(self.parts) > 1:
            self.opt.value = " ".join(self.parts)


@dataclass(slots=True)
class RawSection:
    name: str
    line: int
    options: dict[str, RawOption] = field(default_factory=dict)


def lex(text: str, source: str) -> dict[str, RawSection]:
    """Split a config text into sections and options (no interpretation of values)."""
    sections: dict[str, RawSection] = {}
    current: RawSection | None = None
    last: _Continued | None = None
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if raw.endswith("\r"):
            raw = raw[:-1]
        indented = raw[:1] in (" ", "\t")
        if last is not None and indented and strip(raw):
            last.add(raw.lstrip(WS), lineno)
            continue
        if last is not None:
            last.finish()
            last = None
        line = raw.lstrip(WS)
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            line = line.rstrip(WS)
            if len(line) < 2 or not line.endswith("]"):
                raise ConfigError("malformed section header (expected '[NAME]')", source, lineno)
            name = line[1:-1]
            if not name:
                raise ConfigError("empty section name '[]'", source, lineno)
            if name in sections:
                first = sections[name].line
                raise ConfigError(
                    f"duplicate section {show_section(name)} (first on line {first})",
                    source,
                    lineno,
                )
            current = sections[name] = RawSection(name, lineno)
            continue
        idx = line.find("=")
        if idx < 0:
            if indented:
                msg = "continuation line (starts with white space) with no option to continue"
            else:
                msg = "line is neither a [SECTION] header, a 'name = value' option nor a comment"
            raise ConfigError(msg, source, lineno)
        if idx == 0:
            raise ConfigError("option has no name before '='", source, lineno)
        if current is None:
            raise ConfigError("option outside of any [SECTION]", source, lineno)
        name = line[:idx].rstrip(WS)
        if name in current.options:
            first = current.options[name].line
            raise ConfigError(
                f"{show_section(current.name)} duplicate option {show(name)} "
                f"(first on line {first})",
                source,
                lineno,
            )
        current.options[name] = opt = RawOption(name, line[idx + 1 :], lineno)
        last = _Continued(opt)
    if last is not None:
        last.finish()
    return sections


@dataclass(slots=True)
class Item:
    key: str | None  # None: a bare "v1, v2" item
    values: list[str]
    line: int


def _pieces(value: str) -> list[str]:
    """Split on ``/``, and also on a ``,`` that starts another ``key:`` attribute.

    PROTOCOL.md's own example writes ``port: 7500, timeout: 60``; a comma inside a value
    (``users: 1, 2``, ``tcp,udp``) is never followed by ``name:``, so this is unambiguous.
    Each piece keeps its separator's width (one character) for line accounting.
    """
    out: list[str] = []
    for piece in value.split("/"):
        segments = piece.split(",")
        current = [segments[0]]  # joined once: no string grown per segment (linear)
        keyed = ":" in segments[0]
        for seg in segments[1:]:
            if keyed and ":" in seg:
                out.append(",".join(current))
                current = [seg]
            else:
                current.append(seg)
                keyed = keyed or ":" in seg
        out.append(",".join(current))
    return out


def split_items(opt: RawOption, source: str, where: str) -> list[Item]:
    """Split a ``a / key: b, c / d`` value into items (letmein's ``Map``)."""
    items = []
    offset = 0
    for piece in _pieces(opt.value):
        lead = len(piece) - len(piece.lstrip(WS))
        line = opt.line_at(offset + min(lead, max(len(piece) - 1, 0)))
        offset += len(piece) + 1
        idx = piece.find(":")
        if idx >= 0:
            key = strip(piece[:idx])
            if not key:
                raise ConfigError(f"{where}: attribute has no name before ':'", source, line)
            items.append(Item(key, [strip(v) for v in piece[idx + 1 :].split(",")], line))
        else:
            items.append(Item(None, [strip(v) for v in piece.split(",")], line))
    return items


def looks_numeric(s: str) -> bool:
    """letmein's ``is_number``: decimal digits or ``0x`` + hex digits (possibly none)."""
    return _NUMBERISH.fullmatch(strip(s)) is not None


def parse_uint(s: str) -> int | None:
    """Decimal or ``0x`` hex unsigned integer (letmein's parse_u16/u32), else None."""
    s = strip(s)
    if len(s) > _MAX_NUMBER_LEN:
        return None
    if _DEC.fullmatch(s):
        return int(s, 10)
    if _HEX.fullmatch(s):
        return int(s[2:], 16)
    return None


def parse_float(s: str) -> float | None:
    """A finite float in Rust's ``f64`` syntax (no inf/nan, no underscores), else None."""
    s = strip(s)
    if len(s) > 2 * _MAX_NUMBER_LEN or not _FLOAT.fullmatch(s):
        return None
    value = float(s)
    return value if math.isfinite(value) else None


def parse_seconds(s: str) -> float | None:
    """A duration: an unsigned integer (decimal or ``0x`` hex, as letmein's control-timeout
    takes it) or a finite float, else None. Range checks are the caller's."""
    whole = parse_uint(s)
    return float(whole) if whole is not None else parse_float(s)


def parse_id(s: str) -> int | None:
    """A user/resource id: 1 to 8 hex digits, either case (letmein: from_str_radix 16)."""
    s = strip(s)
    return int(s, 16) if _ID.fullmatch(s) else None


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def parse_bool(s: str) -> bool | None:
    word = lower_word(s)
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    return None


def lower_word(s: str) -> str:
    """Stripped, lower-cased keyword; non-ASCII text never matches (no Kelvin-sign 'k')."""
    s = strip(s)
    return s.lower() if s.isascii() else "\0"


class Checker:
    """Scalar checks that raise ``ConfigError`` with the file name and line."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, message: str, line: int | None) -> NoReturn:
        raise ConfigError(message, self.source, line)

    def known_options(self, sect: RawSection, allowed: tuple[str, ...]) -> None:
        for name, opt in sect.options.items():
            if name not in allowed:
                self.fail(
                    f"[{sect.name}] unknown option {show(name)} (known: {', '.join(allowed)})",
                    opt.line,
                )

    def ids(
        self, sect: RawSection, bad: str, duplicate: str, lines: dict[int, int]
    ) -> Iterator[tuple[int, RawOption]]:
        """The options of an id-keyed section ([KEYS], [RESOURCES]) with their ids, in file
        order (so the first problem is the one reported); ``lines`` learns each id's line."""
        for name, opt in sect.options.items():
            ident = parse_id(name)
            if ident is None:
                self.fail(f"{bad} {show(strip(name))} (expected 8 hex digits)", opt.line)
            if ident in lines:
                self.fail(f"{duplicate} {hex_id(ident)} (first on line {lines[ident]})", opt.line)
            lines[ident] = opt.line
            yield ident, opt

    # -- scalars ------------------------------------------------------------------------

    def uint(self, value: str, what: str, line: int, lo: int, hi: int) -> int:
        n = parse_uint(value)
        if n is None or not lo <= n <= hi:
            self.fail(
                f"{what}: bad number {show(strip(value))} (expected a whole number {lo}..{hi})",
                line,
            )
        return n

    def name(self, value: str, what: str, line: int) -> str:
        s = strip(value)
        if not _NAME.fullmatch(s):
            self.fail(f"{what}: bad name {show(s)} (expected 1 to 64 of A-Z a-z 0-9 _ . -)", line)
        return s

    def id(self, value: str, what: str, line: int) -> int:
        n = parse_id(value)
        if n is None:
            self.fail(f"{what}: bad id {show(strip(value))} (expected 8 hex digits)", line)
        return n

    def enum(self, opt: RawOption, what: str, choices: tuple[str, ...]) -> str:
        word = lower_word(opt.value)
        if word not in choices:
            self.fail(
                f"{what}: bad value {show(strip(opt.value))} (expected {' | '.join(choices)})",
                opt.line,
            )
        return word
