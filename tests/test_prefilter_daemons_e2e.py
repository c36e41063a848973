"""The pre-filter with the real daemons and the real client (issue 11), UDP-only server.

- The ``fastknock`` client (``python -m fastknock.cli``) knocks 5/5 while a junk flood of
  thousands of datagrams/s spoofs its own address (random source ports), against a
  UDP-only, stealth server with the pre-filter at its defaults. The flood empties the
  client's per-source bucket (the kernel counts it as over the allowance); the spare
  allowance lets it and the knocks through, and fastknockd throws the junk away. The
  proven set is emptied before each knock, so each one is a first-time knock. Control:
  the same five knocks without the flood.
- While the pre-filter sheds (a small spare), fastknockfwd logs one warning naming the
  reason and the flooding source prefix, and its metrics file counts the drops. Control:
  no such line before the flood.

Namespaces, rules and processes are this module's own (``tests.e2e_support.Stack``).
"""

from __future__ import annotations

import os
import pwd
import re
import time
from pathlib import Path

import pytest

from tests import netns, spoof
from tests.e2e_support import (
    CONTROL_PORT,
    FWD_USER,
    KEY1,
    USER1,
    Stack,
    port_res,
    read_metrics,
    wait_for,
)

pytestmark = pytest.mark.e2e

RES = port_res(0x301, 2601)
FLOOD_RATE = 4000  # junk datagrams/s: "thousands", far below what fastknockd drains


def udp_only_client_config(stack: Stack) -> Path:
    path = stack.work / "udp-only-client.conf"
    path.write_text(
        f"[GENERAL]\nport = {CONTROL_PORT} / udp\ncontrol-timeout = 2\n\n"
        f"[CLIENT]\ndefault-user = {USER1:08X}\n\n[KEYS]\n{USER1:08X} = {KEY1.hex().upper()}\n\n"
        f"[RESOURCES]\n{RES.id:08X} = {RES.spec}\n"
    )
    path.chmod(0o600)
    return path


def start(name: str, nft_extra: str = "") -> tuple[Stack, Path]:
    netns.require()
    metrics = Path("/nonexistent")
    stack = Stack(name, [RES], port_spec=f"{CONTROL_PORT} / udp", verbose=False,
                  nft_extra=nft_extra, start_server=False)  # fmt: skip
    try:
        # fastknockfwd runs as FWD_USER after its start: its metrics go where it may write.
        (stack.work / "fwd-metrics").mkdir()
        account = pwd.getpwnam(FWD_USER)
        os.chown(stack.work / "fwd-metrics", account.pw_uid, account.pw_gid)
        metrics = stack.work / "fwd-metrics" / "fwd.prom"
        assert stack.fwd is not None
        stack.fwd.stop()
        stack.fwd_args = ["--metrics-file", str(metrics), "--metrics-interval", "0.2"]
        stack.start_fwd()
        stack.start_server()
        spoof.static_neighbours(stack.pair)
    except BaseException:
        stack.close()
        raise
    return stack, metrics


def knock_five(stack: Stack, conf: Path) -> list[int]:
    codes = []
    server = stack.pair.server_v4
    for _ in range(5):
        stack.nft("flush", "set", "inet", "filter", "fastknock_proven4")  # a first-time knock
        codes.append(stack.knock("knock", server, "-4", str(RES.probe), config=conf).code)
    return codes


def test_the_client_knocks_5_of_5_through_a_flood_that_spoofs_its_own_address() -> None:
    stack, metrics = start("pfvictim")
    try:
        conf = udp_only_client_config(stack)
        server, me, _ = stack.addrs(v6=False)
        # Control: no flood.
        assert knock_five(stack, conf) == [0] * 5
        wait_for("fwd metrics", lambda: bool(read_metrics(metrics)))
        spared = 'fastknockfwd_prefilter_spared_total{reason="ip4"}'
        before = read_metrics(metrics)[spared]
        # The attack: junk with the client's own address, random source ports.
        flood = spoof.Flood(stack.pair.client, me, server, CONTROL_PORT, FLOOD_RATE)
        flood.start()
        try:
            wait_for("the flood to empty the client's bucket", lambda: flood.sent > 1000)
            codes = knock_five(stack, conf)
        finally:
            flood.stop()
        assert codes == [0] * 5, stack.all_logs()[-3000:]
        # The flood was over the client's allowance (the kernel counted it): the spare
        # let it through and nothing was dropped.
        wait_for("fresh fwd metrics", lambda: read_metrics(metrics)[spared] > before + 1000)
        m = read_metrics(metrics)
        assert m['fastknockfwd_prefilter_dropped_total{reason="ip4"}'] == 0
        assert stack.connects(me, server, RES.probe)
    finally:
        stack.close()


def test_fwd_warns_once_naming_the_top_source_while_the_prefilter_sheds() -> None:
    stack, metrics = start("pfwarn", nft_extra="prefilter-spare = 50\n")
    try:
        assert stack.fwd is not None
        server = stack.pair.server_v4
        flooder = "198.51.100.7"
        time.sleep(0.5)  # a few polls of the counters without a flood
        assert "pre-filter shedding" not in stack.fwd.text()  # control
        flood = spoof.Flood(stack.pair.client, flooder, server, CONTROL_PORT, 3000)
        flood.start()
        try:
            wait_for("the warning", lambda: "pre-filter shedding" in stack.fwd.text())  # type: ignore[union-attr]
            time.sleep(1.0)  # more polls while still shedding: no second line
        finally:
            flood.stop()
        lines = [ln for ln in stack.fwd.text().splitlines() if "pre-filter shedding" in ln]
        assert len(lines) == 1 and "WARNING" in lines[0]
        assert "reason ip4" in lines[0] and f"top source {flooder}/32" in lines[0]
        assert re.search(r"\d+ datagrams dropped", lines[0])
        m = read_metrics(metrics)
        assert m['fastknockfwd_prefilter_dropped_total{reason="ip4"}'] > 0
    finally:
        stack.close()
