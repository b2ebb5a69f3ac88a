"""Smoke test of the vm tier itself: real kernel ESP between two namespaces, set up with
`ip xfrm` (not the project's code), so a broken guest is told apart from a broken backend."""
from __future__ import annotations

from tests.hosts import sh
from tests.vm.wire import CANARY, capture, ping, udp_exchange, xfrm_packets

KEY_AB = "0x" + "11" * 16 + "01020304"  # AES-128 key + 4-byte salt (RFC 4106 §8.1)
KEY_BA = "0x" + "22" * 16 + "05060708"
SPI_AB, SPI_BA = 0x1001, 0x2002


def test_ip_xfrm_esp_carries_udp_and_icmp(pair):
    hosts, a, b = pair
    aa, ba = a.v4, b.v4
    for h, me, peer in ((a, aa, ba), (b, ba, aa)):
        batch = [f"xfrm state add src {s} dst {d} proto esp spi {spi:#x} reqid 1 mode transport "
                 f"aead rfc4106(gcm(aes)) {key} 128"
                 for s, d, spi, key in ((aa, ba, SPI_AB, KEY_AB), (ba, aa, SPI_BA, KEY_BA))]
        batch += [f"xfrm policy add src {s} dst {t} dir {d} "
                  f"tmpl src {s} dst {t} proto esp mode transport reqid 1"
                  for d, s, t in (("out", me, peer), ("in", peer, me))]
        sh("ip", "-n", h.name, "-batch", "-", input="\n".join(batch) + "\n")
    with capture(hosts, b) as wire:  # tcpdump inside b: transport mode is never seen decrypted
        ping(a, ba)
        assert udp_exchange(a, aa, b, ba) == CANARY
    assert {SPI_AB, SPI_BA} <= wire.esp_spis(), wire.text()
    assert not wire.has_plaintext(), "the canary crossed the veth in clear"
    for h in (a, b):
        counted = xfrm_packets(h)
        assert counted[SPI_AB] >= 3 and counted[SPI_BA] >= 2, (h.name, counted)
