"""What an IkeSa tells its driver (drained with `IkeSa.next_event()`).

The agent maps NegotiationFailed.reason to a failure-shunt lifetime (product.md §3):
"no-proposal", "ts-unacceptable", "auth-failed", "timeout", "peer-unreachable", "internal".
"""
from __future__ import annotations

from dataclasses import dataclass

from oe_agent.model import ChildSaParams, IPAddress

FAILURE_REASONS = ("no-proposal", "ts-unacceptable", "auth-failed", "timeout",
                   "peer-unreachable", "internal")


@dataclass(frozen=True)
class IkeEvent:
    """Base: `spi_i`/`spi_r` name the IKE SA (8 bytes each) the event belongs to."""


@dataclass(frozen=True)
class PeerKeyNeeded(IkeEvent):
    """Answer with `IkeSa.supply_peer_keys(keys, now)`; the exchange waits for it.
    `peer_id` is the peer's IDi/IDr payload value (payloads.IdInitiator/IdResponder)."""

    peer_id: object
    remote: IPAddress


@dataclass(frozen=True)
class IkeSaEstablished(IkeEvent):
    spi_i: bytes
    spi_r: bytes
    initiator: bool  # we initiated
    local: IPAddress
    remote: IPAddress
    local_id: object
    remote_id: object
    auth: str  # how the peer authenticated: "signature", "psk", "null"
    nat_local: bool  # we are behind a NAT (our NAT_DETECTION hash did not match)
    nat_remote: bool  # the peer is behind a NAT
    encap: tuple[int, int] | None  # (local, remote) UDP ports after the float, if any
    algorithms: str  # e.g. "aes-gcm-16-256/prf-hmac-sha2-256/31"


@dataclass(frozen=True)
class IkeSaRekeyed(IkeEvent):
    old_spi_i: bytes
    old_spi_r: bytes
    spi_i: bytes
    spi_r: bytes


@dataclass(frozen=True)
class IkeSaDeleted(IkeEvent):
    """The IKE SA is gone (and with it every Child SA, each reported by ChildSaDeleted first).
    reason: "local" (we deleted), "peer" (peer's Delete), "dead-peer" (liveness timeout),
    "superseded" (lost a simultaneous-initiation tie-break)."""

    spi_i: bytes
    spi_r: bytes
    reason: str


@dataclass(frozen=True)
class ChildSaEstablished(IkeEvent):
    params: ChildSaParams
    initiator: bool  # we initiated the exchange that created it


@dataclass(frozen=True)
class ChildSaRekeyed(IkeEvent):
    """Install `new`; `old` keeps working until its ChildSaDeleted follows (RFC 7296 §2.8:
    the Delete exchange of the old pair ends the rekey)."""

    old: ChildSaParams
    new: ChildSaParams
    # we sent the CREATE_CHILD_SA that made `new`; if not, the peer sends on `new` only once
    # it has our answer, and deletes `old` after that (so our outbound waits for that Delete)
    initiator: bool = True


@dataclass(frozen=True)
class ChildSaDeleted(IkeEvent):
    params: ChildSaParams
    reason: str  # "local", "peer", "ike-deleted", "rekey-collision"


@dataclass(frozen=True)
class NegotiationFailed(IkeEvent):
    """The IKE SA (or a Child SA exchange on it, if `child`) failed; `reason` in
    FAILURE_REASONS, `notify` the Notify type involved (0 if none)."""

    reason: str
    detail: str = ""
    notify: int = 0
    child: bool = False


@dataclass(frozen=True)
class PeerAlive(IkeEvent):
    """A liveness check (empty INFORMATIONAL) was answered."""
