"""Child SAs of one IKE SA: traffic selector narrowing (RFC 7296 §2.9), KEYMAT split (§2.17)
into model.ChildSaParams, and the small per-Child-SA state."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from oe_agent.ike.const import NotifyType
from oe_agent.ike.crypto import Prf, child_keys
from oe_agent.ike.errors import IkeProtocolError
from oe_agent.ike.proposal import Suite
from oe_agent.model import ChildSaParams, IPAddress, Mode, TrafficSelector


class ChildState(enum.Enum):
    INSTALLED = "installed"
    REKEYING = "rekeying"  # our CREATE_CHILD_SA with REKEY_SA for it is in flight
    REKEYED = "rekeyed"  # replaced by a new Child SA; waiting for the Delete exchange
    DELETING = "deleting"  # our Delete for it is in flight


@dataclass
class ChildSa:
    """One Child SA pair; `params` is what the dataplane installed."""

    params: ChildSaParams
    ni: bytes
    nr: bytes
    state: ChildState = ChildState.INSTALLED
    announced: bool = True  # reported to the driver (a redundant collision child never is)

    @property
    def spi_in(self) -> int:
        return self.params.spi_in

    @property
    def spi_out(self) -> int:
        return self.params.spi_out


def _intersect(a: TrafficSelector, b: TrafficSelector) -> TrafficSelector | None:
    if a.version != b.version:
        return None
    if a.proto and b.proto and a.proto != b.proto:
        return None
    start, end = max(a.start, b.start), min(a.end, b.end)
    ps, pe = max(a.port_start, b.port_start), min(a.port_end, b.port_end)
    if start > end or ps > pe:
        return None
    return TrafficSelector(start, end, a.proto or b.proto, ps, pe)


def narrow(offered: tuple[TrafficSelector, ...],
           allowed: tuple[TrafficSelector, ...]) -> tuple[TrafficSelector, ...]:
    """The parts of the peer's selectors our policy allows (§2.9); TS_UNACCEPTABLE if none."""
    out: list[TrafficSelector] = []
    for o in offered:
        for a in allowed:
            x = _intersect(o, a)
            if x is not None and x not in out:
                out.append(x)
    if not out:
        raise IkeProtocolError(NotifyType.TS_UNACCEPTABLE, "no traffic selector fits our policy")
    return tuple(out)


def within(answer: tuple[TrafficSelector, ...], offered: tuple[TrafficSelector, ...]) -> bool:
    """The responder may only narrow (§2.9): each returned selector lies in one we offered."""
    return bool(answer) and all(any(_intersect(a, o) == a for o in offered) for a in answer)


def host_selector(addr: IPAddress) -> TrafficSelector:
    return TrafficSelector.host(addr)


def build_params(*, exchange_initiator: bool, local: IPAddress, remote: IPAddress,
                 spi_in: int, spi_out: int, suite: Suite, mode: Mode, prf: Prf, sk_d: bytes,
                 ni: bytes, nr: bytes, g_ir: bytes, ts_i: tuple[TrafficSelector, ...],
                 ts_r: tuple[TrafficSelector, ...], encap: tuple[int, int] | None,
                 lifetime_s: int) -> ChildSaParams:
    """ChildSaParams from KEYMAT = prf+(SK_d, [g^ir |] Ni | Nr): initiator->responder keys
    first, where 'initiator' is the initiator of this exchange (§2.17)."""
    encr_len, integ_len = suite.esp_key_sizes()
    k = child_keys(prf, sk_d, ni, nr, encr_len, integ_len, g_ir)
    if exchange_initiator:
        enc_out, int_out, enc_in, int_in = k.encr_i, k.integ_i, k.encr_r, k.integ_r
        ts_local, ts_remote = ts_i, ts_r
    else:
        enc_out, int_out, enc_in, int_in = k.encr_r, k.integ_r, k.encr_i, k.integ_i
        ts_local, ts_remote = ts_r, ts_i
    return ChildSaParams(
        local=local, remote=remote, spi_in=spi_in, spi_out=spi_out, mode=mode,
        alg=suite.esp_algorithm(), encr_key_in=enc_in, encr_key_out=enc_out,
        integ_key_in=int_in, integ_key_out=int_out, ts_local=ts_local, ts_remote=ts_remote,
        encap=encap, esn=suite.esn, lifetime_soft_s=lifetime_s * 9 // 10 if lifetime_s else 0,
        lifetime_hard_s=lifetime_s)

