"""How fastknockfwd talks to nftables: one call of ``Runner.run`` is one transaction.

Design
------
``LibNftables`` talks to the kernel in-process through ``libnftables.so.1`` (ctypes; native
syntax in, JSON out for listings). ``NftExe`` runs ``[NFTABLES] exe -f -`` (listings:
``exe -j list ...``) as the fallback. Both implement ``Runner.run(commands, json_output)``.
``make_runner`` prefers libnftables (no process per transaction; the only runner that
works under ``seccomp = kill``) and falls back to the executable.
"""

from __future__ import annotations

import ctypes
import subprocess
import threading
from typing import Protocol

from fastknock.errors import FirewallError

__all__ = ["LibNftables", "NftExe", "Runner", "make_runner"]


class Runner(Protocol):
    name: str

    def run(self, commands: str, json_output: bool = False) -> str:
        """Run ``commands`` (native nft syntax) as one transaction; FirewallError on error."""
        ...


class LibNftables:
    """In-process runner on libnftables (ctypes). Thread-safe: one call at a time."""

    name = "libnftables"
    _JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON

    def __init__(self, soname: str = "libnftables.so.1") -> None:
        try:
            lib = ctypes.CDLL(soname)
        except OSError as exc:
            raise FirewallError(f"cannot load {soname}: {exc}") from exc
        vp = ctypes.c_void_p
        lib.nft_ctx_new.restype = vp
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [vp]
        lib.nft_ctx_buffer_output.argtypes = [vp]
        lib.nft_ctx_buffer_error.argtypes = [vp]
        lib.nft_ctx_output_set_flags.argtypes = [vp, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.argtypes = [vp, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_get_output_buffer.argtypes = [vp]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [vp]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise FirewallError("nft_ctx_new failed")
        if lib.nft_ctx_buffer_output(ctx) or lib.nft_ctx_buffer_error(ctx):
            lib.nft_ctx_free(ctx)
            raise FirewallError("cannot buffer libnftables output")
        self._lib = lib
        self._ctx: int | None = ctx
        self._lock = threading.Lock()

    def run(self, commands: str, json_output: bool = False) -> str:
        with self._lock:
            if self._ctx is None:
                raise FirewallError("libnftables context is closed")
            self._lib.nft_ctx_output_set_flags(self._ctx, self._JSON if json_output else 0)
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        if rc != 0:
            raise FirewallError("nftables: " + (err.decode(errors="replace").strip() or "error"))
        return str(out.decode(errors="replace"))

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None


class NftExe:
    """Fallback runner: one ``nft -f -`` process per call (``-j`` for JSON output)."""

    name = "nft-exe"

    def __init__(self, exe: str = "nft", timeout: float = 30.0) -> None:
        self.exe = exe
        self.timeout = timeout

    def run(self, commands: str, json_output: bool = False) -> str:
        if json_output:
            # nft 1.0.6 prints nothing for ``-j -f -`` with native input: pass argv instead.
            if "\n" in commands.strip() or '"' in commands:
                raise FirewallError("JSON output: one simple command per call")
            argv, stdin = [self.exe, "-j", *commands.split()], None
        else:
            argv, stdin = [self.exe, "-f", "-"], commands
        try:
            proc = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=self.timeout
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FirewallError(f"cannot run {self.exe}: {exc}") from exc
        if proc.returncode != 0:
            raise FirewallError(f"{self.exe}: " + (proc.stderr.strip() or f"rc={proc.returncode}"))
        return proc.stdout


def make_runner(exe: str = "nft", prefer_lib: bool = True) -> Runner:
    """libnftables if it loads (and is preferred), else the ``exe`` runner."""
    if prefer_lib:
        try:
            return LibNftables()
        except FirewallError:
            pass
    return NftExe(exe)
