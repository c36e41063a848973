"""Dropping privileges after start-up (the seeds' "relinquish privileges" advice).

- fastknockd needs root only to bind its port and to be started by root: ``drop_to(user,
  group)`` then switches to the unprivileged account for good: supplementary groups cleared,
  real/effective/saved gid and uid set, ``PR_SET_NO_NEW_PRIVS``, and a check that no
  capability is left (``CapEff``/``CapPrm`` of ``/proc/self/status`` are zero).
- fastknockfwd must stay able to change nftables: ``become_with_net_admin(uid, gid, groups)``
  switches to its own account (``fastknockfwd``, created by fastknock-install; the server
  account's group as a supplementary group, to re-read the 0640 root:fastknock config on
  reload) with ``PR_SET_KEEPCAPS``, then keeps CAP_NET_ADMIN alone in the permitted,
  effective, inheritable, ambient and bounding sets, with ``PR_SET_NO_NEW_PRIVS``: it owns no
  root file any more. ``keep_only_net_admin()`` (uid 0 stays) is the ``--test-mode``
  fallback when that account does not exist.

Both are no-ops for a process that does not run as root (e.g. started by systemd with
``User=`` and socket activation): there is nothing to drop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import grp
import os
import pwd

from fastknock.errors import PrivilegeError

DEFAULT_USER = "fastknock"
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
CAP_NET_ADMIN = 12
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


@functools.cache
def _libc() -> ctypes.CDLL:
    """Loaded once: ``find_library`` runs ``ldconfig -p`` (a subprocess) on every call, and a
    privilege drop makes ~40 prctl calls."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _prctl(option: int, arg: int, arg3: int = 0) -> None:
    if _libc().prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3), 0, 0) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"prctl({option}) failed: {os.strerror(err)}")


def no_new_privs() -> None:
    """Neither this process nor anything it could start may ever gain privileges again."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def capabilities(pid: int | str = "self") -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb of a process, from /proc/<pid>/status."""
    caps = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Cap"):
                name, value = line.split(":", 1)
                caps[name] = int(value.strip(), 16)
    return caps


def lookup(user: str, group: str | None = None) -> tuple[int, int]:
    """uid and gid of the account; a clear error with the fix when it does not exist."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(
            f"the account {user!r} does not exist; create it with "
            f"'useradd --system --no-create-home --shell /usr/sbin/nologin {user}' "
            "(fastknock-install does this), or choose another with --user"
        ) from None
    gid = pw.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"the group {group!r} does not exist") from None
    return pw.pw_uid, gid


def drop_to(user: str, group: str | None = None) -> bool:
    """Become ``user``:``group`` for good if running as root. Returns True if it dropped."""
    if os.geteuid() != 0:
        return False
    uid, gid = lookup(user, group)
    if uid == 0:
        raise PrivilegeError(f"refusing to 'drop' to {user!r}: it is root")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    no_new_privs()
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PrivilegeError("privilege drop did not take effect")
    caps = capabilities()
    if caps.get("CapEff", 1) or caps.get("CapPrm", 1):
        raise PrivilegeError("capabilities remain after dropping privileges")
    return True


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _single_threaded() -> None:
    """Capabilities (capset, PR_SET_KEEPCAPS, ambient) are per thread, and glibc applies a
    uid change to every thread: a thread started earlier would keep all of root's
    capabilities (or lose CAP_NET_ADMIN). So these run before any other thread exists."""
    if len(os.listdir("/proc/self/task")) != 1:
        raise PrivilegeError("capabilities must be set before any other thread starts")


def _bounding_net_admin_only() -> None:
    """Drop every capability but CAP_NET_ADMIN from the bounding set (needs CAP_SETPCAP)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        if cap != CAP_NET_ADMIN:
            _prctl(PR_CAPBSET_DROP, cap)


def _net_admin_only(inheritable: bool) -> None:
    """Capability sets: CAP_NET_ADMIN alone (also inheritable if asked)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = 1 << CAP_NET_ADMIN
    if inheritable:
        data[0].inheritable = 1 << CAP_NET_ADMIN
    if _libc().capset(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"capset failed: {os.strerror(ctypes.get_errno())}")


def keep_only_net_admin() -> bool:
    """As root: keep CAP_NET_ADMIN only (bounding, permitted, effective). True if done.
    (fastknockfwd without an account of its own, ``--test-mode`` only: uid 0 stays.)"""
    if os.geteuid() != 0:
        return False
    _single_threaded()
    _bounding_net_admin_only()
    _net_admin_only(inheritable=False)
    no_new_privs()
    caps = capabilities()
    if caps["CapEff"] != 1 << CAP_NET_ADMIN or caps["CapBnd"] != 1 << CAP_NET_ADMIN:
        raise PrivilegeError("capabilities other than CAP_NET_ADMIN remain")
    return True


def become_with_net_admin(uid: int, gid: int, groups: list[int]) -> bool:
    """As root: become ``uid``:``gid`` (supplementary ``groups``) for good, keeping
    CAP_NET_ADMIN alone (permitted, effective, and ambient so that the ``nft`` executable
    runner inherits it). The process then owns no root file: it cannot read a 0600 root
    file or rewrite one. True if done (False when not root: nothing to drop)."""
    if os.geteuid() != 0:
        return False
    if uid == 0:
        raise PrivilegeError("refusing to 'drop' fastknockfwd to uid 0")
    _single_threaded()
    _bounding_net_admin_only()  # while CAP_SETPCAP is still effective
    _prctl(PR_SET_KEEPCAPS, 1)  # permitted capabilities survive the uid change
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _prctl(PR_SET_KEEPCAPS, 0)
    _net_admin_only(inheritable=True)  # the uid change cleared the effective set
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_ADMIN)
    no_new_privs()
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PrivilegeError("privilege drop did not take effect")
    caps = capabilities()
    want = 1 << CAP_NET_ADMIN
    if any(caps[k] != want for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")):
        raise PrivilegeError("capabilities other than CAP_NET_ADMIN remain")
    return True
