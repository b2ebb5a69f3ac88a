"""Issue 3, acceptance 4 on real ESP, the parts test_kernel_esp.py leaves out: ESN with a
128-packet replay window (XFRMA_REPLAY_ESN_VAL), ChaCha20-Poly1305 (RFC 7634), and packet-count
lifetimes: the soft limit gives a typed SaExpire(hard=False) to rekey on, the hard limit removes
the SA, and the counters read back through the project's API count what was sent."""
from __future__ import annotations

import asyncio
import ipaddress
import os
import time

from oe_agent.model import ChildSaParams, EspAlgorithm, Mode, SaExpire
from tests.vm.wire import CANARY, sniff, udp_exchange, udp_socket

CHACHA = EspAlgorithm("chacha20-poly1305", 256)


async def test_esn_chacha_and_packet_lifetimes(pair, dataplanes):
    lan, _, _ = pair
    a, b, dp_a, dp_b = dataplanes
    A, B = ipaddress.ip_address(a.v4), ipaddress.ip_address(b.v4)
    events = dp_a.events()
    try:
        spi_ba = await dp_a.alloc_spi(A, B)
        spi_ab = await dp_b.alloc_spi(B, A)
        k_ab, k_ba = os.urandom(36), os.urandom(36)  # 256-bit key + 4-byte salt
        common = dict(mode=Mode.TRANSPORT, alg=CHACHA, esn=True, replay_window=128)
        pa = ChildSaParams(local=A, remote=B, spi_in=spi_ba, spi_out=spi_ab, encr_key_in=k_ba,
                           encr_key_out=k_ab, lifetime_soft_packets=4,
                           lifetime_hard_packets=12, **common)
        pb = ChildSaParams(local=B, remote=A, spi_in=spi_ab, spi_out=spi_ba, encr_key_in=k_ab,
                           encr_key_out=k_ba, **common)
        await dp_b.add_child_sa(pb)
        await dp_a.add_child_sa(pa)
        sas = {s.spi: s for s in await dp_a.sas()}
        assert sas[spi_ab].esn and sas[spi_ba].esn
        assert sas[spi_ba].replay_window == 128
        assert sas[spi_ab].algorithms == ("chacha20-poly1305",)
        assert sas[spi_ab].lifetime.soft_packets == 4 and sas[spi_ab].lifetime.hard_packets == 12
        reqid = sas[spi_ab].reqid  # reqid 0 in the params: the dataplane took one from its band
        assert reqid in dp_a.reqid_band and sas[spi_ba].reqid == reqid

        with sniff(lan, b) as wire:
            assert udp_exchange(a, a.v4, b, b.v4, port=5010) == CANARY
        assert spi_ab in {spi for kind, spi in wire.esp() if kind == "esp"}
        assert not wire.has_plaintext()

        # keep sending until the hard limit: soft expire first, then hard, then the SA is gone
        tx = udp_socket(a, a.v4)
        soft = hard = None
        sent = 0
        try:
            deadline = time.monotonic() + 60
            while hard is None:
                assert time.monotonic() < deadline, f"no hard expire after {sent} packets"
                if sent < 40:
                    try:
                        tx.sendto(CANARY, (b.v4, 5011))
                    except OSError:
                        pass  # the packet over the hard limit is refused (EINVAL)
                    sent += 1
                try:
                    ev = await asyncio.wait_for(events.__anext__(), 1.0)
                except asyncio.TimeoutError:
                    continue
                if isinstance(ev, SaExpire) and ev.spi == spi_ab:
                    assert ev.reqid == reqid and ev.dst == B
                    if ev.hard:
                        hard = ev
                    else:
                        assert hard is None
                        soft = ev
                        counted = {c.spi: c.packets for c in await dp_a.counters()}
                        assert counted[spi_ab] >= 4, counted
        finally:
            tx.close()
        assert soft is not None, "hard expire without the soft one"
        assert spi_ab not in {s.spi for s in await dp_a.sas()}
        received = {c.spi: c.packets for c in await dp_b.counters()}
        assert received[spi_ab] >= 4  # the receiver counted the packets on its side
    finally:
        await events.aclose()
