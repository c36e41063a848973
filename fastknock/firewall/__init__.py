"""The insides of fastknockfwd, the small privileged firewall daemon (main: ``fastknock.fwd``).

Runs in: fastknockfwd, as root with CAP_NET_ADMIN only. May import: ``fastknock.ipc`` (the
request codec), ``fastknock.conf``, ``fastknock.osutil``, ``fastknock.errors`` and the
standard library; never the network-facing code (``fastknock.knockd``, ``fastknock.protocol``,
the wire codec or MAC code), the client, or uvloop. Less code as root means less to audit:
``tests/test_layering.py`` guards this closure. ``daemon`` owns the request checks and the
batching, ``nft`` the nftables ruleset (lease sets, jump rules, transactions), ``runner``
how commands reach the kernel, ``prefilter`` the in-kernel pre-filter chain.
"""
