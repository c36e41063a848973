"""Tests of fastknock.conf.config: letmein's own config files load with letmein's meaning, and
every malformed input is a ConfigError that names the file, the line and the problem.

Fuzz invariant (hypothesis tests at the end): any text or bytes -> a Config or a
ConfigError, never another exception; and no error message ever contains key material.

The letmein fixtures are read from tests/compat/ (or $FASTKNOCK_COMPAT_DIR)
(override with FASTKNOCK_COMPAT_DIR). Behaviour marked "letmein:" is taken from letmein
12.x's own unit tests (letmein-conf/src/lib.rs, ini.rs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastknock.conf.config import (
    Config,
    ErrorPolicy,
    JumpResource,
    NftablesConfig,
    PortResource,
    SeccompMode,
    config_checksum,
    load_config,
    parse_config,
)
from fastknock.errors import ConfigError

# --------------------------------------------------------------------------- fixtures


def _compat_dir() -> Path:
    """letmein's own fixtures, copied unmodified into tests/compat/ (see its README.md)."""
    env = os.environ.get("FASTKNOCK_COMPAT_DIR")
    path = Path(env) if env else Path(__file__).parent / "compat"
    assert (path / "letmeind.conf").is_file(), f"letmein compat fixtures missing in {path}"
    return path


@pytest.fixture(scope="module")
def compat() -> Path:
    return _compat_dir()


KEY_HEX = "80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D"  # test-*.conf
KEY2_HEX = "998877665544332211009988776655443322110099887766554433221100CDEF"  # letmein test
NFT = "[NFTABLES]\nchain-input = LETMEIN-INPUT\n"  # two lines, for server-role snippets
SRC = "t.conf"


def err(text: str | bytes, role: str = "client") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC, role)  # type: ignore[arg-type]
    return info.value


def check(text: str | bytes, line: int | None, *fragments: str, role: str = "client") -> None:
    e = err(text, role)
    assert e.source == SRC
    assert e.line == line, (e.line, e.message)
    for fragment in fragments:
        assert fragment in e.message, (fragment, e.message)
    where = SRC if line is None else f"{SRC}:{line}"
    assert str(e) == f"{where}: {e.message}"


def client(text: str) -> Config:
    return parse_config(text, SRC, "client")


# --------------------------------------------------------------------------- compat files


def _expect_test_conf(cfg: Config) -> None:
    assert cfg.debug is True
    assert cfg.port == 5810
    assert cfg.control_timeout == 5.0
    assert cfg.control_error_policy is ErrorPolicy.ALWAYS
    assert cfg.seccomp is SeccompMode.KILL
    assert cfg.default_user is None
    assert dict(cfg.keys) == {0x12345678: bytes.fromhex(KEY_HEX)}
    assert set(cfg.resources) == {0x87654321, 0xAABBCCDD}
    assert cfg.resources[0x87654321] == PortResource(0x87654321, 42, tcp=True, udp=False)
    assert cfg.resources[0xAABBCCDD] == JumpResource(
        0xAABBCCDD,
        input="MYCHAIN-INPUT",
        forward="MYCHAIN-FORWARD",
        output="MYCHAIN-OUTPUT",
        input_match_saddr=True,
        forward_match_saddr=True,
        output_match_saddr=True,
        users=frozenset({0x12345678}),
        timeout=60,
    )


def test_test_udp_conf(compat: Path) -> None:
    cfg = load_config(compat / "test-udp.conf", "server")
    _expect_test_conf(cfg)
    assert (cfg.port_tcp, cfg.port_udp) == (False, True)
    assert cfg.nftables == NftablesConfig(
        chain_input="LETMEIN-INPUT",
        exe="nft",
        family="inet",
        table="filter",
        chain_forward="LETMEIN-FORWARD",
        chain_output="LETMEIN-OUTPUT",
        timeout=600,
        max_nr_rules=100,  # "#max-nr-rules = ..." is commented out: the default
    )
    assert cfg.source == str(compat / "test-udp.conf")


def test_test_tcp_conf(compat: Path) -> None:
    cfg = load_config(str(compat / "test-tcp.conf"), "server")
    _expect_test_conf(cfg)
    assert (cfg.port_tcp, cfg.port_udp) == (True, False)
    assert cfg.nftables is not None
    assert cfg.nftables.max_nr_rules == 5
    assert cfg.nftables.timeout == 600


def test_letmeind_conf(compat: Path) -> None:
    cfg = load_config(compat / "letmeind.conf", "server")
    assert cfg.debug is True
    assert (cfg.port, cfg.port_tcp, cfg.port_udp) == (5800, True, False)
    assert cfg.control_timeout == 5.0
    assert cfg.control_error_policy is ErrorPolicy.ALWAYS
    assert cfg.seccomp is SeccompMode.OFF
    assert cfg.nftables == NftablesConfig(
        "LETMEIN-INPUT", "nft", "inet", "filter", "LETMEIN-FORWARD", "LETMEIN-OUTPUT", 600, 100
    )
    assert dict(cfg.keys) == {}
    assert dict(cfg.resources) == {}
    assert cfg.default_user is None


def test_letmein_conf_as_client(compat: Path) -> None:
    cfg = load_config(compat / "letmein.conf", "client")
    assert cfg.debug is True
    assert (cfg.port, cfg.port_tcp, cfg.port_udp) == (5800, True, False)
    assert cfg.control_timeout == 5.0
    assert cfg.seccomp is SeccompMode.OFF
    assert cfg.default_user == 1
    assert dict(cfg.keys) == {}
    assert dict(cfg.resources) == {}
    assert cfg.nftables is None


