"""The TUN device `oe0`: plain IP packets in and out (IFF_TUN | IFF_NO_PI), non-blocking.

Packets the host routes into `oe0` are read here and protected; unprotected packets are written
here and the host receives them from `oe0` — so `tcpdump -i oe0` shows the plaintext (KLIPS's
ipsec0, product.md §6). The device lives as long as the file descriptor (not persistent).
"""
from __future__ import annotations

import fcntl
import os
import struct

from oe_agent.errors import UserError

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
_MAX_PACKET = 65535


class TunDevice:
    """One TUN interface. `read_batch` drains up to `n` packets per wakeup (batching)."""

    def __init__(self, name: str = "oe0"):
        if not name or len(name.encode()) > 15 or "/" in name or name.strip() != name:
            raise UserError(f"bad TUN interface name {name!r} (1-15 characters, no '/')")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise UserError(f"cannot open /dev/net/tun for {name}: {e.strerror} "
                            "(needs CAP_NET_ADMIN and the tun module)") from None
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        except OSError as e:
            os.close(fd)
            raise UserError(f"cannot create TUN device {name}: {e.strerror}") from None
        self.fd = fd
        self.name = ifr[:16].rstrip(b"\0").decode()

    def read_batch(self, n: int = 64) -> list[bytes]:
        """Up to `n` packets that are ready now (empty list when none)."""
        out = []
        read = os.read
        fd = self.fd
        for _ in range(n):
            try:
                out.append(read(fd, _MAX_PACKET))
            except BlockingIOError:
                break
        return out

    def write(self, pkt: bytes) -> None:
        """Hand one IP packet to the host as if it arrived on this interface."""
        os.write(self.fd, pkt)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
