# C-level API of fastknock._wire, for `cimport` by the other extensions (_hmac, the
# recvmmsg receive path). Inline helpers are compiled into the cimporting module; the
# plain cdef functions are shared through the module's C-API capsule.
from libc.stdint cimport uint32_t


cdef enum:
    WIRE_MSG_SIZE = 56
    WIRE_MAGIC = 0x3B1BB719
    WIRE_MAX_OP = 5  # REVOKE
    WIRE_HEAD_SIZE = 20  # OPERATION || USER || RESOURCE || SALT: bytes 4..24 of a message
    WIRE_SALT_SIZE = 8
    WIRE_AUTH_SIZE = 32

    # fastknock.message.Reason, for nogil code
    REASON_OK = 0
    REASON_SIZE = 1
    REASON_MAGIC = 2
    REASON_OPERATION = 3
    REASON_UNKNOWN_USER = 4
    REASON_MAC = 5


cdef inline uint32_t load_be32(const unsigned char *p) noexcept nogil:
    return ((<uint32_t>p[0]) << 24) | ((<uint32_t>p[1]) << 16) | ((<uint32_t>p[2]) << 8) | p[3]


cdef inline void store_be32(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline int frame_reason(const unsigned char *data, Py_ssize_t n,
                             unsigned int allowed_ops) noexcept nogil:
    """REASON_OK if size, magic and operation (a bit set in allowed_ops) are right,
    else the first check that failed. Reads nothing past data[8]."""
    cdef uint32_t op
    if n != WIRE_MSG_SIZE:
        return REASON_SIZE
    if load_be32(data) != WIRE_MAGIC:
        return REASON_MAGIC
    op = load_be32(data + 4)
    if op > WIRE_MAX_OP or not ((allowed_ops >> op) & 1):
        return REASON_OPERATION
    return REASON_OK


# Python-facing helpers shared with _hmac (same messages and exception types as the
# pure-Python reference). Each returns -1 with an exception set on bad input.
cdef int to_u32(object value, uint32_t *out, str what) except -1
cdef int copy_fixed(object value, Py_ssize_t size, unsigned char *out, str what) except -1
# A Message from 56 bytes that already passed frame_reason (no checks). user: the USER
# field as an int object if the caller has it cached, else None.
cdef object message_from_raw(const unsigned char *p, object user)
