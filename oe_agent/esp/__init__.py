"""Userspace ESP (RFC 4303) over a TUN device, for kernels without ESP (product.md §6).

Modules: sa.py = sans-I/O ESP (ChildSa/EspSa: no sockets, no clock, IVs from the sequence number
or an injected rng); packet.py = IP headers, ICMP too-big, fragment reassembly; udp.py = the
RFC 3948 port-4500 split and raw ESP sockets; tun.py = the `oe0` device; dataplane.py =
`UserspaceDataplane`, an oe_agent.model.Dataplane; static.py = manual keys (`python -m
oe_agent.esp CONFIG.json`).

Wiring with the IKE adapter (it owns UDP 4500, which IKE and ESP share):
    dp = UserspaceDataplane(own_udp=False)     # do not bind 4500 ourselves
    dp.attach_udp(sendto)                      # sendto(data: bytes, (host: str, port: int)):
                                               #   the adapter's 4500 socket sends ESP for us
    await dp.start()
    # in the adapter's datagram_received on 4500 (RFC 3948 §2.2):
    #   first 4 bytes zero -> IKE (strip the marker); a lone 0xff -> NAT keepalive; else ESP:
    dp.esp_received(data, addr)                # whole datagram = SPI .. ICV
Without an adapter (tests, the benchmark), `own_udp=True` (default) binds 4500 itself
(udp.UdpEncap) and makes the same split. Our own traffic (IKE ports 500/4500, ESP, packets we
re-inject in the clear with SO_MARK 0x4f45) always takes the main table, never oe0.
"""