def test_letmein_conf_is_not_a_server_config(compat: Path) -> None:
    path = compat / "letmein.conf"
    with pytest.raises(ConfigError) as info:
        load_config(path, "server")
    assert info.value.source == str(path)
    assert info.value.line is None
    assert "missing section [NFTABLES]" in info.value.message


@pytest.mark.parametrize("name", ["letmeind.conf", "letmein.conf", "test-udp.conf"])
def test_checksum_of_compat_files(compat: Path, name: str) -> None:
    data = (compat / name).read_bytes()
    expected = hashlib.sha3_256(len(data).to_bytes(8, "big") + data).digest()
    assert config_checksum(data) == expected
    assert load_config(compat / name, "client").checksum == expected
    assert parse_config(data.decode(), "x", "client").checksum == expected  # str == bytes


def test_checksum_known_answer() -> None:
    # letmein-conf/src/lib.rs test_checksum: ConfigChecksum::calculate(b"foo").
    expected = bytes(
        [169, 20, 32, 235, 39, 155, 209, 150, 21, 4, 157, 0, 214, 7, 7, 53]
        + [175, 241, 233, 40, 193, 191, 156, 101, 63, 41, 34, 51, 17, 221, 76, 170]
    )
    assert config_checksum(b"foo") == expected
    assert config_checksum(b"") == hashlib.sha3_256(bytes(8)).digest()


def _uncomment_examples(text: str, keys: dict[str, str]) -> str:
    """Uncomment every example option (``#name = ...``) in [KEYS] and [RESOURCES],
    with its ``#   continued`` lines, and give the users real keys."""
    out: list[str] = []
    section = ""
    in_example = False
    for line in text.split("\n"):
        if line.startswith("["):
            section = line
        example = section in ("[KEYS]", "[RESOURCES]")
        if example and re.match(r"#[0-9A-Fa-f]{8} = ", line):
            line = line[1:]
            uid = line.split("=")[0].strip()
            if uid in keys:
                line = f"{uid} = {keys[uid]}"
            in_example = True
        elif example and in_example and re.match(r"#\s{4,}\S", line):
            line = line[1:]  # a continuation line of the example above
        else:
            in_example = False
        out.append(line)
    return "\n".join(out)


def test_letmeind_conf_examples_all_parse(compat: Path) -> None:
    text = _uncomment_examples(
        (compat / "letmeind.conf").read_text(), {"00000001": KEY_HEX, "00000002": KEY2_HEX}
    )
    assert "\n0000001A = port: 2000" in text and "\n           timeout: 60" in text
    cfg = parse_config(text, "letmeind.conf", "server")
    assert dict(cfg.keys) == {1: bytes.fromhex(KEY_HEX), 2: bytes.fromhex(KEY2_HEX)}
    r = cfg.resources
    assert r[0x1A] == PortResource(0x1A, 2000)
    assert r[0x1B] == PortResource(0x1B, 3500)
    assert r[0x1C] == PortResource(0x1C, 4500, users=frozenset({1, 2}))
    assert r[0x1D] == PortResource(0x1D, 5500, users=frozenset({1}))
    assert r[0x1E] == PortResource(0x1E, 6500, tcp=True, udp=True)
    assert r[0x1F] == PortResource(0x1F, 7500, timeout=60)
    chains = ("MYCHAIN-INPUT", "MYCHAIN-FORWARD", "MYCHAIN-OUTPUT")
    assert r[0x20] == JumpResource(0x20, *chains)
    assert r[0x21] == JumpResource(0x21, input="MYCHAIN-INPUT")
    assert r[0x22] == JumpResource(0x22, input="MYCHAIN-INPUT", users=frozenset({1, 2}))
    assert r[0x23] == JumpResource(
        0x23,
        *chains,
        input_match_saddr=True,
        forward_match_saddr=True,
        output_match_saddr=True,
        users=frozenset({1}),
        timeout=60,
    )
    assert len(r) == 10
    assert cfg.allowed(1, r[0x1D]) and not cfg.allowed(2, r[0x1D]) and cfg.allowed(2, r[0x1A])


def test_letmein_conf_examples_all_parse(compat: Path) -> None:
    text = _uncomment_examples(
        (compat / "letmein.conf").read_text(), {"00000001": KEY_HEX, "00000002": KEY2_HEX}
    )
    cfg = parse_config(text, "letmein.conf", "client")
    assert set(cfg.keys) == {1, 2}
    assert set(cfg.resources) == {0x1A, 0x1B, 0x1C, 0x1D, 0x1E}
    assert cfg.resources[0x1E] == PortResource(0x1E, 6500, tcp=True, udp=True)


@pytest.mark.parametrize(
    ("active", "alternative", "attr", "expected"),
    [
        ("port = 5800", "port = 5800 / udp", "port", (5800, False, True)),
        ("port = 5800", "port = 5800 / tcp, udp", "port", (5800, True, True)),
        ("exe = nft", "exe = /usr/sbin/nft", "exe", "/usr/sbin/nft"),
    ],
)
def test_letmeind_conf_alternative_lines(
    compat: Path, active: str, alternative: str, attr: str, expected: object
) -> None:
    text = (compat / "letmeind.conf").read_text()
    assert f"\n{active}\n" in text and f"\n#{alternative}\n" in text
    text = text.replace(f"\n{active}\n", f"\n#{active}\n").replace(
        f"\n#{alternative}\n", f"\n{alternative}\n"
    )
    cfg = parse_config(text, "letmeind.conf", "server")
    if attr == "port":
        assert (cfg.port, cfg.port_tcp, cfg.port_udp) == expected
    else:
        assert cfg.nftables is not None and cfg.nftables.exe == expected


