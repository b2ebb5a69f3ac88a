"""What crossed the wire: a small reader for tcpdump's pcap files (Ethernet, IPv4/IPv6, UDP).

Tests prove encryption by a capture (testing.md, "Truth on the wire"): ESP-in-UDP packets
present, the plaintext canary absent.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UdpPacket:
    src: str
    dst: str
    sport: int
    dport: int
    payload: bytes

    @property
    def is_esp_in_udp(self) -> bool:
        """RFC 3948 §2.2: on 4500 a non-zero first word is an ESP SPI; zero is the non-ESP
        marker of IKE (RFC 7296 §2.23); a single 0xff byte is a NAT keepalive."""
        return 4500 in (self.sport, self.dport) and len(self.payload) >= 8 \
            and self.payload[:4] != b"\0\0\0\0"

    @property
    def is_ike(self) -> bool:
        if self.sport == 500 or self.dport == 500:
            return True
        return 4500 in (self.sport, self.dport) and self.payload[:4] == b"\0\0\0\0" \
            and len(self.payload) > 4


def _ip(b: bytes) -> str:
    import ipaddress
    return str(ipaddress.ip_address(b))


def read_pcap(path: Path) -> list[UdpPacket]:
    """UDP packets of a classic pcap file (link type Ethernet); everything else is skipped."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a classic pcap file")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    if linktype != 1:
        raise ValueError(f"{path}: link type {linktype}, expected Ethernet")
    out: list[UdpPacket] = []
    pos = 24
    while pos + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[pos + 8:pos + 12])[0]
        frame = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        if len(frame) < 14:
            continue
        ethertype = struct.unpack("!H", frame[12:14])[0]
        ip = frame[14:]
        if ethertype == 0x0800 and len(ip) >= 20:
            ihl = (ip[0] & 0xF) * 4
            if ip[9] != 17:
                continue
            src, dst, l4 = _ip(ip[12:16]), _ip(ip[16:20]), ip[ihl:]
        elif ethertype == 0x86DD and len(ip) >= 40:
            if ip[6] != 17:  # no extension headers on our test links
                continue
            src, dst, l4 = _ip(ip[8:24]), _ip(ip[24:40]), ip[40:]
        else:
            continue
        if len(l4) < 8:
            continue
        sport, dport = struct.unpack("!HH", l4[:4])
        out.append(UdpPacket(src, dst, sport, dport, l4[8:]))
    return out


def canary_seen(path: Path, canary: bytes) -> bool:
    """The plaintext marker anywhere in the capture (headers included: it must not appear)."""
    return canary in path.read_bytes()


class Partition:
    """nftables in one test host that drops its IKE/ESP traffic (UDP 500 and 4500) both ways,
    with counters, so a test can make two requests cross: both sides send while the link is
    cut, then it heals and their retransmissions meet (RFC 7296 §2.8.1 collisions)."""

    TABLE = "oe_partition"

    def __init__(self, host):
        self.host = host

    def cut(self) -> None:
        self.host.run("nft", "-f", "-", input=(
            f"table inet {self.TABLE} {{\n"
            " chain in { type filter hook input priority -10; policy accept;\n"
            "  udp dport { 500, 4500 } counter drop\n }\n"
            " chain out { type filter hook output priority -10; policy accept;\n"
            "  udp dport { 500, 4500 } counter drop\n }\n}\n"))

    def requests_only(self) -> None:
        """Let IKE requests through but drop IKE responses (R flag, RFC 7296 §3.1) on 4500,
        so two crossed requests both arrive while both are still unanswered."""
        self.heal()
        # UDP payload on 4500: non-ESP marker (4 zero bytes), then the IKE header, whose flags
        # are its byte 19: bits (8 + 4 + 19) * 8 = 248 of the transport header
        match = "udp dport 4500 @th,64,32 0 @th,250,1 1"
        self.host.run("nft", "-f", "-", input=(
            f"table inet {self.TABLE} {{\n"
            f" chain in {{ type filter hook input priority -10; policy accept;\n"
            f"  {match} counter drop\n }}\n"
            f" chain out {{ type filter hook output priority -10; policy accept;\n"
            f"  {match} counter drop\n }}\n}}\n"))

    def dropped(self) -> tuple[int, int]:
        """(packets dropped coming in, going out)."""
        import json
        out = self.host.run("nft", "-j", "list", "table", "inet", self.TABLE).stdout
        counts = {}
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if rule:
                for expr in rule["expr"]:
                    if "counter" in expr:
                        counts[rule["chain"]] = expr["counter"]["packets"]
        return counts.get("in", 0), counts.get("out", 0)

    def wait_dropped(self, inbound: int, outbound: int, timeout: float = 10.0) -> None:
        import time
        deadline = time.monotonic() + timeout
        while True:
            got = self.dropped()
            if got[0] >= inbound and got[1] >= outbound:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"partition: dropped {got}, waiting for ({inbound}, {outbound})")
            time.sleep(0.05)

    def heal(self) -> None:
        self.host.run("nft", "delete", "table", "inet", self.TABLE, check=False)
