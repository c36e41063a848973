# cython: language_level=3
"""C version of HMAC-SHA3-256 keys and the key ring (reference: ``fastknock._hmac_py``).

Design
------
* An ``HmacKey`` holds two Keccak states, inner and outer, that have absorbed the
  zero-padded key XOR ipad / opad (one 136-byte block each: one permutation each, once).
  The raw key is never kept: the padded key block is wiped after setup, the states on
  deallocation, and neither is reachable from Python (no attribute, no pickling). Scratch
  states (keyed state XOR public data, key-equivalent since Keccak-f is invertible) are
  wiped after each MAC; register spills inside the permutation are beyond our reach.
* AUTH input is 52 bytes (PROTOCOL.md): OPERATION || USER || RESOURCE || SALT, which are
  bytes 4..24 of the message itself, then the 32-byte challenge. That fits one block, so
  a MAC is exactly two permutations: copy inner, XOR 7 lanes + padding, permute; copy
  outer, XOR the 4 digest lanes + padding, permute. The digest lanes are compared to the
  received AUTH lanes by OR-ing XORs: constant time, no early exit.
* ``KeyRing`` keeps user ids in a sorted C array (binary search) next to pointers to the
  ``HmacKey`` states, so ``check_raw`` (``_hmac.pxd``) runs without the GIL for a
  batched receive path. ``check`` is the fused parse-and-verify: size, magic, operation,
  user, MAC, cheapest first, straight on the datagram's buffer; no Python object is made
  until the MAC has passed (rejections return prebuilt tuples).
* Keccak-f[1600] and the sponge helpers live in ``keccak.h``; the framing in ``_wire``.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.long cimport PyLong_Check
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy, memset

from fastknock._wire cimport (
    REASON_MAC,
    REASON_OK,
    REASON_UNKNOWN_USER,
    WIRE_AUTH_SIZE,
    WIRE_HEAD_SIZE,
    WIRE_SALT_SIZE,
    copy_fixed,
    frame_reason,
    load_be32,
    message_from_raw,
    store_be32,
    to_u32,
)

from fastknock.message import ZERO_CHALLENGE, Reason

__all__ = ["DEFAULT_ALLOWED_OPS", "HmacKey", "KeyRing", "vector_macs"]


cdef extern from "keccak4.h":
    uint64_t fk_load64le(const unsigned char *p) nogil
    uint32_t fk_load32le(const unsigned char *p) nogil
    void fk_sha3_256_absorb_final(uint64_t st[25], const unsigned char *p, size_t n) nogil
    void fk_sha3_256_squeeze(const uint64_t *st, unsigned char *out) nogil
    void fk_keccakf1600_out4(const uint64_t st[25], uint64_t out[4]) nogil
    void fk_keccakf1600_x4_out4(const uint64_t **inp, uint64_t out[4][4], int vector) nogil
    int fk_x4_supported() nogil
    # SHA3 padding as lane values: 0x06 (domain bits + first pad bit) in the byte right
    # after the data, 0x80 in the last byte of the block (lane 16, top byte).
    uint64_t PAD_LAST "FK_SHA3_PAD_LAST"


cdef enum:
    BLOCK_SIZE = 136  # SHA3-256 rate, bytes
    BLOCK_LANES = 17
    DIGEST_SIZE = 32
    NOGIL_DIGEST_MIN = 4096  # release the GIL for digest() inputs at least this long

cdef unsigned char ZERO32[32]  # static storage: all zero, never written

DEFAULT_ALLOWED_OPS = 0x21  # (1 << Operation.KNOCK) | (1 << Operation.REVOKE)

cdef int _vector = 1  # 0: hmac52_x4 runs four scalar permutations (vector_macs)


def vector_macs(enabled=None):
    """Whether ``hmac52_x4`` (the batched receive path's MACs and tokens) computes four at
    a time with AVX2 (``keccak4.h``): the CPU must have it and it must not be switched
    off. ``enabled`` switches it, for the differential tests and the benchmark's baseline;
    the results are the same either way."""
    global _vector
    if enabled is not None:
        _vector = 1 if enabled else 0
    return bool(_vector and fk_x4_supported())


cdef tuple _REJECT = tuple([(Reason(i), None) for i in range(len(Reason))])
cdef object _OK = Reason.OK


cdef inline void _keyed_state(uint64_t st[25], const unsigned char *block,
                              uint64_t pad) noexcept nogil:
    cdef int i
    memset(st, 0, 25 * sizeof(uint64_t))
    for i in range(BLOCK_LANES):
        st[i] = fk_load64le(block + 8 * i) ^ pad
    fk_keccakf1600(st)


cdef inline void _inner_input(const hmac_state *k, const unsigned char *head,
                              const unsigned char *challenge, uint64_t s[25]) noexcept nogil:
    """s = the inner state with head (20 bytes) || challenge (32 bytes) and the padding
    absorbed, ready for the inner permutation."""
    memcpy(s, k.inner, 25 * sizeof(uint64_t))
    # The 52 bytes as 7 little-endian lanes, padding 0x06 at byte 52 (lane 6, byte 4).
    s[0] ^= fk_load64le(head)
    s[1] ^= fk_load64le(head + 8)
    s[2] ^= fk_load32le(head + 16) | (<uint64_t>fk_load32le(challenge) << 32)
    s[3] ^= fk_load64le(challenge + 4)
    s[4] ^= fk_load64le(challenge + 12)
    s[5] ^= fk_load64le(challenge + 20)
    s[6] ^= fk_load32le(challenge + 28) | (<uint64_t>0x06 << 32)
    s[16] ^= PAD_LAST


cdef inline void _outer_input(const hmac_state *k, const uint64_t mac[4],
                              uint64_t s[25]) noexcept nogil:
    """s = the outer state with the inner digest mac (as lanes) and the padding absorbed."""
    memcpy(s, k.outer, 25 * sizeof(uint64_t))
    s[0] ^= mac[0]
    s[1] ^= mac[1]
    s[2] ^= mac[2]
    s[3] ^= mac[3]
    s[4] ^= 0x06
    s[16] ^= PAD_LAST


cdef inline void _hmac52(const hmac_state *k, const unsigned char *head,
                         const unsigned char *challenge, uint64_t mac[4]) noexcept nogil:
    """HMAC of head (20 bytes) || challenge (32 bytes), as lanes, to mac."""
    cdef uint64_t s[25]
    _inner_input(k, head, challenge, s)
    fk_keccakf1600_out4(s, mac)
    _outer_input(k, mac, s)
    fk_keccakf1600_out4(s, mac)
    # s held keyed state XOR public data: key-equivalent (the permutation is invertible).
    fk_secure_zero(s, sizeof(s))


cdef bint auth_is(const uint64_t mac[4], const unsigned char *auth) noexcept nogil:
    """Constant time: whether auth (32 bytes) is mac (as lanes)."""
    return ((mac[0] ^ fk_load64le(auth)) | (mac[1] ^ fk_load64le(auth + 8))
            | (mac[2] ^ fk_load64le(auth + 16)) | (mac[3] ^ fk_load64le(auth + 24))) == 0


cdef inline bint _verify52(const hmac_state *k, const unsigned char *head,
                           const unsigned char *challenge,
                           const unsigned char *auth) noexcept nogil:
    cdef uint64_t mac[4]
    cdef bint ok
    _hmac52(k, head, challenge, mac)
    ok = auth_is(mac, auth)
    fk_secure_zero(mac, sizeof(mac))  # the true MAC of data an attacker may have chosen
    return ok


cdef void hmac52_x4(const hmac_state **keys, const unsigned char **heads,
                    const unsigned char **challenges, uint64_t mac[4][4]) noexcept nogil:
    cdef uint64_t s[4][25]
    cdef const uint64_t *inp[4]
    cdef int j
    for j in range(4):
        _inner_input(keys[j], heads[j], challenges[j] if challenges != NULL else ZERO32, s[j])
        inp[j] = &s[j][0]
    fk_keccakf1600_x4_out4(inp, mac, _vector)
    for j in range(4):
        _outer_input(keys[j], mac[j], s[j])
    fk_keccakf1600_x4_out4(inp, mac, _vector)
    fk_secure_zero(s, sizeof(s))  # keyed state XOR public data


cdef int _head(object operation, object user, object resource, object salt,
               unsigned char *head) except -1:
    cdef uint32_t op, u, r
    to_u32(operation, &op, "operation")
    to_u32(user, &u, "user")
    to_u32(resource, &r, "resource")
    copy_fixed(salt, WIRE_SALT_SIZE, head + 12, "salt")
    store_be32(head, op)
    store_be32(head + 4, u)
    store_be32(head + 8, r)
    return 0


@cython.auto_pickle(False)
@cython.final
cdef class HmacKey:
    """HMAC-SHA3-256 with a pre-absorbed key."""

    def __cinit__(self, key):
        cdef Py_buffer view
        cdef unsigned char block[BLOCK_SIZE]
        cdef uint64_t h[25]
        memset(block, 0, BLOCK_SIZE)
        PyObject_GetBuffer(key, &view, PyBUF_SIMPLE)
        try:
            if view.len > BLOCK_SIZE:  # RFC 2104: a long key is hashed first
                memset(h, 0, sizeof(h))
                fk_sha3_256_absorb_final(h, <const unsigned char *>view.buf, view.len)
                fk_sha3_256_squeeze(h, block)
                fk_secure_zero(h, sizeof(h))
            else:
                memcpy(block, view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        _keyed_state(self.st.inner, block, 0x3636363636363636ULL)
        _keyed_state(self.st.outer, block, 0x5C5C5C5C5C5C5C5CULL)
        fk_secure_zero(block, sizeof(block))

    def __dealloc__(self):
        fk_secure_zero(&self.st, sizeof(hmac_state))

    cdef void sign_raw(self, const unsigned char *head, const unsigned char *challenge,
                       unsigned char *out) noexcept nogil:
        cdef uint64_t mac[4]
        _hmac52(&self.st, head, challenge, mac)
        fk_sha3_256_squeeze(mac, out)

    cdef bint verify_raw(self, const unsigned char *head, const unsigned char *challenge,
                         const unsigned char *auth) noexcept nogil:
        return _verify52(&self.st, head, challenge, auth)

    def digest(self, data):
        """HMAC of ``data`` (any length)."""
        cdef Py_buffer view
        cdef uint64_t s[25]
        cdef uint64_t mac[4]
        cdef unsigned char out[DIGEST_SIZE]
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            memcpy(s, self.st.inner, sizeof(s))
            if view.len >= NOGIL_DIGEST_MIN:
                with nogil:
                    fk_sha3_256_absorb_final(s, <const unsigned char *>view.buf, view.len)
            else:
                fk_sha3_256_absorb_final(s, <const unsigned char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        memcpy(mac, s, sizeof(mac))
        _outer_input(&self.st, mac, s)
        fk_keccakf1600_out4(s, mac)
        fk_secure_zero(s, sizeof(s))
        fk_sha3_256_squeeze(mac, out)
        return PyBytes_FromStringAndSize(<const char *>out, DIGEST_SIZE)

    def sign(self, operation, user, resource, salt, challenge=ZERO_CHALLENGE):
        """The AUTH field for these message fields and challenge token."""
        cdef unsigned char head[WIRE_HEAD_SIZE]
        cdef unsigned char chal[WIRE_AUTH_SIZE]
        cdef unsigned char out[DIGEST_SIZE]
        _head(operation, user, resource, salt, head)
        copy_fixed(challenge, WIRE_AUTH_SIZE, chal, "challenge")
        self.sign_raw(head, chal, out)
        return PyBytes_FromStringAndSize(<const char *>out, DIGEST_SIZE)

    def verify(self, operation, user, resource, salt, auth, challenge=ZERO_CHALLENGE):
        """Constant-time check of ``auth``; an ``auth`` of the wrong length is False."""
        cdef unsigned char head[WIRE_HEAD_SIZE]
        cdef unsigned char chal[WIRE_AUTH_SIZE]
        cdef Py_buffer view
        _head(operation, user, resource, salt, head)
        copy_fixed(challenge, WIRE_AUTH_SIZE, chal, "challenge")
        if PyBytes_CheckExact(auth):
            if PyBytes_GET_SIZE(auth) != WIRE_AUTH_SIZE:
                return False
            return _verify52(&self.st, head, chal,
                             <const unsigned char *>PyBytes_AS_STRING(auth))
        PyObject_GetBuffer(auth, &view, PyBUF_SIMPLE)
        try:
            if view.len != WIRE_AUTH_SIZE:
                return False
            return _verify52(&self.st, head, chal, <const unsigned char *>view.buf)
        finally:
            PyBuffer_Release(&view)

    def verify_message(self, msg, challenge=ZERO_CHALLENGE):
        operation, user, resource, salt, auth = msg
        return self.verify(operation, user, resource, salt, auth, challenge)

    def __repr__(self):
        return "HmacKey(<redacted>)"

    def __reduce__(self):
        raise TypeError("HmacKey holds a secret key and cannot be pickled")


@cython.auto_pickle(False)
@cython.final
cdef class KeyRing:
    """One ``HmacKey`` per user id, and the fused first-datagram check."""

    def __cinit__(self, keys):
        cdef dict by_id = {}
        cdef uint32_t u
        cdef Py_ssize_t i
        self.n = 0
        self.ids = NULL
        self.states = NULL
        self.keys = []
        self.users = ()
        for user, key in keys.items():
            to_u32(user, &u, "user id")
            by_id[u] = HmacKey(key)
        order = sorted(by_id)
        n = len(order)
        self.ids = <uint32_t *>PyMem_Malloc(max(n, 1) * sizeof(uint32_t))
        self.states = <const hmac_state **>PyMem_Malloc(max(n, 1) * sizeof(hmac_state *))
        if self.ids == NULL or self.states == NULL:
            raise MemoryError()
        for i in range(n):
            k = <HmacKey>by_id[order[i]]
            self.ids[i] = order[i]
            self.states[i] = &k.st
            self.keys.append(k)
        self.users = tuple(order)
        self.n = n

    def __dealloc__(self):
        PyMem_Free(self.ids)
        PyMem_Free(self.states)

    cdef Py_ssize_t index(self, uint32_t user) noexcept nogil:
        cdef Py_ssize_t lo = 0, hi = self.n, mid
        while lo < hi:
            mid = lo + ((hi - lo) >> 1)
            if self.ids[mid] < user:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.n and self.ids[lo] == user:
            return lo
        return -1

    cdef const hmac_state *lookup(self, uint32_t user) noexcept nogil:
        cdef Py_ssize_t i = self.index(user)
        if i < 0:
            return NULL
        return self.states[i]

    cdef int check_raw(self, const unsigned char *data, Py_ssize_t n,
                       unsigned int allowed_ops) noexcept nogil:
        cdef Py_ssize_t index
        return self.check_index(data, n, allowed_ops, &index)

    cdef int frame_index(self, const unsigned char *data, Py_ssize_t n,
                         unsigned int allowed_ops, Py_ssize_t *index) noexcept nogil:
        cdef int reason = frame_reason(data, n, allowed_ops)
        if reason != REASON_OK:
            return reason
        index[0] = self.index(load_be32(data + 8))
        return REASON_OK if index[0] >= 0 else REASON_UNKNOWN_USER

    cdef int check_index(self, const unsigned char *data, Py_ssize_t n,
                         unsigned int allowed_ops, Py_ssize_t *index) noexcept nogil:
        cdef int reason = self.frame_index(data, n, allowed_ops, index)
        if reason != REASON_OK:
            return reason
        if not _verify52(self.states[index[0]], data + 4, ZERO32, data + 24):
            return REASON_MAC
        return REASON_OK

    cdef bint verify_index(self, Py_ssize_t i, const unsigned char *head,
                           const unsigned char *challenge,
                           const unsigned char *auth) noexcept nogil:
        return _verify52(self.states[i], head, challenge, auth)

    cdef void verify_knocks(self, int n, const Py_ssize_t *index,
                            const unsigned char **data, bint *ok) noexcept nogil:
        cdef const hmac_state *keys[4]
        cdef const unsigned char *heads[4]
        cdef uint64_t mac[4][4]
        cdef int j
        if n == 1:  # a lone one: the scalar MAC is cheaper than a 4-way with 3 idle
            ok[0] = _verify52(self.states[index[0]], data[0] + 4, ZERO32, data[0] + 24)
            return
        for j in range(4):  # idle ways repeat the first datagram; their results are unread
            keys[j] = self.states[index[j if j < n else 0]]
            heads[j] = data[j if j < n else 0] + 4
        hmac52_x4(keys, heads, NULL, mac)
        for j in range(n):
            ok[j] = auth_is(mac[j], data[j] + 24)
        fk_secure_zero(mac, sizeof(mac))

    def check_batch(self, datagrams, allowed_ops=DEFAULT_ALLOWED_OPS):
        """The reason ``check`` gives each of ``datagrams`` (without the messages), the
        MACs verified four at a time with ``verify_knocks``, as the batched receive path
        does: for the tests and benchmarks of that path."""
        cdef list bufs = [bytes(memoryview(d)) for d in datagrams]
        cdef list out = [0] * len(bufs)
        cdef Py_ssize_t index[4]
        cdef const unsigned char *data[4]
        cdef Py_ssize_t at[4]
        cdef bint ok[4]
        cdef Py_ssize_t i, n = 0, j, total = len(bufs)
        cdef int reason
        cdef const unsigned char *p
        cdef unsigned int ops
        if not isinstance(allowed_ops, int):  # as check()
            raise TypeError(f"allowed_ops must be an int, not {type(allowed_ops).__name__}")
        ops = allowed_ops
        for i in range(total + 1):
            if i < total:
                p = <const unsigned char *>PyBytes_AS_STRING(bufs[i])
                reason = self.frame_index(p, PyBytes_GET_SIZE(bufs[i]), ops, &index[n])
                if reason == REASON_OK:
                    data[n] = p
                    at[n] = i
                    n += 1
                out[i] = reason
            if n == 4 or (i == total and n):
                self.verify_knocks(<int>n, index, data, ok)
                for j in range(n):
                    out[at[j]] = REASON_OK if ok[j] else REASON_MAC
                n = 0
        return [Reason(r) for r in out]

    def check(self, data, allowed_ops=DEFAULT_ALLOWED_OPS):
        """Parse and authenticate (zero challenge) the first datagram of a session."""
        cdef Py_buffer view
        cdef const unsigned char *p
        cdef int reason
        cdef Py_ssize_t i
        if not isinstance(allowed_ops, int):  # as the reference: a float is not truncated
            raise TypeError(f"allowed_ops must be an int, not {type(allowed_ops).__name__}")
        cdef unsigned int ops = allowed_ops  # OverflowError outside 0..2**32-1, as the reference
        if PyBytes_CheckExact(data):
            p = <const unsigned char *>PyBytes_AS_STRING(data)
            reason = self.check_index(p, PyBytes_GET_SIZE(data), ops, &i)
            if reason != REASON_OK:
                return _REJECT[reason]
            return (_OK, message_from_raw(p, <object>PyTuple_GET_ITEM(self.users, i)))
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            p = <const unsigned char *>view.buf
            reason = self.check_index(p, view.len, ops, &i)
            if reason != REASON_OK:
                return _REJECT[reason]
            return (_OK, message_from_raw(p, <object>PyTuple_GET_ITEM(self.users, i)))
        finally:
            PyBuffer_Release(&view)

    def get(self, user):
        return _find(self, user)

    def __contains__(self, user):
        return _find(self, user) is not None

    def __len__(self):
        return self.n

    def __repr__(self):
        return f"KeyRing(<{self.n} keys redacted>)"

    def __reduce__(self):
        raise TypeError("KeyRing holds secret keys and cannot be pickled")


cdef object _find(KeyRing ring, object user):
    cdef Py_ssize_t i
    if not PyLong_Check(user) or not (0 <= user <= 0xFFFFFFFF):
        return None
    i = ring.index(<uint32_t>user)
    return None if i < 0 else ring.keys[i]
