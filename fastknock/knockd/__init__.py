"""The insides of fastknockd, the network-facing server (its main is ``fastknock.server``).

Runs in: fastknockd only, unprivileged after start-up. May import: the shared core at the top
of ``fastknock`` (message, wire, mac, protocol, ipc), ``fastknock.conf``,
``fastknock.osutil``, asyncio and uvloop; never ``fastknock.firewall`` (the root daemon's
code) nor ``fastknock.knock`` (the client). ``control`` holds the UDP and TCP transports,
``recv`` with ``_recv`` / ``_recv_py`` the batched UDP receive path, ``sockets`` the control
sockets (bound, or passed by systemd and checked against the config), ``fwdlink`` the client
of fastknockfwd, ``workers`` the SO_REUSEPORT process group.
"""
