"""The one exception hierarchy of fastknock.

Plain Python, imported by both the Cython extensions and their pure-Python references so
that both raise the same types, and by every program. Exceptions are for *local* misuse and
bad local input (a config file, a command line). Input from the network never raises out
of a receive path: it becomes a rejection with a reason code (see
``fastknock.message.Reason``).
"""

from __future__ import annotations


class FastknockError(Exception):
    """Base class of every fastknock error."""


class WireError(FastknockError, ValueError):
    """A byte string is not a valid 56-byte protocol message."""


class ConfigError(FastknockError):
    """A configuration file is malformed. Carries the file name and the line number."""

    def __init__(self, message: str, source: str = "<config>", line: int | None = None) -> None:
        self.message = message
        self.source = source
        self.line = line
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {message}")


class ProtocolError(FastknockError):
    """Local misuse of a protocol state machine (e.g. sending in the wrong state)."""


class FirewallError(FastknockError):
    """The firewall (nftables or the firewall daemon) failed to apply a change."""


class PrivilegeError(FastknockError):
    """The account to drop to is missing, or the kernel refused a step (``osutil.privs``)."""


class SeccompError(FastknockError, RuntimeError):
    """A seccomp mode was asked for but libseccomp/pyseccomp is missing (``osutil.seccomp``)."""


class KnockError(FastknockError):
    """A knock failed: timeout, refusal, GOAWAY or a bad reply. ``str()`` is the one-liner."""


class UsageError(FastknockError):
    """The client's command line or config is unusable: it exits 2 with this message."""


class KnockFailed(FastknockError):
    """Every address of a knock failed (the client exits 1): one line per failure."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines
