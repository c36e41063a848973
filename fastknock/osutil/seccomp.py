"""seccomp allow-lists for fastknock's three programs, installed after initialisation.

Each program, once it has read its config, bound its sockets and dropped what privileges it
can, calls ``install(mode, profile)``. From then on every syscall outside the profile's
allow-list is logged by the kernel (``log``: audit, the process goes on) or kills the process
(``kill``: SIGSYS). ``off`` installs nothing. Where libseccomp or pyseccomp is missing,
``log``/``kill`` fail loudly rather than run unprotected.

The lists are by name; names the running architecture lacks (e.g. ``open``, ``poll``,
``epoll_wait`` do not exist on aarch64, which only has the ``*at``/``p*`` forms) are skipped,
so one list serves x86_64 and aarch64. Threads are allowed (``clone`` with CLONE_THREAD, as
Python's threads and libuv's pool need), new processes are not: ``fork``/``vfork``/``clone``
without CLONE_THREAD, ``execve``/``execveat`` and ``ptrace`` are outside every list. ``clone3``
answers ENOSYS so that glibc falls back to the filterable ``clone``; so does io_uring (a
large kernel attack surface that none of the programs needs).

Note for fastknockfwd: with seccomp on it must talk to nftables through libnftables (netlink,
in-process); the ``nft`` executable fallback needs execve and is refused under ``kill``.
"""

from __future__ import annotations

import errno
import logging
from typing import Literal

from fastknock.errors import SeccompError

log = logging.getLogger("fastknock.seccomp")

# Imported now, not in install(): install() runs after the privilege drop, when the Python
# installation may no longer be readable (e.g. under a 0700 /root).
try:
    import pyseccomp as _sc
except (ImportError, OSError) as _exc:  # libseccomp missing: install() says so if needed
    _sc = None
    _IMPORT_ERROR: BaseException | None = _exc
else:
    _IMPORT_ERROR = None

Profile = Literal["server", "fwd", "client"]

CLONE_THREAD = 0x00010000

# Who needs what. Every profile gets BASE.
_GROUPS: dict[str, tuple[str, ...]] = {
    # The CPython runtime: memory, signals, time, randomness, exit; lazily imported modules
    # and log formatting read files (openat/read/fstat...).
    "runtime": (
        "brk",
        "mmap",
        "munmap",
        "mprotect",
        "mremap",
        "madvise",
        "rt_sigaction",
        "rt_sigprocmask",
        "rt_sigreturn",
        "sigaltstack",
        "futex",
        "futex_waitv",
        "set_robust_list",
        "get_robust_list",
        "rseq",
        "getrandom",
        "exit",
        "exit_group",
        "getpid",
        "gettid",
        "getppid",
        "getuid",
        "geteuid",
        "getgid",
        "getegid",
        "getgroups",
        "getresuid",
        "getresgid",
        "clock_gettime",
        "clock_getres",
        "clock_nanosleep",
        "nanosleep",
        "gettimeofday",
        "time",
        "sched_yield",
        "sched_getaffinity",
        "uname",
        "prlimit64",
        "getrlimit",
        "sysinfo",
        "set_tid_address",
        "prctl",
        "arch_prctl",
        "membarrier",
        "tgkill",
    ),
    # File descriptors and files: stdio, logs, config re-reads on SIGHUP, PID/metrics files.
    "files": (
        "read",
        "write",
        "readv",
        "writev",
        "pread64",
        "pwrite64",
        "lseek",
        "close",
        "close_range",
        "dup",
        "dup2",
        "dup3",
        "fcntl",
        "ioctl",
        "pipe",
        "pipe2",
        "fstat",
        "newfstatat",
        "stat",
        "lstat",
        "statx",
        "fstatfs",
        "open",
        "openat",
        "getdents64",
        "readlink",
        "readlinkat",
        "getcwd",
        "access",
        "faccessat",
        "faccessat2",
        "unlink",
        "unlinkat",
        "rename",
        "renameat",
        "renameat2",
        "fsync",
        "fdatasync",
        "ftruncate",
        "fchmod",
        "umask",
    ),
    # The event loop (asyncio's selector or libuv under uvloop).
    "eventloop": (
        "epoll_create",
        "epoll_create1",
        "epoll_ctl",
        "epoll_wait",
        "epoll_pwait",
        "epoll_pwait2",
        "poll",
        "ppoll",
        "select",
        "pselect6",
        "eventfd2",
        "signalfd4",
        "timerfd_create",
        "timerfd_settime",
        "timerfd_gettime",
    ),
    # Sockets: the control port, the Unix socket between the daemons, netlink for nftables.
    "sockets": (
        "socket",
        "connect",
        "accept",
        "accept4",
        "sendto",
        "recvfrom",
        "sendmsg",
        "recvmsg",
        "sendmmsg",
        "recvmmsg",
        "getsockname",
        "getpeername",
        "getsockopt",
        "setsockopt",
        "shutdown",
        "socketpair",
    ),
}

