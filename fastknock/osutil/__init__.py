"""Operating-system helpers shared by both daemons: privileges, seccomp, systemd, metrics.

Runs in: fastknockd and fastknockfwd (as root before their privilege drop, and after it).
May import: the standard library, ctypes, pyseccomp, and ``fastknock.errors``; never the
protocol, the network-facing code or the firewall layer. ``privs`` drops users and
capabilities, ``seccomp`` owns the syscall allow-lists, ``systemd`` socket activation and
sd_notify, ``metrics`` the Prometheus textfile writer.
"""
