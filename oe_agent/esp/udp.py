"""ESP-in-UDP on port 4500 (RFC 3948) and raw ESP (IP protocol 50) sockets.

One UDP port carries both IKE and ESP (RFC 3948 §2): IKE messages start with the 4-byte zero
non-ESP marker, a lone 0xFF byte is a NAT keepalive (§2.3), anything else is ESP (its SPI is
never 0). The IKE adapter owns the 4500 socket when the agent runs; it hands ESP datagrams to the
dataplane (`IkeAdapter(on_esp=UserspaceDataplane.on_esp)`) and lends its send function
(`UserspaceDataplane.attach_udp(IkeAdapter.send_esp)`). `UdpEncap` is the same split on a socket
of our own, for a dataplane running without IKE (static keys, tests, the benchmark).
"""
from __future__ import annotations

import asyncio
import errno
import socket
from typing import Callable

NON_ESP_MARKER = b"\0\0\0\0"
KEEPALIVE = b"\xff"
SO_MARK = 36

EspHandler = Callable[[bytes, tuple], None]


def classify(datagram: bytes) -> str:
    """'ike', 'keepalive', 'esp' or 'invalid' for a datagram received on port 4500."""
    if datagram == KEEPALIVE:
        return "keepalive"
    if len(datagram) < 8:  # shorter than an ESP header (SPI + sequence number)
        return "invalid"
    if datagram[:4] == NON_ESP_MARKER:
        return "ike"
    return "esp"


def open_socket(family: int, kind: int, proto: int) -> socket.socket | None:
    """A socket, or None when the host has no such address family (an IPv4-only kernel)."""
    try:
        return socket.socket(family, kind, proto)
    except OSError as e:
        if e.errno == errno.EAFNOSUPPORT and family == socket.AF_INET6:
            return None
        raise


def _batch_reader(sock: socket.socket, handler: Callable[[bytes, tuple], None], batch: int):
    def ready() -> None:
        recv = sock.recvfrom
        for _ in range(batch):
            try:
                data, addr = recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP errors surface here (ECONNREFUSED...): the next read goes on
                continue
            handler(data, addr)
    return ready


class UdpEncap:
    """Our own port-4500 sockets (IPv4 and IPv6): ESP to `on_esp(data, addr)`, IKE messages
    (marker stripped) to `on_ike(message, addr)` when given, keepalives dropped. Reads up to
    `batch` datagrams per wakeup."""

    def __init__(self, on_esp: EspHandler, on_ike: EspHandler | None = None, port: int = 4500,
                 batch: int = 64, families=(socket.AF_INET, socket.AF_INET6)):
        self.on_esp, self.on_ike, self.port, self.batch = on_esp, on_ike, port, batch
        self.families = families
        self.socks: dict[int, socket.socket] = {}
        self.ignored = 0

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        for fam in self.families:
            s = open_socket(fam, socket.SOCK_DGRAM, 0)
            if s is None:
                continue
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", self.port))
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self.socks[fam] = s
            loop.add_reader(s.fileno(), _batch_reader(s, self._dispatch, self.batch))

    def _dispatch(self, data: bytes, addr: tuple) -> None:
        kind = classify(data)
        if kind == "esp":
            self.on_esp(data, addr)
        elif kind == "ike" and self.on_ike is not None:
            self.on_ike(data[4:], addr)
        else:
            self.ignored += 1

    def sendto(self, data: bytes, addr: tuple) -> None:
        s = self.socks.get(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
        if s is None:
            raise OSError(errno.EAFNOSUPPORT, f"no socket for {addr[0]}")
        s.sendto(data, addr)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        for s in self.socks.values():
            loop.remove_reader(s.fileno())
            s.close()
        self.socks.clear()


class RawEsp:
    """IP protocol 50 sockets (RFC 4303 without encapsulation). IPv4 raw sockets deliver the IP
    header, IPv6 ones do not; `on_esp(esp, (src, 0))` gets the ESP packet alone. `mark` keeps our
    own packets out of the routes that lead into the TUN device."""

    def __init__(self, on_esp: EspHandler, mark: int, batch: int = 64):
        self.on_esp, self.mark, self.batch = on_esp, mark, batch
        self.socks: dict[int, socket.socket] = {}

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        for fam in (socket.AF_INET, socket.AF_INET6):
            s = open_socket(fam, socket.SOCK_RAW, socket.IPPROTO_ESP)
            if s is None:
                continue
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.setblocking(False)
            self.socks[fam] = s
            handler = self._strip_v4 if fam == socket.AF_INET else self.on_esp
            loop.add_reader(s.fileno(), _batch_reader(s, handler, self.batch))

    def _strip_v4(self, data: bytes, addr: tuple) -> None:
        if len(data) >= 20 and data[0] >> 4 == 4:
            self.on_esp(data[(data[0] & 15) * 4:], addr)

    def sendto(self, data: bytes, addr: tuple) -> None:
        s = self.socks.get(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
        if s is None:
            raise OSError(errno.EAFNOSUPPORT, f"no raw ESP socket for {addr[0]}")
        s.sendto(data, (addr[0], 0))

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        for s in self.socks.values():
            loop.remove_reader(s.fileno())
            s.close()
        self.socks.clear()
