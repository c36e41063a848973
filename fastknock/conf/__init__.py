"""Configuration shared by all three programs: letmein's file format, parsed and checked.

Runs in: every process (fastknockd, fastknockfwd as root, the client), at start-up and on
reload. May import: the standard library and ``fastknock.errors`` only; nothing that does
network I/O. ``model`` owns the types and the one rule of who may open what, ``config`` the
parser and validation, ``lexer`` the line-level reading (sections, continuation lines,
scalar parsers, quoting for messages), ``permissions`` the letmein-style warnings about
file ownership and modes.
"""
