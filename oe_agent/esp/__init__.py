"""Userspace ESP (RFC 4303) over a TUN device, for kernels without ESP (product.md §6).

Modules: sa.py = sans-I/O ESP (ChildSa/EspSa: no sockets, no clock, IVs from the sequence number
or an injected rng); packet.py = IP headers, ICMP too-big, fragment reassembly; udp.py = the
RFC 3948 port-4500 split and raw ESP sockets; tun.py = the `oe0` device; dataplane.py =
`UserspaceDataplane`, an oe_agent.model.Dataplane; static.py = manual keys (`python -m
oe_agent.esp CONFIG.json`).

Wiring with the IKE adapter (oe_agent.ike.adapter.IkeAdapter owns UDP 4500, which IKE and ESP
share, and splits it by the non-ESP marker, RFC 3948 §2.2):
    dp = UserspaceDataplane(own_udp=False)     # do not bind 4500 ourselves
    ike = IkeAdapter(..., on_esp=dp.on_esp)    # on_esp(data, (local, port), (remote, port))
    dp.attach_udp(ike.send_esp)                # send_esp(data, (local, port), (remote, port))
    await ike.start(); await dp.start()
(`dp.esp_received(data, (host, port))` is the same entry point for any other socket owner.)
Without an adapter (tests, the benchmark), `own_udp=True` (default) binds 4500 itself
(udp.UdpEncap) and makes the same split. Our own traffic (IKE ports 500/4500, ESP, packets we
re-inject in the clear with SO_MARK 0x4f45) always takes the main table, never oe0.
"""
