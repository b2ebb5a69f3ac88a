"""Issue 3, acceptance 3 and 4: real kernel ESP through the project's own XFRM code.

SA pairs and policies are installed by oe_agent.trap (KernelDataplane: ALLOCSPI, NEWSA/UPDSA,
policies), never by `ip xfrm`; the proof is on the wire (a raw capture on the veth: ESP or
ESP-in-UDP with our SPIs, no plaintext canary) and in the kernel's SA counters read back
through the same API.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from contextlib import ExitStack

import pytest

from oe_agent.model import Acquire, ChildSaParams, EspAlgorithm, Mode, SaExpire
from tests.vm.wire import CANARY, encap_socket, ping, sniff, udp_exchange, udp_socket

GCM = EspAlgorithm("aes-gcm-16", 128)
CBC = EspAlgorithm("aes-cbc", 128, "hmac-sha2-256-128")
ALL_ALGORITHMS = {"aes-gcm-16", "aes-cbc", "hmac-sha2-256-128", "chacha20-poly1305"}


def keys(alg: EspAlgorithm) -> tuple[bytes, bytes]:
    """Fresh (encryption, integrity) keys; AEAD keys carry the 4-byte salt (RFC 4106 §8.1)."""
    if alg.integ is None:
        return os.urandom(alg.encr_key_bits // 8 + 4), b""
    return os.urandom(alg.encr_key_bits // 8), os.urandom(32)


async def install_pair(dp_a, dp_b, a_addr: str, b_addr: str, mode: Mode, alg: EspAlgorithm,
                       encap: bool = False, seq_a: int = 0, **life):
    """Negotiation's outcome, done by hand: each side allocates its inbound SPI, both get
    mirrored ChildSaParams; B first, so A's first packets find B ready."""
    a, b = ipaddress.ip_address(a_addr), ipaddress.ip_address(b_addr)
    spi_ba = await dp_a.alloc_spi(a, b, seq=seq_a)  # A receives on it
    spi_ab = await dp_b.alloc_spi(b, a)
    (k_ab, i_ab), (k_ba, i_ba) = keys(alg), keys(alg)
    ports = (4500, 4500) if encap else None
    common = dict(mode=mode, alg=alg, encap=ports, **life)
    pa = ChildSaParams(local=a, remote=b, spi_in=spi_ba, spi_out=spi_ab, encr_key_in=k_ba,
                       encr_key_out=k_ab, integ_key_in=i_ba, integ_key_out=i_ab,
                       reqid=dp_a.new_reqid(), **common)
    pb = ChildSaParams(local=b, remote=a, spi_in=spi_ab, spi_out=spi_ba, encr_key_in=k_ab,
                       encr_key_out=k_ba, integ_key_in=i_ab, integ_key_out=i_ba,
                       reqid=dp_b.new_reqid(), **common)
    await dp_b.add_child_sa(pb)
    await dp_a.add_child_sa(pa)
    return pa, pb


async def next_event(events, kind, bound: float = 15.0):
    """The next event of `kind` from a dataplane's event stream, within a bound."""
    deadline = time.monotonic() + bound
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {kind.__name__} event within {bound} s")
        ev = await asyncio.wait_for(events.__anext__(), left)
        if isinstance(ev, kind):
            return ev


async def test_probe_reports_full_support(dataplanes):
    _, _, dp_a, _ = dataplanes
    caps = dp_a.capabilities
    assert caps.esp, caps.detail
    assert ALL_ALGORITHMS <= caps.algorithms, caps


# Pairwise cover of mode x algorithm x family x encapsulation: every pair of values appears.
MATRIX = [
    (Mode.TRANSPORT, GCM, 4, False),
    (Mode.TRANSPORT, CBC, 6, True),
    (Mode.TUNNEL, GCM, 6, True),
    (Mode.TUNNEL, CBC, 4, True),
    (Mode.TUNNEL, CBC, 6, False),
]


@pytest.mark.parametrize("mode,alg,ver,encap", MATRIX, ids=[
    f"{m.value}-{a.encr}-v{v}-{'udp' if e else 'esp'}" for m, a, v, e in MATRIX])
