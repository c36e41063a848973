"""What a rejected datagram costs the batched C reader, per kind, in the same run.

Datagrams are sent over loopback to a UDP socket in rounds of 2,000 (so the socket buffer
never overflows), and only the reader's ``drain()`` is timed (process CPU time), so the
figure is recvmmsg plus the C checks, per datagram. Kinds:

* ``junk``: 56 random bytes (refused on the magic);
* ``forged KNOCK``: a KNOCK for a known user with a random AUTH (one HMAC; the reader
  computes them four at a time with AVX2, ``keccak4.h``);
* ``forged KNOCK, scalar MACs``: the same with the 4-way MACs switched off
  (``fastknock._hmac.vector_macs(False)``): one MAC after the other, as before;
* ``forged RESPONSE``: a RESPONSE for a known user with a random AUTH, from a peer the
  reader never answered: dropped before any crypto (RESPONSE admission, ``knockd/asked.py``);
* ``forged RESPONSE, answered peer``: the same from a peer that got a CHALLENGE before:
  four token HMACs and four MAC verifications (``knockd/challenges.py``);
* ``replayed KNOCK``: one valid KNOCK from ever new source ports: answered for 8 peers,
  then dropped before the MAC (the KNOCK answer cap, ``knockd/replaycap.py``);
* ``fresh KNOCKs``: a distinct valid KNOCK each, from ever new source ports: each answered
  in C with a computed CHALLENGE (one MAC check, one token HMAC, and a sendmmsg).

Ratios are against ``junk`` of the same run. Run: ``PYTHONPATH=. python bench/bench_reject_cost.py``
(loopback only; bounded: 5 x 40,000 datagrams).
"""

from __future__ import annotations

import os
import socket
import time

from fastknock import _ext
from fastknock._hmac_py import HmacKey as PyKey
from fastknock._wire_py import pack
from fastknock.message import Operation

USER, RES = 0x00000001, 0x00000022
KEY = bytes.fromhex("80E9C81DFA4879B2C64910E1B6870DA42DFB82261B76C859F3A0F5A09DEA2A3D")
ROUND, ROUNDS = 2000, 20


def kinds() -> dict[str, list[bytes]]:
    valid_salt = os.urandom(8)
    valid = pack(Operation.KNOCK, USER, RES, valid_salt, PyKey(KEY).sign(0, USER, RES, valid_salt))
    return {
        "junk": [b"\x00" + os.urandom(55) for _ in range(64)],
        "forged KNOCK": [
            pack(Operation.KNOCK, USER, RES, os.urandom(8), os.urandom(32)) for _ in range(64)
        ],
        "forged KNOCK, scalar MACs": [
            pack(Operation.KNOCK, USER, RES, os.urandom(8), os.urandom(32)) for _ in range(64)
        ],
        "forged RESPONSE": [
            pack(Operation.RESPONSE, USER, RES, os.urandom(8), os.urandom(32)) for _ in range(64)
        ],
        "forged RESPONSE, answered peer": [
            pack(Operation.RESPONSE, USER, RES, os.urandom(8), os.urandom(32)) for _ in range(64)
        ],
        "replayed KNOCK": [valid],
        "fresh KNOCKs": [fresh() for _ in range(ROUND * ROUNDS)],
    }


def fresh() -> bytes:
    salt = os.urandom(8)
    return pack(Operation.KNOCK, USER, RES, salt, PyKey(KEY).sign(0, USER, RES, salt))


def cost(
    reader: object, server: socket.socket, payloads: list[bytes], fresh_ports: bool,
    answered: bool = False,
) -> float:  # fmt: skip
    """CPU microseconds per datagram of ``reader.drain()``; ``answered``: the sender got a
    CHALLENGE first (not timed)."""
    dest = server.getsockname()
    spent = 0.0
    total = 0
    senders = [
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50 if fresh_ports else 1)
    ]
    if answered:
        senders[0].sendto(fresh(), dest)
        while not reader.drain():  # type: ignore[attr-defined]
            pass
    try:
        for r in range(ROUNDS):
            for i in range(ROUND):
                data = payloads[(r * ROUND + i) % len(payloads)]
                senders[i % len(senders)].sendto(data, dest)
            t0 = time.process_time()
            got = 0
            while got < ROUND:
                n = reader.drain()  # type: ignore[attr-defined]
                if n == 0:
                    break
                got += n
            spent += time.process_time() - t0
            total += got
            if fresh_ports and r % 2:
                for s in senders:
                    s.close()
                senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]
    finally:
        for s in senders:
            s.close()
    return spent / total * 1e6


def main() -> None:
    if _ext.disabled():
        print("bench_reject_cost measures the C reader: unset FASTKNOCK_NO_EXTENSIONS")
        return
    from fastknock._hmac import HmacKey, KeyRing, vector_macs
    from fastknock.knockd._recv import Reader
    from fastknock.protocol import FIRST_OPS

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    server.setblocking(False)
    handed: list[bytes] = []
    reader = Reader(server, KeyRing({USER: KEY}), lambda d, k, a: handed.append(d),
                    allowed_ops=FIRST_OPS)  # fmt: skip
    reader.set_secrets(HmacKey(os.urandom(32)), 7, HmacKey(os.urandom(32)))
    reader.set_grants({USER << 32 | RES})
    results = {}
    for name, payloads in kinds().items():
        ports = name in ("replayed KNOCK", "fresh KNOCKs")
        answered = name.endswith("answered peer")
        vector_macs(not name.endswith("scalar MACs"))
        results[name] = min(cost(reader, server, payloads, ports, answered) for _ in range(3))
        vector_macs(True)
        reader.take()
    base = results["junk"]
    print(f"{'kind':<31} {'us/datagram':>12} {'vs junk':>8}")
    for name, us in results.items():
        print(f"{name:<31} {us:>12.3f} {us / base:>7.2f}x")
    print(
        f"\nforged KNOCK, 4-way / scalar MACs: "
        f"{results['forged KNOCK'] / results['forged KNOCK, scalar MACs']:.2f}x "
        f"(4-way AVX2 in use: {vector_macs()})"
    )
    print(
        f"forged RESPONSE (answered peer) / forged KNOCK: "
        f"{results['forged RESPONSE, answered peer'] / results['forged KNOCK']:.2f}x "
        f"(handed up to Python: {len(handed)})"
    )
    server.close()


if __name__ == "__main__":
    main()
