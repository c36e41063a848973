"""Shared fixtures.

``impl`` runs a test once per implementation of the hot paths: "py" (the pure-Python
references ``fastknock._wire_py`` / ``fastknock._hmac_py``) and "c" (the Cython
extensions ``fastknock._wire`` / ``fastknock._hmac``). The "c" run is skipped only when
``FASTKNOCK_NO_EXTENSIONS=1``; otherwise a missing extension is an error, not a skip.
Session-scoped so hypothesis tests can use it (it holds no state).
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest

from fastknock import _ext

NO_EXTENSIONS = _ext.disabled()

IMPLEMENTATIONS = {
    "py": ("fastknock._wire_py", "fastknock._hmac_py"),
    "c": ("fastknock._wire", "fastknock._hmac"),
}


def load_impl(name: str) -> SimpleNamespace:
    wire_name, mac_name = IMPLEMENTATIONS[name]
    return SimpleNamespace(
        name=name,
        wire=importlib.import_module(wire_name),
        mac=importlib.import_module(mac_name),
    )


@pytest.fixture(scope="session", params=["py", "c"])
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    if request.param == "c" and NO_EXTENSIONS:
        pytest.skip("FASTKNOCK_NO_EXTENSIONS=1: C extensions not in use")
    return load_impl(request.param)


@pytest.fixture(scope="session")
def both() -> tuple[SimpleNamespace, SimpleNamespace]:
    """(py, c) for differential tests; skipped without the extensions."""
    if NO_EXTENSIONS:
        pytest.skip("FASTKNOCK_NO_EXTENSIONS=1: no C implementation to compare against")
    return load_impl("py"), load_impl("c")