async def test_project_sas_carry_udp_and_icmp(dataplanes, lan, mode, alg, ver, encap):
    a, b, dp_a, dp_b = dataplanes
    aa, ba = (a.v4, b.v4) if ver == 4 else (a.v6, b.v6)
    pa, pb = await install_pair(dp_a, dp_b, aa, ba, mode, alg, encap)
    spi_ab, spi_ba = pa.spi_out, pa.spi_in
    with ExitStack() as stack:
        if encap:  # RFC 3948 receivers: the kernel decapsulates on a UDP_ENCAP socket
            stack.enter_context(encap_socket(a, aa))
            stack.enter_context(encap_socket(b, ba))
        wire = stack.enter_context(sniff(lan, b))
        ping(a, ba, count=2)
        assert udp_exchange(a, aa, b, ba) == CANARY
        assert udp_exchange(b, ba, a, aa, payload=CANARY + b"-back", port=5001) == \
            CANARY + b"-back"
    seen = wire.esp()
    kind = "udp" if encap else "esp"
    assert {spi_ab, spi_ba} <= {spi for k, spi in seen if k == kind}, seen
    assert not [s for k, s in seen if k != kind], f"ESP in the wrong encapsulation: {seen}"
    clear = wire.plaintext()
    assert not clear, "the canary crossed the veth in clear:\n" + "\n".join(clear)

    ca = {c.spi: c for c in await dp_a.counters()}
    cb = {c.spi: c for c in await dp_b.counters()}
    # A -> B: 2 echo requests + >= 1 UDP; B -> A: 2 echo replies + >= 1 UDP
    for c, spi, n in ((ca, spi_ab, 3), (cb, spi_ab, 3), (ca, spi_ba, 3), (cb, spi_ba, 3)):
        assert c[spi].packets >= n and c[spi].bytes > 0, c[spi]
    sa = {s.spi: s for s in await dp_a.sas()}
    assert sa[spi_ab].mode is mode and sa[spi_ab].encap == pa.encap


async def test_hold_delivers_first_packet(dataplanes):
    """A trap catches the first packet; it waits in the kernel's larval queue while the SAs
    are made and arrives once they are in, without being sent again (product.md §3)."""
    a, b, dp_a, dp_b = dataplanes
    await dp_a.set_trap(ipaddress.ip_network(f"{b.v4}/32"))
    events = dp_a.events()
    rx = udp_socket(b, b.v4, 5002)
    tx = udp_socket(a, a.v4)
    try:
        first = CANARY + b"-first"
        tx.sendto(first, (b.v4, 5002))  # once: no retry anywhere below
        acq = await next_event(events, Acquire)
        assert (str(acq.src), str(acq.dst), acq.proto, acq.dport) == (a.v4, b.v4, 17, 5002)
        await install_pair(dp_a, dp_b, a.v4, b.v4, Mode.TRANSPORT, GCM, seq_a=acq.seq)
        rx.settimeout(15)
        data, peer = rx.recvfrom(2048)
        assert (data, peer[0]) == (first, a.v4)
    finally:
        rx.close()
        tx.close()
        await events.aclose()


async def test_soft_expire_event_then_hard_expire_removes_sa(dataplanes):
    """Soft lifetime: a typed SaExpire(hard=False) with the pair's reqid, to rekey on; hard
    lifetime: SaExpire(hard=True) and the kernel no longer has the SA."""
    a, b, dp_a, dp_b = dataplanes
    events = dp_a.events()
    try:
        pa, _ = await install_pair(dp_a, dp_b, a.v4, b.v4, Mode.TRANSPORT, GCM,
                                   lifetime_soft_s=2, lifetime_hard_s=5)
        ping(a, b.v4, count=1)
        counted = {c.spi: c.packets for c in await dp_a.counters()}
        assert counted[pa.spi_out] >= 1 and counted[pa.spi_in] >= 1, counted
        ours = {pa.spi_in, pa.spi_out}
        soft, hard = set(), set()
        deadline = time.monotonic() + 30
        while hard != ours:
            ev = await next_event(events, SaExpire, bound=deadline - time.monotonic())
            if ev.spi not in ours:
                continue
            assert ev.reqid == pa.reqid
            if ev.hard:
                assert ev.spi in soft, "hard expire before the soft one"
                hard.add(ev.spi)
            else:
                soft.add(ev.spi)
        assert soft == ours
        left = {s.spi for s in await dp_a.sas()}
        assert not ours & left, f"hard-expired SAs still in the kernel: {ours & left}"
    finally:
        await events.aclose()
