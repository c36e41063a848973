"""The one reader of the extension switch: C extension or pure-Python reference.

Design
------
Every hot path (``wire``, ``mac``, ``knockd.recv``) is a Cython extension with an
independent pure-Python reference of the same API. ``select(extension, reference)``
imports the extension unless ``FASTKNOCK_NO_EXTENSIONS=1`` is set or it is not built
(``ImportError``), else the reference, and says which one it took ("c" or "py");
``bind`` also copies the chosen module's public names into the selector's namespace. The
selectors import the reference's names under ``TYPE_CHECKING``, so mypy sees one set of
types whichever is chosen at run time. ``setup.py`` reads the same variable itself: it runs
before the package is built and cannot import it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, MutableMapping
from types import ModuleType

SWITCH = "FASTKNOCK_NO_EXTENSIONS"


def disabled() -> bool:
    """True when ``FASTKNOCK_NO_EXTENSIONS=1``: use the pure-Python references only."""
    return os.environ.get(SWITCH) == "1"


def select(extension: str, reference: str) -> tuple[ModuleType, str]:
    """``(module, "c")`` for the extension if enabled and built, else ``(reference, "py")``."""
    if not disabled():
        try:
            return importlib.import_module(extension), "c"
        except ImportError:  # not built: the pure-Python reference
            pass
    return importlib.import_module(reference), "py"


def bind(
    namespace: MutableMapping[str, object], extension: str, reference: str, names: Iterable[str]
) -> str:
    """Set ``names`` in ``namespace`` (a selector's ``globals()``) from the chosen module;
    return "c" or "py". ``IMPLEMENTATION`` in ``names`` is skipped (the caller sets it)."""
    module, which = select(extension, reference)
    for name in names:
        if name != "IMPLEMENTATION":
            namespace[name] = getattr(module, name)
    return which
