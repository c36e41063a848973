# The C side of fastknock.knockd.peer, shared by the batched UDP reader (_recv.pyx): socket
# structures, the 18-byte peer key built straight from a sockaddr (IPv6 address, IPv4 as
# ::ffff:a.b.c.d, then the port in network order), its hash for the live-peer set, the socket
# module's address tuple, and the stateless-challenge token input (knockd/challenges.py).
# Declarations and inline functions only: nothing here is a module of its own.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from fastknock._wire cimport store_be32


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr_storage:
        sa_family_t ss_family
    struct iovec:
        void *iov_base
        size_t iov_len
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    struct timespec:
        pass
    int recvmmsg(int sockfd, mmsghdr *msgvec, unsigned int vlen, int flags,
                 timespec *timeout)
    int sendmmsg(int sockfd, mmsghdr *msgvec, unsigned int vlen, int flags)
    enum:
        MSG_DONTWAIT
        AF_INET
        AF_INET6


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    uint16_t ntohs(uint16_t)
    uint32_t ntohl(uint32_t)


cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)


cdef enum:
    HOST_MAX = 64  # > INET6_ADDRSTRLEN (46)
    KEY_SIZE = 18  # fastknock.knockd.peer.KEY_SIZE: 16 address bytes, 2 port bytes


# One live session's peer: the IPv6 (or IPv4-mapped) address and the port, network order;
# the first 18 bytes are the peer key of ``fastknock.knockd.peer``.
ctypedef struct peer_key:
    uint8_t addr[16]
    uint16_t port
    uint8_t state  # SLOT_EMPTY, SLOT_USED, SLOT_DEAD



cdef inline int _cmp_u64(const void *a, const void *b) noexcept nogil:
    cdef unsigned long long x = (<const unsigned long long *>a)[0]
    cdef unsigned long long y = (<const unsigned long long *>b)[0]
    return (x > y) - (x < y)


cdef inline void _token_input(unsigned char *head, unsigned char *chal, uint32_t op,
                              const unsigned char *ids, int64_t epoch,
                              const peer_key *k) noexcept nogil:
    """The 52-byte PRF input of challenges.token: OP || USER || RESOURCE || EPOCH (head,
    20 bytes) and ADDR || PORT || 0^14 (chal, 32 bytes); ids = USER || RESOURCE."""
    store_be32(head, op)
    memcpy(head + 4, ids, 8)
    store_be32(head + 12, <uint32_t>((<uint64_t>epoch) >> 32))
    store_be32(head + 16, <uint32_t>(<uint64_t>epoch))
    memset(chal, 0, 32)
    memcpy(chal, k, KEY_SIZE)


cdef inline void _key_of(const sockaddr_storage *sa, peer_key *k) noexcept nogil:
    """The raw key of a peer address: IPv6 bytes (IPv4 as ::ffff:a.b.c.d) and the port."""
    cdef const sockaddr_in6 *s6
    cdef const sockaddr_in *s4
    memset(k, 0, sizeof(peer_key))
    if sa.ss_family == AF_INET6:
        s6 = <const sockaddr_in6 *>sa
        memcpy(k.addr, s6.sin6_addr.s6_addr, 16)
        k.port = s6.sin6_port
    else:
        s4 = <const sockaddr_in *>sa
        k.addr[10] = 0xFF
        k.addr[11] = 0xFF
        memcpy(k.addr + 12, &s4.sin_addr.s_addr, 4)
        k.port = s4.sin_port


cdef inline size_t _hash(const peer_key *k) noexcept nogil:
    # FNV-1a over the 18 key bytes. Only peers with a live session are ever inserted, and
    # the table never holds more than the session cap: no hash flooding.
    cdef uint64_t h = 1469598103934665603ULL
    cdef int i
    for i in range(16):
        h = (h ^ k.addr[i]) * 1099511628211ULL
    h = (h ^ (k.port & 0xFF)) * 1099511628211ULL
    h = (h ^ (k.port >> 8)) * 1099511628211ULL
    return <size_t>(h ^ (h >> 29))


cdef inline bint _same(const peer_key *a, const peer_key *b) noexcept nogil:
    return a.port == b.port and memcmp(a.addr, b.addr, 16) == 0


cdef inline void _key_from_bytes(bytes key, peer_key *k) except *:
    if len(key) != KEY_SIZE:
        raise ValueError(f"a peer key is {KEY_SIZE} bytes, not {len(key)}")
    memset(k, 0, sizeof(peer_key))
    memcpy(k, <const char *>key, KEY_SIZE)


cdef inline tuple _py_addr(const sockaddr_storage *sa):
    """The address as the socket module shapes it."""
    cdef char host[HOST_MAX]
    cdef const sockaddr_in6 *s6
    cdef const sockaddr_in *s4
    cdef object h, port
    if sa.ss_family == AF_INET6:
        s6 = <const sockaddr_in6 *>sa
        inet_ntop(AF_INET6, &s6.sin6_addr, host, HOST_MAX)
        h = host.decode("ascii")
        port = ntohs(s6.sin6_port)
        return (h, port, ntohl(s6.sin6_flowinfo), s6.sin6_scope_id)
    s4 = <const sockaddr_in *>sa
    inet_ntop(AF_INET, &s4.sin_addr, host, HOST_MAX)
    return (host.decode("ascii"), ntohs(s4.sin_port))
