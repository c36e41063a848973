"""The insides of the client, ``fastknock`` (its main and argument parsing: ``fastknock.cli``).

Runs in: the user's client process, on Linux, macOS or Windows. May import: the shared core
(message, wire, mac, protocol) and ``fastknock.conf``; never the daemons' subpackages.
``client`` sends one knock or revoke over blocking UDP or TCP sockets and retransmits.
"""
