# C-level API of fastknock.knockd._decide: the batch and the decision state of the batched UDP
# reader (_recv.Reader derives from Decider). The socket structures and the peer key: _net.pxd.
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from fastknock._hmac cimport HmacKey, KeyRing
from fastknock.knockd._net cimport iovec, mmsghdr, peer_key, sockaddr_storage
from fastknock.knockd._asked cimport asked_set
from fastknock.knockd._live cimport live_set
from fastknock.knockd._replay cimport cap_entry, cap_table


cdef enum:
    RECV_BATCH = 64  # datagrams per recvmmsg call
    RECV_SLOT = 64  # bytes per datagram buffer: > 56, so msg_len == 56 means exactly 56
    REASON_RESPONSE = 6  # a RESPONSE that matches no computed token (forged or stale)
    REASON_CAPPED = 7  # a KNOCK answered for enough peers in this epoch (replaycap.py)
    RECV_NREASONS = 8  # REASON_OK .. REASON_CAPPED
    VERDICT_CHALLENGED = 8  # answered in C with a computed CHALLENGE (no Python object)

cdef class Decider:
    cdef int fd
    cdef KeyRing ring
    cdef unsigned int allowed_ops
    cdef bint pass_rejects

    # Stateless challenges (fastknock.knockd.challenges): the current and previous epoch
    # secrets, and the (user << 32 | resource) pairs that pass server rule 3, sorted.
    cdef HmacKey cur
    cdef HmacKey prev
    cdef bint have_cur
    cdef bint have_prev
    cdef int64_t epoch
    cdef unsigned long long *grants
    cdef Py_ssize_t ngrants

    # CHALLENGEs computed during one batch, sent with one sendmmsg after it.
    cdef mmsghdr out_msgs[RECV_BATCH]
    cdef iovec out_iov[RECV_BATCH]
    cdef unsigned char out_bufs[RECV_BATCH][56]
    cdef int nout
    cdef cap_table caps  # the KNOCK answer cap (replaycap.py), filled only after the MAC
    cdef asked_set asked  # the peers answered per epoch (asked.py): RESPONSE admission

    # MAC verdicts of this batch's datagrams computed ahead, four at a time (macs_from):
    # bit i of mac_known says datagram i has one, bit i of mac_ok what it is.
    cdef int nread  # datagrams in the batch
    cdef uint64_t mac_known
    cdef uint64_t mac_ok

    cdef mmsghdr msgs[RECV_BATCH]
    cdef iovec iov[RECV_BATCH]
    cdef sockaddr_storage names[RECV_BATCH]
    cdef unsigned char bufs[RECV_BATCH][RECV_SLOT]

    # The peers that have a live session: exactly the keys the endpoint announced with
    # track() and not yet with untrack().
    cdef live_set live

    # Counters since the last take(): datagrams dropped in C, per reason; handed up;
    # of those, handed up because the peer has a live session; recvmmsg batches; errors.
    cdef uint64_t dropped
    cdef uint64_t reasons[RECV_NREASONS]
    cdef uint64_t handed
    cdef uint64_t live_hits
    cdef uint64_t batches
    cdef uint64_t errors
    cdef uint64_t challenged
    cdef uint64_t send_dropped

    cdef int decide(self, int start, int n) noexcept nogil
    cdef int first_verdict(self, int i) noexcept nogil
    cdef int before_mac(self, int i, peer_key *k, cap_entry **e,
                        Py_ssize_t *index) noexcept nogil
    cdef bint mac_candidate(self, int j, Py_ssize_t *index) noexcept nogil
    cdef void macs_from(self, int i, Py_ssize_t index) noexcept nogil
    cdef int check_response(self, const unsigned char *buf,
                            const sockaddr_storage *sa) noexcept nogil
    cdef bint granted(self, uint32_t user, uint32_t resource) noexcept nogil
    cdef void challenge(self, int i, const peer_key *k) noexcept nogil
    cdef void send_challenges(self) noexcept nogil

