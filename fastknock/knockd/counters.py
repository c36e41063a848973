"""fastknockd's counters: one enum names every one, with its metric family and help text.

A counter is bumped as ``counters[Count.X] += n``; a typo is an ``AttributeError`` at the
call site, never a new metrics series. ``Count`` members fall in two kinds:

* rejections (``reason`` is set): one sample each of ``fastknockd_rejected_total{reason=..}``;
* plain counters (``metric`` is set): one family each.

``families(counters, active, info)`` renders all of them (zeros included, so every series
exists from the start) for ``osutil.metrics``. ``Count.for_outcome`` maps a session's
``Outcome`` to its counter. The C reader's ``take()`` fields map onto members through
``READER_FIELDS``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from fastknock.osutil.metrics import Family, Sample
from fastknock.protocol import Outcome


class Count(enum.Enum):
    """value: (name, rejected-reason label or None, metric family or None, help)."""

    # -- rejections, by reason ----------------------------------------------------------
    OUTCOME_SIZE = ("outcome_size", "size", None, "")
    OUTCOME_MAGIC = ("outcome_magic", "magic", None, "")
    OUTCOME_OPERATION = ("outcome_operation", "operation", None, "")
    OUTCOME_UNKNOWN_USER = ("outcome_unknown-user", "unknown-user", None, "")
    OUTCOME_MAC = ("outcome_mac", "mac", None, "")
    OUTCOME_UNKNOWN_RESOURCE = ("outcome_unknown-resource", "unknown-resource", None, "")
    OUTCOME_USER_NOT_ALLOWED = ("outcome_user-not-allowed", "user-not-allowed", None, "")
    OUTCOME_BAD_PORT = ("outcome_bad-port", "bad-port", None, "")
    OUTCOME_SEQUENCE = ("outcome_sequence", "sequence", None, "")
    OUTCOME_RESPONSE_MAC = ("outcome_response-mac", "response-mac", None, "")
    OUTCOME_REPLAY = ("outcome_replay", "replay", None, "")
    KNOCK_REPLAY_CAPPED = ("knock_replay_capped", "knock-replay-capped", None, "")
    OUTCOME_FIREWALL = ("outcome_firewall", "firewall", None, "")
    OUTCOME_TIMEOUT = ("outcome_timeout", "timeout", None, "")
    DROPPED_LIMITS = ("dropped_limits", "limits", None, "")
    DROPPED_QUEUE = ("dropped_queue", "queue", None, "")
    DROPPED_UNFIT = ("dropped_unfit", "unfit", None, "")
    DROPPED_TCP_BUDGET = ("dropped_tcp_budget", "tcp-budget", None, "")
    DROPPED_SITE = ("dropped_site", "site-cap", None, "")
    TCP_PREAUTH_DEADLINE = ("tcp_preauth_deadline", "preauth-deadline", None, "")
    TCP_PREAUTH_EVICTED = ("tcp_preauth_evicted", "preauth-evicted", None, "")

    # -- plain counters ---------------------------------------------------------------
    RECEIVED = (
        "received",
        None,
        "fastknockd_received_total",
        "Control messages received (UDP datagrams and TCP messages), including rejected ones.",
    )
    SESSIONS = (
        "sessions",
        None,
        "fastknockd_sessions_total",
        "UDP control sessions started (a RESPONSE matched a computed token).",
    )
    CHALLENGES = (
        "challenges",
        None,
        "fastknockd_challenges_total",
        "Computed UDP CHALLENGEs sent (a KNOCK/REVOKE passed basic auth; no state kept).",
    )
    KNOCK_CAP_EVICTED = (
        "knock_cap_evicted",
        None,
        "fastknockd_knock_cap_evicted_total",
        "KNOCKs the answer cap forgot early because their table set was full "
        "(many distinct valid KNOCKs in one epoch).",
    )
    TCP_CONNECTIONS = (
        "tcp_connections",
        None,
        "fastknockd_tcp_connections_total",
        "TCP control connections.",
    )
    KNOCKED = ("knocked", None, "fastknockd_knocks_total", "Successful knocks (lease installed).")
    REVOKED = ("revoked", None, "fastknockd_revokes_total", "Successful revokes (lease removed).")
    FIREWALL_ERRORS = (
        "firewall_errors",
        None,
        "fastknockd_firewall_errors_total",
        "Firewall requests that failed or were refused by fastknockfwd.",
    )
    OUTCOME_OK = (
        "outcome_ok",
        None,
        "fastknockd_sessions_ok_total",
        "Sessions that ended with COMEIN.",
    )
    UDP_ERRORS = (
        "udp_errors",
        None,
        "fastknockd_udp_errors_total",
        "Errors reported by the UDP socket.",
    )
    UDP_SEND_DROPPED = (
        "udp_send_dropped",
        None,
        "fastknockd_udp_send_dropped_total",
        "Replies dropped on a full socket send buffer.",
    )
    UDP_BATCHES = (
        "udp_batches",
        None,
        "fastknockd_udp_batches_total",
        "recvmmsg batches read by the batched receive path.",
    )
    UDP_HANDED_UP = (
        "udp_handed_up",
        None,
        "fastknockd_udp_handed_up_total",
        "Datagrams the batched receive path passed on to the session logic.",
    )
    UDP_LIVE_HITS = (
        "udp_live_hits",
        None,
        "fastknockd_udp_live_session_datagrams_total",
        "Datagrams of peers with a live session (batched receive path).",
    )
    UDP_READER_ERRORS = (
        "udp_reader_errors",
        None,
        "fastknockd_udp_reader_errors_total",
        "Receive errors and handler failures in the batched receive path.",
    )
    TCP_ABORTED = (
        "tcp_aborted",
        None,
        "fastknockd_tcp_aborted_total",
        "TCP control connections that broke off.",
    )
    TCP_CANCELLED = ("tcp_cancelled", None, "fastknockd_tcp_cancelled_total",
                     "TCP control connections cut by a shutdown.")  # fmt: skip

    def __repr__(self) -> str:
        return f"Count.{self.name}"

    @property
    def key(self) -> str:
        """The internal name (log lines, tests, the metric of an unlisted counter)."""
        return self.value[0]

    @classmethod
    def for_outcome(cls, outcome: Outcome) -> Count:
        return _BY_OUTCOME[outcome]


_BY_OUTCOME = {outcome: Count[f"OUTCOME_{outcome.name}"] for outcome in Outcome}

# The C/Python reader's take() fields (in their COUNTERS order) -> Count.
READER_FIELDS: dict[str, tuple[Count, ...]] = {
    "dropped": (Count.RECEIVED,),
    "size": (Count.OUTCOME_SIZE,),
    "magic": (Count.OUTCOME_MAGIC,),
    "operation": (Count.OUTCOME_OPERATION,),
    "unknown_user": (Count.OUTCOME_UNKNOWN_USER,),
    "mac": (Count.OUTCOME_MAC,),
    "response": (Count.OUTCOME_RESPONSE_MAC,),
    "handed_up": (Count.UDP_HANDED_UP,),
    "live_hits": (Count.UDP_LIVE_HITS,),
    "batches": (Count.UDP_BATCHES,),
    "errors": (Count.UDP_READER_ERRORS,),
    "challenged": (Count.RECEIVED, Count.CHALLENGES),  # read and answered in C
    "send_dropped": (Count.UDP_SEND_DROPPED,),
    "capped": (Count.KNOCK_REPLAY_CAPPED,),  # also in "dropped"
    "cap_evicted": (Count.KNOCK_CAP_EVICTED,),
}


class Counters(dict[Count, int]):
    """``Count`` -> value; a missing counter reads as 0."""

    def __missing__(self, key: Count) -> int:
        if not isinstance(key, Count):
            raise KeyError(key)
        return 0

    def by_name(self) -> dict[str, int]:
        return {count.key: value for count, value in self.items()}


def families(
    counters: Mapping[Count, int], active_sessions: int, info: Mapping[str, str] | None = None
) -> list[Family]:
    """fastknockd's metric families: every counter, zero until something happens."""
    rejects = [Sample(counters.get(c, 0), (("reason", c.value[1]),)) for c in Count if c.value[1]]
    fams = [
        Family(
            "fastknockd_rejected_total",
            "counter",
            "Control messages rejected or dropped, by reason.",
            rejects,
        )
    ]
    for c in Count:
        if c.value[2]:
            fams.append(Family(c.value[2], "counter", c.value[3], [Sample(counters.get(c, 0))]))
    fams.append(
        Family(
            "fastknockd_sessions_active",
            "gauge",
            "Control sessions in progress.",
            [Sample(active_sessions)],
        )
    )
    if info:
        fams.append(
            Family(
                "fastknockd_info",
                "gauge",
                "Build and runtime information.",
                [Sample(1, tuple(sorted(info.items())))],
            )
        )
    return fams


__all__ = ["READER_FIELDS", "Count", "Counters", "families"]
