"""fastknock: an authenticated port knocker, wire- and config-compatible with letmein."""

__version__ = "0.1.0"
