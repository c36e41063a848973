# C-level API of fastknock._hmac, for `cimport` by other extensions (the recvmmsg receive
# path). Every entry here is nogil and never raises; the caller owns the buffers.
from libc.stdint cimport uint32_t, uint64_t


cdef extern from "keccak.h":
    void fk_keccakf1600(uint64_t st[25]) nogil
    void fk_secure_zero(void *p, size_t n) nogil


# One key's HMAC-SHA3-256 states after absorbing (key ^ ipad) and (key ^ opad).
ctypedef struct hmac_state:
    uint64_t inner[25]
    uint64_t outer[25]


# Four HMAC-SHA3-256 of 52-byte inputs at once (four ways of one AVX2 permutation,
# keccak4.h; four scalar ones without AVX2 or with vector_macs(False)): way j under
# keys[j] over heads[j] (20 bytes) || challenges[j] (32 bytes; challenges NULL: all zero),
# the MAC as lanes to mac[j]. The caller wipes mac if it is secret to it.
cdef void hmac52_x4(const hmac_state **keys, const unsigned char **heads,
                    const unsigned char **challenges, uint64_t mac[4][4]) noexcept nogil
# Constant time: whether auth (32 bytes) is mac (as lanes).
cdef bint auth_is(const uint64_t mac[4], const unsigned char *auth) noexcept nogil


cdef class HmacKey:
    cdef hmac_state st

    # AUTH over head (20 bytes: OPERATION || USER || RESOURCE || SALT, i.e. bytes 4..24
    # of a message) and a 32-byte challenge token, written to out (32 bytes).
    cdef void sign_raw(self, const unsigned char *head, const unsigned char *challenge,
                       unsigned char *out) noexcept nogil
    # Constant-time: 1 if auth (32 bytes) is the AUTH of head and challenge, else 0.
    cdef bint verify_raw(self, const unsigned char *head, const unsigned char *challenge,
                         const unsigned char *auth) noexcept nogil


cdef class KeyRing:
    cdef Py_ssize_t n
    cdef uint32_t *ids  # sorted ascending, n entries
    cdef const hmac_state **states  # states[i] belongs to ids[i]; owned by keys[i]
    cdef list keys  # the HmacKey objects, keeping the states alive
    cdef tuple users  # the ids as int objects, same order (reused in returned Messages)

    # Index of user in ids, or -1. Binary search.
    cdef Py_ssize_t index(self, uint32_t user) noexcept nogil
    # The key state of user, or NULL.
    cdef const hmac_state *lookup(self, uint32_t user) noexcept nogil
    # The fused check of one datagram (data, n bytes) that starts a session: returns a
    # fastknock.message.Reason code (REASON_* in _wire.pxd); REASON_OK means size,
    # magic, operation (a bit in allowed_ops), user and AUTH (zero challenge) are good.
    cdef int check_raw(self, const unsigned char *data, Py_ssize_t n,
                       unsigned int allowed_ops) noexcept nogil
    # The checks of check_raw before the MAC (size, magic, operation, user): a Reason code,
    # and the user's index (into ids/keys/users): read it only with REASON_OK.
    cdef int frame_index(self, const unsigned char *data, Py_ssize_t n,
                         unsigned int allowed_ops, Py_ssize_t *index) noexcept nogil
    # check_raw that also stores the user's index (into ids/keys/users): read it only with
    # REASON_OK.
    cdef int check_index(self, const unsigned char *data, Py_ssize_t n,
                         unsigned int allowed_ops, Py_ssize_t *index) noexcept nogil
    # Constant-time: 1 if auth (32 bytes) is the AUTH of head (20 bytes) and challenge
    # under the key of the user at index i (0 <= i < n), else 0.
    cdef bint verify_index(self, Py_ssize_t i, const unsigned char *head,
                           const unsigned char *challenge,
                           const unsigned char *auth) noexcept nogil
    # The MACs of n (1..4) KNOCK/REVOKE datagrams (56 bytes at data[j], already past the
    # frame checks; their user at index[j]) over the zero challenge, computed together
    # (hmac52_x4): ok[j] = whether data[j]'s AUTH is right. Constant time per datagram.
    cdef void verify_knocks(self, int n, const Py_ssize_t *index,
                            const unsigned char **data, bint *ok) noexcept nogil
