"""The ``fastknock`` client over real loopback sockets against a small server built on the core."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fastknock import cli
from fastknock.conf.config import ErrorPolicy, PortResource
from fastknock.mac import KeyRing
from fastknock.message import Operation
from fastknock.protocol import ServerSettings
from tests.loopback_server import LoopbackServer

USER = 0x00000001
KEY_HEX = "80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D"
RES_SSH = 0x00000022
RES_UDP = 0x00000023


def settings(policy: ErrorPolicy = ErrorPolicy.ALWAYS, timeout: float = 2.0) -> ServerSettings:
    return ServerSettings(
        keyring=KeyRing({USER: bytes.fromhex(KEY_HEX)}),
        resources={
            RES_SSH: PortResource(RES_SSH, 22),
            RES_UDP: PortResource(RES_UDP, 53, tcp=False, udp=True),
        },
        control_port=5800,
        policy=policy,
        timeout=timeout,
    )


def write_config(tmp_path: Path, port: int, proto: str = "tcp", timeout: float = 2.0) -> str:
    path = tmp_path / "fastknock.conf"
    path.write_text(
        f"[GENERAL]\nport = {port} / {proto}\ncontrol-timeout = {timeout}\n\n"
        f"[CLIENT]\ndefault-user = {USER:08X}\n\n"
        f"[KEYS]\n{USER:08X} = {KEY_HEX}\n\n"
        f"[RESOURCES]\n{RES_SSH:08X} = port: 22\n{RES_UDP:08X} = port: 53 / udp\n"
    )
    path.chmod(0o600)  # it holds a key: readable by others would be warned about
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("command", ["knock", "revoke"])
def test_knock_and_revoke(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], udp: bool, host: str, command: str
) -> None:
    with LoopbackServer(settings(), udp=udp) as server:
        conf = write_config(tmp_path, server.port, "udp" if udp else "tcp")
        code, err = run(capsys, "-c", conf, command, host, "22")
    assert (code, err) == (0, "")  # quiet on success
    (req,) = server.requests
    op = Operation.KNOCK if command == "knock" else Operation.REVOKE
    assert (req.operation, req.user, req.resource, str(req.peer)) == (op, USER, RES_SSH, host)


def test_transport_flags_override_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with LoopbackServer(settings(), udp=True) as server:
        conf = write_config(tmp_path, 1, "tcp")  # wrong port and transport in the config
        code, _ = run(capsys, "-c", conf, "knock", "127.0.0.1", "-U", "-P", str(server.port), "53")
    assert code == 0
    with LoopbackServer(settings(), udp=True) as server:  # PORT may also come before options
        code, _ = run(capsys, "-c", conf, "knock", "127.0.0.1", "53", "-U", "-P", str(server.port))
    assert code == 0
    assert [r.resource for r in server.requests] == [RES_UDP]


def test_resource_and_user_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with LoopbackServer(settings(), udp=False) as server:
        conf = write_config(tmp_path, server.port)
        code, _ = run(capsys, "-c", conf, "knock", "127.0.0.1", "-r", "23", "-u", "1")
    assert code == 0 and [r.resource for r in server.requests] == [RES_UDP]


def test_goaway_fails_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with LoopbackServer(settings(), udp=False, firewall_ok=False) as server:
        conf = write_config(tmp_path, server.port)
        code, err = run(capsys, "-c", conf, "knock", "127.0.0.1", "22")
    assert code == cli.EXIT_FAILED
    assert err.count("\n") == 1 and "GOAWAY" in err and "knock failed" in err


def test_unknown_resource_on_server_gets_goaway(tmp_path: Path, capsys) -> None:
    with LoopbackServer(settings(), udp=True) as server:
        conf = write_config(tmp_path, server.port, "udp")
        code, err = run(capsys, "-c", conf, "knock", "127.0.0.1", "-r", "99")
    assert code == cli.EXIT_FAILED and "GOAWAY" in err and server.requests == []


def test_udp_timeout_against_silent_server(tmp_path: Path, capsys) -> None:
    with LoopbackServer(settings(), udp=True, mute=True) as server:
        conf = write_config(tmp_path, server.port, "udp", timeout=0.8)
        code, err = run(capsys, "-c", conf, "knock", "127.0.0.1", "22")
        received = list(server.received)
    assert code == cli.EXIT_FAILED and "timeout" in err
    # The client re-sent the very same KNOCK while it waited.
    assert len(received) >= 2 and len(set(received)) == 1


def test_udp_retransmission_recovers_a_lost_knock(tmp_path: Path, capsys) -> None:
    with LoopbackServer(settings(), udp=True, drop_first=1) as server:
        conf = write_config(tmp_path, server.port, "udp", timeout=2.0)
        code, err = run(capsys, "-c", conf, "knock", "127.0.0.1", "22")
        first_two = server.received[:2]
    assert (code, err) == (0, "")
    assert len(first_two) == 2 and first_two[0] == first_two[1]
    assert len(server.requests) == 1


@pytest.mark.parametrize("udp_side", ["silent", "closed"])
def test_udp_without_answer_falls_back_to_tcp_when_both_are_offered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], udp_side: str
) -> None:
    """-U with ``port = P / udp, tcp``: a UDP KNOCK that gets no answer (a socket that reads
    and never replies, or no UDP socket at all: ICMP unreachable) is retried over TCP."""
    with (
        LoopbackServer(settings(timeout=0.8), udp=False) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent,
    ):
        if udp_side == "silent":
            silent.bind(("127.0.0.1", server.port))
        # Control: UDP only in the config, so no fallback: the knock fails.
        conf = write_config(tmp_path, server.port, "udp", timeout=0.8)
        code, err = run(capsys, "-c", conf, "knock", "127.0.0.1", "22")
        assert code == cli.EXIT_FAILED and server.requests == []
        # Both offered, UDP asked for: falls back, and succeeds over TCP.
        conf = write_config(tmp_path, server.port, "udp, tcp", timeout=0.8)
        code, err = run(capsys, "-c", conf, "-v", "knock", "127.0.0.1", "22", "-U")
        assert code == 0 and "falling back to TCP" in err and "/tcp: COMEIN" in err
        assert len(server.requests) == 1
        # Both offered, no flag: TCP straight away (the preference stays).
        code, err = run(capsys, "-c", conf, "-v", "knock", "127.0.0.1", "22")
        assert code == 0 and "/udp" not in err


def test_tcp_refused(tmp_path: Path, capsys) -> None:
    with socket.socket() as s:  # a port that is certainly closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = write_config(tmp_path, port)
    code, err = run(capsys, "-c", conf, "knock", "127.0.0.1", "22")
    assert code == cli.EXIT_FAILED and "refused" in err


@pytest.fixture
def dual_stack_name(monkeypatch: pytest.MonkeyPatch) -> str:
    """A host name that resolves to ::1 and 127.0.0.1 (this machine's /etc/hosts may lack one)."""
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host != "dual.fastknock.test":
            return real(host, port, *args, **kwargs)
        return real("::1", port, *args, **kwargs) + real("127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return "dual.fastknock.test"


@pytest.mark.parametrize(
    ("flags", "peers"),
    [
        ([], {"127.0.0.1", "::1"}),
        (["-4"], {"127.0.0.1"}),
        (["-6"], {"::1"}),
        (["-4", "-6"], {"127.0.0.1", "::1"}),
    ],
)
def test_host_name_knocks_both_families(tmp_path, capsys, dual_stack_name, flags, peers) -> None:
    with LoopbackServer(settings(), udp=False) as server:
        conf = write_config(tmp_path, server.port)
        code, err = run(capsys, "-c", conf, "knock", dual_stack_name, "22", *flags)
    assert (code, err) == (0, "")
    assert {str(r.peer) for r in server.requests} == peers


def test_verbose_shows_each_step(tmp_path: Path, capsys) -> None:
    with LoopbackServer(settings(), udp=True) as server:
        conf = write_config(tmp_path, server.port, "udp")
        code, err = run(capsys, "-c", conf, "-v", "knock", "127.0.0.1", "22")
    assert code == 0
    for step in ("sending KNOCK", "received CHALLENGE", "sending RESPONSE", "received COMEIN"):
        assert step in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["knock", "127.0.0.1", "2222"], "no resource for port 2222"),
        (["knock", "127.0.0.1"], "give the PORT"),
        (["knock", "127.0.0.1", "22", "-u", "5"], "no key for user 00000005"),
    ],
)
def test_usage_errors(tmp_path, capsys, argv, message) -> None:
    conf = write_config(tmp_path, 5800)
    code, err = run(capsys, "-c", conf, *argv)
    assert code == cli.EXIT_USAGE and message in err


