# The live-peer set of the batched UDP reader (_recv.pyx): the peers that have a live UDP
# session, as raw 18-byte keys (_net.pxd), kept by the endpoint through Reader.track() when
# a session starts and Reader.untrack() when it ends, so it holds exactly the live sessions
# and is bounded by the session caps whatever the traffic. Open addressing with linear
# probing and tombstones; the table doubles at half full and is rebuilt in place when
# tombstones fill it. Declarations and inline functions only.
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy

from fastknock.knockd._net cimport _hash, _key_of, _same, peer_key, sockaddr_storage


cdef enum:
    LIVE_EMPTY = 0  # peer_key.state values
    LIVE_USED = 1
    LIVE_DEAD = 2
    LIVE_MIN_CAP = 64


ctypedef struct live_set:
    peer_key *table
    Py_ssize_t cap  # a power of two
    Py_ssize_t used  # live entries
    Py_ssize_t dead  # tombstones


cdef inline int live_init(live_set *s) noexcept nogil:
    """0, or -1 when out of memory."""
    s.table = <peer_key *>calloc(LIVE_MIN_CAP, sizeof(peer_key))
    s.cap = LIVE_MIN_CAP
    s.used = s.dead = 0
    return 0 if s.table != NULL else -1


cdef inline void live_free(live_set *s) noexcept nogil:
    free(s.table)
    s.table = NULL


cdef inline Py_ssize_t live_find(const live_set *s, const peer_key *k) noexcept nogil:
    cdef size_t mask = <size_t>s.cap - 1
    cdef size_t i = _hash(k) & mask
    while s.table[i].state != LIVE_EMPTY:
        if s.table[i].state == LIVE_USED and _same(&s.table[i], k):
            return <Py_ssize_t>i
        i = (i + 1) & mask
    return -1


cdef inline bint live_has(const live_set *s, const sockaddr_storage *sa) noexcept nogil:
    """Whether the peer of a received datagram has a live session."""
    cdef peer_key k
    _key_of(sa, &k)
    return live_find(s, &k) >= 0


cdef inline int _live_rehash(live_set *s, Py_ssize_t cap) noexcept nogil:
    cdef peer_key *old = s.table
    cdef Py_ssize_t oldcap = s.cap, j
    cdef size_t i, mask
    if cap < LIVE_MIN_CAP:
        cap = LIVE_MIN_CAP
    s.table = <peer_key *>calloc(cap, sizeof(peer_key))
    if s.table == NULL:
        s.table = old
        return -1
    s.cap = cap
    s.used = s.dead = 0
    mask = <size_t>cap - 1
    for j in range(oldcap):
        if old[j].state == LIVE_USED:
            i = _hash(&old[j]) & mask
            while s.table[i].state != LIVE_EMPTY:
                i = (i + 1) & mask
            s.table[i] = old[j]
            s.used += 1
    free(old)
    return 0


cdef inline int live_insert(live_set *s, const peer_key *k) noexcept nogil:
    """0 (added, or already there), or -1 when out of memory (the set is unchanged)."""
    cdef size_t mask
    cdef size_t i
    if live_find(s, k) >= 0:
        return 0
    if (s.used + s.dead + 1) * 2 > s.cap:
        if _live_rehash(s, s.cap * 2 if (s.used + 1) * 2 > s.cap else s.cap) < 0:
            return -1
    mask = <size_t>s.cap - 1
    i = _hash(k) & mask
    while s.table[i].state == LIVE_USED:
        i = (i + 1) & mask
    if s.table[i].state == LIVE_DEAD:
        s.dead -= 1
    memcpy(&s.table[i], k, sizeof(peer_key))
    s.table[i].state = LIVE_USED
    s.used += 1
    return 0


cdef inline void live_remove(live_set *s, const peer_key *k) noexcept nogil:
    cdef Py_ssize_t i = live_find(s, k)
    if i >= 0:
        s.table[i].state = LIVE_DEAD
        s.used -= 1
        s.dead += 1
