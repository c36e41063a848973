# Stub of the C extension fastknock.knockd._recv; same API as fastknock.knockd._recv_py.
import socket
from collections.abc import Callable, Mapping

__all__ = ["COUNTERS", "Reader"]

COUNTERS: tuple[str, ...]

class Reader:
    def __init__(
        self,
        sock: socket.socket,
        keyring: object,
        handler: Callable[[bytes, tuple], None],
        peers: Mapping[tuple, object],
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
    def drain(self) -> int: ...
    def take(self) -> tuple[int, ...]: ...
