# The C side of fastknock.knockd.asked (the peers the reader sent a CHALLENGE to, per epoch;
# its design is in that module's docstring), for the batched UDP reader (_recv.pyx): two
# generations, each an open-addressed set of 18-byte peer keys with a keyed hash, at most
# ASKED_LIMIT distinct keys (then "unknown": every RESPONSE gets the full check). Placement
# is internal, so the Python reference is a plain set with the same count rule.
# Declarations and inline functions only.
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from fastknock.knockd._net cimport KEY_SIZE
from fastknock.knockd._replay cimport _fmix, _le64


cdef enum:
    ASKED_SLOTS = 8192  # a power of two, twice ASKED_LIMIT
    ASKED_LIMIT = 4096  # asked.LIMIT


ctypedef struct asked_slot:
    uint8_t used
    uint8_t key[KEY_SIZE]


ctypedef struct asked_gen:
    asked_slot *slots  # ASKED_SLOTS
    int count
    bint unknown


ctypedef struct asked_set:
    asked_gen gen[2]
    int cur  # gen[cur] is the current epoch's, gen[1 - cur] the previous one's
    uint64_t k0
    uint64_t k1


cdef inline size_t _asked_home(const asked_set *t, const uint8_t *key) noexcept nogil:
    cdef uint64_t port = key[16] | (<uint64_t>key[17] << 8)
    return <size_t>(_fmix(_fmix(_fmix(_le64(key) ^ t.k0) ^ _le64(key + 8) ^ t.k1) ^ port)
                    & (ASKED_SLOTS - 1))


cdef inline bint _asked_in(const asked_set *t, const asked_gen *g,
                           const uint8_t *key) noexcept nogil:
    cdef size_t i = _asked_home(t, key)
    while g.slots[i].used:
        if memcmp(g.slots[i].key, key, KEY_SIZE) == 0:
            return True
        i = (i + 1) & (ASKED_SLOTS - 1)
    return False


cdef inline void _asked_clear(asked_gen *g) noexcept nogil:
    memset(g.slots, 0, ASKED_SLOTS * sizeof(asked_slot))
    g.count = 0
    g.unknown = False


cdef inline void asked_rotate(asked_set *t, bint shift) noexcept nogil:
    """AskedPeers.rotate."""
    if shift:
        t.cur = 1 - t.cur
    else:
        _asked_clear(&t.gen[1 - t.cur])
    _asked_clear(&t.gen[t.cur])


cdef inline void asked_forget(asked_set *t) noexcept nogil:
    """AskedPeers.forget."""
    t.gen[0].unknown = True
    t.gen[1].unknown = True


cdef inline void asked_add(asked_set *t, const uint8_t *key) noexcept nogil:
    """AskedPeers.add."""
    cdef asked_gen *g = &t.gen[t.cur]
    cdef size_t i
    if g.unknown or _asked_in(t, g, key):
        return
    if g.count >= ASKED_LIMIT:
        g.unknown = True
        return
    i = _asked_home(t, key)
    while g.slots[i].used:
        i = (i + 1) & (ASKED_SLOTS - 1)
    g.slots[i].used = 1
    memcpy(g.slots[i].key, key, KEY_SIZE)
    g.count += 1


cdef inline bint asked_admits(const asked_set *t, const uint8_t *key) noexcept nogil:
    """AskedPeers.admits."""
    if t.gen[0].unknown or t.gen[1].unknown:
        return True
    return _asked_in(t, &t.gen[0], key) or _asked_in(t, &t.gen[1], key)
