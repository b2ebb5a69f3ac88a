"""Minimal capture reading for `oe-agent decrypt`: pcap and pcapng files, link layers
Ethernet (with 802.1Q tags), Linux cooked v1/v2, raw IP and BSD loopback, then IPv4/IPv6.

Malformed files raise CaptureError with one line saying where; frames that are not IP, or are
truncated, are skipped (a capture may hold anything)."""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from oe_agent.model import IPAddress


class CaptureError(Exception):
    """The file is not a readable pcap/pcapng capture."""


LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276


@dataclass(frozen=True)
class Frame:
    number: int  # 1-based, as Wireshark counts
    timestamp: float
    linktype: int
    data: bytes


@dataclass(frozen=True)
class IpPacket:
    src: IPAddress
    dst: IPAddress
    proto: int
    payload: bytes
    version: int


# pcap magic numbers as read from the file: little/big endian, microsecond/nanosecond stamps
_PCAP_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d")


def read_frames(f: BinaryIO) -> Iterator[Frame]:
    """Frames of a pcap or pcapng file, by its magic number."""
    head = f.read(4)
    if len(head) < 4:
        raise CaptureError("file too short for a capture")
    if head == b"\x0a\x0d\x0d\x0a":
        yield from _pcapng(f, head)
    elif head in _PCAP_MAGICS:
        yield from _pcap(f, head)
    else:
        raise CaptureError("not a pcap or pcapng file (unknown magic number)")


def _pcap(f: BinaryIO, magic: bytes) -> Iterator[Frame]:
    end = "<" if magic[0] in (0xD4, 0x4D) else ">"
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    rest = f.read(20)
    if len(rest) < 20:
        raise CaptureError("truncated pcap file header")
    linktype = struct.unpack(end + "I", rest[16:20])[0] & 0x0FFFFFFF
    n = 0
    while True:
        rec = f.read(16)
        if not rec:
            return
        if len(rec) < 16:
            raise CaptureError(f"truncated record header after frame {n}")
        sec, frac, incl, _ = struct.unpack(end + "IIII", rec)
        if incl > 0x4000000:
            raise CaptureError(f"frame {n + 1}: implausible length {incl}")
        data = f.read(incl)
        if len(data) < incl:
            raise CaptureError(f"frame {n + 1} truncated")
        n += 1
        yield Frame(n, sec + frac / (1e9 if nano else 1e6), linktype, data)


def _pcapng(f: BinaryIO, head: bytes) -> Iterator[Frame]:
    end, links, n, first = "<", [], 0, True
    while True:
        hdr = head if first else f.read(8)
        if first:
            hdr += f.read(4)
        if not hdr:
            return
        if len(hdr) < 8:
            raise CaptureError("truncated pcapng block header")
        btype = struct.unpack("<I", hdr[:4])[0]
        if btype == 0x0A0D0D0A:  # section header: byte order from its magic
            bom = f.read(4)
            if bom == b"\x4d\x3c\x2b\x1a":
                end = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                end = ">"
            else:
                raise CaptureError("bad pcapng byte-order magic")
            blen = struct.unpack(end + "I", hdr[4:8])[0]
            body = bom + f.read(blen - 12) if blen >= 12 else b""
            links = []
        else:
            btype, blen = struct.unpack(end + "II", hdr)
            if blen < 12 or blen > 0x4000000:
                raise CaptureError(f"pcapng block of length {blen}")
            body = f.read(blen - 8)
        first = False
        if len(body) < blen - 8:
            raise CaptureError("truncated pcapng block")
        body = body[:blen - 12]
        if btype == 1:  # interface description
            if len(body) < 8:
                raise CaptureError("short pcapng interface block")
            links.append(struct.unpack(end + "H", body[:2])[0])
        elif btype == 6:  # enhanced packet
            if len(body) < 20:
                raise CaptureError("short pcapng packet block")
            iface, hi, lo, cap, _ = struct.unpack(end + "IIIII", body[:20])
            if iface >= len(links):
                raise CaptureError(f"packet on undeclared interface {iface}")
            n += 1
            yield Frame(n, ((hi << 32) | lo) / 1e6, links[iface], body[20:20 + cap])
        elif btype == 3:  # simple packet
            if not links:
                raise CaptureError("simple packet block before any interface")
            n += 1
            yield Frame(n, 0.0, links[0], body[4:])


def ip_of(frame: Frame) -> IpPacket | None:
    """The IP packet carried by a frame, or None if it is not IPv4/IPv6."""
    d, lt = frame.data, frame.linktype
    if lt == LINKTYPE_ETHERNET:
        off, etype = 14, int.from_bytes(d[12:14], "big")
        while etype in (0x8100, 0x88A8) and len(d) >= off + 4:
            etype, off = int.from_bytes(d[off + 2:off + 4], "big"), off + 4
        if etype not in (0x0800, 0x86DD):
            return None
        d = d[off:]
    elif lt == LINKTYPE_LINUX_SLL:
        if int.from_bytes(d[14:16], "big") not in (0x0800, 0x86DD):
            return None
        d = d[16:]
    elif lt == LINKTYPE_LINUX_SLL2:
        if int.from_bytes(d[0:2], "big") not in (0x0800, 0x86DD):
            return None
        d = d[20:]
    elif lt == LINKTYPE_NULL:
        d = d[4:]
    elif lt not in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return None
    return parse_ip(d)


_IPV6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options


def parse_ip(d: bytes) -> IpPacket | None:
    """IPv4 or IPv6 header -> addresses, upper protocol and payload; None if malformed or a
    non-first fragment."""
    if not d:
        return None
    version = d[0] >> 4
    if version == 4:
        ihl = (d[0] & 15) * 4
        if ihl < 20 or len(d) < ihl:
            return None
        total = int.from_bytes(d[2:4], "big")
        if int.from_bytes(d[6:8], "big") & 0x1FFF:
            return None
        end = total if ihl <= total <= len(d) else len(d)
        return IpPacket(ipaddress.IPv4Address(d[12:16]), ipaddress.IPv4Address(d[16:20]), d[9],
                        d[ihl:end], 4)
    if version == 6:
        if len(d) < 40:
            return None
        nh, off = d[6], 40
        end = min(len(d), 40 + int.from_bytes(d[4:6], "big"))
        while nh in _IPV6_EXT or nh == 44:
            if len(d) < off + 8:
                return None
            if nh == 44:
                if int.from_bytes(d[off + 2:off + 4], "big") & 0xFFF8:
                    return None
                nh, off = d[off], off + 8
            else:
                nh, off = d[off], off + 8 + d[off + 1] * 8
        return IpPacket(ipaddress.IPv6Address(d[8:24]), ipaddress.IPv6Address(d[24:40]), nh,
                        d[off:end], 6)
    return None
