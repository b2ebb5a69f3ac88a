"""IPv4/IPv6 header parsing and building for the userspace ESP dataplane.

Only what ESP needs: find the addresses, protocol and ports of a packet read from the TUN device,
strip the IP header for transport mode (RFC 4303 §3.1.1), rebuild one on the way in, and answer
"too big" with ICMP (RFC 792 type 3 code 4 with the next-hop MTU of RFC 1191; RFC 4443 §3.2).
"""
from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

from oe_agent.model import IPAddress

PROTO_ICMP = 1
PROTO_IPIP = 4
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_IPV6 = 41
PROTO_ESP = 50
PROTO_ICMPV6 = 58
PROTO_NONE = 59  # RFC 4303 §2.6: dummy packet (traffic flow confidentiality)
_V6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options: (len + 1) * 8 bytes
_V6_FRAG = 44
_PORTED = {PROTO_TCP, PROTO_UDP, 132, 136}  # TCP, UDP, SCTP, UDP-Lite: ports first


class PacketError(ValueError):
    """Not an IP packet this dataplane can handle (truncated, wrong version, bad length)."""


class IpInfo(NamedTuple):
    """Where a packet goes: enough to pick an SA, a shunt or a policy."""

    version: int
    src_b: bytes  # packed addresses: cheap to compare and to use as keys on the fast path
    dst_b: bytes
    proto: int  # upper-layer protocol after IPv6 extension headers
    sport: int
    dport: int
    header_len: int  # bytes up to the upper-layer header
    fragment: bool  # a fragment (not a whole datagram)
    df: bool  # IPv4 Don't Fragment; always True for IPv6 (routers never fragment)

    @property
    def src(self) -> IPAddress:
        return ipaddress.ip_address(self.src_b)

    @property
    def dst(self) -> IPAddress:
        return ipaddress.ip_address(self.dst_b)


