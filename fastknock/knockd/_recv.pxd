# C-level API of fastknock.knockd._recv (the batched UDP receive path), so that a benchmark or
# a later extension can cimport the Reader; the batch and the decisions: _decide.pxd.
from libc.stdint cimport int64_t

from fastknock.knockd._decide cimport Decider


cdef class Reader(Decider):
    cdef object handler  # handler(data: bytes, key: bytes, addr: tuple) -> None
    cdef int budget  # recvmmsg calls per drain()
    cdef int64_t rest_ns  # the rest under a stream (module docstring); 0: never
    cdef int64_t gap_ns  # a drain this soon after the last one's end is in a stream
    cdef int64_t last_end  # CLOCK_MONOTONIC ns at the end of the last drain()
    cdef int64_t talk_ns  # no rest for this long after a hand-up or a CHALLENGE
    cdef int64_t talk_until  # ... i.e. until then (CLOCK_MONOTONIC ns)

    cdef int hand_up(self, int i) except -1
