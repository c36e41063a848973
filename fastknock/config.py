"""Configuration files (letmein's format), parsed to frozen dataclasses.

CONTRACT (implementation pending; see the config helper task). Types below are final.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal, Mapping, Union

DEFAULT_CLIENT_CONFIG = "/etc/fastknock/fastknock.conf"
DEFAULT_SERVER_CONFIG = "/etc/fastknock/fastknockd.conf"
DEFAULT_CONTROL_PORT = 5800

Role = Literal["server", "client"]


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


Resource = Union[PortResource, JumpResource]


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

    def allowed(self, user: int, resource: Resource) -> bool:
        return resource.users is None or user in resource.users