def test_keys_never_in_repr_or_str(compat: Path) -> None:
    cfg = load_config(compat / "test-udp.conf", "server")
    for text in (repr(cfg), str(cfg)):
        assert KEY_HEX not in text.upper()
        assert bytes.fromhex(KEY_HEX).hex() not in text
        assert repr(bytes.fromhex(KEY_HEX)) not in text
        assert "keys" not in text and "checksum" not in text


def test_config_is_immutable(compat: Path) -> None:
    cfg = load_config(compat / "test-udp.conf", "server")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.keys[1] = b"x" * 32  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.resources[1] = PortResource(1, 1)  # type: ignore[index]


# --------------------------------------------------------------------------- letmein semantics


def test_general_section_like_letmein() -> None:
    # letmein: test_general.
    cfg = client(
        "[GENERAL]\ndebug = true\nport = 1234\ncontrol-timeout=1.5\n"
        "control-error-policy= basic-auth \nseccomp = kill"
    )
    assert cfg.debug is True
    assert (cfg.port, cfg.port_tcp, cfg.port_udp) == (1234, True, False)
    assert cfg.control_timeout == 1.5
    assert cfg.control_error_policy is ErrorPolicy.BASIC_AUTH
    assert cfg.seccomp is SeccompMode.KILL


def test_defaults() -> None:
    cfg = client("")
    assert (cfg.debug, cfg.port, cfg.port_tcp, cfg.port_udp) == (False, 5800, True, False)
    assert cfg.control_timeout == 5.0
    assert cfg.control_error_policy is ErrorPolicy.ALWAYS
    assert cfg.seccomp is SeccompMode.OFF
    assert (cfg.nftables, cfg.default_user, dict(cfg.keys), dict(cfg.resources)) == (
        None,
        None,
        {},
        {},
    )
    cfg = parse_config(NFT, SRC, "server")
    assert cfg.nftables == NftablesConfig("LETMEIN-INPUT")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("5800", (5800, True, False)),
        ("5800/tcp", (5800, True, False)),
        ("5800/udp", (5800, False, True)),
        ("5800/udp,tcp", (5800, True, True)),
        ("5800 / tcp, udp", (5800, True, True)),
        ("1234 / TCP ", (1234, True, False)),  # letmein: test_port
        ("1234/UDP", (1234, False, True)),
        ("1234/ UDP , TCP", (1234, True, True)),
        ("udp, tcp / 1234", (1234, True, True)),
        ("udp", (5800, False, True)),  # letmein: no number keeps the default port
        ("0x1F90", (8080, True, False)),  # letmein's parse_u16 takes 0x hex
        ("65535/tcp/udp", (65535, True, True)),
        ("1", (1, True, False)),
    ],
)
def test_control_port_spec(spec: str, expected: tuple[int, bool, bool]) -> None:
    cfg = client(f"[GENERAL]\nport = {spec}\n")
    assert (cfg.port, cfg.port_tcp, cfg.port_udp) == expected


@pytest.mark.parametrize(
    ("word", "value"),
    [("true", True), ("TRUE", True), ("yes", True), ("on", True), ("1", True)]
    + [("false", False), ("No", False), ("off", False), ("0", False)],
)
def test_debug_bool_words(word: str, value: bool) -> None:
    assert client(f"[GENERAL]\ndebug = {word}\n").debug is value


@pytest.mark.parametrize(
    ("text", "value"),
    [("5", 5.0), ("0.25", 0.25), (".5", 0.5), ("1e1", 10.0), ("0x5", 5.0), ("2.", 2.0)],
)
def test_control_timeout_numbers(text: str, value: float) -> None:
    assert client(f"[GENERAL]\ncontrol-timeout = {text}\n").control_timeout == value


def test_enums_case_insensitive_like_letmein() -> None:
    cfg = client("[GENERAL]\ncontrol-error-policy = Full-Auth\nseccomp = LOG\n")
    assert cfg.control_error_policy is ErrorPolicy.FULL_AUTH
    assert cfg.seccomp is SeccompMode.LOG


def test_resources_like_letmein() -> None:
    # letmein: test_resources_port / test_resources_jump (short ids are hex too).
    cfg = client(
        "[RESOURCES]\n"
        "9876ABCD = port : 4096\n"
        "9876ABCE = port : 4097 / TCP\n"
        "9876ABCF = port : 4098 / udp / users: 1, 2 ,3  \n"
        "9876ABD0 = port : 4099 / udp, tcp / users: 4 / timeout:42\n"
        "1234FEDC = jump / input: FOO / forward:BAR / input-match: saddr\n"
        "1234FEDD = jump / input: FOO / forward:BAR / output: BIZ / users: 1, 10, 100"
        " / output-match: saddr\n"
        "1234FEDE = jump / forward:BAR / forward-match: saddr / timeout: 3\n"
        "00000001 = timeout: 5 / port: 22\n"
    )
    r = cfg.resources
    assert r[0x9876ABCD] == PortResource(0x9876ABCD, 4096)
    assert r[0x9876ABCE] == PortResource(0x9876ABCE, 4097)
    assert r[0x9876ABCF] == PortResource(0x9876ABCF, 4098, False, True, frozenset({1, 2, 3}))
    assert r[0x9876ABD0] == PortResource(0x9876ABD0, 4099, True, True, frozenset({4}), 42)
    assert r[0x1234FEDC] == JumpResource(
        0x1234FEDC, input="FOO", forward="BAR", input_match_saddr=True
    )
    assert r[0x1234FEDD] == JumpResource(
        0x1234FEDD,
        input="FOO",
        forward="BAR",
        output="BIZ",
        output_match_saddr=True,
        users=frozenset({0x1, 0x10, 0x100}),
    )
    assert r[0x1234FEDE] == JumpResource(
        0x1234FEDE, forward="BAR", forward_match_saddr=True, timeout=3
    )
    assert r[1] == PortResource(1, 22, timeout=5)  # attributes in any order


