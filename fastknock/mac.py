"""HMAC-SHA3-256 keys and the key ring: the C extension ``fastknock._hmac`` or its
pure-Python reference ``fastknock._hmac_py``.

Design
------
* Chosen once at import, like ``fastknock.wire``: ``FASTKNOCK_NO_EXTENSIONS=1`` or an
  ``ImportError`` selects the reference; ``IMPLEMENTATION`` is "c" or "py".
* ``HmacKey(key)``: ``digest``, ``sign``, ``verify`` (constant time), ``verify_message``.
  ``KeyRing({user: key})``: ``get``, ``in``, ``len`` and ``check(datagram, allowed_ops)``,
  the fused parse-and-verify of a session's first datagram -> ``(Reason, Message | None)``.
* Keys never show in ``repr`` and the objects cannot be pickled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastknock import _ext

__all__ = ["DEFAULT_ALLOWED_OPS", "IMPLEMENTATION", "HmacKey", "KeyRing"]

if TYPE_CHECKING:
    from fastknock._hmac_py import DEFAULT_ALLOWED_OPS, HmacKey, KeyRing

IMPLEMENTATION = _ext.bind(globals(), "fastknock._hmac", "fastknock._hmac_py", __all__)
