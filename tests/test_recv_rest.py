"""The readers' rest under a stream (``Reader(rest_us=..., busy_gap_us=...)``; the design
is in ``knockd/_recv.pyx``, "The rest"), on both readers over real loopback sockets.

A drain that starts soon after the previous one ended (a stream) and has emptied the socket
with nothing handed up sleeps ``rest_us`` once, then reads what came meanwhile; with no
stream, after a hand-up, or with ``rest_us = 0`` (the control) it returns at once. The rest
and the gap are widened here (1 s) and the late datagram comes 50 ms into the rest, so that
what is asserted (which drain reads it) does not depend on the machine's load.
"""

from __future__ import annotations

import select
import socket
import threading
from types import SimpleNamespace

import pytest

from tests.test_recv import dest, make

SECOND_US = 1_000_000


def junk() -> bytes:
    return b"\x00" * 56  # refused on the magic: a reject, never handed up


def late(server: socket.socket, client: socket.socket, delay: float) -> threading.Timer:
    t = threading.Timer(delay, lambda: client.sendto(junk(), dest(server)))
    t.start()
    return t


@pytest.mark.parametrize(
    ("rest", "may_rest"),
    [(True, True), (False, True), (True, False)],
    ids=["rest", "control", "caller-busy"],
)
def test_a_stream_rests_once_and_reads_what_came(
    impl: SimpleNamespace, server: socket.socket, rest: bool, may_rest: bool
) -> None:
    """caller-busy: the glue says the loop has work waiting (``drain(may_rest=False)``)."""
    reader, _, _ = make(impl, server, rest_us=SECOND_US if rest else 0, busy_gap_us=SECOND_US)
    rest = rest and may_rest
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.sendto(junk(), dest(server))
        assert reader.drain() == 1  # type: ignore[attr-defined]  # no stream yet: at once
        c.sendto(junk(), dest(server))
        t = late(server, c, 0.05)
        # In a stream now (the last drain just ended): with the rest, the late one is read
        # in the same drain; without, it is left for the next.
        assert reader.drain(may_rest) == (2 if rest else 1)  # type: ignore[attr-defined]
        t.join()
        if not rest:
            select.select([server], [], [], 5)
            assert reader.drain() == 1  # type: ignore[attr-defined]


def test_no_rest_after_a_hand_up_or_when_idle(impl: SimpleNamespace, server: socket.socket) -> None:
    # pass_rejects: every 56-byte datagram is handed up (Python has work: no rest).
    reader, rec, _ = make(impl, server, rest_us=SECOND_US, busy_gap_us=SECOND_US, pass_rejects=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.sendto(junk(), dest(server))
        assert reader.drain() == 1  # type: ignore[attr-defined]
        c.sendto(junk(), dest(server))
        t = late(server, c, 0.05)
        assert reader.drain() == 1  # type: ignore[attr-defined]  # a hand-up: no rest
        t.join()
        select.select([server], [], [], 5)
        assert reader.drain() == 1  # type: ignore[attr-defined]
    assert len(rec.got) == 3
    # Idle: a drain that starts more than busy_gap_us after the last one does not rest.
    reader, _, _ = make(impl, server, rest_us=SECOND_US, busy_gap_us=1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        for _ in range(2):
            c.sendto(junk(), dest(server))
            t = late(server, c, 0.05)
            assert reader.drain() == 1  # type: ignore[attr-defined]
            t.join()
            select.select([server], [], [], 5)
            assert reader.drain() == 1  # type: ignore[attr-defined]


def test_rest_arguments_are_checked(impl: SimpleNamespace, server: socket.socket) -> None:
    for bad in ({"rest_us": -1}, {"rest_us": SECOND_US + 1}, {"busy_gap_us": -1}, {"talk_us": -1}):
        with pytest.raises((ValueError, OverflowError)):
            make(impl, server, **bad)


@pytest.mark.parametrize("talk", [True, False], ids=["talking", "control"])
def test_no_rest_for_talk_us_after_a_hand_up(
    impl: SimpleNamespace, server: socket.socket, talk: bool
) -> None:
    """After a drain that handed something up (or answered a KNOCK), the next drains do not
    rest for ``talk_us``: the client's next datagram is due a round trip later. A wrong
    size is dropped even with pass_rejects, so the second drain sees only a reject."""
    reader, rec, _ = make(
        impl,
        server,
        rest_us=SECOND_US,
        busy_gap_us=SECOND_US,
        talk_us=SECOND_US if talk else 0,
        pass_rejects=True,
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.sendto(junk(), dest(server))
        assert reader.drain() == 1  # type: ignore[attr-defined]  # handed up
        c.sendto(b"\x00" * 40, dest(server))
        t = threading.Timer(0.05, lambda: c.sendto(b"\x00" * 40, dest(server)))
        t.start()
        assert reader.drain() == (1 if talk else 2)  # type: ignore[attr-defined]
        t.join()
        if talk:
            select.select([server], [], [], 5)
            assert reader.drain() == 1  # type: ignore[attr-defined]
    assert len(rec.got) == 1
