"""Reading a configuration file: a bounded read of one regular file.

Design
------
A config path is given by an administrator, but what it names may be hostile or simply
wrong (``-c /dev/zero``, a FIFO, a 1 GB file). ``read_config_file``:

* opens with ``O_NONBLOCK`` (opening a FIFO must not wait for a writer) and ``O_NOCTTY``,
  then ``fstat``s the *opened* descriptor: only a regular file is read (no race between a
  check of the path and the open);
* reads at most ``MAX_CONFIG_BYTES`` + 1 bytes: a larger file is a ``ConfigError`` naming
  the line at which the limit is reached, never a memory blow-up. ``parse_config`` applies
  the same limit to text handed to it directly, so one number bounds every parse.

A symlink as the config path is followed on purpose (``/etc/fastknock/fastknockd.conf`` may
be managed that way); the directory that holds it is root's (fastknock-install makes it
0750 root:fastknock), so no other account can plant one there.
"""

from __future__ import annotations

import errno
import os
import stat

from fastknock.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: letmein's largest real configs are a few kB

_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def too_large(data: bytes, source: str) -> ConfigError:
    """The error for a config over ``MAX_CONFIG_BYTES``: file and the line the limit cuts."""
    line = data.count(b"\n", 0, MAX_CONFIG_BYTES) + 1
    return ConfigError(
        f"config is larger than {MAX_CONFIG_BYTES // (1 << 20)} MiB (the limit is reached "
        "on this line)",
        source,
        line,
    )


def read_config_file(source: str) -> bytes:
    """The bytes of the regular file ``source``; ``ConfigError`` for anything else."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(source, flags)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot read config: {reason}", source) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"cannot read config: {os.strerror(errno.EISDIR)}", source)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
            raise ConfigError(f"cannot read config: {kind}, not a regular file", source)
        os.set_blocking(fd, True)
        chunks = []
        left = MAX_CONFIG_BYTES + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise ConfigError(
            f"cannot read config: {exc.strerror or type(exc).__name__}", source
        ) from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise too_large(data, source)
    return data
