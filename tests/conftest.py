"""Shared fixtures.

``impl`` runs a test once per implementation of the hot paths: "py" (the pure-Python
references ``fastknock._wire_py`` / ``fastknock._hmac_py``) and "c" (the Cython
extensions ``fastknock._wire`` / ``fastknock._hmac``). The "c" run is skipped only when
``FASTKNOCK_NO_EXTENSIONS=1``; otherwise a missing extension is an error, not a skip.
Each also carries its batched UDP reader (``fastknock.knockd._recv_py`` / ``_recv``).
Session-scoped so hypothesis tests can use it (it holds no state).
"""

from __future__ import annotations

import importlib
import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from fastknock import _ext

NO_EXTENSIONS = _ext.disabled()

IMPLEMENTATIONS = {
    "py": ("fastknock._wire_py", "fastknock._hmac_py", "fastknock.knockd._recv_py"),
    "c": ("fastknock._wire", "fastknock._hmac", "fastknock.knockd._recv"),
}


def load_impl(name: str) -> SimpleNamespace:
    """One implementation: ``wire``, ``mac`` and the batched reader (``Reader``,
    ``COUNTERS``) of ``fastknock.knockd``."""
    wire_name, mac_name, recv_name = IMPLEMENTATIONS[name]
    recv = importlib.import_module(recv_name)
    return SimpleNamespace(
        name=name,
        wire=importlib.import_module(wire_name),
        mac=importlib.import_module(mac_name),
        Reader=recv.Reader,
        COUNTERS=recv.COUNTERS,
    )


@pytest.fixture(scope="session", params=["py", "c"])
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    if request.param == "c" and NO_EXTENSIONS:
        pytest.skip("FASTKNOCK_NO_EXTENSIONS=1: C extensions not in use")
    return load_impl(request.param)


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["v4", "dual"])
def server(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    """A bound, non-blocking UDP socket on loopback: IPv4, or dual-stack IPv6 (where IPv4
    peers show as ::ffff:a.b.c.d), for the batched readers' tests."""
    if request.param == socket.AF_INET6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.setblocking(False)
    with sock:
        yield sock


@pytest.fixture(scope="session")
def both() -> tuple[SimpleNamespace, SimpleNamespace]:
    """(py, c) for differential tests; skipped without the extensions."""
    if NO_EXTENSIONS:
        pytest.skip("FASTKNOCK_NO_EXTENSIONS=1: no C implementation to compare against")
    return load_impl("py"), load_impl("c")
