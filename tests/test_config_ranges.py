"""[RESOURCES] extensions of issue 15: ``port: A-B`` ranges, ``ipv4-prefix``/``ipv6-prefix``.

Every attribute is read in both roles; every error names the file, the line and what is
wrong (``ConfigError`` renders ``file:line: message``); letmein's configs still load with
the same meaning (tests/compat).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastknock import server
from fastknock.conf.config import JumpResource, PortResource, load_config, parse_config
from fastknock.errors import ConfigError

SRC = "t.conf"
SERVER = "[GENERAL]\nport = 5800 / udp\n[NFTABLES]\nchain-input = LETMEIN-INPUT\n[RESOURCES]\n"
HEADER_LINES = SERVER.count("\n")  # the first resource is on line HEADER_LINES + 1
COMPAT = Path(__file__).parent / "compat"


def res(spec: str, role: str = "server") -> PortResource | JumpResource:
    return parse_config(f"{SERVER}00000042 = {spec}\n", SRC, role).resources[0x42]  # type: ignore[arg-type]


def error(text: str, role: str = "server") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC, role)  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize("role", ["server", "client"])
def test_port_range_and_prefixes_load_in_both_roles(role: str) -> None:
    assert res("port: 60000-61000 / udp", role) == PortResource(
        0x42, 60000, tcp=False, udp=True, port_last=61000
    )
    r = res("port: 22 / ipv4-prefix: 24 / ipv6-prefix: 64", role)
    assert r == PortResource(0x42, 22, ipv4_prefix=24, ipv6_prefix=64)
    assert isinstance(r, PortResource) and list(r.ports) == [22]


def test_range_attributes_combine_and_spaces_are_allowed() -> None:
    r = res("port: 100 - 0x00C8 / tcp,udp / ipv6-prefix: 56 / users: 1 / timeout: 60")
    assert r == PortResource(
        0x42, 100, True, True, frozenset({1}), 60, port_last=200, ipv6_prefix=56
    )
    assert isinstance(r, PortResource) and (r.ports.start, r.ports.stop) == (100, 201)


def test_a_range_of_one_port_is_that_port() -> None:
    """``A-A`` is stored as the single port (the exact-address kernel sets serve it)."""
    assert res("port: 22-22") == PortResource(0x42, 22)


def test_defaults_are_one_address_and_one_port() -> None:
    r = res("port: 22")
    assert isinstance(r, PortResource)
    assert (r.port_last, r.ipv4_prefix, r.ipv6_prefix) == (None, 32, 128)


def test_jump_prefixes_with_saddr_match() -> None:
    r = res("jump / forward: MY-FWD / forward-match: saddr / ipv4-prefix: 16 / ipv6-prefix: 48")
    assert r == JumpResource(
        0x42, forward="MY-FWD", forward_match_saddr=True, ipv4_prefix=16, ipv6_prefix=48
    )


def test_full_length_prefixes_are_allowed_explicitly() -> None:
    assert res("port: 22 / ipv4-prefix: 32 / ipv6-prefix: 128") == PortResource(0x42, 22)


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("port: 61000-60000", ("port: range 61000-60000 is reversed",)),
        ("port: 60000-", ("range '60000-' lacks a port",)),
        ("port: -61000", ("range '-61000' lacks a port",)),
        ("port: -", ("range '-' lacks a port",)),
        ("port: 0-10", ("port range start: bad number '0'", "1..65535")),
        ("port: 10-65536", ("port range end: bad number '65536'", "1..65535")),
        ("port: 1-2-3", ("port range end: bad number '2-3'",)),
        ("port: ssh-http", ("port range start: bad number 'ssh'",)),
        ("port: 60000-61000, 62000", ("'port:' takes one number or one range A-B",)),
        ("port: 5000-6000", ("port range 5000-6000 includes the control port 5800",)),
        ("port: 5800-5801 / tcp", ("includes the control port 5800",)),  # any protocol
        ("port: 22 / ipv4-prefix: 0", ("resource 00000042 ipv4-prefix: bad number '0'", "1..32")),
        ("port: 22 / ipv4-prefix: 33", ("ipv4-prefix: bad number '33'", "1..32")),
        ("port: 22 / ipv6-prefix: 0", ("ipv6-prefix: bad number '0'", "1..128")),
        ("port: 22 / ipv6-prefix: 129", ("ipv6-prefix: bad number '129'", "1..128")),
        ("port: 22 / ipv4-prefix: /24", ("ipv4-prefix: bad number ''",)),
        ("port: 22 / ipv4-prefix: 24, 16", ("'ipv4-prefix:' takes one number",)),
        ("port: 22 / ipv6-prefix: 64 / ipv6-prefix: 64", ("more than one 'ipv6-prefix:'",)),
        ("jump / input: X / ipv4-prefix: 24", ("'ipv4-prefix:' needs an 'input-match: saddr'",)),
        ("jump / output: X / ipv6-prefix: 64", ("'ipv6-prefix:' needs an 'input-match: saddr'",)),
    ],
)
def test_errors_name_file_line_and_problem(spec: str, fragments: tuple[str, ...]) -> None:
    # Two resources before the bad one: the line number is the bad resource's own.
    text = f"{SERVER}00000001 = port: 1\n00000002 = port: 2\n00000042 = {spec}\n"
    e = error(text)
    line = HEADER_LINES + 3
    assert (e.source, e.line) == (SRC, line), e
    assert str(e).startswith(f"{SRC}:{line}: [RESOURCES] resource 00000042"), e
    for fragment in fragments:
        assert fragment in e.message, (fragment, e.message)


def test_control_port_is_checked_whatever_the_section_order() -> None:
    """[GENERAL] after [RESOURCES]: the range is checked against the port read later."""
    text = (
        "[RESOURCES]\n00000042 = port: 9000-9100\n"
        "[GENERAL]\nport = 9050\n[NFTABLES]\nchain-input = X\n"
    )
    e = error(text)
    assert (e.line, e.message) == (
        2,
        "[RESOURCES] resource 00000042: port range 9000-9100 includes the control port 9050 "
        "([GENERAL] port)",
    )
    # The control: the same range with the default control port (5800) loads.
    assert parse_config(text.replace("port = 9050", "port = 5800"), SRC).resources


def test_default_control_port_is_checked() -> None:
    e = error("[NFTABLES]\nchain-input = X\n[RESOURCES]\n1 = port: 5000-6000\n")
    assert e.line == 4 and "control port 5800" in e.message


def test_client_role_does_not_check_the_control_port() -> None:
    """A client config names the server's control port, but ranges are the server's to
    judge (it refuses them at knock time too, ``model.admit``)."""
    text = "[GENERAL]\nport = 5800\n[RESOURCES]\n00000042 = port: 5000-6000\n"
    r = parse_config(text, SRC, "client").resources[0x42]
    assert isinstance(r, PortResource) and r.port_last == 6000


def test_single_port_on_the_control_port_still_loads() -> None:
    """letmein accepts it; ``admit`` refuses it at knock time (unchanged)."""
    assert res("port: 5800") == PortResource(0x42, 5800)


@pytest.mark.parametrize(
    ("first", "second", "port"),
    [
        ("port: 100-200", "port: 150", "150/tcp"),
        ("port: 150", "port: 100-200", "150/tcp"),
        ("port: 100-200 / udp", "port: 200-300 / tcp,udp", "200/udp"),
        ("port: 100-200", "port: 50-100", "100/tcp"),
        ("port: 100-200", "port: 120-130", "120/tcp"),
    ],
)
def test_overlapping_ranges_are_refused(first: str, second: str, port: str) -> None:
    text = f"{SERVER}00000001 = {first}\n# a comment\n00000002 = {second}\n"
    e = error(text)
    assert e.line == HEADER_LINES + 3
    assert e.message == (
        f"[RESOURCES] resource 00000002: port {port} is already opened by resource 00000001 "
        f"(line {HEADER_LINES + 1})"
    )


def test_adjacent_ranges_and_other_protocols_do_not_overlap() -> None:
    """The controls: touching ranges, and the same range on the other protocol, load."""
    text = (
        f"{SERVER}1 = port: 100-200\n2 = port: 201-300\n3 = port: 100-300 / udp\n"
        "4 = port: 99\n5 = port: 301\n"
    )
    assert len(parse_config(text, SRC).resources) == 5


def test_first_overlap_in_file_order_is_reported() -> None:
    text = f"{SERVER}1 = port: 10-20\n2 = port: 30-40\n3 = port: 35\n4 = port: 15\n"
    e = error(text)
    assert e.line == HEADER_LINES + 3 and "resource 00000003: port 35/tcp" in e.message


def test_many_disjoint_ranges_load() -> None:
    """Thousands of resources: the overlap check is a sweep, not all pairs."""
    body = "".join(
        f"{i + 1:08X} = port: {6000 + 10 * i}-{6000 + 10 * i + 9}\n" for i in range(5000)
    )
    assert len(parse_config(SERVER + body, SRC).resources) == 5000


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 65535), st.integers(1, 65535), st.integers(1, 32), st.integers(1, 128))
def test_range_and_prefix_round_trip(a: int, b: int, p4: int, p6: int) -> None:
    first, last = min(a, b), max(a, b)
    text = f"[RESOURCES]\n1 = port: {first}-{last} / ipv4-prefix: {p4} / ipv6-prefix: {p6}\n"
    r = parse_config(text, SRC, "client").resources[1]
    assert r == PortResource(
        1, first, port_last=last if last > first else None, ipv4_prefix=p4, ipv6_prefix=p6
    )


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("letmeind.conf", "server"),  # its resources are commented out: loads, none
        ("letmein.conf", "client"),
        ("test-tcp.conf", "server"),
        ("test-udp.conf", "server"),
    ],
)
def test_letmein_configs_load_without_extensions(name: str, role: str) -> None:
    """letmein's own files: every port resource is one port for the knocker's address."""
    cfg = load_config(COMPAT / name, role)  # type: ignore[arg-type]
    for r in cfg.resources.values():
        assert (r.ipv4_prefix, r.ipv6_prefix) == (32, 128)
        if isinstance(r, PortResource):
            assert r.port_last is None and len(r.ports) == 1


def test_check_config_shows_ranges_and_prefixes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "fastknockd.conf"
    conf.write_text(
        f"{SERVER}00000301 = port: 2301 / ipv4-prefix: 24 / ipv6-prefix: 64\n"
        "00000303 = port: 60000-60002 / udp\n00000304 = port: 22\n"
    )
    conf.chmod(0o600)
    assert server.main(["-c", str(conf), "--check-config"]) == 0
    out = capsys.readouterr().out
    assert "00000301  port 2301/tcp  opens the knocker's IPv4 /24, IPv6 /64  users all" in out
    assert "00000303  port 60000-60002/udp  users all" in out
    assert "00000304  port 22/tcp  users all" in out  # the control: plain as before
    conf.write_text(conf.read_text().replace("60000-60002", "5000-6000"))
    assert server.main(["-c", str(conf), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert f"{conf}:{HEADER_LINES + 2}:" in err and "includes the control port 5800" in err
