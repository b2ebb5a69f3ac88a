"""Userspace ESP (RFC 4303) over a TUN device, for kernels without ESP (product.md §6).

sa.py: sans-I/O ESP (no sockets, no clock); packet.py: IP headers; udp.py: the RFC 3948 port-4500
split; tun.py: the `oe0` device; dataplane.py: `UserspaceDataplane` (oe_agent.model.Dataplane).
"""
