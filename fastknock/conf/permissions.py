"""Config file permission checks (letmein warns about the same things).

- A server config (read by fastknockd and fastknockfwd) holds every user's key and decides
  what root opens in the firewall: it should be owned by root and not readable (or
  writable) by others.
- A client config that holds keys should not be writable by group or others (anyone who can
  write it can swap the server's address or key), nor readable by others (anyone who reads
  it can knock as its user).

These are warnings, not errors: the daemons log them and go on, ``--check-config`` prints
them.
"""

from __future__ import annotations

import os
import stat

from fastknock.conf.config import Config, Role


def permission_warnings(path: str | os.PathLike[str], config: Config, role: Role) -> list[str]:
    """Human-readable warnings about ``path``'s owner and mode (empty when all is well)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    mode = stat.S_IMODE(st.st_mode)
    where = os.fspath(path)
    out = []
    if role == "server":
        if st.st_uid != 0:
            out.append(f"{where}: server config is not owned by root (uid {st.st_uid})")
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            out.append(
                f"{where}: server config is accessible by others (mode {mode:04o}); "
                f"it holds keys: chmod o-rwx {where}"
            )
        elif mode & stat.S_IWGRP:
            out.append(f"{where}: server config is writable by its group (mode {mode:04o})")
    elif config.keys:
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            out.append(
                f"{where}: client config with keys is writable by group or others "
                f"(mode {mode:04o}): chmod go-w {where}"
            )
        if mode & stat.S_IROTH:
            out.append(
                f"{where}: client config with keys is readable by others (mode {mode:04o}); "
                f"anyone who reads it can knock as its user: chmod o-rwx {where}"
            )
    return out
