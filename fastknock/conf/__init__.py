"""Configuration shared by all three programs: letmein's file format, parsed and checked.

Runs in: every process (fastknockd, fastknockfwd as root, the client), at start-up and on
reload. May import: the standard library and ``fastknock.errors`` only; nothing that does
network I/O. ``config`` owns the types and validation, ``lexer`` the line-level reading
(sections, continuation lines, scalar parsers, quoting for messages), ``permissions`` the
letmein-style warnings about file ownership and modes.
"""
