"""Async NETLINK_XFRM sockets: one for requests (ack/error by sequence number, dumps), one for
the kernel's multicast events (ACQUIRE, EXPIRE, POLEXPIRE).

Both act on the network namespace the process is in when they are opened, and nothing else.
The event socket is pull-based: it reads from the kernel only when the consumer asks, so the
kernel's socket buffer is the only queue; when it overflows, the kernel reports ENOBUFS and the
reader yields `EventsLost` so the owner can resync by dump (netlink(7)).
"""
from __future__ import annotations

import asyncio
import errno as errno_mod
import itertools
import os
import socket
import struct
from dataclasses import dataclass, field

from pyroute2.netlink import nlmsg

from oe_agent.trap import xfrm

_RCVBUF = 1 << 20


class XfrmError(OSError):
    """The kernel refused a request: errno, plus its extended-ack message when it gave one."""

    def __init__(self, err: int, request: str, ext_ack: str = ""):
        self.ext_ack = ext_ack
        text = f"{request}: {os.strerror(err)}" + (f" ({ext_ack})" if ext_ack else "")
        super().__init__(err, text)

    def __str__(self) -> str:
        return self.strerror


@dataclass(frozen=True)
class EventsLost:
    """The kernel dropped multicast messages (ENOBUFS): state must be re-read by dump."""


_MSG_NAMES = {v: k for k, v in vars(xfrm).items() if k.startswith("XFRM_MSG_")}


