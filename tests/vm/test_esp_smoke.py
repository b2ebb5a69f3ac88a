"""Smoke test of the vm tier itself: real kernel ESP between two namespaces, set up with
`ip xfrm` (not the project's code), so a broken guest is told apart from a broken backend."""
from __future__ import annotations

from tests.vm.wire import CANARY, capture, ping, udp_exchange, xfrm_packets

KEY_AB = "0x" + "11" * 16 + "01020304"  # AES-128 key + 4-byte salt (RFC 4106 §8.1)
KEY_BA = "0x" + "22" * 16 + "05060708"
SPI_AB, SPI_BA = 0x1001, 0x2002


def test_ip_xfrm_esp_carries_udp_and_icmp(pair):
    hosts, a, b = pair
    aa, ba = a.v4, b.v4
    for h in (a, b):
        for src, dst, spi, key in ((aa, ba, SPI_AB, KEY_AB), (ba, aa, SPI_BA, KEY_BA)):
            h.run("ip", "xfrm", "state", "add", "src", src, "dst", dst, "proto", "esp",
                  "spi", hex(spi), "reqid", "1", "mode", "transport",
                  "aead", "rfc4106(gcm(aes))", key, "128")
    for h, me, peer in ((a, aa, ba), (b, ba, aa)):
        for d, s, t in (("out", me, peer), ("in", peer, me)):
            h.run("ip", "xfrm", "policy", "add", "src", s, "dst", t, "dir", d,
                  "tmpl", "src", s, "dst", t, "proto", "esp", "mode", "transport", "reqid", "1")
    with capture(hosts, b) as wire:
        ping(a, ba)
        assert udp_exchange(a, aa, b, ba) == CANARY
    assert {SPI_AB, SPI_BA} <= wire.esp_spis(), wire.text()
    assert not wire.has_plaintext(), "the canary crossed the veth in clear"
    assert xfrm_packets(a, SPI_AB) >= 3 and xfrm_packets(b, SPI_AB) >= 3
    assert xfrm_packets(a, SPI_BA) >= 2 and xfrm_packets(b, SPI_BA) >= 2