def test_ids_either_case_and_short_hex() -> None:
    cfg = client(
        f"[CLIENT]\ndefault-user = 123\n[KEYS]\naabbccdd = {KEY_HEX.lower()}\n"
        f"1 = {KEY2_HEX}\n[RESOURCES]\nAbCd = port: 9 / users: aabbccdd, 00000001\n"
    )
    assert cfg.default_user == 0x123  # letmein: test_client
    assert set(cfg.keys) == {0xAABBCCDD, 1}
    assert cfg.keys[0xAABBCCDD] == bytes.fromhex(KEY_HEX)
    assert cfg.resources[0xABCD] == PortResource(0xABCD, 9, users=frozenset({0xAABBCCDD, 1}))


def test_nftables_like_letmein() -> None:
    # letmein: test_nft.
    cfg = parse_config(
        "[NFTABLES]\nexe = mynft \nfamily = ip6\ntable = myfilter\n"
        "chain-input = myLETMEIN-INPUT\ntimeout = 50\nmax-nr-rules = 0x10\n",
        SRC,
        "server",
    )
    assert cfg.nftables == NftablesConfig(
        chain_input="myLETMEIN-INPUT",
        exe="mynft",
        family="ip6",
        table="myfilter",
        timeout=50,
        max_nr_rules=16,
    )


def test_continuation_lines() -> None:
    # letmein: test_parser_continuation. Tabs and spaces continue; a blank line ends.
    cfg = client("[GENERAL]\nport =\n\t5800\n  \t/ udp,\n\t\ttcp\n\t\n\ndebug = yes\n")
    assert (cfg.port, cfg.port_tcp, cfg.port_udp, cfg.debug) == (5800, True, True, True)
    # An indented '#' line after an option is part of the value, not a comment.
    check("[GENERAL]\nport = 5800\n  # comment\n", 2, "[GENERAL] port", "unknown protocol")
    # After a blank line an indented line is no continuation (letmein: ..._bad).
    check("[GENERAL]\nport = 5800\n\n  / udp\n", 4, "no option to continue")


def test_indented_option_without_previous_option_is_an_option() -> None:
    # letmein reads an indented 'name = value' at the start of a section as an option.
    assert client("[GENERAL]\n  port = 5801\n").port == 5801


def test_crlf_line_endings_and_comments() -> None:
    cfg = client("# c\r\n[GENERAL]\r\n#port = 1\r\nport = 5811 / udp\r\n\r\ndebug=1\r\n")
    assert (cfg.port, cfg.port_udp, cfg.port_tcp, cfg.debug) == (5811, True, False, True)


def test_bytes_and_str_give_same_config() -> None:
    text = f"[GENERAL]\nport = 1/udp\n[KEYS]\n00000001 = {KEY_HEX}\n"
    assert client(text) == parse_config(text.encode(), SRC, "client")


def test_resource_on_control_port_is_accepted() -> None:
    # PROTOCOL rule 3: refused at knock time, not at parse time.
    cfg = parse_config(f"[GENERAL]\nport = 5800\n{NFT}[RESOURCES]\n1 = port: 5800\n", SRC)
    assert cfg.resources[1] == PortResource(1, 5800)


def test_resource_users_need_not_have_keys() -> None:
    cfg = client(f"[KEYS]\n1 = {KEY_HEX}\n[RESOURCES]\n2 = port: 22 / users: 00000009\n")
    assert cfg.resources[2].users == frozenset({9})


def test_same_port_different_protocols_is_allowed() -> None:
    cfg = client("[RESOURCES]\n1 = port: 53 / udp\n2 = port: 53 / tcp\n3 = port: 54\n")
    assert cfg.resources[1] == PortResource(1, 53, tcp=False, udp=True)
    assert cfg.resources[2] == PortResource(2, 53, tcp=True, udp=False)


def test_client_section_on_server_and_nftables_on_client() -> None:
    cfg = parse_config(f"[CLIENT]\ndefault-user = 00000002\n{NFT}", SRC, "server")
    assert cfg.default_user == 2
    cfg = client(NFT + "family = ip\n")
    assert cfg.nftables == NftablesConfig("LETMEIN-INPUT", family="ip")
    assert client("[NFTABLES]\nfamily = ip\n").nftables is None  # no chain-input: unused
    check("[NFTABLES]\nfamily = arp\n", 2, "[NFTABLES] family", "'arp'")


def test_role_must_be_server_or_client() -> None:
    with pytest.raises(ValueError, match="role"):
        parse_config("", SRC, "root")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- malformed files


