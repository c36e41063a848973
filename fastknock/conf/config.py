"""Configuration files (letmein's format), parsed to frozen dataclasses.

Design
------
* ``parse_config(text, source, role)`` is pure: text in, a frozen ``Config`` out, or a
  ``ConfigError(message, source, line)``. ``load_config`` only reads the bytes. The lexer
  and the scalar parsers live in ``lexer``, the types in ``model`` (re-exported here);
  this module owns the meaning of each section. The format is PROTOCOL.md "Configuration
  file format"; where that text is silent, letmein 12.x's own reader (letmein-conf)
  decides.
* A file letmein accepts loads with the same meaning, with these deliberate exceptions,
  each of which only rejects files that are wrong or ambiguous anyway: unknown sections
  and options, duplicate options, ``X-match`` without ``X:``, port 0, zero timeouts,
  fractional nftables/resource timeouts, table/chain names outside
  ``[A-Za-z0-9_.-]{1,64}``, and (server) a missing ``[NFTABLES]``/``chain-input``.
  Two port resources may share a port number when their protocols do not overlap
  (letmein refuses any shared number).
* Ids (users, resources, default-user) are 1 to 8 hex digits, as letmein reads them
  (``u32::from_str_radix(s, 16)``); the docs always write 8.
* Keys are secrets: they live only in ``Config.keys`` (``repr=False``) and no error message
  quotes a key, a key-shaped string, or a whole line (see ``lexer.show``).
* Role "server" needs ``[NFTABLES]`` with ``chain-input``. Role "client" parses
  ``[NFTABLES]`` if present (validated the same way) and sets ``nftables`` only when it
  names ``chain-input``. ``[CLIENT]`` is accepted in both roles.
* Mappings in ``Config`` are read-only ``MappingProxyType`` views.
* fastknock extensions (letmein has none of these): ``[NFTABLES] prefilter = on|off``
  (default on), ``prefilter-rate`` (default 100 datagrams/s per source),
  ``prefilter-burst`` (default 200), ``prefilter-ipv6-prefix`` (default 64),
  ``prefilter-ipv6-group`` (default 48) and ``prefilter-spare`` (default 20000/s): the
  in-kernel pre-filter of a UDP control port, set up by fastknockfwd (``firewall/prefilter.py``);
  ``[HOOKS]`` (``conf/hooks.py``); [RESOURCES] and its extensions (port ranges, prefix
  opens): ``resources``.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_CLIENT_CONFIG",
    "DEFAULT_CONTROL_PORT",
    "DEFAULT_SERVER_CONFIG",
    "Config",
    "ErrorPolicy",
    "JumpResource",
    "NftablesConfig",
    "PortResource",
    "Resource",
    "Role",
    "SeccompMode",
    "config_checksum",
    "load_config",
    "parse_config",
]

import hashlib
import os
import re
from types import MappingProxyType
from typing import Literal

from fastknock.conf.files import MAX_CONFIG_BYTES, read_config_file, too_large
from fastknock.conf.hooks import hooks as parse_hooks
from fastknock.conf.lexer import (
    U32_MAX,
    RawOption,
    RawSection,
    hex_id,
    lex,
    looks_numeric,
    lower_word,
    parse_bool,
    parse_seconds,
    show,
    split_items,
    strip,
)
from fastknock.conf.model import (
    DEFAULT_CONTROL_PORT,
    Config,
    ErrorPolicy,
    HooksConfig,
    JumpResource,
    NftablesConfig,
    PortResource,
    Resource,
    SeccompMode,
)
from fastknock.conf.resources import ResourceParser, protocols
from fastknock.errors import ConfigError

DEFAULT_CLIENT_CONFIG = "/etc/fastknock/fastknock.conf"
DEFAULT_SERVER_CONFIG = "/etc/fastknock/fastknockd.conf"

Role = Literal["server", "client"]


# --------------------------------------------------------------------------- parsing

_KEY_HEX = re.compile(r"[0-9A-Fa-f]{64}")
_SECTIONS = ("GENERAL", "NFTABLES", "CLIENT", "KEYS", "RESOURCES", "HOOKS")
_GENERAL = ("debug", "port", "control-timeout", "control-error-policy", "seccomp")
_NFTABLES = tuple(
    "exe family table chain-input chain-forward chain-output timeout max-nr-rules".split()
) + (
    "prefilter",
    "prefilter-rate",
    "prefilter-burst",
    "prefilter-ipv6-prefix",
    "prefilter-ipv6-group",
    "prefilter-spare",
)
_PREFILTER_MAX = 1_000_000  # datagrams/s and burst: far above any real knock rate
_CLIENT = ("default-user",)
_FAMILIES = ("inet", "ip", "ip6")


def config_checksum(data: bytes) -> bytes:
    """letmein's ConfigChecksum: SHA3-256(u64 big-endian len(data) || data)."""
    h = hashlib.sha3_256(len(data).to_bytes(8, "big"))
    h.update(data)
    return h.digest()


