# Stub of the C extension fastknock.knockd._recv; same API as fastknock.knockd._recv_py.
import socket
from collections.abc import Callable

__all__ = ["COUNTERS", "Reader"]

COUNTERS: tuple[str, ...]

class Reader:
    def __init__(
        self,
        sock: socket.socket,
        keyring: object,
        handler: Callable[[bytes, bytes, tuple], None],
        *,
        pass_rejects: bool = ...,
        allowed_ops: int = ...,
        budget: int = ...,
    ) -> None: ...
    def configure(self, keyring: object, pass_rejects: bool) -> None: ...
    @property
    def keyring(self) -> object: ...
    @property
    def tracked(self) -> int: ...
    def track(self, key: bytes) -> None: ...
    def untrack(self, key: bytes) -> None: ...
    def drain(self) -> int: ...
    def take(self) -> tuple[int, ...]: ...