@pytest.mark.parametrize(
    ("text", "line", "fragments"),
    [
        # --- structure
        ("[GENERAL]\ndebug = true\n[FOO]\n", 3, ("unknown section", "'[FOO]'")),
        ("[general]\n", 1, ("unknown section", "'[general]'")),  # names are case-sensitive
        ("# c\nport = 5800\n", 2, ("outside of any [SECTION]",)),
        ("[GENERAL]\nport 5800\n", 2, ("neither a [SECTION] header",)),
        ("  stray\n[GENERAL]\n", 1, ("no option to continue",)),
        ("[GENERAL]\n\n\tstray\n", 3, ("no option to continue",)),
        ("[GENERAL\n", 1, ("malformed section header",)),
        ("[GENERAL] # x\n", 1, ("malformed section header",)),
        ("[]\n", 1, ("empty section name",)),
        ("[GENERAL]\n= 5\n", 2, ("no name before '='",)),
        ("[GENERAL]\nport = 1\n[KEYS]\n[GENERAL]\n", 4, ("duplicate section [GENERAL]", "line 1")),
        ("[GENERAL]\nport = 1\n\nport = 2\n", 4, ("duplicate option 'port'", "line 2")),
        ("[GENERAL]\nPort = 1\n", 2, ("[GENERAL] unknown option 'Port'",)),
        ("[GENERAL]\ndefault-user = 1\n", 2, ("[GENERAL] unknown option 'default-user'",)),
        ("[NFTABLES]\nchain = X\n", 2, ("[NFTABLES] unknown option 'chain'",)),
        ("[CLIENT]\nuser = 1\n", 2, ("[CLIENT] unknown option 'user'",)),
        # --- [GENERAL] values
        ("[GENERAL]\ndebug = maybe\n", 2, ("[GENERAL] debug", "'maybe'")),
        ("[GENERAL]\nport = 0\n", 2, ("[GENERAL] port", "bad number '0'", "1..65535")),
        ("[GENERAL]\nport = 65536\n", 2, ("[GENERAL] port", "'65536'")),
        ("[GENERAL]\nport = \n", 2, ("[GENERAL] port: empty item",)),
        ("[GENERAL]\nport = -1\n", 2, ("[GENERAL] port", "unknown protocol '-1'")),
        ("[GENERAL]\nport = 5800/sctp\n", 2, ("unknown protocol 'sctp'",)),
        ("[GENERAL]\nport = 5800/\n", 2, ("[GENERAL] port: empty item",)),
        ("[GENERAL]\nport = 0x\n", 2, ("[GENERAL] port", "bad number '0x'")),
        ("[GENERAL]\nport = 5800/5801\n", 2, ("more than one port number",)),
        ("[GENERAL]\nport = 5800, tcp\n", 2, ("unknown protocol '5800'",)),
        ("[GENERAL]\nport = proto: tcp\n", 2, ("[GENERAL] port: unknown attribute 'proto'",)),
        ("[GENERAL]\nport = \u0665\u0668\n", 2, ("[GENERAL] port",)),  # Arabic-Indic digits
        ("[GENERAL]\ncontrol-timeout = 0\n", 2, ("control-timeout", "'0'")),
        ("[GENERAL]\ncontrol-timeout = -1\n", 2, ("control-timeout", "'-1'")),
        ("[GENERAL]\ncontrol-timeout = inf\n", 2, ("control-timeout", "'inf'")),
        ("[GENERAL]\ncontrol-timeout = nan\n", 2, ("control-timeout", "'nan'")),
        ("[GENERAL]\ncontrol-timeout = 1e999\n", 2, ("control-timeout",)),
        ("[GENERAL]\ncontrol-timeout = 1_000\n", 2, ("control-timeout", "'1_000'")),
        ("[GENERAL]\ncontrol-timeout = 5s\n", 2, ("control-timeout", "'5s'")),
        ("[GENERAL]\ncontrol-error-policy = never\n", 2, ("control-error-policy", "'never'")),
        ("[GENERAL]\nseccomp = on\n", 2, ("[GENERAL] seccomp", "off | log | kill")),
        ("[GENERAL]\nseccomp = \u212aill\n", 2, ("[GENERAL] seccomp",)),  # Kelvin sign
        # --- [NFTABLES] values
        ("[NFTABLES]\nfamily = INET\n", 2, ("[NFTABLES] family", "'INET'")),
        ("[NFTABLES]\ntable = my table\n", 2, ("[NFTABLES] table", "bad name 'my table'")),
        ("[NFTABLES]\ntable = \n", 2, ("[NFTABLES] table", "bad name ''")),
        ("[NFTABLES]\nchain-input = " + "A" * 65 + "\n", 2, ("chain-input", "bad name")),
        ("[NFTABLES]\nchain-output = a;b\n", 2, ("chain-output", "'a;b'")),
        ("[NFTABLES]\nchain-forward = ü\n", 2, ("chain-forward", "bad name")),
        ("[NFTABLES]\ntimeout = 0\n", 2, ("[NFTABLES] timeout", "bad number '0'")),
        ("[NFTABLES]\ntimeout = 1.5\n", 2, ("[NFTABLES] timeout", "'1.5'", "whole number")),
        ("[NFTABLES]\ntimeout = 4294967296\n", 2, ("[NFTABLES] timeout",)),
        ("[NFTABLES]\nmax-nr-rules = -3\n", 2, ("[NFTABLES] max-nr-rules", "'-3'")),
        ("[NFTABLES]\nmax-nr-rules = " + "9" * 5000 + "\n", 2, ("max-nr-rules", "not shown")),
        ("[NFTABLES]\nexe =  \n", 2, ("[NFTABLES] exe",)),
        ("[NFTABLES]\nexe = nft\x07\n", 2, ("[NFTABLES] exe",)),
        # --- [CLIENT]
        ("[CLIENT]\ndefault-user = 1234567G\n", 2, ("default-user", "bad id '1234567G'")),
        ("[CLIENT]\ndefault-user = 123456789\n", 2, ("default-user", "bad id <9 characters, not")),
        ("[CLIENT]\ndefault-user = 0x1\n", 2, ("default-user", "'0x1'")),
        ("[CLIENT]\ndefault-user = +1\n", 2, ("default-user", "'+1'")),
        # --- [KEYS] ids and duplicates
        (f"[KEYS]\n1234567G = {KEY_HEX}\n", 2, ("[KEYS] bad user id '1234567G'",)),
        (f"[KEYS]\n = {KEY_HEX}\n", 2, ("no name before '='",)),
        (f"[KEYS]\nuser 1 = {KEY_HEX}\n", 2, ("[KEYS] bad user id 'user 1'",)),
        (
            f"[KEYS]\n00000001 = {KEY_HEX}\n# x\n1 = {KEY2_HEX}\n",
            4,
            ("[KEYS] duplicate key for user 00000001", "line 2"),
        ),
        (f"[KEYS]\n1 = {KEY_HEX}\n1 = {KEY2_HEX}\n", 3, ("[KEYS] duplicate option '1'",)),
        # --- [RESOURCES]
        ("[RESOURCES]\nxyz = port: 1\n", 2, ("[RESOURCES] bad resource id 'xyz'",)),
        (
            "[RESOURCES]\n0000001A = port: 1\n1a = port: 2\n",
            3,
            ("duplicate resource 0000001A", "line 2"),
        ),
        (
            "[RESOURCES]\n1 = port: 42\n2 = port: 42 / udp,tcp\n",
            3,
            ("resource 00000002: port 42/tcp is already opened by resource 00000001 (line 2)",),
        ),
        (
            "[RESOURCES]\n1 = port: 42 / tcp,udp\n\n2 = port: 0x2A/udp\n",
            4,
            ("port 42/udp is already opened by resource 00000001",),
        ),
        (
            "[RESOURCES]\n1 = port: 42 / color: red\n",
            2,
            ("resource 00000001: unknown attribute 'color'",),
        ),
        ("[RESOURCES]\n1 = port: 42 / sctp\n", 2, ("resource 00000001: unknown attribute 'sctp'",)),
        ("[RESOURCES]\n1 = port: 42 /\n", 2, ("unknown attribute ''",)),
        ("[RESOURCES]\n1 = port: 42 / : x\n", 2, ("resource 00000001: attribute has no name",)),
        ("[RESOURCES]\n1 = port: 0\n", 2, ("resource 00000001 port", "bad number '0'")),
        ("[RESOURCES]\n1 = port: 70000\n", 2, ("resource 00000001 port", "'70000'")),
        ("[RESOURCES]\n1 = port: ssh\n", 2, ("resource 00000001 port", "'ssh'")),
        ("[RESOURCES]\n1 = port: 1, 2\n", 2, ("'port:' takes one number",)),
        ("[RESOURCES]\n1 = port: 1 / port: 2\n", 2, ("more than one 'port:'",)),
        ("[RESOURCES]\n1 = port\n", 2, ("resource 00000001: unknown attribute 'port'",)),
        ("[RESOURCES]\n1 = port: 1 / timeout: 0\n", 2, ("resource 00000001 timeout", "'0'")),
        ("[RESOURCES]\n1 = port: 1 / timeout: 1.5\n", 2, ("timeout", "'1.5'")),
        ("[RESOURCES]\n1 = port: 1 / timeout: 1, 2\n", 2, ("'timeout:' takes one number",)),
        ("[RESOURCES]\n1 = port: 1 / timeout: 1 / timeout: 2\n", 2, ("more than one 'timeout:'",)),
        ("[RESOURCES]\n1 = port: 1 / users: 1 / users: 2\n", 2, ("more than one 'users:'",)),
        ("[RESOURCES]\n1 = port: 1 / users: 1,,2\n", 2, ("resource 00000001 users", "bad id ''")),
        ("[RESOURCES]\n1 = port: 1 / users: bob\n", 2, ("users", "bad id 'bob'")),
        ("[RESOURCES]\n1 = ssh\n", 2, ("resource 00000001: must be either 'port: N",)),
        ("[RESOURCES]\n1 = \n", 2, ("must be either",)),
        ("[RESOURCES]\n1 = port: 1 / jump / input: A\n", 2, ("must be either",)),
        ("[RESOURCES]\n1 = jump\n", 2, ("jump resource needs 'input:', 'forward:' or 'output:'",)),
        ("[RESOURCES]\n1 = jump / users: 1\n", 2, ("jump resource needs",)),
        (
            "[RESOURCES]\n1 = jump / input: A / output-match: saddr\n",
            2,
            ("'output-match:' without 'output:'",),
        ),
        (
            "[RESOURCES]\n1 = jump / input: A / input-match: daddr\n",
            2,
            ("'input-match:' must be 'saddr'",),
        ),
        ("[RESOURCES]\n1 = jump / input: A / input-match: SADDR\n", 2, ("must be 'saddr'",)),
        ("[RESOURCES]\n1 = jump / input: A / input: B\n", 2, ("more than one 'input:'",)),
        ("[RESOURCES]\n1 = jump / input: A,B\n", 2, ("'input:' takes one chain name",)),
        ("[RESOURCES]\n1 = jump / input: my chain\n", 2, ("resource 00000001 input", "bad name")),
        ("[RESOURCES]\n1 = jump / input:\n", 2, ("resource 00000001 input", "bad name ''")),
        ("[RESOURCES]\n1 = jump / input: A / port-ish: 1\n", 2, ("unknown attribute 'port-ish'",)),
        ("[RESOURCES]\n1 = jump / input: A / udp\n", 2, ("unknown attribute 'udp'",)),
        ("[RESOURCES]\n1 = jump: x / input: A\n", 2, ("'jump' takes no value",)),
        ("[RESOURCES]\n1 = jump / jump / input: A\n", 2, ("'jump' given twice",)),
    ],
)
def test_malformed(text: str, line: int, fragments: tuple[str, ...]) -> None:
    check(text, line, *fragments)


