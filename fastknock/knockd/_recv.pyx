# cython: language_level=3
"""Batched UDP receive for fastknockd's control port (reference: ``fastknock.knockd._recv_py``).

Design
------
* ``Reader.drain()`` runs from the event loop's reader callback (``loop.add_reader``). Each
  ``recvmmsg`` call (non-blocking) fills up to 64 fixed 64-byte slots; at most ``budget``
  calls per ``drain()``, so that under a flood the loop still gets to its timers and the
  firewall replies between batches (the fd is level-triggered: the loop calls back).
* Each batch is decided in C with the GIL released, in order and cheapest first, exactly
  as the ``DatagramProtocol`` path (``control.UdpControl``) would decide:
  1. ``msg_len != 56`` -> drop (REASON_SIZE); a slot is bigger than 56 bytes, so 56
     means exactly 56.
  2. The peer (address, port) has a live session -> hand up (RESPONSEs, retransmits).
  3. ``pass_rejects`` (policy ``always`` sends GOAWAYs, or debug logging wants one line
     per reject): hand up; Python checks and answers everything itself.
  4. A RESPONSE (from a peer without a session): magic, known user, a peer this reader
     answered in this or the previous epoch (``asked.py``, C in ``_asked.pxd``; else no
     token can match), then the stateless token check of ``fastknock.knockd.challenges``
     -- the four candidate tokens (current and previous epoch secret x KNOCK and REVOKE),
     each verified, no early exit, as the four ways of two ``hmac52_x4`` calls (AVX2,
     ``keccak4.h``). A match -> hand up (Python re-checks it and spends the token); else
     drop (REASON_RESPONSE).
  5. With secrets set, the KNOCK answer cap (``replaycap.py``, C in ``_replay.pxd``): a
     KNOCK already answered for enough other peers in this epoch is dropped before any
     MAC (REASON_CAPPED): a replay from many addresses costs a lookup.
  6. Else the fused check of ``KeyRing.check_index`` (size, magic, operation, user, MAC
     over the zero challenge, ``_hmac.pxd``), its MAC computed together with up to three
     later datagrams of the batch that will need one (``macs_from``: four ways of one
     AVX2 permutation; a verdict computed ahead depends on the key ring alone, so it stays
     right whatever the datagrams before it change). A KNOCK/REVOKE that passes is
     recorded in the cap and its peer among the asked ones, and if its (user, resource)
     passes rule 3 (the ``grants`` the endpoint computed) it is
     answered here: its computed CHALLENGE goes out with one ``sendmmsg`` per batch, and no
     Python object is made (VERDICT_CHALLENGED). One that passes without a grant is handed
     up (Python refuses it and answers as the policy says); one that fails is dropped,
     counted by reason.
  The decisions stop at each datagram Python must see; the handler runs (it may start or
  end a session, or rotate the secrets), then the rest of the batch is decided, so every
  datagram meets the state the one-by-one path would show it.
  Only handed-up datagrams become Python objects: ``handler(bytes, key, addr)`` with the
  18-byte peer key of ``fastknock.knockd.peer`` and ``addr`` shaped like the socket
  module's (``(host, port)`` or ``(host, port, flow, scope)``), to reply to.
* The rest (``rest_us``; fastknockd sets 200 us, ``recv.REST_US``). Under a flood the
  datagrams come microseconds apart, and a reader woken for each reads one or two: the
  wake-up (``epoll_wait``, the loop's callback, ``recvmmsg``) costs 2-3 us, several times
  the C checks of a datagram, here and on a bare blocking ``recvmmsg`` drain alike. So a
  drain that starts within ``busy_gap_us`` (1 ms) of the previous one's end -- a stream --
  and has emptied the socket without handing anything up sleeps ``rest_us`` once (the
  GIL released) and reads what came meanwhile: one wake-up per ~40 datagrams at 200,000/s
  instead of one per two. Bounded: once per drain, never after a hand-up (Python has work
  to do: its replies and the firewall request go out at once), never when idle (the
  first datagram after a quiet spell is read at once), so a datagram waits at most
  ``rest_us`` longer, and the loop is held at most ``rest_us`` more per wake-up, only
  under a stream. (Resting in the loop instead, by dropping the reader for a 1 ms timer,
  cut the CPU alike but cost the legit knocks 2-3 ms at p50: libuv's timers are in
  milliseconds.)
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
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from libc.stdint cimport int64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, nanosleep, timespec
from libc.stdlib cimport bsearch

from fastknock._hmac cimport HmacKey, KeyRing, auth_is, hmac_state, hmac52_x4
from fastknock.knockd._live cimport live_free, live_has, live_init, live_insert, live_remove
from fastknock.knockd._asked cimport (
    ASKED_SLOTS,
    asked_add,
    asked_admits,
    asked_forget,
    asked_rotate,
    asked_slot,
)
from fastknock.knockd._replay cimport (
    CAP_SETS,
    CAP_WAYS,
    _le64,
    cap_entry,
    cap_find,
    cap_record,
    cap_refuses,
)
from fastknock.knockd._net cimport (
    AF_INET,
    AF_INET6,
    KEY_SIZE,
    MSG_DONTWAIT,
    _cmp_u64,
    _key_from_bytes,
    _key_of,
    _py_addr,
    _token_input,
    peer_key,
    recvmmsg,
    sendmmsg,
    sockaddr_storage,
)
from fastknock._wire cimport (
    frame_reason,
    REASON_MAC,
    REASON_MAGIC,
    REASON_OK,
    REASON_SIZE,
    REASON_UNKNOWN_USER,
    WIRE_MAGIC,
    WIRE_MSG_SIZE,
    load_be32,
    store_be32,
)

cdef extern from "keccak.h":
    void fk_sha3_256_squeeze(const uint64_t *st, unsigned char *out) nogil
    void fk_secure_zero(void *p, size_t n) nogil

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
    MAX_REST_US = 1000000  # rest_us and busy_gap_us: at most a second
    OP_KNOCK = 0
    OP_CHALLENGE = 1
    OP_RESPONSE = 2
    OP_REVOKE = 5


@cython.auto_pickle(False)
@cython.final
cdef class Reader:
    """Drains a non-blocking UDP socket in batches; see the module docstring."""

    def __cinit__(self, sock, KeyRing keyring not None, handler, *,
                  bint pass_rejects=False, unsigned int allowed_ops=0x21, int budget=16,
                  bytes cap_seed=None, long rest_us=0, long busy_gap_us=1000):
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
        if not 0 <= rest_us <= MAX_REST_US or not 0 <= busy_gap_us <= MAX_REST_US:
            raise ValueError(f"rest_us and busy_gap_us are 0..{MAX_REST_US}")
        self.rest_ns = rest_us * 1000
        self.gap_ns = busy_gap_us * 1000
        self.last_end = -(1LL << 62)
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

    # -- the hot path --

    cdef int decide(self, int start, int n) noexcept nogil:
        """Decide datagrams start..n-1 in order, counting the drops, up to the first one
        Python must see: its index, or n."""
        cdef int i, v
        for i in range(start, n):
            if self.msgs[i].msg_len != WIRE_MSG_SIZE:
                v = REASON_SIZE
            elif self.live.used and live_has(&self.live, &self.names[i]):
                self.live_hits += 1
                return i
            else:
                v = self.first_verdict(i)
                if v == REASON_OK:
                    return i
            if v != VERDICT_CHALLENGED:
                self.dropped += 1
                self.reasons[v] += 1
        return n

    cdef int first_verdict(self, int i) noexcept nogil:
        """The verdict on 56-byte datagram i from a peer without a session (steps 3-6)."""
        cdef int reason
        cdef Py_ssize_t index
        cdef const unsigned char *buf = self.bufs[i]
        cdef peer_key k
        cdef cap_entry *e = NULL
        if self.pass_rejects:  # Python answers rejections too: it checks them itself
            return REASON_OK
        if load_be32(buf + 4) == OP_RESPONSE:
            return self.check_response(buf, &self.names[i])
        _key_of(&self.names[i], &k)
        if self.have_cur:
            e = cap_find(&self.caps, buf + 24, self.epoch)
            if cap_refuses(e, <const uint8_t *>&k):
                return REASON_CAPPED
        reason = frame_reason(buf, WIRE_MSG_SIZE, self.allowed_ops)
        if reason != REASON_OK:
            return reason
        index = self.ring.index(load_be32(buf + 8))
        if index < 0:
            return REASON_UNKNOWN_USER
        if not (self.mac_known >> i) & 1:
            self.macs_from(i, index)
        if not (self.mac_ok >> i) & 1:
            return REASON_MAC
        if not self.have_cur:
            return reason
        cap_record(&self.caps, e, buf + 24, <const uint8_t *>&k, self.epoch)
        asked_add(&self.asked, <const uint8_t *>&k)
        if self.granted(load_be32(buf + 8), load_be32(buf + 12)):
            self.challenge(i, &k)
            return VERDICT_CHALLENGED
        return reason

    cdef bint mac_candidate(self, int j, Py_ssize_t *index) noexcept nogil:
        """Whether datagram j of the batch will need its MAC if nothing changes before it is
        decided (steps 1-6 up to the MAC, as first_verdict); its user's index."""
        cdef const unsigned char *buf = self.bufs[j]
        cdef peer_key k
        if (self.msgs[j].msg_len != WIRE_MSG_SIZE or (self.mac_known >> j) & 1
                or load_be32(buf + 4) == OP_RESPONSE
                or frame_reason(buf, WIRE_MSG_SIZE, self.allowed_ops) != REASON_OK):
            return False
        if self.live.used and live_has(&self.live, &self.names[j]):
            return False
        index[0] = self.ring.index(load_be32(buf + 8))
        if index[0] < 0:
            return False
        if self.have_cur:
            _key_of(&self.names[j], &k)
            return not cap_refuses(cap_find(&self.caps, buf + 24, self.epoch),
                                   <const uint8_t *>&k)
        return True

    cdef void macs_from(self, int i, Py_ssize_t index) noexcept nogil:
        """The MAC verdicts of datagram i (past the frame checks, its user at index) and of
        up to three later datagrams of the batch that are candidates (mac_candidate), in
        one KeyRing.verify_knocks: four MACs for about the price of one and a half. A
        verdict computed ahead stays right whatever the datagrams before it change (the MAC
        depends on the key ring alone, and configure() forgets the verdicts); one that is
        not needed in the end (the peer got a session, the cap filled) is unused."""
        cdef Py_ssize_t idx[4]
        cdef const unsigned char *data[4]
        cdef int slot[4]
        cdef bint ok[4]
        cdef int n = 1, j
        idx[0] = index
        data[0] = self.bufs[i]
        slot[0] = i
        j = i + 1
        while n < 4 and j < self.nread:
            if self.mac_candidate(j, &idx[n]):
                data[n] = self.bufs[j]
                slot[n] = j
                n += 1
            j += 1
        self.ring.verify_knocks(n, idx, data, ok)
        for j in range(n):
            self.mac_known |= (<uint64_t>1) << slot[j]
            if ok[j]:
                self.mac_ok |= (<uint64_t>1) << slot[j]
            else:
                self.mac_ok &= ~((<uint64_t>1) << slot[j])

    cdef int check_response(self, const unsigned char *buf,
                            const sockaddr_storage *sa) noexcept nogil:
        cdef Py_ssize_t user
        cdef peer_key k
        cdef unsigned char heads[4][20]
        cdef unsigned char chals[4][32]
        cdef unsigned char toks[4][32]
        cdef const hmac_state *keys[4]
        cdef const unsigned char *hp[4]
        cdef const unsigned char *cp[4]
        cdef uint64_t mac[4][4]
        cdef uint32_t ops[2]
        cdef int w
        cdef bint ok = False
        if load_be32(buf) != WIRE_MAGIC:
            return REASON_MAGIC
        user = self.ring.index(load_be32(buf + 8))
        if user < 0:
            return REASON_UNKNOWN_USER
        if not self.have_cur:
            return REASON_RESPONSE
        _key_of(sa, &k)
        if not asked_admits(&self.asked, <const uint8_t *>&k):  # no token went to this peer
            return REASON_RESPONSE
        ops[0] = OP_KNOCK
        ops[1] = OP_REVOKE
        # Way w: the token of epoch (current - (w >> 1)) and operation ops[w & 1], under the
        # current or previous secret (without a previous one, prev is cur: the same work,
        # masked below); then the MAC of the RESPONSE over each token. Every candidate is
        # computed and verified: no early exit.
        for w in range(4):
            _token_input(heads[w], chals[w], ops[w & 1], buf + 8, self.epoch - (w >> 1), &k)
            keys[w] = &self.cur.st if w < 2 else &self.prev.st
            hp[w] = heads[w]
            cp[w] = chals[w]
        hmac52_x4(keys, hp, cp, mac)
        for w in range(4):
            fk_sha3_256_squeeze(mac[w], toks[w])  # the token: as HmacKey.sign_raw writes it
            keys[w] = self.ring.states[user]
            hp[w] = buf + 4
            cp[w] = toks[w]
        hmac52_x4(keys, hp, cp, mac)
        for w in range(4):
            ok |= auth_is(mac[w], buf + 24) and (w < 2 or self.have_prev)
        fk_secure_zero(toks, sizeof(toks))
        fk_secure_zero(mac, sizeof(mac))
        return REASON_OK if ok else REASON_RESPONSE

    cdef bint granted(self, uint32_t user, uint32_t resource) noexcept nogil:
        cdef unsigned long long want = ((<unsigned long long>user) << 32) | resource
        return bsearch(&want, self.grants, self.ngrants, sizeof(unsigned long long),
                       _cmp_u64) != NULL

    cdef void challenge(self, int i, const peer_key *k) noexcept nogil:
        """Queue the computed CHALLENGE for datagram i (a KNOCK/REVOKE that passed) from
        the peer ``k``."""
        cdef const unsigned char *buf = self.bufs[i]
        cdef unsigned char *out = self.out_bufs[self.nout]
        cdef unsigned char head[20]
        cdef unsigned char chal[32]
        _token_input(head, chal, load_be32(buf + 4), buf + 8, self.epoch, k)
        self.cur.sign_raw(head, chal, out + 24)  # the token is the AUTH field
        store_be32(out, WIRE_MAGIC)
        store_be32(out + 4, OP_CHALLENGE)
        memcpy(out + 8, buf + 8, 8)  # USER || RESOURCE
        memcpy(out + 16, out + 24, 8)  # SALT = token[:8]
        self.out_msgs[self.nout].msg_hdr.msg_name = &self.names[i]
        self.out_msgs[self.nout].msg_hdr.msg_namelen = self.msgs[i].msg_hdr.msg_namelen
        self.nout += 1
        self.challenged += 1

    cdef void send_challenges(self) noexcept nogil:
        cdef int done = 0, sent
        while done < self.nout:
            sent = sendmmsg(self.fd, &self.out_msgs[done], self.nout - done, MSG_DONTWAIT)
            if sent < 0:
                if errno == EINTR:
                    continue
                self.send_dropped += self.nout - done  # full send buffer: clients retry
                break
            done += sent
        self.nout = 0

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

    def drain(self):
        """Read until the socket is empty or ``budget`` batches are done. Returns the number
        of datagrams read."""
        cdef int n = 0, i = 0, call, err
        cdef Py_ssize_t total = 0
        cdef int fd = self.fd
        cdef bint rest = self.rest_ns and _now_ns() - self.last_end < self.gap_ns
        cdef uint64_t handed = self.handed
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
                if rest and n > 0 and self.handed == handed:  # a stream, only rejects so far
                    rest = False
                    with nogil:
                        nanosleep(&pause, NULL)
                    continue
                break
        self.last_end = _now_ns()
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