PROFILES: dict[str, tuple[str, ...]] = {
    "server": ("runtime", "files", "eventloop", "sockets"),  # fastknockd: bound before install
    "fwd": ("runtime", "files", "eventloop", "sockets"),  # fastknockfwd, see _EXTRA
    "client": ("runtime", "files", "eventloop", "sockets"),  # fastknock
}

_EXTRA: dict[str, tuple[str, ...]] = {
    # libnftables binds its netlink socket per context; the daemon re-creates its Unix socket
    # (chmod/chown) on reload.
    "fwd": (
        "bind",
        "listen",
        "fchown",
        "chmod",
        "chown",
        "fchmodat",
        "fchownat",
        "mkdir",
        "mkdirat",
    ),
}


def syscalls(profile: Profile) -> list[str]:
    """The allow-list of ``profile`` as syscall names (before architecture filtering)."""
    names: list[str] = []
    for group in PROFILES[profile]:
        names.extend(_GROUPS[group])
    names.extend(_EXTRA.get(profile, ()))
    return sorted(set(names))


def forbid_io_uring() -> None:
    """An early filter, before any event loop exists: io_uring_setup answers ENOSYS.

    libuv (under uvloop) sets up an io_uring at loop creation to batch epoll_ctl calls, and
    operations submitted through io_uring bypass seccomp. With this in place libuv falls back
    to plain epoll_ctl, and the allow-list installed later can refuse io_uring altogether.
    """
    sc = _sc
    if sc is None:
        raise SeccompError(f"seccomp needs pyseccomp and libseccomp: {_IMPORT_ERROR}")
    flt = sc.SyscallFilter(sc.ALLOW)
    for name in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
        if sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0:
            flt.add_rule(sc.ERRNO(errno.ENOSYS), name)
    flt.load()


def install(mode: str, profile: Profile) -> None:
    """Install the filter for ``profile`` in every thread of this process (and its future
    threads).

    ``mode``: "off" (nothing), "log" (log forbidden syscalls) or "kill" (kill the process).
    Raises SeccompError when seccomp is requested but libseccomp/pyseccomp is unavailable.
    """
    if mode == "off":
        return
    if mode not in ("log", "kill"):
        raise ValueError(f"seccomp mode must be off, log or kill, not {mode!r}")
    sc = _sc
    if sc is None:
        raise SeccompError(f"seccomp = {mode} needs pyseccomp and libseccomp: {_IMPORT_ERROR}")

    default = sc.KILL_PROCESS if mode == "kill" else sc.LOG
    flt = sc.SyscallFilter(default)
    # Every thread, also those started before the filter goes in (an executor thread, a C
    # receive thread): TSYNC, or the load fails.
    flt.set_attr(sc.Attr.CTL_TSYNC, 1)
    allowed = 0
    for name in syscalls(profile):
        if sc.resolve_syscall(sc.Arch.NATIVE, name) < 0:
            continue  # not a syscall on this architecture
        flt.add_rule(sc.ALLOW, name)
        allowed += 1
    # Threads yes, processes no.
    flt.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    # "Not implemented" rather than death where a library probes and falls back: clone3 (glibc
    # falls back to clone) and io_uring (see forbid_io_uring).
    for name in ("clone3", "io_uring_setup", "io_uring_enter", "io_uring_register"):
        if sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0:
            flt.add_rule(sc.ERRNO(errno.ENOSYS), name)
    flt.load()
    log.info("seccomp (%s) installed for %s: %d syscalls allowed", mode, profile, allowed + 1)