def test_error_in_multiline_resource_points_at_its_line() -> None:
    text = (
        "[RESOURCES]\n"
        "aabbccdd = jump /\n"
        "           input: MYCHAIN-INPUT /\n"
        "           input-match: saddr / users: 12345678 /\n"
        "           timeout: sixty\n"
    )
    check(text, 5, "resource AABBCCDD timeout", "'sixty'")
    check(text.replace("users: 12345678", "users: 1234567Z"), 4, "bad id '1234567Z'")
    check(text.replace("input: MYCHAIN", "inptu: MYCHAIN"), 3, "unknown attribute 'inptu'")


def test_missing_nftables_on_server() -> None:
    check("[GENERAL]\nport = 5800\n", None, "missing section [NFTABLES]", role="server")


def test_missing_chain_input_on_server() -> None:
    check(
        "[GENERAL]\n\n[NFTABLES]\ntable = filter\n",
        3,
        "missing required option 'chain-input'",
        role="server",
    )


def test_first_problem_in_file_order_is_reported() -> None:
    text = f"[RESOURCES]\n1 = port: 0\n[NFTABLES]\nfamily = arp\n[KEYS]\n1 = {KEY_HEX[:-1]}\n"
    check(text, 2, "[RESOURCES]", role="server")


def test_non_utf8_bytes() -> None:
    data = b"[GENERAL]\ndebug = true\nport = 58\xff00\n"
    check(data, 3, "not valid UTF-8")
    check("[GENERAL]\n\n# \udcff\n", 3, "not valid Unicode")  # lone surrogate in a str


