"""Values shared by the IKE engine, the dataplanes and the agent.

The engine produces `ChildSaParams`; a dataplane (kernel XFRM or userspace ESP) consumes them.
Neither imports the other: both import this module, which imports nothing of the project.
"""
from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Mode(enum.Enum):
    TRANSPORT = "transport"
    TUNNEL = "tunnel"


class ShuntKind(enum.Enum):
    PASS = "pass"
    DROP = "drop"
    HOLD = "hold"


@dataclass(frozen=True)
class TrafficSelector:
    """An address range with protocol and port range (RFC 7296 §3.13.1); 0 proto = any."""

    start: IPAddress
    end: IPAddress
    proto: int = 0
    port_start: int = 0
    port_end: int = 65535

    @classmethod
    def from_network(cls, net: IPNetwork | str, proto: int = 0, port: int | None = None):
        net = ipaddress.ip_network(net, strict=False)
        ps, pe = (port, port) if port is not None else (0, 65535)
        return cls(net.network_address, net.broadcast_address, proto, ps, pe)

    @classmethod
    def host(cls, addr: IPAddress | str, proto: int = 0, port: int | None = None):
        a = ipaddress.ip_address(addr)
        return cls.from_network(ipaddress.ip_network(a), proto, port)

    @property
    def version(self) -> int:
        return self.start.version

    def network(self) -> IPNetwork:
        """The single CIDR this range is; ValueError if it is not one (XFRM needs prefixes)."""
        nets = list(ipaddress.summarize_address_range(self.start, self.end))
        if len(nets) != 1:
            raise ValueError(f"range {self.start}-{self.end} is not one prefix")
        return nets[0]


@dataclass(frozen=True)
class EspAlgorithm:
    """ESP transforms of one Child SA. Names: 'aes-gcm-16', 'aes-cbc', 'chacha20-poly1305';
    integrity 'hmac-sha2-256-128' or None for AEAD. AEAD keys include the salt (RFC 4106 §8.1:
    4 bytes; RFC 7634: 4 bytes)."""

    encr: str
    encr_key_bits: int
    integ: str | None = None


@dataclass(frozen=True)
class ChildSaParams:
    """Everything a dataplane needs to install one Child SA pair (both directions)."""

    local: IPAddress  # outer addresses (the IKE endpoints)
    remote: IPAddress
    spi_in: int  # SPI the peer sends to us with
    spi_out: int  # SPI we send with
    mode: Mode
    alg: EspAlgorithm
    encr_key_in: bytes
    encr_key_out: bytes
    integ_key_in: bytes = b""
    integ_key_out: bytes = b""
    ts_local: tuple[TrafficSelector, ...] = ()
    ts_remote: tuple[TrafficSelector, ...] = ()
    encap: tuple[int, int] | None = None  # (local port, remote port) for ESP-in-UDP
    esn: bool = False
    reqid: int = 0  # set by the agent from its reqid band
    lifetime_soft_s: int = 0  # 0 = none
    lifetime_hard_s: int = 0
    lifetime_soft_bytes: int = 0
    lifetime_hard_bytes: int = 0
    replay_window: int = 64
    lifetime_soft_packets: int = 0  # 0 = none (XFRM and the userspace ESP both count packets)
    lifetime_hard_packets: int = 0


@dataclass(frozen=True)
class Acquire:
    """The kernel (or the userspace dataplane) saw a packet that needs an SA."""

    src: IPAddress
    dst: IPAddress
    proto: int = 0
    sport: int = 0
    dport: int = 0
    seq: int = 0  # kernel acquire sequence, for ALLOCSPI tied to it
    policy_index: int = 0
    packet: bytes | None = None  # userspace dataplane: the packet itself (for hold)


@dataclass(frozen=True)
class SaExpire:
    """A Child SA reached a lifetime: soft = rekey now, hard = it is gone."""

    spi: int
    dst: IPAddress
    hard: bool
    reqid: int = 0


@dataclass(frozen=True)
class PolicyExpire:
    """A policy with a lifetime expired (shunt expiry on the kernel dataplane)."""

    src: IPNetwork
    dst: IPNetwork
    index: int
    hard: bool


@dataclass(frozen=True)
class SaCounters:
    spi: int
    dst: IPAddress
    bytes: int
    packets: int
    use_time: int = 0  # last use, seconds since epoch (0 = never)


@dataclass(frozen=True)
class Capabilities:
    """What the dataplane can do, from the probe."""

    esp: bool
    algorithms: frozenset[str] = field(default_factory=frozenset)
    detail: str = ""


class Dataplane(Protocol):
    """What the agent needs from a dataplane. Kernel XFRM and userspace TUN both implement it.

    Addresses are the host pair; `sel` forms are (network, proto, dport) triples from the
    policy groups. Only state the dataplane itself installed is ever removed.
    """

    async def start(self) -> Capabilities: ...

    async def stop(self, keep_sas: bool = False) -> None: ...

    async def set_trap(self, dst: IPNetwork, proto: int = 0, port: int = 0) -> None: ...

    async def set_pass(self, dst: IPNetwork, proto: int = 0, port: int = 0) -> None: ...

    async def set_block(self, dst: IPNetwork, proto: int = 0, port: int = 0) -> None: ...

    async def remove_group_policy(self, dst: IPNetwork, proto: int = 0, port: int = 0) -> None: ...

    async def set_shunt(self, local: IPAddress, remote: IPAddress, kind: ShuntKind,
                        lifetime_s: int) -> None: ...

    async def clear_shunt(self, local: IPAddress, remote: IPAddress) -> None: ...

    async def alloc_spi(self, local: IPAddress, remote: IPAddress, seq: int = 0) -> int: ...

    async def add_child_sa(self, params: ChildSaParams, outbound: bool = True) -> None:
        """Install the pair. outbound=False (a rekey we answered): the inbound SA only, the
        old pair keeps carrying our traffic until `add_outbound` (RFC 7296 §2.8)."""

    async def add_outbound(self, params: ChildSaParams) -> None:
        """The outbound SA of a pair added with outbound=False: our traffic moves to it."""

    async def del_outbound(self, params: ChildSaParams) -> None:
        """Stop sending on a pair that is going (another carries the traffic); it still
        receives until del_child_sa."""

    async def del_child_sa(self, params: ChildSaParams) -> None: ...

    async def counters(self) -> list[SaCounters]: ...

    def events(self) -> AsyncIterator[Acquire | SaExpire | PolicyExpire]: ...
