"""The wire codec: the C extension ``fastknock._wire`` or its pure-Python reference.

Design
------
* Chosen once at import by ``fastknock._ext``: ``FASTKNOCK_NO_EXTENSIONS=1`` in the
  environment, or an ``ImportError`` (extension not built), selects ``fastknock._wire_py``.
  ``IMPLEMENTATION`` says which one is in use ("c" or "py"); ``tests/test_extensions.py``
  fails if a build that should have the extension silently fell back.
* Both have the same API and raise the same exception types (``fastknock.errors``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastknock import _ext

__all__ = ["IMPLEMENTATION", "pack", "parse", "serialize"]

if TYPE_CHECKING:
    from fastknock._wire_py import pack, parse, serialize

IMPLEMENTATION = _ext.bind(globals(), "fastknock._wire", "fastknock._wire_py", __all__)