def test_load_config_os_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"
    with pytest.raises(ConfigError) as info:
        load_config(missing, "server")
    assert info.value.source == str(missing)
    assert info.value.line is None
    assert info.value.message == "cannot read config: No such file or directory"
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, "client")
    assert info.value.message == "cannot read config: Is a directory"


def test_load_config_reports_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.conf"
    path.write_bytes(b"[GENERAL]\r\n\r\nseccomp = strict\r\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, "client")
    assert (info.value.source, info.value.line) == (str(path), 3)
    assert str(info.value).startswith(f"{path}:3: [GENERAL] seccomp")


# --------------------------------------------------------------------------- key material


@pytest.mark.parametrize(
    ("value", "line", "fragment"),
    [
        (KEY_HEX[:-1], 2, "[KEYS] key of user 00000001: must be 64 hex digits (got 63)"),
        (KEY_HEX + "0", 2, "[KEYS] key of user 00000001: must be 64 hex digits (got 65)"),
        (KEY_HEX[:-1] + "G", 2, "must be 64 hex digits (found a non-hex character)"),
        (KEY_HEX[:30] + " " + KEY_HEX[31:], 2, "must be 64 hex digits (found a non-hex"),
        ("", 2, "must be 64 hex digits (got 0)"),
        ("0" * 64, 2, "[KEYS] key of user 00000001: the all-zero key is not allowed"),
        ("F" * 64, 2, "[KEYS] key of user 00000001: the all-FF key is letmein's placeholder"),
        ("f" * 64, 2, "the all-FF key"),
    ],
)
def test_bad_keys_are_not_echoed(value: str, line: int, fragment: str) -> None:
    e = err(f"[KEYS]\n00000001 = {value}\n")
    assert (e.source, e.line) == (SRC, line)
    assert fragment in e.message
    if value:
        for text in (str(e), repr(e), e.message):
            assert value.strip() not in text
            assert KEY_HEX[:16] not in text


@pytest.mark.parametrize(
    "text",
    [
        f"[KEYS]\n{KEY_HEX} = 00000001\n",  # id and key swapped
        f"[KEYS]\n{KEY_HEX}\n",  # key pasted without an id
        f"[GENERAL]\n{KEY_HEX} = 1\n",  # key as an option name
        f"[RESOURCES]\n1 = {KEY_HEX}\n",  # key as a resource
        f"[RESOURCES]\n1 = port: 1 / users: {KEY_HEX}\n",
        f"[CLIENT]\ndefault-user = {KEY_HEX}\n",
        f"[GENERAL]\nport = {KEY_HEX}\n",
        f"[GENERAL]\nseccomp = {KEY_HEX}\n",
        f"[NFTABLES]\nchain-input = {KEY_HEX}-\n",
        f"[{KEY_HEX}]\n",
        f"[KEYS]\n1 = {KEY_HEX}\n1 = {KEY_HEX}\n",
        f"[KEYS]\n1 = {KEY_HEX}\n0001 = {KEY_HEX}\n",
    ],
)
def test_misplaced_keys_are_not_echoed(text: str) -> None:
    e = err(text)
    for shown in (str(e), repr(e)):
        assert KEY_HEX[:12] not in shown.upper()
        assert not re.search(r"[0-9A-Fa-f]{9,}", shown)


# --------------------------------------------------------------------------- properties

_FRAGMENTS = [
    "[GENERAL]",
    "[NFTABLES]",
    "[CLIENT]",
    "[KEYS]",
    "[RESOURCES]",
    "[",
    "]",
    "#",
    " ",
    "\t",
    "=",
    "/",
    ":",
    ",",
    "port",
    "debug",
    "tcp",
    "udp",
    "jump",
    "input",
    "input-match",
    "saddr",
    "users",
    "timeout",
    "chain-input",
    "family",
    "inet",
    "default-user",
    "0x",
    "1",
    "5800",
    "00000001",
    "FF",
    KEY_HEX,
    "\r",
    "\n",
]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=400))
def test_fuzz_any_text(text: str) -> None:
    for role in ("server", "client"):
        try:
            cfg = parse_config(text, SRC, role)
        except ConfigError as e:
            assert e.source == SRC
            assert e.line is None or 1 <= e.line <= text.count("\n") + 1
        else:
            assert isinstance(cfg, Config)
            assert cfg.checksum == config_checksum(text.encode())


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS) | st.text(max_size=4), max_size=60))
def test_fuzz_config_shaped_text(parts: list[str]) -> None:
    text = "".join(parts)
    try:
        cfg = parse_config(text, SRC, "client")
    except ConfigError as e:
        assert e.source == SRC
        assert KEY_HEX not in str(e).upper()
    else:
        for key in cfg.keys.values():
            assert len(key) == 32 and key not in (bytes(32), b"\xff" * 32)
        for res in cfg.resources.values():
            if isinstance(res, PortResource):
                assert 1 <= res.port <= 65535 and (res.tcp or res.udp)
            else:
                assert res.input or res.forward or res.output


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_bytes(data: bytes) -> None:
    try:
        parse_config(data, SRC, "client")
    except ConfigError as e:
        assert e.source == SRC


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.integers(0, 0xFFFFFFFF),
        st.binary(min_size=32, max_size=32).filter(lambda k: k not in (bytes(32), b"\xff" * 32)),
        max_size=8,
    ),
    st.booleans(),
)
def test_keys_round_trip(keys: dict[int, bytes], lower: bool) -> None:
    body = ""
    for uid, key in keys.items():
        body += f"{uid:08x} = {key.hex()}\n" if lower else f"{uid:08X} = {key.hex().upper()}\n"
    assert dict(client("[KEYS]\n" + body).keys) == keys


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 65535),
    st.sampled_from(["", " / tcp", " / udp", " / tcp,udp", "/UDP , TCP"]),
    st.one_of(st.none(), st.frozensets(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=4)),
    st.one_of(st.none(), st.integers(1, 0xFFFFFFFF)),
)
def test_port_resource_round_trip(
    port: int, proto: str, users: frozenset[int] | None, timeout: int | None
) -> None:
    text = f"[RESOURCES]\nCAFE0001 = port: {port}{proto}"
    if users is not None:
        text += " / users: " + ", ".join(f"{u:08X}" for u in sorted(users))
    if timeout is not None:
        text += f"\n    / timeout: {timeout}"
    res = client(text + "\n").resources[0xCAFE0001]
    udp = "udp" in proto.lower()
    tcp = "tcp" in proto.lower() or not udp
    assert res == PortResource(0xCAFE0001, port, tcp, udp, users, timeout)


