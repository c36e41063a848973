"""Config error messages never carry terminal escapes or key-shaped text from the file.

Every string a message takes from the file goes through ``lexer.show`` (or
``show_section``): a control character (``ESC [2J`` clears an admin's terminal when the log
is read) or a run of hex digits that might be a key is replaced by "<N characters, not
shown>". The property test builds configs from hostile fragments (section names, option
names and values made of control characters, hex runs and the format's own punctuation) in
every position, for both roles.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastknock.conf.config import parse_config
from fastknock.errors import ConfigError

KEY_HEX = "80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D"
HEX64 = re.compile(r"[0-9A-Fa-f]{64}")
BASE = (
    "[GENERAL]\nport = 5800 / udp\n"
    "[NFTABLES]\nchain-input = LETMEIN-INPUT\n"
    f"[KEYS]\n00000001 = {KEY_HEX}\n"
    "[RESOURCES]\n00000022 = port: 22\n"
)


def message(text: str, role: str = "server") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.conf", role)  # type: ignore[arg-type]
    return str(info.value)


def clean(msg: str) -> bool:
    return msg.isprintable() and HEX64.search(msg) is None


@pytest.mark.parametrize(
    "text",
    [
        f"[{KEY_HEX}]\n[{KEY_HEX}]\n",  # duplicate section, key-shaped name
        "[X\x1b[2J]\n[X\x1b[2J]\n",  # duplicate section, terminal escape
        f"[{KEY_HEX}]\na = 1\na = 2\n",  # duplicate option: the section name is quoted too
        "[X\x1b[2J]\na = 1\na = 2\n",
        f"[X\x1b[2J{KEY_HEX}]\n",  # unknown section (was quoted already: a control)
    ],
)
def test_section_names_are_quoted_in_every_message(text: str) -> None:
    msg = message(text)
    assert "t.conf:" in msg and "not shown" in msg, msg
    assert clean(msg), repr(msg)


def test_plain_section_names_still_read_plainly() -> None:
    """The control: an ordinary section name is still shown as written."""
    assert "duplicate section [KEYS] (first on line 1)" in message("[KEYS]\n[KEYS]\n")
    assert "[GENERAL] duplicate option 'port'" in message("[GENERAL]\nport = 1\nport = 2\n")


_HOSTILE = st.sampled_from(
    [
        "\x1b[2J",
        "\x1b]0;pwn\x07",
        "\x00",
        "\x7f",
        "\x9b",
        "\u202e",
        "\r",
        "\t",
        KEY_HEX,
        KEY_HEX[:32],
        KEY_HEX[:9],
        "GENERAL",
        "KEYS",
        "RESOURCES",
        "NFTABLES",
        "HOOKS",
        "on-open",
        "hook-user",
        "hook-timeout",
        "/bin/x '",
        "port",
        "users",
        "jump",
        "input",
        "0x",
        "=",
        "/",
        ":",
        ",",
        "[",
        "]",
        " ",
        "#",
    ]
)
_WORD = st.lists(_HOSTILE | st.text(max_size=3), min_size=1, max_size=5).map("".join)
_LINE = st.one_of(
    _WORD.map(lambda w: f"[{w}]"),
    st.tuples(_WORD, _WORD).map(lambda p: f"{p[0]} = {p[1]}"),
    _WORD.map(lambda w: f"  {w}"),  # a continuation line
    _WORD,
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_LINE, max_size=8),
    st.integers(min_value=0, max_value=BASE.count("\n")),
    st.sampled_from(["server", "client"]),
)
def test_no_message_holds_control_characters_or_key_material(
    lines: list[str], at: int, role: str
) -> None:
    """Hostile lines spliced into a valid config at any line: parse or a clean error."""
    base = BASE.split("\n")
    text = "\n".join(base[:at] + lines + base[at:])
    try:
        parse_config(text, "t.conf", role)  # type: ignore[arg-type]
    except ConfigError as exc:
        assert clean(str(exc)), repr(str(exc))
