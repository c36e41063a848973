"""Files the daemons create as root in a runtime directory another account may write.

Design
------
fastknockd hands ``RUNDIR/fastknockd/`` to its server account (so it can remove its PID
file at exit) and fastknockfwd hands ``RUNDIR/fastknockfwd/`` to its own account; both start
as root and write there again at the next start. Anything the account left in the directory
is hostile then: a symlink ``fastknockd.pid -> /etc/passwd`` must not make root overwrite
and chown the target. So root never resolves a path inside such a directory:

* ``RunDir`` makes the directory if missing and opens it ``O_DIRECTORY | O_NOFOLLOW`` (a
  symlink in its place is refused); ownership and mode are set on that fd (``fchown``,
  ``fchmod``), and every file below is opened relative to it (``dir_fd``).
* ``RunDir.create`` removes whatever entry has the name (``unlink`` removes a link, never
  its target) and creates a new file ``O_CREAT | O_EXCL | O_NOFOLLOW``: if the account
  plants something in between, the create fails instead of following it. The file is
  chowned by fd.
* ``PidLock`` (fastknockfwd's single-instance lock): the PID file opened ``O_NOFOLLOW``
  without truncation (a symlink, or a file with more than one link, is removed and the
  open retried), then ``flock(LOCK_EX | LOCK_NB)``. The lock, not a PID that any process
  could fake, says "one is running"; it dies with the process, so a killed instance leaves
  no stale lock. The PID is written through the locked fd once serving (``publish``).

The parent of the run directory (``/run``, or ``--rundir``) must be root's: it is the
administrator's choice and is not checked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

from fastknock.errors import FastknockError

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class RunDir:
    """An opened runtime directory; files are created relative to it, never by path."""

    def __init__(self, path: str, mode: int, uid: int = -1, gid: int = -1) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", 0o755, exist_ok=True)  # the admin's --rundir
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, mode)
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise FastknockError(f"{path}: not a directory (a symlink?): refusing") from None
            raise
        try:
            if uid != -1 or gid != -1:
                os.fchown(self.fd, uid, gid)
            os.fchmod(self.fd, mode)
        except BaseException:
            os.close(self.fd)
            raise

    def join(self, name: str) -> str:
        return os.path.join(self.path, name)

    def remove(self, name: str) -> None:
        """Remove the entry ``name`` (a link is removed, not followed); gone already is fine."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def create(self, name: str, mode: int, uid: int = -1, gid: int = -1) -> int:
        """A new, empty regular file ``name`` (whatever had the name is removed first),
        opened for writing; owner set by fd. Returns the fd."""
        self.remove(name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
        fd = os.open(name, flags, mode, dir_fd=self.fd)
        try:
            if uid != -1 or gid != -1:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write_new(self, name: str, text: str, mode: int, uid: int = -1, gid: int = -1) -> str:
        """``create`` + write ``text``; returns the file's path (for removal at exit)."""
        fd = self.create(name, mode, uid, gid)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return self.join(name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class AlreadyRunning(FastknockError):
    def __init__(self, path: str, pid: str) -> None:
        pid = pid if pid.isdigit() else "unknown"  # the file's text is not trusted
        super().__init__(f"already running (pid {pid}: {path} is locked)")
        self.pid = pid


class PidLock:
    """The exclusive lock on a PID file (see the module header)."""

    def __init__(self, rundir: RunDir, name: str, uid: int = -1, gid: int = -1) -> None:
        self.rundir, self.name = rundir, name
        self.path = rundir.join(name)
        for _ in range(8):  # the holder may remove the file between our open and flock
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644, dir_fd=rundir.fd)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                rundir.remove(name)  # a planted symlink: removed, never followed
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    os.close(fd)  # a hard link to some other file: drop our name for it
                    rundir.remove(name)
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    raise AlreadyRunning(self.path, pid) from None
                try:
                    now = os.stat(name, dir_fd=rundir.fd, follow_symlinks=False)
                except FileNotFoundError:
                    now = None
                if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    if uid != -1 or gid != -1:
                        os.fchown(fd, uid, gid)
                    os.fchmod(fd, 0o644)
                    self.fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # locked a file that was removed meanwhile: try the new one
        raise FastknockError(f"{self.path}: could not lock it (keeps changing)")

    def publish(self, pid: int) -> None:
        """Write ``pid`` into the locked file ("initialised and serving")."""
        data = f"{pid}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self, remove: bool = True) -> None:
        if self.fd < 0:
            return
        if remove:
            with contextlib.suppress(OSError):
                self.rundir.remove(self.name)
        os.close(self.fd)
        self.fd = -1