class _Parser(ResourceParser):
    """Every section but [RESOURCES] (``resources.ResourceParser``) lives here."""

    def __init__(self, source: str, role: Role) -> None:
        super().__init__(source)
        self.role = role

    # -- [GENERAL] ----------------------------------------------------------------------

    def general(self, sect: RawSection, out: dict[str, object]) -> None:
        self.known_options(sect, _GENERAL)
        opts = sect.options
        if "debug" in opts:
            opt = opts["debug"]
            flag = parse_bool(opt.value)
            if flag is None:
                self.fail(
                    f"[GENERAL] debug: bad value {show(strip(opt.value))} (expected true|false)",
                    opt.line,
                )
            out["debug"] = flag
        if "port" in opts:
            out["port"], out["port_tcp"], out["port_udp"] = self.control_port(opts["port"])
        if "control-timeout" in opts:
            opt = opts["control-timeout"]
            timeout = parse_seconds(opt.value)  # letmein also takes 0x hex here
            if timeout is None or not 0 < timeout <= U32_MAX:
                self.fail(
                    f"[GENERAL] control-timeout: bad number {show(strip(opt.value))} "
                    "(expected positive seconds)",
                    opt.line,
                )
            out["control_timeout"] = timeout
        if "control-error-policy" in opts:
            choices = tuple(p.value for p in ErrorPolicy)
            word = self.enum(
                opts["control-error-policy"], "[GENERAL] control-error-policy", choices
            )
            out["control_error_policy"] = ErrorPolicy(word)
        if "seccomp" in opts:
            choices = tuple(m.value for m in SeccompMode)
            out["seccomp"] = SeccompMode(self.enum(opts["seccomp"], "[GENERAL] seccomp", choices))

    def control_port(self, opt: RawOption) -> tuple[int, bool, bool]:
        where = "[GENERAL] port"
        port: int | None = None
        tcp = udp = False
        for item in split_items(opt, self.source, where):
            if item.key is not None:
                self.fail(f"{where}: unknown attribute {show(item.key)}", item.line)
            if item.values == [""]:
                self.fail(f"{where}: empty item (expected a port number, tcp or udp)", item.line)
            if len(item.values) == 1 and looks_numeric(item.values[0]):
                if port is not None:
                    self.fail(f"{where}: more than one port number", item.line)
                port = self.uint(item.values[0], where, item.line, 1, 0xFFFF)
                continue
            t, u, bad = protocols(item.values)
            if bad is not None:
                self.fail(
                    f"{where}: unknown protocol {show(bad)} (expected tcp, udp or both)",
                    item.line,
                )
            tcp, udp = tcp or t, udp or u
        if not (tcp or udp):
            tcp = True
        return (DEFAULT_CONTROL_PORT if port is None else port), tcp, udp

    # -- [NFTABLES] and [CLIENT] --------------------------------------------------------

    def nftables(self, sect: RawSection | None) -> NftablesConfig | None:
        if sect is None:
            if self.role == "server":
                self.fail("missing section [NFTABLES] (required on the server)", None)
            return None
        self.known_options(sect, _NFTABLES)
        opts = sect.options
        kw: dict[str, object] = {}
        if "exe" in opts:
            exe = strip(opts["exe"].value)
            if not exe or not exe.isprintable():
                self.fail("[NFTABLES] exe: must be a non-empty printable path", opts["exe"].line)
            kw["exe"] = exe
        if "family" in opts:
            opt = opts["family"]
            family = strip(opt.value)
            if family not in _FAMILIES:
                self.fail(
                    f"[NFTABLES] family: bad value {show(family)} (expected inet | ip | ip6)",
                    opt.line,
                )
            kw["family"] = family
        for name in ("table", "chain-input", "chain-forward", "chain-output"):
            if name in opts:
                kw[name.replace("-", "_")] = self.name(
                    opts[name].value, f"[NFTABLES] {name}", opts[name].line
                )
        for name in ("timeout", "max-nr-rules"):
            if name in opts:
                kw[name.replace("-", "_")] = self.uint(
                    opts[name].value, f"[NFTABLES] {name}", opts[name].line, 1, U32_MAX
                )
        self.prefilter(opts, kw)
        if "chain_input" not in kw:
            if self.role == "server":
                self.fail("[NFTABLES] missing required option 'chain-input'", sect.line)
            return None
        return NftablesConfig(**kw)  # type: ignore[arg-type]

    def prefilter(self, opts: dict[str, RawOption], kw: dict[str, object]) -> None:
        """``prefilter = on|off`` (also true/false), ``prefilter-rate`` (datagrams/s per
        source), ``prefilter-burst`` (datagrams), ``prefilter-ipv6-prefix`` and
        ``prefilter-ipv6-group`` (16..128), ``prefilter-spare`` (datagrams/s, 0 = none)."""
        if "prefilter" in opts:
            opt = opts["prefilter"]
            word = lower_word(opt.value)
            flag = {"on": True, "off": False}.get(word, parse_bool(opt.value))
            if flag is None:
                self.fail(
                    f"[NFTABLES] prefilter: bad value {show(strip(opt.value))} (expected on | off)",
                    opt.line,
                )
            kw["prefilter"] = flag
        for name, lo, hi in (
            ("prefilter-rate", 1, _PREFILTER_MAX),
            ("prefilter-burst", 1, _PREFILTER_MAX),
            ("prefilter-ipv6-prefix", 16, 128),
            ("prefilter-ipv6-group", 16, 128),
            ("prefilter-spare", 0, _PREFILTER_MAX),
        ):
            if name in opts:
                kw[name.replace("-", "_")] = self.uint(
                    opts[name].value, f"[NFTABLES] {name}", opts[name].line, lo, hi
                )

    def client(self, sect: RawSection) -> int | None:
        self.known_options(sect, _CLIENT)
        opt = sect.options.get("default-user")
        return None if opt is None else self.id(opt.value, "[CLIENT] default-user", opt.line)

    # -- [KEYS] -------------------------------------------------------------------------

    def keys(self, sect: RawSection) -> dict[int, bytes]:
        found = self.ids(sect, "[KEYS] bad user id", "[KEYS] duplicate key for user", {})
        return {uid: self.key(opt, uid) for uid, opt in found}

    def key(self, opt: RawOption, uid: int) -> bytes:
        # Never quote the value: not even a wrong one (it may be a real key with a typo).
        text = strip(opt.value)
        what = f"[KEYS] key of user {hex_id(uid)}"
        if len(text) != 64:
            self.fail(f"{what}: must be 64 hex digits (got {len(text)})", opt.line)
        if not _KEY_HEX.fullmatch(text):
            self.fail(f"{what}: must be 64 hex digits (found a non-hex character)", opt.line)
        key = bytes.fromhex(text)
        if key == bytes(32):
            self.fail(f"{what}: the all-zero key is not allowed", opt.line)
        if key == b"\xff" * 32:
            self.fail(
                f"{what}: the all-FF key is letmein's placeholder, not a key "
                "(make one with gen-key)",
                opt.line,
            )
        return key


