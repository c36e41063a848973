"""The man pages in fastknock/man/ stay true: each renders with ``man -l`` without a warning,
every option that a program's ``--help`` lists appears in its page, and every option name the
config parser knows appears in fastknock.conf(5). The units' ``Documentation=`` name pages
that exist.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastknock.conf.config import parse_config
from fastknock.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
MAN = REPO / "fastknock" / "man"
UNITS = REPO / "fastknock" / "units"
PAGES = {
    "fastknock.1": [["fastknock.cli"], ["fastknock.cli", "knock"], ["fastknock.cli", "revoke"],
                    ["fastknock.cli", "gen-key"]],
    "fastknockd.8": [["fastknock.server"]],
    "fastknockfwd.8": [["fastknock.fwd"]],
    "fastknock-install.8": [["fastknock.install"]],
    "fastknock.conf.5": [],
}  # fmt: skip
# An option in --help: after a space, "[" or ","; never inside a word ("non-zero").
OPTION = re.compile(r"(?:(?<=[\s\[,])|^)(--?[A-Za-z0-9][A-Za-z0-9-]*)")


def render(page: Path) -> str:
    if shutil.which("man") is None:
        if os.environ.get("CI"):
            pytest.fail("man missing (apt package man-db)")
        pytest.skip("man missing (apt package man-db)")
    env = dict(os.environ, LANG="C", LC_ALL="C", MANWIDTH="100", MAN_DISABLE_SECCOMP="1")
    proc = subprocess.run(
        ["man", "--warnings", "-l", str(page)], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # groff warnings: bad macros, lines it could not fit
    return proc.stdout


def help_options(argv: list[str]) -> set[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="100")
    proc = subprocess.run(
        [sys.executable, "-m", argv[0], *argv[1:], "--help"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return set(OPTION.findall(proc.stdout)) - {"-h", "--help"}


def test_every_page_is_packaged_and_listed() -> None:
    assert sorted(p.name for p in MAN.iterdir() if p.suffix in (".1", ".5", ".8")) == sorted(PAGES)


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_renders_and_lists_every_option(page: str) -> None:
    text = render(MAN / page)
    name = page.rsplit(".", 1)[0]
    assert text.startswith(f"{name.upper()}({page.rsplit('.', 1)[1]})")
    assert "NAME" in text and "SEE ALSO" in text
    words = set(re.findall(r"--?[A-Za-z0-9][A-Za-z0-9-]*", text))
    for argv in PAGES[page]:
        options = help_options(argv)
        assert "--version" in options or len(argv) > 1, f"{argv} has no --version"
        assert options, argv  # the extraction found something to check
        missing = sorted(options - words)
        assert not missing, f"{page} lacks {missing} of {' '.join(argv)} --help"


def _known(section: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(f"[{section}]\nno-such-option = 1\n", source="probe", role="client")
    known = re.search(r"\(known: ([^)]*)\)", str(info.value))
    assert known, str(info.value)
    return known.group(1).split(", ")


def test_config_page_names_every_option() -> None:
    text = render(MAN / "fastknock.conf.5")
    sections = ("GENERAL", "NFTABLES", "CLIENT", "HOOKS")
    for section in sections:
        assert f"[{section}]" in text
        for option in _known(section):
            assert re.search(rf"(?m)^\s+{re.escape(option)} =", text), f"[{section}] {option}"
    for section in ("KEYS", "RESOURCES"):
        assert f"[{section}]" in text
    for word in ("port:", "jump", "users:", "timeout:", "input:", "forward:", "output:",
                 "input-match: saddr", "forward-match:", "output-match:", "ipv4-prefix:",
                 "ipv6-prefix:", "port: 60000-61000"):  # fmt: skip
        assert word in text, word


def test_units_document_pages_that_exist() -> None:
    for unit in sorted(UNITS.iterdir()):
        docs = re.findall(r"^Documentation=(.*)$", unit.read_text(), re.M)
        assert docs, f"{unit.name} has no Documentation="
        for ref in " ".join(docs).split():
            m = re.fullmatch(r"man:([\w.-]+)\((\d)\)", ref)
            assert m, ref
            assert (MAN / f"{m.group(1)}.{m.group(2)}").exists(), f"{unit.name}: {ref}"


def test_config_page_example_loads() -> None:
    """fastknock.conf(5)'s EXAMPLE is a valid server config (a key pasted in)."""
    text = (MAN / "fastknock.conf.5").read_text()
    example = text.split(".SH EXAMPLE\n.nf\n", 1)[1].split(".fi\n", 1)[0].replace("\\-", "-")
    example = re.sub(r"<64 hex digits[^>]*>", "80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859"
                     "F3A0F5A09DEA2A3D", example)  # fmt: skip
    cfg = parse_config(example, "fastknock.conf(5)", "server")
    assert len(cfg.resources) == 5 and cfg.hooks is not None
    # The control: the example's own resources, with two on one port, are refused.
    with pytest.raises(ConfigError, match="already opened"):
        parse_config(example.replace("port: 2222", "port: 22"), "x", "server")
