# cython: language_level=3
"""Batched UDP receive for fastknockd's control port (reference: ``fastknock.knockd._recv_py``).

Design
------
* ``Reader.drain()`` runs from the event loop's reader callback (``loop.add_reader``). Each
  ``recvmmsg`` call (non-blocking) fills up to 64 fixed 64-byte slots; at most ``budget``
  calls per ``drain()``, so that under a flood the loop still gets to its timers and the
  firewall replies between batches (the fd is level-triggered: the loop calls back).
* ``Reader`` derives from ``_decide.Decider``, where each batch is decided in C with the
  GIL released, in order, exactly as the ``DatagramProtocol`` path would (its docstring
  has the rules). The decisions stop at each datagram Python must see; ``drain`` hands it
  up (``handler(bytes, key, addr)``, the 18-byte peer key of ``fastknock.knockd.peer`` and
  ``addr`` shaped like the socket module's), then the rest of the batch is decided, so
  every datagram meets the state the one-by-one path would show it. Only handed-up
  datagrams become Python objects.
* The rest (``rest_us``; fastknockd sets 200 us, ``recv.REST_US``). Under a flood the
  datagrams come microseconds apart, and a reader woken for each reads one or two: the
  wake-up (``epoll_wait``, the loop's callback, ``recvmmsg``) costs 2-3 us, several times
  the C checks of a datagram, here and on a bare blocking ``recvmmsg`` drain alike. So a
  drain that starts within ``busy_gap_us`` (1 ms) of the previous one's end -- a stream --
  and has emptied the socket without handing anything up sleeps ``rest_us`` once (the
  GIL released) and reads what came meanwhile: one wake-up per ~40 datagrams at 200,000/s
  instead of one per two. Bounded: once per drain, never after a hand-up (Python has work
  to do: its replies and the firewall request go out at once) or a CHALLENGE sent, nor
  for ``talk_us`` (fastknockd: 5 ms) after one (its RESPONSE is due a round trip later,
  and must not wait on a rest; a flood of rejects makes neither), never when idle (the
  first datagram after a quiet spell is read at once), and never when the caller says
  the loop has other work waiting (``drain(may_rest=False)``: the glue passes
  ``Controller.quiet``, no firewall request in flight and no TCP connection open). A
  resting drain holds the loop, and a firewall exchange takes about ten loop turns: with
  the rest on regardless, each turn cost a rest and the legit knocks 4-5 ms at p50
  (bench/flood). So a datagram waits at most ``rest_us`` longer, only under a stream.
  (Resting in the loop instead, by dropping the reader for a 1 ms timer, cut the CPU
  alike but cost the knocks 2-3 ms at p50: libuv's timers are in milliseconds.)
* "Live session" is a C hash set of raw peer keys (``_live.pxd``), kept by the endpoint:
  ``track(key)`` when a UDP session starts, ``untrack(key)`` when it ends (synchronously,
  from inside the handler). So it holds exactly the live sessions, bounded by the session
  caps whatever the traffic. With no live session the lookup is skipped.
* Counters live in C and are fetched with ``take()`` (deltas since the last call), which
  the asyncio glue (``fastknock.knockd.recv``) merges into the endpoint's counters.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, nanosleep, timespec

from fastknock._hmac cimport HmacKey, KeyRing
from fastknock._wire cimport WIRE_MSG_SIZE
from fastknock.knockd._asked cimport ASKED_SLOTS, asked_forget, asked_rotate, asked_slot
from fastknock.knockd._decide cimport (
    RECV_BATCH,
    RECV_SLOT,
    REASON_CAPPED,
    Decider,
)
from fastknock.knockd._live cimport live_free, live_init, live_insert, live_remove
from fastknock.knockd._net cimport (
    KEY_SIZE,
    MSG_DONTWAIT,
    _key_from_bytes,
    _key_of,
    _py_addr,
    peer_key,
    recvmmsg,
    sockaddr_storage,
)
from fastknock.knockd._replay cimport CAP_SETS, CAP_WAYS, _le64, cap_entry


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return <int64_t>t.tv_sec * 1000000000 + t.tv_nsec


import logging
import os

__all__ = ["Reader", "COUNTERS"]

log = logging.getLogger("fastknockd")

# The names of take()'s fields, in order.
COUNTERS = (
    "dropped", "size", "magic", "operation", "unknown_user", "mac", "response",
    "handed_up", "live_hits", "batches", "errors", "challenged", "send_dropped",
    "capped", "cap_evicted",
)


cdef enum:
    MAX_REST_US = 1000000  # rest_us, busy_gap_us and talk_us: at most a second


@cython.auto_pickle(False)
@cython.final
cdef class Reader(Decider):
    """Drains a non-blocking UDP socket in batches; see the module docstring."""

    def __cinit__(self, sock, KeyRing keyring not None, handler, *,
                  bint pass_rejects=False, unsigned int allowed_ops=0x21, int budget=16,
                  bytes cap_seed=None, long rest_us=0, long busy_gap_us=1000,
                  long talk_us=0):
        cdef int i
        if cap_seed is None:
            cap_seed = os.urandom(16)
        if len(cap_seed) != 16:
            raise ValueError("the cap seed is 16 bytes")
        self.fd = sock.fileno()
        if self.fd < 0:
            raise ValueError("socket is closed")
        if budget < 1:
            raise ValueError("budget must be at least 1")
        if not all(0 <= t <= MAX_REST_US for t in (rest_us, busy_gap_us, talk_us)):
            raise ValueError(f"rest_us, busy_gap_us and talk_us are 0..{MAX_REST_US}")
        self.rest_ns = rest_us * 1000
        self.gap_ns = busy_gap_us * 1000
        self.talk_ns = talk_us * 1000
        self.last_end = self.talk_until = -(1LL << 62)
        self.ring = keyring
        self.handler = handler
        self.have_cur = self.have_prev = False
        self.grants = NULL
        self.ngrants = 0
        self.pass_rejects = pass_rejects
        self.allowed_ops = allowed_ops
        self.budget = budget
        if live_init(&self.live) < 0:
            raise MemoryError()
        self.caps.entries = <cap_entry *>PyMem_Calloc(CAP_SETS * CAP_WAYS, sizeof(cap_entry))
        if self.caps.entries == NULL:
            raise MemoryError()
        self.caps.k0 = _le64(<const uint8_t *><const char *>cap_seed)
        self.caps.k1 = _le64(<const uint8_t *><const char *>cap_seed + 8)
        for i in range(2):
            self.asked.gen[i].slots = <asked_slot *>PyMem_Calloc(ASKED_SLOTS, sizeof(asked_slot))
            if self.asked.gen[i].slots == NULL:
                raise MemoryError()
        self.asked.k0 = self.caps.k0 ^ 0x9E3779B97F4A7C15ULL  # another key than the cap's
        self.asked.k1 = self.caps.k1 ^ 0x9E3779B97F4A7C15ULL
        memset(self.msgs, 0, sizeof(self.msgs))
        for i in range(RECV_BATCH):
            self.iov[i].iov_base = self.bufs[i]
            self.iov[i].iov_len = RECV_SLOT
            self.msgs[i].msg_hdr.msg_iov = &self.iov[i]
            self.msgs[i].msg_hdr.msg_iovlen = 1
            self.msgs[i].msg_hdr.msg_name = &self.names[i]
            self.out_iov[i].iov_base = self.out_bufs[i]
            self.out_iov[i].iov_len = WIRE_MSG_SIZE
            self.out_msgs[i].msg_hdr.msg_iov = &self.out_iov[i]
            self.out_msgs[i].msg_hdr.msg_iovlen = 1

    def __dealloc__(self):
        live_free(&self.live)
        PyMem_Free(self.grants)
        PyMem_Free(self.caps.entries)
        PyMem_Free(self.asked.gen[0].slots)
        PyMem_Free(self.asked.gen[1].slots)

    # -- configuration (a config reload swaps the key ring and the policy) --

    def configure(self, KeyRing keyring not None, bint pass_rejects):
        if self.pass_rejects and not pass_rejects:  # Python answered KNOCKs meanwhile
            asked_forget(&self.asked)
        self.ring = keyring
        self.pass_rejects = pass_rejects
        self.mac_known = 0  # verdicts computed ahead under the old keys

    def set_secrets(self, HmacKey current not None, int64_t epoch, HmacKey previous):
        """The challenge secrets of the current epoch (and the previous one, or None)."""
        cdef bint same = self.have_cur and current is self.cur and epoch == self.epoch
        cdef bint shift = (self.have_cur and previous is not None and previous is self.cur
                           and epoch == self.epoch + 1)
        if not same:
            asked_rotate(&self.asked, shift)
        self.cur = current
        self.epoch = epoch
        self.have_cur = True
        self.prev = previous if previous is not None else current
        self.have_prev = previous is not None

    def set_grants(self, grants):
        """The (user << 32 | resource) pairs that pass server rule 3."""
        cdef list values = sorted(set(int(g) for g in grants))
        cdef Py_ssize_t i, n = len(values)
        cdef unsigned long long *arr = <unsigned long long *>PyMem_Calloc(
            max(n, 1), sizeof(unsigned long long))
        if arr == NULL:
            raise MemoryError()
        for i in range(n):
            arr[i] = values[i]
        PyMem_Free(self.grants)
        self.grants = arr
        self.ngrants = n

    @property
    def keyring(self):
        return self.ring

    @property
    def tracked(self):
        """Entries in the live-peer set (for tests: bounded by the session caps)."""
        return self.live.used

    def track(self, bytes key not None):
        """The endpoint started a UDP session for the peer ``key`` (18 bytes)."""
        cdef peer_key k
        _key_from_bytes(key, &k)
        if live_insert(&self.live, &k) < 0:
            raise MemoryError()

    def untrack(self, bytes key not None):
        """The endpoint ended the UDP session of the peer ``key``."""
        cdef peer_key k
        _key_from_bytes(key, &k)
        live_remove(&self.live, &k)

    cdef int hand_up(self, int i) except -1:
        cdef peer_key k
        _key_of(&self.names[i], &k)
        key = PyBytes_FromStringAndSize(<const char *>&k, KEY_SIZE)
        addr = _py_addr(&self.names[i])
        data = PyBytes_FromStringAndSize(<const char *>self.bufs[i], WIRE_MSG_SIZE)
        self.handed += 1
        try:
            self.handler(data, key, addr)
        except Exception:
            self.errors += 1
            log.exception("UDP datagram handler failed")
        return 0

    def drain(self, bint may_rest=True):
        """Read until the socket is empty or ``budget`` batches are done. Returns the number
        of datagrams read. ``may_rest``: the caller has nothing waiting on a prompt return
        (the rest, module docstring)."""
        cdef int n = 0, i = 0, call, err
        cdef Py_ssize_t total = 0
        cdef int fd = self.fd
        cdef int64_t now = _now_ns()
        cdef bint rest = (may_rest and self.rest_ns and now - self.last_end < self.gap_ns
                          and now >= self.talk_until)
        cdef uint64_t handed = self.handed, challenged = self.challenged
        cdef timespec pause
        pause.tv_sec = self.rest_ns // 1000000000
        pause.tv_nsec = self.rest_ns % 1000000000
        for call in range(self.budget):
            for i in range(RECV_BATCH):
                self.msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
                self.msgs[i].msg_hdr.msg_flags = 0
            with nogil:
                n = recvmmsg(fd, self.msgs, RECV_BATCH, MSG_DONTWAIT, NULL)
                err = errno
                self.nout = 0  # (a handler that raised out of the last drain left some)
                self.nread = n if n > 0 else 0
                self.mac_known = 0
                i = self.decide(0, n) if n > 0 else 0
            if n < 0:
                if err == EINTR:
                    continue
                if err != EAGAIN:  # == EWOULDBLOCK on Linux
                    self.errors += 1
                break
            self.batches += 1
            total += n
            while i < n:  # datagram i is Python's; then the rest meets the state it left
                self.hand_up(i)
                with nogil:
                    i = self.decide(i + 1, n)
            if self.nout:  # the CHALLENGEs computed in C, after the batch's hand-ups
                with nogil:
                    self.send_challenges()
            if n < RECV_BATCH:
                if (rest and n > 0 and self.handed == handed  # a stream, only rejects so far
                        and self.challenged == challenged):
                    rest = False
                    with nogil:
                        nanosleep(&pause, NULL)
                    continue
                break
        self.last_end = _now_ns()
        if self.handed != handed or self.challenged != challenged:  # a conversation
            self.talk_until = self.last_end + self.talk_ns
        return total

    def take(self):
        """Counter deltas since the last call, in ``COUNTERS`` order; resets them."""
        out = (
            self.dropped, self.reasons[1], self.reasons[2], self.reasons[3],
            self.reasons[4], self.reasons[5], self.reasons[6], self.handed, self.live_hits,
            self.batches, self.errors, self.challenged, self.send_dropped,
            self.reasons[REASON_CAPPED], self.caps.evicted,
        )
        self.dropped = self.handed = self.live_hits = self.batches = self.errors = 0
        self.challenged = self.send_dropped = self.caps.evicted = 0
        memset(self.reasons, 0, sizeof(self.reasons))
        return out

    def __repr__(self):
        return f"Reader(fd={self.fd}, tracked={self.live.used})"
