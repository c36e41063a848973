# Stub of the C extension fastknock.knockd._recv: the same API as its pure-Python reference,
# so the signatures are written once (fastknock/knockd/_recv_py.py) and cannot drift apart.
from fastknock.knockd._recv_py import COUNTERS as COUNTERS
from fastknock.knockd._recv_py import Reader as Reader

__all__ = ["COUNTERS", "Reader"]
