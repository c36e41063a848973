"""The wire codec: the C extension ``fastknock._wire`` or its pure-Python reference.

Design
------
* Chosen once at import: ``FASTKNOCK_NO_EXTENSIONS=1`` in the environment, or an
  ``ImportError`` (extension not built), selects ``fastknock._wire_py``. ``IMPLEMENTATION``
  says which one is in use ("c" or "py"); ``tests/test_extensions.py`` fails if a build
  that should have the extension silently fell back.
* Both have the same API and raise the same exception types (``fastknock.errors``).
"""

from __future__ import annotations

import os

__all__ = ["IMPLEMENTATION", "pack", "parse", "serialize"]

IMPLEMENTATION: str

if os.environ.get("FASTKNOCK_NO_EXTENSIONS") == "1":
    from fastknock._wire_py import pack, parse, serialize

    IMPLEMENTATION = "py"
else:
    try:
        from fastknock._wire import pack, parse, serialize
    except ImportError:  # not built: the pure-Python reference
        from fastknock._wire_py import pack, parse, serialize

        IMPLEMENTATION = "py"
    else:
        IMPLEMENTATION = "c"
