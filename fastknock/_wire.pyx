# cython: language_level=3
"""C version of the 56-byte wire codec (reference: ``fastknock._wire_py``).

Design
------
* Cheapest checks first, straight on the caller's buffer: ``bytes`` is read in place,
  any other object through the buffer protocol (``PyBUF_SIMPLE``: contiguous bytes).
* Same API and exception types as the reference: ``WireError`` for bad values,
  ``TypeError`` for wrong types, ``BufferError`` for a non-contiguous buffer.
* ``_wire.pxd`` holds the framing for other extensions: inline big-endian loads/stores,
  ``frame_reason`` (size/magic/operation as a ``Reason`` code, nogil) and the shared
  argument converters ``to_u32`` / ``copy_fixed``. ``_hmac`` builds its fused check on them.
* A ``Message`` is allocated and filled in C (what ``tuple.__new__`` does, without the
  NamedTuple's Python-level ``__new__``) and operations come from a table of
  ``Operation`` members.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.long cimport PyLong_Check
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.stdint cimport uint32_t
from libc.string cimport memcpy

from fastknock.errors import WireError
from fastknock.message import Message, Operation

__all__ = ["pack", "parse", "serialize"]


cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object obj, int *overflow) except? -1

cdef extern from *:
    """
    /* A 5-tuple of the tuple subclass `type` (a NamedTuple), filled directly: what
     * tuple.__new__(type, items) does, minus the call and the temporary tuple. */
    static PyObject *fk_new_tuple5(PyObject *type, PyObject *a, PyObject *b, PyObject *c,
                                   PyObject *d, PyObject *e) {
        PyObject *t = ((PyTypeObject *)type)->tp_alloc((PyTypeObject *)type, 5);
        if (t == NULL) return NULL;
        Py_INCREF(a); PyTuple_SET_ITEM(t, 0, a);
        Py_INCREF(b); PyTuple_SET_ITEM(t, 1, b);
        Py_INCREF(c); PyTuple_SET_ITEM(t, 2, c);
        Py_INCREF(d); PyTuple_SET_ITEM(t, 3, d);
        Py_INCREF(e); PyTuple_SET_ITEM(t, 4, e);
        return t;
    }
    """
    object fk_new_tuple5(object type, object a, object b, object c, object d, object e)


cdef tuple _OPS = tuple([Operation(i) for i in range(WIRE_MAX_OP + 1)])
cdef object _Message = Message


cdef int to_u32(object value, uint32_t *out, str what) except -1:
    cdef int overflow = 0
    cdef long long v
    if not PyLong_Check(value):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow or v < 0 or v > 0xFFFFFFFF:
        raise WireError(f"{what} must be a 32-bit unsigned integer, got {value}")
    out[0] = <uint32_t>v
    return 0


cdef int copy_fixed(object value, Py_ssize_t size, unsigned char *out, str what) except -1:
    cdef Py_buffer view
    cdef Py_ssize_t n
    if PyBytes_CheckExact(value):
        n = PyBytes_GET_SIZE(value)
        if n != size:
            raise WireError(f"{what} must be {size} bytes, got {n}")
        memcpy(out, PyBytes_AS_STRING(value), size)
        return 0
    PyObject_GetBuffer(value, &view, PyBUF_SIMPLE)
    try:
        if view.len != size:
            raise WireError(f"{what} must be {size} bytes, got {view.len}")
        memcpy(out, view.buf, size)
    finally:
        PyBuffer_Release(&view)
    return 0


cdef object message_from_raw(const unsigned char *p, object user):
    if user is None:
        user = load_be32(p + 8)
    return fk_new_tuple5(
        _Message,
        <object>PyTuple_GET_ITEM(_OPS, load_be32(p + 4)),
        user,
        load_be32(p + 12),
        PyBytes_FromStringAndSize(<const char *>p + 16, WIRE_SALT_SIZE),
        PyBytes_FromStringAndSize(<const char *>p + 24, WIRE_AUTH_SIZE),
    )


cdef object _parse_raw(const unsigned char *p, Py_ssize_t n):
    cdef int reason = frame_reason(p, n, 0xFFFFFFFFu)
    if reason == REASON_OK:
        return message_from_raw(p, None)
    if reason == REASON_SIZE:
        raise WireError(f"message must be {WIRE_MSG_SIZE} bytes, got {n}")
    if reason == REASON_MAGIC:
        raise WireError(f"bad magic 0x{load_be32(p):08x}")
    raise WireError(f"unknown operation {load_be32(p + 4)}")


def parse(data):
    """Decode one 56-byte message; ``WireError`` on wrong size, magic or operation."""
    cdef Py_buffer view
    if PyBytes_CheckExact(data):
        return _parse_raw(<const unsigned char *>PyBytes_AS_STRING(data),
                          PyBytes_GET_SIZE(data))
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return _parse_raw(<const unsigned char *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


def pack(operation, user, resource, salt, auth):
    """Encode one message from its fields."""
    cdef uint32_t op, u, r
    cdef unsigned char buf[WIRE_MSG_SIZE]
    to_u32(operation, &op, "operation")
    if op > WIRE_MAX_OP:
        raise WireError(f"unknown operation {op}")
    to_u32(user, &u, "user")
    to_u32(resource, &r, "resource")
    copy_fixed(salt, WIRE_SALT_SIZE, buf + 16, "salt")
    copy_fixed(auth, WIRE_AUTH_SIZE, buf + 24, "auth")
    store_be32(buf, WIRE_MAGIC)
    store_be32(buf + 4, op)
    store_be32(buf + 8, u)
    store_be32(buf + 12, r)
    return PyBytes_FromStringAndSize(<const char *>buf, WIRE_MSG_SIZE)


def serialize(msg):
    """Encode a ``Message`` (any 5-sequence of its fields)."""
    operation, user, resource, salt, auth = msg
    return pack(operation, user, resource, salt, auth)
