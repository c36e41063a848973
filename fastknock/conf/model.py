"""What a configuration file means: the frozen, slotted types ``parse_config`` returns.

Design
------
* Plain data, no parsing (that is ``fastknock.conf.config``): every process that holds a
  config imports these types, fastknockfwd included.
* Keys are secrets: ``Config.keys`` is ``repr=False``. Mappings are read-only views.
* ``admit`` is the one place of PROTOCOL.md "Flow" rule 3 (which user may open which
  resource): fastknockd applies it before it sends a challenge, fastknockfwd again as root
  before it touches the firewall; both map the ``Refusal`` to their own status codes.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "DEFAULT_CONTROL_PORT",
    "Config",
    "ErrorPolicy",
    "HooksConfig",
    "JumpResource",
    "NftablesConfig",
    "PortResource",
    "Refusal",
    "Resource",
    "SeccompMode",
    "admit",
    "user_allowed",
]

DEFAULT_CONTROL_PORT = 5800


class ErrorPolicy(enum.Enum):
    ALWAYS = "always"
    BASIC_AUTH = "basic-auth"
    FULL_AUTH = "full-auth"


class SeccompMode(enum.Enum):
    OFF = "off"
    LOG = "log"
    KILL = "kill"


@dataclass(frozen=True, slots=True)
class PortResource:
    id: int
    port: int
    tcp: bool = True
    udp: bool = False
    users: frozenset[int] | None = None  # None: every user in [KEYS] may knock it
    timeout: int | None = None  # seconds; None: [NFTABLES] timeout
    # fastknock extensions (issue 15): ``port: A-B`` opens A..B inclusive (None: one port);
    # ``ipv4-prefix: N`` / ``ipv6-prefix: N`` open the knocker's /N instead of its address.
    port_last: int | None = None
    ipv4_prefix: int = 32
    ipv6_prefix: int = 128

    @property
    def ports(self) -> range:
        """Every port this resource opens (one, or the inclusive range)."""
        return range(self.port, (self.port if self.port_last is None else self.port_last) + 1)


@dataclass(frozen=True, slots=True)
class JumpResource:
    id: int
    input: str | None = None
    forward: str | None = None
    output: str | None = None
    input_match_saddr: bool = False
    forward_match_saddr: bool = False
    output_match_saddr: bool = False
    users: frozenset[int] | None = None
    timeout: int | None = None
    ipv4_prefix: int = 32  # with ``*-match: saddr``: match the knocker's /N (issue 15)
    ipv6_prefix: int = 128


Resource = PortResource | JumpResource


@dataclass(frozen=True, slots=True)
class NftablesConfig:
    chain_input: str
    exe: str = "nft"
    family: str = "inet"  # inet | ip | ip6
    table: str = "filter"
    chain_forward: str | None = None
    chain_output: str | None = None
    timeout: int = 600
    max_nr_rules: int = 100
    # In-kernel pre-filter for a UDP control port (fastknock extension, see firewall/prefilter.py):
    # drop datagrams that are not 56 bytes, and rate-limit each source (an IPv4 address,
    # or an IPv6 prefix of prefilter-ipv6-prefix bits; and each IPv6 group prefix at
    # GROUP_FACTOR times that) to rate/s with a burst; what a source sends beyond its
    # allowance still passes while the shared spare allowance (datagrams/s) lasts.
    prefilter: bool = True
    prefilter_rate: int = 100  # datagrams per second per source
    prefilter_burst: int = 200  # datagrams
    prefilter_ipv6_prefix: int = 64
    prefilter_ipv6_group: int = 48
    prefilter_spare: int = 20000  # datagrams per second, shared by all sources; 0: none


@dataclass(frozen=True, slots=True)
class HooksConfig:
    """``[HOOKS]`` (fastknock extension, issue 15): programs fastknockfwd runs, without a
    shell, as ``user`` (never root), killed after ``timeout`` seconds."""

    on_open: tuple[str, ...] | None = None  # argv; None: no hook
    on_close: tuple[str, ...] | None = None
    user: str = "nobody"
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    checksum: bytes = field(repr=False)  # SHA3-256(u64be(len(file)) || file)
    debug: bool = False
    port: int = DEFAULT_CONTROL_PORT
    port_tcp: bool = True
    port_udp: bool = False
    control_timeout: float = 5.0
    control_error_policy: ErrorPolicy = ErrorPolicy.ALWAYS
    seccomp: SeccompMode = SeccompMode.OFF
    nftables: NftablesConfig | None = None
    default_user: int | None = None
    keys: Mapping[int, bytes] = field(default_factory=dict, repr=False)
    resources: Mapping[int, Resource] = field(default_factory=dict)
    hooks: HooksConfig | None = None  # server only; None: no [HOOKS] section

    def without_keys(self) -> Config:
        """This config without the key bytes (the user ids stay, for ``admit``), for code
        that never needs a key: fastknockfwd, and fastknockd once its key ring is built.
        (Python cannot wipe the old bytes; the point is that nothing refers to them.)"""
        return dataclasses.replace(self, keys=MappingProxyType(dict.fromkeys(self.keys, b"")))

    def allowed(self, user: int, resource: Resource) -> bool:
        return user_allowed(user, resource)

    def admit(self, user: int, resource_id: int) -> Resource | Refusal:
        """``admit`` with this config's resources, keys and control port."""
        return admit(self.resources, self.keys, self.port, user, resource_id)


class Refusal(enum.Enum):
    """Why a user may not open a resource (rule 3)."""

    UNKNOWN_RESOURCE = "unknown-resource"
    USER_NOT_ALLOWED = "user-not-allowed"  # unknown user, or not in the resource's users:
    BAD_PORT = "bad-port"  # a port resource on (or whose range spans) port 0 or the control port


def user_allowed(user: int, resource: Resource) -> bool:
    """Whether ``resource``'s ``users:`` list (none: every user in [KEYS]) admits ``user``."""
    return resource.users is None or user in resource.users


def admit(
    resources: Mapping[int, Resource],
    users: Container[int],
    control_port: int,
    user: int,
    resource_id: int,
) -> Resource | Refusal:
    """The resource ``user`` (one of ``users``, the [KEYS]) may open, or why not."""
    resource = resources.get(resource_id)
    if resource is None:
        return Refusal.UNKNOWN_RESOURCE
    if user not in users or not user_allowed(user, resource):
        return Refusal.USER_NOT_ALLOWED
    if isinstance(resource, PortResource) and (
        0 in resource.ports or control_port in resource.ports
    ):
        return Refusal.BAD_PORT
    return resource