def parse(pkt: bytes) -> IpInfo:
    """Parse the IP header of `pkt` (RFC 791 / RFC 8200); PacketError if it is not one."""
    if not pkt:
        raise PacketError("empty packet")
    version = pkt[0] >> 4
    if version == 4:
        if len(pkt) < 20:
            raise PacketError("truncated IPv4 header")
        ihl = (pkt[0] & 15) * 4
        total = (pkt[2] << 8) | pkt[3]
        if ihl < 20 or total < ihl or len(pkt) < total:
            raise PacketError("bad IPv4 header or total length")
        frag = (pkt[6] << 8) | pkt[7]
        fragment = bool(frag & 0x3FFF)
        proto = pkt[9]
        src, dst = pkt[12:16], pkt[16:20]
        sport = dport = 0
        if proto in _PORTED and not (frag & 0x1FFF) and total >= ihl + 4:
            sport, dport = struct.unpack_from("!HH", pkt, ihl)
        elif proto == PROTO_ICMP and total >= ihl + 2:
            sport, dport = pkt[ihl], pkt[ihl + 1]  # type/code, as XFRM selectors use them
        return IpInfo(4, src, dst, proto, sport, dport, ihl, fragment, bool(frag & 0x4000))
    if version == 6:
        if len(pkt) < 40:
            raise PacketError("truncated IPv6 header")
        plen = (pkt[4] << 8) | pkt[5]
        if len(pkt) < 40 + plen:
            raise PacketError("bad IPv6 payload length")
        end = 40 + plen
        nh, off, fragment, first = pkt[6], 40, False, True
        while nh in _V6_EXT or nh == _V6_FRAG:
            if off + 8 > end:
                raise PacketError("truncated IPv6 extension header")
            if nh == _V6_FRAG:
                fragment = True
                first = not (struct.unpack_from("!H", pkt, off + 2)[0] & 0xFFF8)
                nh, off = pkt[off], off + 8
            else:
                nh, off = pkt[off], off + (pkt[off + 1] + 1) * 8
        src, dst = pkt[8:24], pkt[24:40]
        sport = dport = 0
        if first and nh in _PORTED and end >= off + 4:
            sport, dport = struct.unpack_from("!HH", pkt, off)
        elif first and nh == PROTO_ICMPV6 and end >= off + 2:
            sport, dport = pkt[off], pkt[off + 1]
        return IpInfo(6, src, dst, nh, sport, dport, off, fragment, True)
    raise PacketError(f"IP version {version}")


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`. 2^16 = 1 (mod 0xFFFF), so the one's
    complement sum of the 16-bit words is the number `data` mod 0xFFFF (0 read as 0xFFFF
    unless every word is zero): one big-integer operation instead of a loop."""
    if len(data) & 1:
        data += b"\0"
    n = int.from_bytes(data, "big")
    s = n % 0xFFFF
    if s == 0 and n:
        s = 0xFFFF
    return ~s & 0xFFFF


def fix_l4_checksum(src: IPAddress, dst: IPAddress, proto: int, segment: bytes) -> bytes:
    """`segment` (TCP or UDP) with its checksum recomputed for the pseudo-header src/dst
    (RFC 3948 §3.1.2: after NAT the sender's checksum covers addresses we never see). An IPv4
    UDP checksum of 0 (none) stays 0; other protocols are returned unchanged."""
    if proto == PROTO_TCP and len(segment) >= 20:
        off = 16
    elif proto == PROTO_UDP and len(segment) >= 8:
        off = 6
        if src.version == 4 and segment[6:8] == b"\0\0":
            return segment
    else:
        return segment
    if src.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!xBH", proto, len(segment))
    else:
        pseudo = _pseudo_v6(src, dst, len(segment), proto)
    zeroed = segment[:off] + b"\0\0" + segment[off + 2:]
    ck = checksum(pseudo + zeroed)
    if ck == 0 and proto == PROTO_UDP:
        ck = 0xFFFF  # RFC 768: a computed 0 is sent as all ones
    return segment[:off] + struct.pack("!H", ck) + segment[off + 2:]


def build_ipv4(src: IPAddress, dst: IPAddress, proto: int, payload: bytes, ttl: int = 64,
               ident: int = 0, df: bool = True, tos: int = 0) -> bytes:
    """An IPv4 header (no options) with a correct total length and header checksum + payload."""
    total = 20 + len(payload)
    if total > 0xFFFF:
        raise PacketError("IPv4 datagram longer than 65535 bytes")
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, tos, total, ident & 0xFFFF, 0x4000 if df else 0,
                      ttl, proto, 0, src.packed, dst.packed)
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def build_ipv6(src: IPAddress, dst: IPAddress, nh: int, payload: bytes, hop_limit: int = 64,
               tclass: int = 0) -> bytes:
    if len(payload) > 0xFFFF:
        raise PacketError("IPv6 payload longer than 65535 bytes (no jumbograms)")
    return struct.pack("!IHBB16s16s", (6 << 28) | (tclass << 20), len(payload), nh, hop_limit,
                       src.packed, dst.packed) + payload


def build_ip(src: IPAddress, dst: IPAddress, proto: int, payload: bytes) -> bytes:
    if src.version != dst.version:
        raise PacketError(f"address families differ: {src} -> {dst}")
    if src.version == 4:
        return build_ipv4(src, dst, proto, payload)
    return build_ipv6(src, dst, proto, payload)


def strip_ip(pkt: bytes, info: IpInfo) -> tuple[int, bytes]:
    """Transport mode (RFC 4303 §3.1.1): the upper-layer protocol and everything after the IP
    header (IPv6 extension headers before the upper layer stay outside ESP's view: they are
    dropped, as this host never sends them for its own traffic)."""
    if info.version == 4:
        total = (pkt[2] << 8) | pkt[3]
        return info.proto, pkt[info.header_len:total]
    end = 40 + ((pkt[4] << 8) | pkt[5])
    return info.proto, pkt[info.header_len:end]


def _pseudo_v6(src: IPAddress, dst: IPAddress, length: int, nh: int) -> bytes:
    return src.packed + dst.packed + struct.pack("!IxxxB", length, nh)


def too_big(pkt: bytes, info: IpInfo, mtu: int, reporter: IPAddress) -> bytes:
    """The ICMP error telling the sender of `pkt` that at most `mtu` bytes fit (PMTU, RFC 1191 /
    RFC 8201), from `reporter`, as much of the offending packet quoted as the RFCs allow."""
    if info.version == 4:
        quote = pkt[:info.header_len + 8]
        body = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quote
        body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
        return build_ipv4(reporter, info.src, PROTO_ICMP, body, df=False)
    quote = pkt[:1280 - 40 - 8]  # RFC 4443 §2.4(c): the error fits in the minimum MTU
    body = struct.pack("!BBHI", 2, 0, 0, mtu) + quote
    ck = checksum(_pseudo_v6(reporter, info.src, len(body), PROTO_ICMPV6) + body)
    body = body[:2] + struct.pack("!H", ck) + body[4:]
    return build_ipv6(reporter, info.src, PROTO_ICMPV6, body, hop_limit=255)


class Reassembler:
    """Rebuilds whole datagrams from IPv4/IPv6 fragments (RFC 791 §3.2, RFC 8200 §4.5), for
    transport mode, which protects whole datagrams only (RFC 4303 §3.1.1): the host fragments
    what exceeds oe0's MTU, ESP is applied to the reassembled datagram and the outer packet is
    fragmented instead. Bounded: at most `max_datagrams` in progress, each for `timeout` s."""

    def __init__(self, max_datagrams: int = 64, timeout: float = 30.0):
        self.max_datagrams, self.timeout = max_datagrams, timeout
        self._parts: dict[tuple, tuple[float, dict[int, bytes], list]] = {}
        self.dropped = 0

    def add(self, pkt: bytes, info: IpInfo, now: float) -> bytes | None:
        """The whole datagram once its last missing fragment arrives, else None."""
        if info.version == 4:
            frag = (pkt[6] << 8) | pkt[7]
            offset, more = (frag & 0x1FFF) * 8, bool(frag & 0x2000)
            key = (info.src_b, info.dst_b, pkt[4:6], info.proto)
            data = pkt[info.header_len:(pkt[2] << 8) | pkt[3]]
        else:
            fh = info.header_len - 8  # this reader puts the fragment header last
            if pkt[6] != 44 or fh != 40:
                self.dropped += 1  # extension headers around the fragment header: not ours
                return None
            fo = (pkt[fh + 2] << 8) | pkt[fh + 3]
            offset, more = fo & 0xFFF8, bool(fo & 1)
            key = (info.src_b, info.dst_b, pkt[fh + 4:fh + 8], info.proto)
            data = pkt[info.header_len:40 + ((pkt[4] << 8) | pkt[5])]
        for k in [k for k, v in self._parts.items() if now - v[0] > self.timeout]:
            del self._parts[k]
            self.dropped += 1
        entry = self._parts.get(key)
        if entry is None:
            if len(self._parts) >= self.max_datagrams:
                self.dropped += 1
                return None
            entry = self._parts[key] = (now, {}, [None])
        _, parts, total = entry
        parts[offset] = data
        if not more:
            total[0] = offset + len(data)
        if total[0] is None or total[0] > 0xFFFF - 40:
            return None
        pos, chunks = 0, []
        while pos < total[0]:
            chunk = parts.get(pos)
            if not chunk:
                return None
            chunks.append(chunk)
            pos += len(chunk)
        del self._parts[key]
        payload = b"".join(chunks)[:total[0]]
        if info.version == 4:
            return build_ipv4(info.src, info.dst, info.proto, payload, ttl=pkt[8],
                              ident=(pkt[4] << 8) | pkt[5], df=False)
        return build_ipv6(info.src, info.dst, info.proto, payload, hop_limit=pkt[7])
