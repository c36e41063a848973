"""[HOOKS] (conf/hooks.py): each option's meaning and default, and every error naming the file,
the line and the option, never quoting key-shaped text or a control character."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastknock import fwd, server
from fastknock.conf.config import parse_config
from fastknock.conf.model import HooksConfig
from fastknock.errors import ConfigError

KEY_HEX = "80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D"
BASE = (
    "[NFTABLES]\nchain-input = LETMEIN-INPUT\n"
    f"[KEYS]\n00000001 = {KEY_HEX}\n[RESOURCES]\n00000022 = port: 22\n"
)  # 6 lines: [HOOKS] is line 7, its first option line 8


def hooks(body: str, role: str = "server") -> HooksConfig | None:
    return parse_config(BASE + "[HOOKS]\n" + body, "t.conf", role).hooks  # type: ignore[arg-type]


def error(body: str, role: str = "server") -> str:
    with pytest.raises(ConfigError) as info:
        hooks(body, role)
    return str(info.value)


def test_no_section_no_hooks() -> None:
    assert parse_config(BASE, "t.conf", "server").hooks is None


def test_defaults() -> None:
    h = hooks("on-open = /usr/local/bin/opened\n")
    assert h == HooksConfig(("/usr/local/bin/opened",), None, "nobody", 10.0)


def test_every_option() -> None:
    h = hooks(
        "on-open = /usr/local/bin/notify --event open 'two words' \"x y\" a\\ b\n"
        "on-close = /bin/logger -t fastknock closed\n"
        "hook-user = fk-hooks\n"
        "hook-timeout = 2.5\n"
    )
    assert h is not None
    assert h.on_open == ("/usr/local/bin/notify", "--event", "open", "two words", "x y", "a b")
    assert h.on_close == ("/bin/logger", "-t", "fastknock", "closed")
    assert (h.user, h.timeout) == ("fk-hooks", 2.5)


def test_no_shell_meaning_in_commands() -> None:
    """Shell syntax is just words: no variables, globs, pipes, comments or redirections."""
    h = hooks("on-open = /bin/echo $HOME * | > # not-a-comment ;\n")
    assert h is not None
    assert h.on_open == ("/bin/echo", "$HOME", "*", "|", ">", "#", "not-a-comment", ";")


def test_whole_number_timeout_and_hex() -> None:
    assert hooks("hook-timeout = 7\n") == HooksConfig(None, None, "nobody", 7.0)
    assert hooks("hook-timeout = 0x10\n") == HooksConfig(None, None, "nobody", 16.0)


def test_a_section_without_commands_runs_nothing() -> None:
    assert hooks("hook-user = daemon\n") == HooksConfig(None, None, "daemon", 10.0)


def test_client_role_validates_and_ignores() -> None:
    assert hooks("on-open = /bin/true\n", role="client") is None
    assert "t.conf:8: [HOOKS] on-open" in error("on-open = true\n", role="client")


@pytest.mark.parametrize(
    ("body", "line", "expected"),
    [
        ("on-open = \n", 8, "[HOOKS] on-open: empty"),
        ("on-open = ''\n", 8, "not an absolute path"),
        ("on-close = notify-send x\n", 8,
         "[HOOKS] on-close: the program 'notify-send' is not an absolute path"),
        ("on-open = ./hook\n", 8, "not an absolute path"),
        ("on-open = /bin/x 'unterminated\n", 8, "cannot split into words (no closing quotation)"),
        ("on-open = /bin/x \\\n", 8, "cannot split into words (no escaped character)"),
        ("on-open = /bin/x\x1b[2J\n", 8, "[HOOKS] on-open: contains a control character"),
        ("on-open = /bin/x" + " a" * 64 + "\n", 8, "more than 64 words"),
        ("on-open = /bin/" + "x" * 4096 + "\n", 8, "longer than 4096 characters"),
        ("hook-user = root\n", 8, "[HOOKS] hook-user: 'root' is refused: hooks never run as root"),
        ("hook-user = \n", 8, "[HOOKS] hook-user: bad account name"),
        ("hook-user = two words\n", 8, "bad account name 'two words'"),
        ("hook-user = 0\n", 8, "bad account name '0'"),
        ("hook-timeout = 0\n", 8,
         "[HOOKS] hook-timeout: bad number '0' (expected positive seconds"),
        ("hook-timeout = -1\n", 8, "[HOOKS] hook-timeout: bad number '-1'"),
        ("hook-timeout = 3601\n", 8, "at most 3600"),
        ("hook-timeout = soon\n", 8, "bad number 'soon'"),
        ("hook-timeout = inf\n", 8, "bad number 'inf'"),
        ("on-open = /bin/a\n\non-error = /bin/b\n", 10,
         "[HOOKS] unknown option 'on-error' (known: on-open, on-close, hook-user, hook-timeout)"),
        ("on-open = /bin/a\non-open = /bin/b\n", 9,
         "[HOOKS] duplicate option 'on-open' (first on line 8)"),
    ],
)  # fmt: skip
def test_errors_name_file_line_and_problem(body: str, line: int, expected: str) -> None:
    msg = error(body)
    assert msg.startswith(f"t.conf:{line}: "), msg
    assert expected in msg, msg


def test_a_second_section_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + "[HOOKS]\n[HOOKS]\n", "t.conf", "server")
    assert str(info.value) == "t.conf:8: duplicate section [HOOKS] (first on line 7)"


def test_messages_never_quote_key_shaped_text() -> None:
    """The program name is quoted through ``show``: a key pasted by mistake is not shown."""
    for body in (f"on-open = {KEY_HEX}\n", f"hook-user = a{KEY_HEX}\n",
                 f"hook-timeout = {KEY_HEX}\n"):  # fmt: skip
        msg = error(body)
        assert KEY_HEX[:9] not in msg and "not shown" in msg, msg
    # Control: an ordinary wrong value is quoted plainly.
    assert "'notify'" in error("on-open = notify\n")


def test_check_config_shows_the_hooks_not_their_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "fastknockd.conf"
    conf.write_text(
        BASE + "[HOOKS]\non-open = /usr/local/bin/notify --token s3cr3t-token x\n"
        "hook-user = daemon\nhook-timeout = 3\n"
    )
    conf.chmod(0o600)
    assert server.main(["-c", str(conf), "--check-config"]) == 0
    out = capsys.readouterr().out
    assert (
        "hooks: on-open /usr/local/bin/notify (+3 argument(s)), on-close none, as daemon, "
        "timeout 3 s" in out
    )
    assert "s3cr3t-token" not in out
    conf.write_text(BASE)  # control: no [HOOKS], no hooks line
    assert server.main(["-c", str(conf), "--check-config"]) == 0
    assert "hooks:" not in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() != 0, reason="fastknockfwd refuses to start as non-root")
def test_fastknockfwd_refuses_a_hook_user_it_cannot_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At start-up, before any firewall change: a missing account is a configuration error
    (exit 2) naming the file."""
    conf = tmp_path / "fastknockd.conf"
    conf.write_text(BASE + "[HOOKS]\non-open = /bin/true\nhook-user = fk-no-such-account\n")
    conf.chmod(0o600)
    argv = ["-c", str(conf), "--rundir", str(tmp_path / "run"), "--test-mode", "--no-systemd",
            "--server-user", "nobody", "--user", "nobody"]  # fmt: skip
    with caplog.at_level("ERROR", "fastknockfwd"):
        assert fwd.main(argv) == 2
    assert f"{conf}: [HOOKS] hook-user: account 'fk-no-such-account' does not exist" in caplog.text
    assert not (tmp_path / "run").exists()  # nothing was set up
