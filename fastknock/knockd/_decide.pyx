# cython: language_level=3
"""The batch decisions of the batched UDP reader (``_recv.Reader`` derives from ``Decider``;
reference: ``fastknock.knockd._recv_py``).

Design
------
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
* ``Decider`` holds what the decisions read and change: the batch (``recvmmsg`` slots and
  their peers' addresses), the key ring and the policy, the challenge secrets and grants,
  the KNOCK answer cap, the asked peers, the live-session set, the CHALLENGEs to send and
  the counters. It reads no socket and calls no Python: ``_recv.Reader`` fills the batch,
  hands up what ``decide`` stops at, and owns the configuration.
"""

cimport cython
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport bsearch
from libc.string cimport memcpy

from fastknock._hmac cimport auth_is, hmac_state, hmac52_x4
from fastknock._wire cimport (
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
from fastknock.knockd._asked cimport asked_add, asked_admits
from fastknock.knockd._live cimport live_has
from fastknock.knockd._net cimport MSG_DONTWAIT, _cmp_u64, _key_of, _token_input, sendmmsg
from fastknock.knockd._replay cimport cap_entry, cap_find, cap_record, cap_refuses


cdef extern from "keccak.h":
    void fk_sha3_256_squeeze(const uint64_t *st, unsigned char *out) nogil
    void fk_secure_zero(void *p, size_t n) nogil


cdef enum:
    OP_KNOCK = 0
    OP_CHALLENGE = 1
    OP_RESPONSE = 2
    OP_REVOKE = 5


@cython.auto_pickle(False)
cdef class Decider:
    """The decisions on a batch of datagrams; see the module docstring."""

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
        cdef cap_entry *e
        if self.pass_rejects:  # Python answers rejections too: it checks them itself
            return REASON_OK
        if load_be32(buf + 4) == OP_RESPONSE:
            return self.check_response(buf, &self.names[i])
        reason = self.before_mac(i, &k, &e, &index)
        if reason != REASON_OK:
            return reason
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

    cdef int before_mac(self, int i, peer_key *k, cap_entry **e,
                        Py_ssize_t *index) noexcept nogil:
        """Steps 5-6 up to the MAC for KNOCK/REVOKE-shaped datagram i: REASON_CAPPED, a
        frame reason (KeyRing.frame_index) or REASON_OK; with it the peer key k, the cap
        entry e (for cap_record; NULL without secrets) and the user's index."""
        cdef const unsigned char *buf = self.bufs[i]
        _key_of(&self.names[i], k)
        e[0] = NULL
        if self.have_cur:
            e[0] = cap_find(&self.caps, buf + 24, self.epoch)
            if cap_refuses(e[0], <const uint8_t *>k):
                return REASON_CAPPED
        return self.ring.frame_index(buf, WIRE_MSG_SIZE, self.allowed_ops, index)

    cdef bint mac_candidate(self, int j, Py_ssize_t *index) noexcept nogil:
        """Whether datagram j of the batch will need its MAC if nothing changes before it is
        decided (steps 1-6 up to the MAC, as decide and first_verdict); its user's index."""
        cdef peer_key k
        cdef cap_entry *e
        if (self.msgs[j].msg_len != WIRE_MSG_SIZE or (self.mac_known >> j) & 1
                or load_be32(self.bufs[j] + 4) == OP_RESPONSE):
            return False
        if self.live.used and live_has(&self.live, &self.names[j]):
            return False
        return self.before_mac(j, &k, &e, index) == REASON_OK

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