# --------------------------------------------------------------------------- pre-filter


def test_prefilter_defaults() -> None:
    nft = client(NFT).nftables
    assert nft is not None
    assert (nft.prefilter, nft.prefilter_rate, nft.prefilter_burst) == (True, 100, 200)
    assert nft.prefilter_ipv6_prefix == 64
    assert (nft.prefilter_ipv6_group, nft.prefilter_spare) == (48, 20000)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("on", True), ("off", False), (" OFF ", False), ("true", True), ("false", False)],
)
def test_prefilter_switch(value: str, expected: bool) -> None:
    nft = client(NFT + f"prefilter = {value}\n").nftables
    assert nft is not None and nft.prefilter is expected


def test_prefilter_numbers() -> None:
    text = NFT + "prefilter-rate = 50\nprefilter-burst = 0x10\nprefilter-ipv6-prefix = 56\n"
    nft = client(text).nftables
    assert nft is not None
    assert (nft.prefilter_rate, nft.prefilter_burst, nft.prefilter_ipv6_prefix) == (50, 16, 56)
    nft = client(NFT + "prefilter-ipv6-group = 56\nprefilter-spare = 0\n").nftables
    assert nft is not None and (nft.prefilter_ipv6_group, nft.prefilter_spare) == (56, 0)


@pytest.mark.parametrize(
    ("line", "fragments"),
    [
        ("prefilter = maybe", ("[NFTABLES] prefilter", "'maybe'", "on | off")),
        ("prefilter-rate = 0", ("[NFTABLES] prefilter-rate", "'0'")),
        ("prefilter-rate = 1.5", ("[NFTABLES] prefilter-rate", "whole number")),
        ("prefilter-burst = 1000001", ("[NFTABLES] prefilter-burst", "1..1000000")),
        ("prefilter-ipv6-prefix = 8", ("[NFTABLES] prefilter-ipv6-prefix", "16..128")),
        ("prefilter-ipv6-prefix = 129", ("[NFTABLES] prefilter-ipv6-prefix",)),
        ("prefilter-ipv6-group = 15", ("[NFTABLES] prefilter-ipv6-group", "16..128")),
        ("prefilter-spare = -1", ("[NFTABLES] prefilter-spare",)),
        ("prefilter-spare = 1000001", ("[NFTABLES] prefilter-spare", "0..1000000")),
        ("prefilter-size = 56", ("[NFTABLES] unknown option 'prefilter-size'",)),
    ],
)
def test_prefilter_errors(line: str, fragments: tuple[str, ...]) -> None:
    check(NFT + line + "\n", 3, *fragments)


def test_protocol_md_resource_examples() -> None:
    """The [RESOURCES] example of PROTOCOL.md, verbatim, including its comma-separated
    ``port: 7500, timeout: 60`` (letmein writes ``/``; both mean the same)."""
    text = (
        "[NFTABLES]\nchain-input = X\n[RESOURCES]\n"
        "00000022 = port: 22\n"
        "00000001 = port: 1234 / tcp,udp / users: 00000005,00000006\n"
        "00000002 = port: 7500, timeout: 60\n"
        "00000003 = jump / input: MYCHAIN-INPUT / forward: MYCHAIN-FORWARD / "
        "output: MYCHAIN-OUTPUT /\n"
        "           input-match: saddr / forward-match: saddr / output-match: saddr /\n"
        "           users: 00000001 / timeout: 60\n"
    )
    res = parse_config(text, "PROTOCOL.md").resources
    assert res[0x22] == PortResource(0x22, 22)
    assert res[1] == PortResource(1, 1234, tcp=True, udp=True, users=frozenset({5, 6}))
    assert res[2] == PortResource(2, 7500, timeout=60)
    assert res[3] == JumpResource(
        3, "MYCHAIN-INPUT", "MYCHAIN-FORWARD", "MYCHAIN-OUTPUT", True, True, True,
        frozenset({1}), 60,
    )  # fmt: skip
    assert parse_config(text.replace(", timeout", " / timeout"), "x").resources == res
