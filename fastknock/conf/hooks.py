"""The ``[HOOKS]`` section (fastknock extension, issue 15): programs fastknockfwd runs when a
knock-lease opens and closes.

Design
------
* Options, exactly: ``on-open = COMMAND``, ``on-close = COMMAND``, ``hook-user = ACCOUNT``
  (default ``nobody``), ``hook-timeout = SECONDS`` (default 10; 0 < SECONDS <= 3600).
* COMMAND is a program and its arguments, never run through a shell: the value is split
  into words the way a POSIX shell splits them (``shlex.split``: single and double quotes,
  backslash escapes; no variables, globs, pipes or redirections, and no comments), and the
  first word must be an absolute path (no ``PATH`` search: what runs is what the file
  names). At most 64 words and 4096 characters; no control characters.
* ``hook-user`` is an account name (``[A-Za-z_][A-Za-z0-9_.-]*``, at most 32 characters,
  an optional trailing ``$``). ``root`` is refused here; fastknockfwd refuses at start-up an
  account that resolves to uid 0 or gid 0, or does not exist (``firewall.hookproc``).
* Role: the server keeps the section (``Config.hooks``). The client validates it the same
  way, so a file one may copy between both roles is checked everywhere, and ignores it
  (``Config.hooks`` is None): the client runs no hooks.
* A section without ``on-open`` and ``on-close`` is valid and runs nothing (fastknockfwd
  then starts no hook runner).
* Errors name the file, the line and the option; values are quoted only through
  ``lexer.show`` (never key-shaped text or control characters).
"""

from __future__ import annotations

import re
import shlex

from fastknock.conf.lexer import Checker, RawOption, RawSection, parse_seconds, show
from fastknock.conf.lexer import strip as _strip
from fastknock.conf.model import HooksConfig

__all__ = ["HOOK_OPTIONS", "MAX_COMMAND_CHARS", "MAX_COMMAND_WORDS", "MAX_TIMEOUT", "hooks"]

HOOK_OPTIONS = ("on-open", "on-close", "hook-user", "hook-timeout")
MAX_COMMAND_CHARS = 4096
MAX_COMMAND_WORDS = 64
MAX_TIMEOUT = 3600.0
_ACCOUNT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")


def _command(p: Checker, opt: RawOption) -> tuple[str, ...]:
    where = f"[HOOKS] {opt.name}"
    text = _strip(opt.value)
    if not text:
        p.fail(f"{where}: empty (expected an absolute program path and its arguments)", opt.line)
    if len(text) > MAX_COMMAND_CHARS:
        p.fail(f"{where}: longer than {MAX_COMMAND_CHARS} characters", opt.line)
    if not text.isprintable():
        p.fail(f"{where}: contains a control character", opt.line)
    try:
        words = shlex.split(text, comments=False, posix=True)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        p.fail(f"{where}: cannot split into words ({str(exc).lower()})", opt.line)
    if not words:
        p.fail(f"{where}: empty (expected an absolute program path and its arguments)", opt.line)
    if len(words) > MAX_COMMAND_WORDS:
        p.fail(f"{where}: more than {MAX_COMMAND_WORDS} words", opt.line)
    if not words[0].startswith("/"):
        p.fail(
            f"{where}: the program {show(words[0])} is not an absolute path (hooks run "
            "without a shell and without a PATH search)",
            opt.line,
        )
    return tuple(words)


def _account(p: Checker, opt: RawOption) -> str:
    name = _strip(opt.value)
    if not _ACCOUNT.fullmatch(name):
        p.fail(
            f"[HOOKS] hook-user: bad account name {show(name)} "
            "(expected letters, digits, _ . -, at most 32 characters)",
            opt.line,
        )
    if name == "root":
        p.fail("[HOOKS] hook-user: 'root' is refused: hooks never run as root", opt.line)
    return name


def _timeout(p: Checker, opt: RawOption) -> float:
    value = parse_seconds(opt.value)
    if value is None or not 0 < value <= MAX_TIMEOUT:
        p.fail(
            f"[HOOKS] hook-timeout: bad number {show(_strip(opt.value))} "
            f"(expected positive seconds, at most {MAX_TIMEOUT:g})",
            opt.line,
        )
    return value


def hooks(p: Checker, sect: RawSection, role: str) -> HooksConfig | None:
    """``[HOOKS]`` as ``HooksConfig`` (server), validated and dropped (client)."""
    p.known_options(sect, HOOK_OPTIONS)
    opts = sect.options
    kw: dict[str, object] = {}
    for name in ("on-open", "on-close"):
        if name in opts:
            kw[name.replace("-", "_")] = _command(p, opts[name])
    if "hook-user" in opts:
        kw["user"] = _account(p, opts["hook-user"])
    if "hook-timeout" in opts:
        kw["timeout"] = _timeout(p, opts["hook-timeout"])
    if role != "server":
        return None
    return HooksConfig(**kw)  # type: ignore[arg-type]
