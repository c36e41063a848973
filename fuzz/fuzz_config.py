#!/usr/bin/env python3
"""Fuzz target "config": ``fastknock.conf.config.parse_config`` in both roles.

Invariant: for any bytes and either role ("server", "client"), ``parse_config`` returns a
``Config`` or raises ``ConfigError``, never another exception; no error message contains a
control, format or line-separator character (Unicode Cc, Cf, Zl, Zp, Cs: terminal escapes,
bidi overrides, forged log lines) or a run of 64 hex digits (a key); a ``Config``'s repr
shows none of its keys; and whatever the server role accepts, the client role accepts with
the same keys and resources (the client only drops the server's ``[NFTABLES]``
requirement). Input: the file's bytes, as ``load_config`` would read them. The seeds are
these and tests/compat's letmein files (``fuzz/run.py`` passes that directory too).
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections.abc import Iterator

import atheris
import harness
from harness import Violation, short

with atheris.instrument_imports():
    from fastknock.conf.config import parse_config
    from fastknock.errors import ConfigError

_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
# One character class of every such code point: a regex search per message is much cheaper
# than a category lookup per character (this target's speed is the parser's speed).
_BAD = re.compile(
    "["
    + "".join(
        re.escape(chr(cp))
        for cp in range(sys.maxunicode + 1)
        if unicodedata.category(chr(cp)) in _BAD_CATEGORIES
    )
    + "]"
)


def unsafe_text(message: str) -> str | None:
    """What makes ``message`` unfit for a log line or a terminal, or None."""
    bad = _BAD.search(message)
    if bad:
        return f"a control character (U+{ord(bad.group()):04X})"
    if _HEX64.search(message):
        return "64 hex digits"
    return None


def parse(data: bytes, role: str) -> object:
    try:
        return parse_config(data, source="fuzz.conf", role=role)  # type: ignore[arg-type]
    except ConfigError as exc:
        problem = unsafe_text(str(exc))
        if problem is not None:
            what = problem.split(" (")[0]
            raise Violation(
                f"error message shows {what}", f"{problem}: {short(str(exc))}"
            ) from None
        return exc


def one(data: bytes) -> None:
    server = parse(data, "server")
    client = parse(data, "client")
    for cfg in (server, client):
        if isinstance(cfg, ConfigError):
            continue
        text = repr(cfg)
        for key in cfg.keys.values():  # type: ignore[attr-defined]
            if key and (key.hex() in text.lower() or repr(key) in text):
                raise Violation("Config repr shows a key")
    if not isinstance(server, ConfigError):
        if isinstance(client, ConfigError):
            raise Violation("server role accepts what the client role refuses", str(client))
        if (server.keys, server.resources) != (client.keys, client.resources):  # type: ignore[attr-defined]
            raise Violation("server and client roles read different keys or resources")


KEY = "80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D"
NFT = "[NFTABLES]\nchain-input = LETMEIN-INPUT\n"
SEEDS = (
    # Smallest valid server and client files.
    NFT,
    f"[KEYS]\n12345678 = {KEY}\n[CLIENT]\ndefault-user = 12345678\n",
    # Every section and option fastknock knows, multi-line resources, CRLF and comments.
    "[GENERAL]\r\ndebug = on\r\nport = 5800 / tcp, udp\r\ncontrol-timeout = 2.5\r\n"
    "control-error-policy = basic-auth\r\nseccomp = log\r\n# comment\r\n"
    f"{NFT}family = inet\ntable = filter\nchain-forward = F\nchain-output = O\n"
    "timeout = 600\nmax-nr-rules = 100\nprefilter = off\nprefilter-rate = 50\n"
    "prefilter-burst = 10\nprefilter-ipv6-prefix = 48\n"
    f"[KEYS]\n1 = {KEY}\nABCDEF01 = {KEY.lower()}\n"
    "[RESOURCES]\n2 = port: 22 / tcp / users: 1, ABCDEF01 / timeout: 30\n"
    "3 = port: 53\n  / udp\n4 = jump / input: I / input-match: saddr, daddr /\n"
    "    forward: F / forward-match: saddr / output: O / output-match: daddr / timeout: 9\n"
    "[CLIENT]\ndefault-user = 1\n",
    # issue 12 finding 4: section names reached "duplicate ..." errors unquoted.
    "[X\x1b[2J]\n[X\x1b[2J]\n",
    f"[{KEY}]\na = 1\na = 2\n",
)


def seeds() -> Iterator[bytes]:
    for text in SEEDS:
        yield text.encode()


if __name__ == "__main__":
    harness.main("config", one, seeds)