def _open(groups: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                      | socket.SOCK_CLOEXEC, xfrm.NETLINK_XFRM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        for opt in (xfrm.NETLINK_EXT_ACK, xfrm.NETLINK_CAP_ACK):
            try:
                s.setsockopt(xfrm.SOL_NETLINK, opt, 1)
            except OSError:  # old kernels: plain errno without the message
                pass
        s.bind((0, groups))
    except BaseException:
        s.close()
        raise
    return s


def parse_error(data: bytes, offset: int, length: int) -> tuple[int, str]:
    """NLMSG_ERROR payload -> (errno >= 0, extended-ack message or "")."""
    (err,) = struct.unpack_from("i", data, offset + 16)
    (flags,) = struct.unpack_from("H", data, offset + 6)
    msg = ""
    if flags & xfrm.NLM_F_ACK_TLVS:
        (orig_len,) = struct.unpack_from("I", data, offset + 20)
        pos = offset + 20 + (16 if flags & xfrm.NLM_F_CAPPED else (orig_len + 3) & ~3)
        end = offset + length
        while pos + 4 <= end:
            alen, atype = struct.unpack_from("HH", data, pos)
            if alen < 4:
                break
            if atype & 0x3FFF == xfrm.NLMSGERR_ATTR_MSG:
                msg = bytes(data[pos + 4:pos + alen]).split(b"\0")[0].decode(errors="replace")
            pos += (alen + 3) & ~3
    return -err, msg


def split(data: bytes):
    """Yield (type, flags, seq, offset, length) for each netlink message in one datagram."""
    off = 0
    while off + 16 <= len(data):
        length, mtype, flags, seq, _pid = struct.unpack_from("IHHII", data, off)
        if length < 16 or off + length > len(data):
            break
        yield mtype, flags, seq, off, length
        off += (length + 3) & ~3


@dataclass
class _Pending:
    name: str
    dump: bool
    future: asyncio.Future
    replies: list = field(default_factory=list)


class XfrmSocket:
    """Request/response over NETLINK_XFRM.

    `request()` sends with NLM_F_ACK and returns the messages the kernel answered before the
    ack (ALLOCSPI's NEWSA, GETSA's state...); `dump()` returns every message of a dump. A
    refusal raises XfrmError carrying errno and the kernel's ext_ack text.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = itertools.count(int.from_bytes(os.urandom(2), "big") + 1)
        self._pending: dict[int, _Pending] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    async def open(cls) -> "XfrmSocket":
        self = cls()
        self._sock = _open()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)
        return self

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(ConnectionError("XFRM socket closed"))
        self._pending.clear()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()

    async def request(self, msg: nlmsg, msg_type: int, flags: int = 0,
                      timeout: float = 10.0) -> list[nlmsg]:
        return await self._send(msg, msg_type, xfrm.NLM_F_REQUEST | xfrm.NLM_F_ACK | flags,
                                dump=False, timeout=timeout)

    async def dump(self, msg: nlmsg, msg_type: int, timeout: float = 30.0) -> list[nlmsg]:
        return await self._send(msg, msg_type, xfrm.NLM_F_REQUEST | xfrm.NLM_F_DUMP,
                                dump=True, timeout=timeout)

    async def _send(self, msg, msg_type, flags, dump, timeout) -> list[nlmsg]:
        if self._sock is None:
            raise ConnectionError("XFRM socket is not open")
        seq = next(self._seq) & 0xFFFFFFFF
        name = _MSG_NAMES.get(msg_type, str(msg_type))
        wire = xfrm.encode(msg, msg_type, flags, seq)
        fut = self._loop.create_future()
        self._pending[seq] = _Pending(name, dump, fut)
        try:
            self._sock.sendto(wire, (0, 0))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(seq, None)

    def _readable(self) -> None:
        while self._sock is not None:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as e:  # ENOBUFS on a unicast socket: answers were lost
                for p in list(self._pending.values()):
                    if not p.future.done():
                        p.future.set_exception(XfrmError(e.errno or errno_mod.EIO, p.name))
                return
            self._dispatch(data)

    def _dispatch(self, data: bytes) -> None:
        for mtype, flags, seq, off, length in split(data):
            p = self._pending.get(seq)
            if p is None or p.future.done():
                continue
            if mtype == xfrm.NLMSG_ERROR:
                err, ext = parse_error(data, off, length)
                if err:
                    p.future.set_exception(XfrmError(err, p.name, ext))
                else:
                    p.future.set_result(p.replies)
            elif mtype == xfrm.NLMSG_DONE:
                (err,) = struct.unpack_from("i", data, off + 16) if length >= 20 else (0,)
                if err:
                    p.future.set_exception(XfrmError(-err, p.name))
                else:
                    p.future.set_result(p.replies)
            else:
                m = xfrm.decode(data, off)
                if m is not None:
                    p.replies.append(m)


class XfrmEventSocket:
    """The kernel's XFRM multicast: ACQUIRE (group 1) and EXPIRE/POLEXPIRE (group 2).
    One consumer at a time calls next()."""

    GROUPS = (xfrm.XFRMNLGRP_ACQUIRE, xfrm.XFRMNLGRP_EXPIRE)

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._backlog: list[nlmsg] = []
        self._waiter: asyncio.Future | None = None

    @classmethod
    async def open(cls, groups=GROUPS) -> "XfrmEventSocket":
        self = cls()
        mask = 0
        for g in groups:
            mask |= 1 << (g - 1)
        self._sock = _open(mask)
        return self

    def close(self) -> None:
        """Close; a consumer waiting in next() gets ConnectionError instead of hanging."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.get_loop().remove_reader(self._sock.fileno())
            self._waiter.set_exception(ConnectionError("XFRM event socket closed"))
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()

    async def next(self) -> nlmsg | EventsLost:
        """The next ACQUIRE/EXPIRE/POLEXPIRE message, or EventsLost after an overflow."""
        loop = asyncio.get_running_loop()
        while not self._backlog:
            if self._sock is None:
                raise ConnectionError("XFRM event socket closed")
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                ready = self._waiter = loop.create_future()
                fd = self._sock.fileno()
                loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
                try:
                    await ready
                finally:
                    self._waiter = None
                    if self._sock is not None:
                        loop.remove_reader(fd)
                continue
            except OSError as e:
                if e.errno == errno_mod.ENOBUFS:
                    return EventsLost()
                raise
            for mtype, _flags, _seq, off, _length in split(data):
                if mtype in (xfrm.XFRM_MSG_ACQUIRE, xfrm.XFRM_MSG_EXPIRE,
                             xfrm.XFRM_MSG_POLEXPIRE):
                    m = xfrm.decode(data, off)
                    if m is not None:
                        self._backlog.append(m)
        return self._backlog.pop(0)
