# The C side of fastknock.knockd.replaycap (the KNOCK answer cap; its design is in that
# module's docstring), for the batched UDP reader (_recv.pyx): the same table, the same keyed
# set index and the same eviction order as the Python reference, so that the two readers
# decide alike (tests/test_recv_replay.py). Declarations and inline functions only.
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from fastknock.knockd._net cimport KEY_SIZE


cdef enum:
    CAP_SETS = 512  # replaycap.SETS
    CAP_WAYS = 8  # replaycap.WAYS
    CAP_PEERS = 8  # replaycap.PEERS
    CAP_ANSWERS = 32  # replaycap.ANSWERS


ctypedef struct cap_entry:
    uint8_t auth[32]
    int64_t epoch
    uint64_t seq  # insertion order; 0: an empty way
    uint8_t npeers
    uint8_t answers
    uint8_t peers[CAP_PEERS][KEY_SIZE]


ctypedef struct cap_table:
    cap_entry *entries  # CAP_SETS * CAP_WAYS, zeroed
    uint64_t k0
    uint64_t k1
    uint64_t seq
    uint64_t evicted


cdef inline uint64_t _le64(const uint8_t *p) noexcept nogil:
    cdef uint64_t x = 0
    cdef int i
    for i in range(7, -1, -1):
        x = (x << 8) | p[i]
    return x


cdef inline uint64_t _fmix(uint64_t x) noexcept nogil:
    x ^= x >> 33
    x *= 0xFF51AFD7ED558CCDULL
    x ^= x >> 33
    x *= 0xC4CEB9FE1A85EC53ULL
    return x ^ (x >> 33)


cdef inline cap_entry *cap_set(cap_table *t, const uint8_t *auth) noexcept nogil:
    """The first way of the set of ``auth`` (replaycap.set_index)."""
    cdef uint64_t h = _fmix(_fmix(_le64(auth) ^ t.k0) ^ _le64(auth + 8) ^ t.k1)
    return t.entries + (h & (CAP_SETS - 1)) * CAP_WAYS


cdef inline cap_entry *cap_find(cap_table *t, const uint8_t *auth, int64_t epoch) noexcept nogil:
    cdef cap_entry *ways = cap_set(t, auth)
    cdef int w
    for w in range(CAP_WAYS):
        if ways[w].seq and ways[w].epoch == epoch and memcmp(ways[w].auth, auth, 32) == 0:
            return &ways[w]
    return NULL


cdef inline bint _has_peer(const cap_entry *e, const uint8_t *peer) noexcept nogil:
    cdef int p
    for p in range(e.npeers):
        if memcmp(e.peers[p], peer, KEY_SIZE) == 0:
            return True
    return False


cdef inline bint cap_refuses(const cap_entry *e, const uint8_t *peer) noexcept nogil:
    """ReplayCap.refuses, given cap_find's entry (NULL: not recorded)."""
    if e == NULL:
        return False
    if e.answers >= CAP_ANSWERS:
        return True
    return e.npeers >= CAP_PEERS and not _has_peer(e, peer)


cdef inline void cap_record(cap_table *t, cap_entry *e, const uint8_t *auth,
                            const uint8_t *peer, int64_t epoch) noexcept nogil:
    """ReplayCap.record, given cap_find's entry (NULL: a new one is inserted)."""
    cdef cap_entry *ways
    cdef int w, victim = -1
    if e == NULL:
        ways = cap_set(t, auth)
        for w in range(CAP_WAYS):  # the first empty or stale way
            if ways[w].seq == 0 or ways[w].epoch != epoch:
                victim = w
                break
        if victim < 0:  # a full set: the oldest goes
            victim = 0
            for w in range(1, CAP_WAYS):
                if ways[w].seq < ways[victim].seq:
                    victim = w
            t.evicted += 1
        e = &ways[victim]
        t.seq += 1
        memcpy(e.auth, auth, 32)
        e.epoch = epoch
        e.seq = t.seq
        e.npeers = 0
        e.answers = 0
    e.answers += 1
    if e.npeers < CAP_PEERS and not _has_peer(e, peer):
        memcpy(e.peers[e.npeers], peer, KEY_SIZE)
        e.npeers += 1
