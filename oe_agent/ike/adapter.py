"""asyncio UDP adapter around IkeEndpoint (aioquic's asyncio/protocol.py shape).

One UDP socket per (address, port) for the IKE port (500) and the NAT-T port (4500). It feeds
datagrams in (stripping the non-ESP marker on 4500, RFC 3948 §2.2), drains datagrams out
(adding it back), re-arms one timer at the endpoint's next deadline, and hands each event to
`on_event(sa, event)`. ESP-in-UDP packets arriving on 4500 go to `on_esp` (the userspace
dataplane), and `send_esp` sends one. The clock is the event loop's (monotonic) time.

The sockets are non-blocking and read with `loop.add_reader`: one wake-up takes every queued
datagram (up to READ_BATCH) and flushes once after them, rather than one event-loop turn and
one flush per datagram (a busy responder receives several datagrams per turn).
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from functools import lru_cache
from typing import Callable

from oe_agent.ike.events import IkeEvent
from oe_agent.ike.message import classify_udp4500
from oe_agent.ike.sa import IkeConfig, IkeEndpoint, IkeSa

UDP_ENCAP = 100  # linux/udp.h
UDP_ENCAP_ESPINUDP = 2
READ_BATCH = 64  # datagrams taken per socket wake-up before the loop runs other work


@lru_cache(maxsize=4096)
def _text(addr) -> str:
    """str(address) for sendto, once per distinct address (ipaddress's __str__ is Python)."""
    return str(addr)


@lru_cache(maxsize=4096)
def _from_text(text: str):
    """recvfrom's address text -> ipaddress object, once per distinct peer (scope dropped)."""
    return ipaddress.ip_address(text.split("%")[0])


class IkeAdapter:
    """Runs an IkeEndpoint on real UDP sockets bound to `addresses`.

    `responder_config(local, remote) -> IkeConfig | None` decides whether a new IKE_SA_INIT
    is answered (None = dropped). `udp_encap=True` asks the kernel to take ESP-in-UDP on the
    4500 sockets itself (kernel XFRM dataplane); IKE still arrives here.
    """

    def __init__(self, addresses, responder_config: Callable[..., IkeConfig | None],
                 on_event: Callable[[IkeSa, IkeEvent], None], *, rng=None,
                 ike_port: int = 500, natt_port: int = 4500, cookie_threshold: int | None = 10,
                 on_esp: Callable[[bytes, tuple, tuple], None] | None = None,
                 udp_encap: bool = False):
        self.addresses = [ipaddress.ip_address(a) for a in addresses]
        self.endpoint = IkeEndpoint(rng or os.urandom, responder_config, cookie_threshold)
        self.on_event = on_event
        self.on_esp = on_esp
        self.ike_port, self.natt_port = ike_port, natt_port
        self.udp_encap = udp_encap
        self.errors: list[str] = []
        self._sockets: dict[tuple, socket.socket] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None  # the deadline _timer is armed for
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for addr in self.addresses:
            for port in (self.ike_port, self.natt_port):
                family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if port == self.natt_port and self.udp_encap:
                        sock.setsockopt(socket.IPPROTO_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
                    sock.bind((str(addr), port))
                    sock.setblocking(False)
                except OSError:
                    sock.close()
                    self.close()
                    raise
                self._sockets[(addr, port)] = sock
                self._loop.add_reader(sock.fileno(), self._readable, sock, (addr, port))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        for sock in self._sockets.values():
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()

    async def __aenter__(self) -> "IkeAdapter":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    # --- driving -----------------------------------------------------------------------
    def now(self) -> float:
        return (self._loop or asyncio.get_event_loop()).time()

    def connect(self, config: IkeConfig, local, remote, remote_port: int | None = None) -> IkeSa:
        sa = self.endpoint.connect(config, local, remote, self.now(), remote_port)
        self.flush()
        return sa

    def act(self, fn: Callable[[float], None]) -> None:
        """Run an IkeSa call with the current time, then send what it produced, e.g.
        `adapter.act(lambda now: sa.rekey_child(spi, now))`."""
        fn(self.now())
        self.flush()

    def send_esp(self, packet: bytes, local: tuple, remote: tuple) -> None:
        """One ESP-in-UDP packet (RFC 3948) from our NAT-T socket at local=(addr, port)."""
        sock = self._sockets.get((ipaddress.ip_address(local[0]), local[1]))
        if sock is not None:
            self._sendto(sock, packet, (str(remote[0]), remote[1]))

    def _sendto(self, sock: socket.socket, data: bytes, addr: tuple) -> None:
        try:
            sock.sendto(data, addr)
        except OSError as e:  # ICMP unreachable reported late, a full buffer, ...
            self.errors.append(f"{addr[0]}:{addr[1]}: {e.strerror or e}")

    def _readable(self, sock: socket.socket, local: tuple) -> None:
        """Take every queued datagram (at most READ_BATCH), then flush once."""
        natt = local[1] == self.natt_port and self.natt_port != self.ike_port
        now = self.now()
        endpoint = self.endpoint
        for _ in range(READ_BATCH):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.errors.append(f"{local[0]}:{local[1]}: {e.strerror or e}")
                continue  # an ICMP error was queued on the socket; datagrams may follow
            remote = (_from_text(addr[0]), addr[1])
            if natt:
                kind, body = classify_udp4500(data)
                if kind == "esp":
                    if self.on_esp is not None:
                        self.on_esp(body, local, remote)
                    continue
                if kind != "ike":
                    continue  # a NAT keepalive or junk
                data = body
            endpoint.receive_datagram(data, local, remote, now)
        self.flush()

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.endpoint.handle_timer(self.now())
        self.flush()

    def flush(self) -> None:
        """Send what the endpoint produced, deliver its events, re-arm the one timer (only
        when its deadline moved: most datagrams leave it where it was)."""
        now = self.now()
        for d in self.endpoint.datagrams_to_send(now):
            sock = self._sockets.get((d.local, d.local_port))
            if sock is None:
                self.errors.append(f"no socket for {d.local}:{d.local_port}")
                continue
            self._sendto(sock, d.wire(), (_text(d.remote), d.remote_port))
        while (item := self.endpoint.next_event()) is not None:
            self.on_event(*item)
        when = self.endpoint.get_timer()
        if when == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        if when is not None and self._loop is not None:
            self._timer = self._loop.call_at(max(when, now), self._on_timer)
            self._timer_at = when
