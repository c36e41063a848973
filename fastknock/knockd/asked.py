"""The peers a batched reader sent a CHALLENGE to, per epoch: RESPONSE admission (sans-I/O).

Why: a forged RESPONSE costs four token HMACs and four MAC checks (16 Keccak permutations),
the dearest datagram there is; a flood of them from one core outran the reader. But a
RESPONSE can only match a token that was sent to its peer (address, port), and every
CHALLENGE a batched reader's socket carries is sent by that reader. So the reader
remembers, per epoch of the challenge secrets, the peers it answered (and the peers of the
KNOCKs that passed the MAC and went to Python, which might answer them); a RESPONSE from
any other peer is dropped before any crypto (counted as ``response``, like a RESPONSE that
matches no token: it cannot match one).

* **Two generations.** The current epoch and the previous one, exactly the epochs whose
  tokens a RESPONSE is checked against. A normal rotation (the next epoch, the old current
  secret now the previous one) shifts them; any other change of secrets (early rotation,
  a reload with a new control timeout, an idle gap) starts both empty: the tokens of the
  old secrets are dead anyway.
* **Never a refusal of its own.** A generation holds at most ``LIMIT`` distinct peers. Past
  that it is marked *unknown*, and while either generation is unknown every RESPONSE gets
  the full check, as without this filter. So filling it (which takes valid KNOCKs: the
  answer cap of ``replaycap.py`` gives each at most 8 peers per epoch) costs the attacker
  the same as today and never locks anybody out. Likewise the reader marks both unknown
  when it stops handing everything up (``pass_rejects`` off again): Python answered those
  KNOCKs and the reader did not see them.
* **State, bounded.** It is a set of peer keys, nothing per peer beyond that: no session,
  timer or queue, and a KNOCK replayed from a million addresses adds at most 8 of them
  per captured KNOCK and epoch.

The C reader keeps the same sets in ``_asked.pxd`` (an open-addressed table with a keyed
hash); this class serves the pure-Python reader. The endpoint (the ``DatagramProtocol``
path) checks every RESPONSE in full: it has no such filter.
"""

from __future__ import annotations

LIMIT = 4096  # distinct peers per generation; more: the generation is unknown


class AskedPeers:
    """The two generations of one reader; see the module docstring."""

    def __init__(self) -> None:
        self._cur: set[bytes] = set()
        self._prev: set[bytes] = set()
        self._unknown = [False, False]  # current, previous

    def rotate(self, shift: bool) -> None:
        """New challenge secrets: ``shift`` for the next epoch (the current secret became
        the previous one), else both generations start empty."""
        if shift:
            self._prev, self._cur = self._cur, set()
            self._unknown = [False, self._unknown[0]]
        else:
            self._prev, self._cur = set(), set()
            self._unknown = [False, False]

    def forget(self) -> None:
        """Somebody else may have answered KNOCKs meanwhile: every RESPONSE gets the full
        check until both generations have rotated out."""
        self._unknown = [True, True]

    def add(self, peer: bytes) -> None:
        if self._unknown[0] or peer in self._cur:
            return
        if len(self._cur) >= LIMIT:
            self._unknown[0] = True
            return
        self._cur.add(peer)

    def admits(self, peer: bytes) -> bool:
        """May a RESPONSE from ``peer`` match a token? (False: it cannot.)"""
        return any(self._unknown) or peer in self._cur or peer in self._prev


__all__ = ["LIMIT", "AskedPeers"]
