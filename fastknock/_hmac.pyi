# Stub of the C extension fastknock._hmac: the same API as its pure-Python reference, so the
# signatures are written once (fastknock/_hmac_py.py) and cannot drift apart.
from fastknock._hmac_py import DEFAULT_ALLOWED_OPS as DEFAULT_ALLOWED_OPS
from fastknock._hmac_py import HmacKey as HmacKey
from fastknock._hmac_py import KeyRing as KeyRing
from fastknock._hmac_py import vector_macs as vector_macs

__all__ = ["DEFAULT_ALLOWED_OPS", "HmacKey", "KeyRing", "vector_macs"]