def parse_config(text: str | bytes, source: str = "<string>", role: Role = "server") -> Config:
    """Parse a whole config file. Raises ``ConfigError`` naming source, line and problem."""
    if role not in ("server", "client"):
        raise ValueError(f"role must be 'server' or 'client', not {role!r}")
    if isinstance(text, str):
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            line = text.count("\n", 0, exc.start) + 1
            raise ConfigError("text is not valid Unicode (lone surrogate)", source, line) from None
    else:
        data = bytes(text)
    if len(data) > MAX_CONFIG_BYTES:
        raise too_large(data, source)
    if not isinstance(text, str):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise ConfigError("file is not valid UTF-8", source, line) from None
    p = _Parser(source, role)
    sections = lex(text, source)
    general: dict[str, object] = {}
    nftables: NftablesConfig | None = None
    default_user: int | None = None
    keys: dict[int, bytes] = {}
    resources: dict[int, Resource] = {}
    hooks: HooksConfig | None = None
    for name, sect in sections.items():  # file order: the first problem is the one reported
        if name == "GENERAL":
            p.general(sect, general)
        elif name == "NFTABLES":
            nftables = p.nftables(sect)
        elif name == "CLIENT":
            default_user = p.client(sect)
        elif name == "KEYS":
            keys = p.keys(sect)
        elif name == "RESOURCES":
            resources = p.resources(sect)
        elif name == "HOOKS":  # conf/hooks.py
            hooks = parse_hooks(p, sect, role)
        else:
            known = " ".join(f"[{n}]" for n in _SECTIONS)
            p.fail(f"unknown section {show(f'[{name}]')} (known: {known})", sect.line)
    if "NFTABLES" not in sections:
        p.nftables(None)  # raises on the server
    if role == "server":  # the control port is known once every section is read
        control_port = general.get("port", DEFAULT_CONTROL_PORT)
        assert isinstance(control_port, int)
        p.check_control_port(resources, control_port)
    return Config(
        source=source,
        checksum=config_checksum(data),
        nftables=nftables,
        default_user=default_user,
        keys=MappingProxyType(keys),
        resources=MappingProxyType(resources),
        hooks=hooks,
        **general,  # type: ignore[arg-type]
    )


def load_config(path: str | os.PathLike[str], role: Role) -> Config:
    """Read (``files.read_config_file``: a regular file, at most 1 MiB) and parse a config
    file; any OS error becomes a ``ConfigError``."""
    source = os.fspath(path)
    return parse_config(read_config_file(source), source, role)