def test_missing_config_is_a_clear_error(tmp_path: Path, capsys) -> None:
    code, err = run(capsys, "-c", str(tmp_path / "nope.conf"), "knock", "127.0.0.1", "22")
    assert code == cli.EXIT_USAGE and "nope.conf" in err


def test_gen_key(capsys: pytest.CaptureFixture[str]) -> None:
    lines = set()
    for _ in range(3):
        assert cli.main(["gen-key", "-u", "abc"]) == 0
        lines.add(capsys.readouterr().out)
    assert len(lines) == 3
    for line in lines:
        assert re.fullmatch(r"00000ABC = [0-9A-F]{64}\n", line)


def test_console_entry_point_help_and_gen_key() -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run(
        [sys.executable, "-m", "fastknock.cli", "knock", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    for flag in ("-r RES", "-u USER", "-P PORT", "-T", "-U", "-4", "-6"):
        assert flag in out
    key = subprocess.run(
        [sys.executable, "-m", "fastknock.cli", "gen-key"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert re.fullmatch(r"00000000 = [0-9A-F]{64}\n", key)


def test_help_texts_say_what_each_command_does() -> None:
    """revoke's PORT is the port to close; gen-key offers no -c/-v (it reads no config)."""

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))

    def help_of(*argv: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "fastknock.cli", *argv, "--help"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return " ".join(proc.stdout.split())

    assert "the port to open" in help_of("knock")
    revoke = help_of("revoke")
    assert "the port to close" in revoke and "the port to open" not in revoke
    gen_key = help_of("gen-key")
    assert "--user" in gen_key and "--config" not in gen_key and "--verbose" not in gen_key
