"""The batched receive path (``fastknock.knockd.recv``) behaves like the ``DatagramProtocol`` path.

* The UDP tests of test_control.py run again here, unchanged, with their ``udp_server``
  helper pointed at ``BatchedUdp`` (on asyncio and on uvloop, like there).
* Both paths get the same traffic mix and must end with the same counters, the same
  replies on the wire and no state left; the stealth policy must send nothing back.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fastknock.conf.config import ErrorPolicy
from fastknock.knockd.control import Controller
from fastknock.knockd.counters import Count
from fastknock.knockd.recv import BatchedUdp, open_udp
from fastknock.message import Operation
from fastknock.protocol import ClientSession
from tests import test_control as tc
from tests.test_control import KEY, RES, USER, FakeFirewall, make_controller
from tests.test_control import knock as tc_knock

run = tc.run  # the fixture: every test on asyncio and on uvloop


async def batched_udp_server(controller: Controller) -> tuple[BatchedUdp, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    proto = await open_udp(controller, sock, "batched")
    assert isinstance(proto, BatchedUdp)
    return proto, port


@pytest.fixture(autouse=True)
def _batched(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(tc, "udp_server", batched_udp_server)
    yield


# test_control.py's UDP tests, collected again: they now run on the batched path.
test_udp_knock = tc.test_udp_knock
test_udp_session_times_out_and_frees_its_slot = tc.test_udp_session_times_out_and_frees_its_slot
test_udp_state_stays_empty_under_a_knock_replayed_from_many_ports = (
    tc.test_udp_state_stays_empty_under_a_knock_replayed_from_many_ports
)
test_udp_junk_creates_no_state_and_stealth_sends_nothing = (
    tc.test_udp_junk_creates_no_state_and_stealth_sends_nothing
)
test_udp_datagrams_during_the_firewall_request_are_dropped = (
    tc.test_udp_datagrams_during_the_firewall_request_are_dropped
)


def _traffic() -> list[bytes]:
    """Junk of every kind plus forged and replayed first messages (no valid sessions)."""
    valid = ClientSession(
        tc.HmacKey(KEY), USER, RES, Operation.KNOCK, os.urandom
    ).start()  # replayed below from other ports
    forged = bytearray(valid)
    forged[-1] ^= 1
    other_user = bytearray(valid)
    other_user[11] ^= 0x40
    bad_magic = bytearray(valid)
    bad_magic[0] ^= 1
    response_op = bytearray(valid)
    response_op[7] = Operation.RESPONSE
    return [b"", b"x" * 55, b"x" * 200, bytes(forged), bytes(other_user), bytes(bad_magic),
            bytes(response_op), os.urandom(56)] * 5  # fmt: skip


async def _replay_traffic(
    path: str, policy: ErrorPolicy
) -> tuple[dict[Count, int], list[bytes], dict[str, object]]:
    fw = FakeFirewall()
    c = make_controller(fw, policy=policy)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    proto = await open_udp(c, sock, path)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    replies: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        for data in _traffic():
            s.sendto(data, ("127.0.0.1", port))
        await tc.until(lambda: c.counters[Count.RECEIVED] >= 40)
        # and one real knock from another port, which must work on both paths
        await tc_knock(port, udp=True)
        await asyncio.sleep(0.05)
        while True:
            try:
                replies.append(s.recv(100))
            except BlockingIOError:
                break
    state = {"peers": c.endpoint.udp_peers, "limits": c.endpoint.limits.total}
    proto.close()
    await loop.shutdown_default_executor()
    keep = {k: v for k, v in c.counters.items() if not k.key.startswith("udp_")}
    return keep, [r[4:8] for r in replies], state


@pytest.mark.parametrize("policy", [ErrorPolicy.BASIC_AUTH, ErrorPolicy.ALWAYS])
def test_both_paths_count_and_answer_the_same(
    run: Callable[[Any], Any], policy: ErrorPolicy
) -> None:
    protocol = run(_replay_traffic("protocol", policy))
    batched = run(_replay_traffic("batched", policy))
    assert batched == protocol
    counters, replies, state = batched
    assert counters[Count.RECEIVED] == 40 + 2 and counters[Count.KNOCKED] == 1
    assert counters[Count.OUTCOME_SIZE] == 15 and counters[Count.OUTCOME_MAC] == 5
    assert counters[Count.OUTCOME_UNKNOWN_USER] == 5 and Count.OUTCOME_OPERATION not in counters
    assert counters[Count.OUTCOME_RESPONSE_MAC] == 5  # the KNOCK turned RESPONSE: no token
    assert counters[Count.OUTCOME_MAGIC] == 10
    assert state == {"peers": 0, "limits": 0}
    if policy is ErrorPolicy.ALWAYS:  # a GOAWAY for each 56-byte reject
        assert replies == [(Operation.GOAWAY).to_bytes(4, "big")] * 25
    else:
        assert replies == []  # stealth


def test_batched_counters_show_the_reader_at_work(run: Callable[[Any], Any]) -> None:
    async def main() -> None:
        c = make_controller(FakeFirewall(), policy=ErrorPolicy.BASIC_AUTH)
        proto, port = await batched_udp_server(c)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(100):
                s.sendto(os.urandom(56), ("127.0.0.1", port))
            await tc.until(lambda: c.counters[Count.RECEIVED] >= 100)
        await tc_knock(port, udp=True)
        # the reader's counters reach the endpoint's within recv.MERGE_DELAY of a drain
        await tc.until(lambda: c.counters[Count.RECEIVED] >= 102)
        assert c.counters[Count.RECEIVED] == 102 and c.counters[Count.KNOCKED] == 1
        assert c.counters[Count.UDP_BATCHES] >= 1
        # the KNOCK was answered in the reader; only its RESPONSE became a Python object
        assert c.counters[Count.UDP_HANDED_UP] == 1 and c.counters[Count.CHALLENGES] == 1
        proto.close()
        assert proto.reader.tracked == 0
        await asyncio.get_running_loop().shutdown_default_executor()

    run(main())


def test_open_udp_rejects_unknown_path(run: Callable[[Any], Any]) -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            with pytest.raises(ValueError):
                await open_udp(make_controller(FakeFirewall()), sock, "nope")  # type: ignore[arg-type]

    run(main())


def test_a_swapped_core_reconfigures_the_reader(run: Callable[[Any], Any]) -> None:
    """A config reload (``Controller.reload``): the reader follows (new key ring, and
    policy ``always`` now wants rejections handed up for their GOAWAY)."""
    from fastknock.mac import KeyRing
    from fastknock.protocol import ServerSettings

    async def main() -> None:
        c = make_controller(FakeFirewall(), policy=ErrorPolicy.BASIC_AUTH)
        proto, port = await batched_udp_server(c)
        assert isinstance(proto, BatchedUdp)
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.sendto(os.urandom(56), ("127.0.0.1", port))
            await tc.until(lambda: c.counters[Count.RECEIVED] == 1)
            await asyncio.sleep(0.1)
            with pytest.raises(BlockingIOError):
                s.recv(100)  # stealth
            old = c.endpoint.settings
            c.reload(
                ServerSettings(
                    keyring=KeyRing({USER: KEY}),
                    resources=old.resources,
                    control_port=old.control_port,
                    policy=ErrorPolicy.ALWAYS,
                    timeout=old.timeout,
                )
            )
            s.sendto(os.urandom(56), ("127.0.0.1", port))
            reply = await asyncio.wait_for(loop.sock_recv(s, 100), 2)  # now a GOAWAY
            assert int.from_bytes(reply[4:8], "big") == Operation.GOAWAY
        assert proto.reader.keyring is c.endpoint.settings.keyring
        await tc_knock(port, udp=True)
        assert c.counters[Count.KNOCKED] == 1
        proto.close()
        await loop.shutdown_default_executor()

    run(main())


def test_the_first_knock_after_an_idle_start_meets_live_secrets(run: Callable[[Any], Any]) -> None:
    """The C reader answers KNOCKs with the challenger's secrets. A server idle for several
    epochs after start (no datagram, so no flush, so no rotation timer) once answered its
    first KNOCK with a secret the endpoint had already dropped: that RESPONSE matched no
    token and the knock timed out. The reader now starts on the current epoch and the
    rotation timer runs from the start; the control is a knock right after start."""

    async def main() -> None:
        timeout = 0.3  # the epoch length
        for idle in (0.0, 4 * timeout):  # control: no idle time; then four epochs idle
            c = make_controller(FakeFirewall(), policy=ErrorPolicy.BASIC_AUTH, timeout=timeout)
            start = time.monotonic()
            c.endpoint.challenger.rotate_now(start)  # epoch 0 starts now, as in server.py
            proto, port = await batched_udp_server(c)
            await asyncio.sleep(idle)
            await tc_knock(port, udp=True, timeout=2.0)
            assert c.counters[Count.KNOCKED] == 1, idle
            assert c.endpoint.challenger.epoch >= int(idle / timeout) - 1
            proto.close()
        await asyncio.get_running_loop().shutdown_default_executor()

    run(main())


def test_the_reader_may_rest_only_while_the_controller_is_quiet(
    run: Callable[[Any], Any],
) -> None:
    """``Controller.quiet`` (what the batched path passes as ``drain(may_rest)``): false
    while a firewall request is in flight or a TCP connection is open, true again after."""

    async def main() -> None:
        fw = FakeFirewall(delay=0.5)
        c = make_controller(fw, policy=ErrorPolicy.BASIC_AUTH)
        proto, port = await batched_udp_server(c)
        assert c.quiet
        knock = asyncio.ensure_future(tc_knock(port, udp=True, timeout=5.0))
        await tc.until(lambda: bool(fw.requests))
        assert not c.quiet  # the firewall request is in flight
        await knock
        await tc.until(lambda: c.quiet)
        assert c.quiet and c.counters[Count.KNOCKED] == 1
        tcp, tcp_port = await tc.tcp_server(c)
        _, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
        await tc.until(lambda: not c.quiet)
        assert not c.quiet  # a TCP connection is open
        writer.close()
        await tc.until(lambda: c.quiet)
        assert c.quiet
        tcp.close()
        proto.close()
        await asyncio.get_running_loop().shutdown_default_executor()

    run(main())
