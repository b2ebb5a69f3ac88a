"""Truth on the wire for the vm tier: captures, canaries, UDP and ICMP between test hosts.

Sockets are opened inside a host's namespace from the test process itself (setns through
pyroute2.netns): a python start costs ~1 s in the guest, a socket costs nothing.
"""
from __future__ import annotations

import re
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import netns as _netns

from tests.hosts import Host, HostFactory, sh

CANARY = b"oe-canary-7f3a9c"  # plaintext that must never appear on the wire when ESP is on
CANARY_HEX = CANARY.hex()  # ping -p pattern (16 bytes max)
SOL_UDP = 17
UDP_ENCAP = 100
UDP_ENCAP_ESPINUDP = 2
NAT_T_PORT = 4500


@contextmanager
def in_netns(host: Host | str):
    """Run the body in the host's (or the named) network namespace; sockets made here stay
    there."""
    _netns.pushns(host if isinstance(host, str) else host.name)
    try:
        yield
    finally:
        _netns.popns()


def family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def udp_socket(host: Host, addr: str, port: int = 0) -> socket.socket:
    with in_netns(host):
        s = socket.socket(family(addr), socket.SOCK_DGRAM)
    s.bind((addr, port))
    return s


def encap_socket(host: Host, addr: str) -> socket.socket:
    """The UDP 4500 socket on which the kernel decapsulates ESP-in-UDP (RFC 3948). Like an
    IKE daemon's NAT-T socket it bypasses the policies (the project's socket_bypass): with a
    host-pair policy the outer UDP packet itself would otherwise fail the inbound check."""
    from oe_agent.trap.dataplane import socket_bypass

    s = udp_socket(host, addr, NAT_T_PORT)
    s.setsockopt(SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
    socket_bypass(s)
    return s


def udp_exchange(src: Host, src_addr: str, dst: Host, dst_addr: str,
                 payload: bytes = CANARY, port: int = 5000, bound: float = 10.0) -> bytes:
    """Send payload src -> dst over UDP until it arrives (bounded); returns what arrived."""
    rx = udp_socket(dst, dst_addr, port)
    tx = udp_socket(src, src_addr)
    try:
        rx.settimeout(0.5)
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            tx.sendto(payload, (dst_addr, port))
            try:
                data, peer = rx.recvfrom(2048)
            except socket.timeout:
                continue
            assert peer[0] == src_addr
            return data
        raise AssertionError(f"UDP {src_addr} -> {dst_addr}:{port} did not arrive in {bound} s")
    finally:
        rx.close()
        tx.close()


def ping(src: Host, dst_addr: str, count: int = 2) -> None:
    """ICMP echo with the canary as payload pattern; fails unless replies come back."""
    r = src.run("ping", "-n", "-c", str(count), "-i", "0.2", "-W", "3", "-p", CANARY_HEX,
                dst_addr, check=False, timeout=30)
    assert r.returncode == 0, f"ping {dst_addr} from {src.name} failed:\n{r.stdout}{r.stderr}"


@dataclass
class Wire:
    """A finished capture on a host's veth."""

    pcap: Path

    def text(self) -> str:
        return sh("tcpdump", "-nn", "-r", str(self.pcap), check=False).stdout

    def esp_spis(self) -> set[int]:
        """SPIs of ESP packets seen (plain and UDP-encapsulated)."""
        return {int(m, 16) for m in re.findall(r"ESP\(spi=0x([0-9a-f]+)", self.text())}

    def udp_encap(self) -> bool:
        return "UDP-encap" in self.text()

    def has_plaintext(self, canary: bytes = CANARY) -> bool:
        return canary in self.pcap.read_bytes()


@contextmanager
def capture(hosts: HostFactory, host: Host, name: str = "wire"):
    """Capture everything on the host's veth for the body's duration; yields a Wire."""
    proc, path = hosts.capture(host, "ip or ip6", name=name)
    wire = Wire(path)
    try:
        yield wire
    finally:
        time.sleep(0.2)  # let the last packets reach the pcap (tcpdump -U flushes per packet)
        host.stop(proc)


def xfrm_packets(host: Host) -> dict[int, int]:
    """SPI -> packets counted by the kernel (`ip -s xfrm state`), for the smoke test; the
    project's own tests read counters through the project's API."""
    out = sh("ip", "-n", host.name, "-s", "xfrm", "state").stdout
    counted = {}
    for block in re.split(r"\n(?=src )", out):
        spi = re.search(r"spi (0x[0-9a-f]+)", block)
        m = re.search(r"lifetime current:\s*\n\s*\d+\(bytes\), (\d+)\(packets\)", block)
        if spi and m:
            counted[int(spi.group(1), 16)] = int(m.group(1))
    return counted


def kernel_has_esp() -> bool:
    subprocess.run(["modprobe", "-a", "esp4", "esp6"], capture_output=True)
    return Path("/sys/module/esp4").is_dir() and Path("/sys/module/esp6").is_dir()


ETH_P_ALL = 0x0003
ESP_PROTO, UDP_PROTO = 50, 17


@dataclass
class Frames:
    """What a raw AF_PACKET socket saw on a veth, both directions (RFC 4303, RFC 3948)."""

    frames: list[bytes]

    @staticmethod
    def parse(f: bytes) -> tuple[int, int, bytes] | None:
        """(IP version, IP protocol, IP payload) of an Ethernet frame; None if not IP."""
        ethertype = int.from_bytes(f[12:14], "big")
        if ethertype == 0x0800:
            return 4, f[14 + 9], f[14 + (f[14] & 0x0F) * 4:]
        if ethertype == 0x86DD:
            return 6, f[14 + 6], f[14 + 40:]
        return None

    def esp(self) -> list[tuple[str, int]]:
        """(kind, spi) per ESP packet: kind 'esp' (IP proto 50) or 'udp' (ESP-in-UDP 4500)."""
        out = []
        for f in self.frames:
            ip = self.parse(f)
            if ip is None:
                continue
            _, proto, payload = ip
            if proto == ESP_PROTO and len(payload) >= 8:
                out.append(("esp", int.from_bytes(payload[:4], "big")))
            elif (proto == UDP_PROTO and len(payload) >= 16
                  and NAT_T_PORT in (int.from_bytes(payload[0:2], "big"),
                                     int.from_bytes(payload[2:4], "big"))):
                spi = int.from_bytes(payload[8:12], "big")
                if spi:  # zero = non-ESP marker (IKE on 4500)
                    out.append(("udp", spi))
        return out

    def plaintext(self, canary: bytes = CANARY) -> list[str]:
        """The frames that carry the canary in clear, described (empty = none)."""
        out = []
        for f in self.frames:
            if canary in f:
                ip = self.parse(f)
                what = f"IPv{ip[0]} proto {ip[1]}" if ip else f"ethertype {f[12:14].hex()}"
                out.append(f"{what}: {f[:80].hex()}")
        return out

    def has_plaintext(self, canary: bytes = CANARY) -> bool:
        return bool(self.plaintext(canary))


@contextmanager
def sniff(hosts: HostFactory, host: Host):
    """A raw socket on the bridge side of the host's veth for the body's duration; yields
    Frames, filled at exit. The bridge side is the wire: inside the host, a tunnel-mode packet
    is seen again after decapsulation (it re-enters through eth0)."""
    with in_netns(hosts.bridge_ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    frames = Frames([])
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        s.bind((f"p{host.index}", ETH_P_ALL))
        s.setblocking(False)
        yield frames
        time.sleep(0.1)
        while True:
            try:
                frames.frames.append(s.recv(65535))
            except BlockingIOError:
                break
    finally:
        s.close()


def flush_xfrm(*hosts: Host) -> None:
    """Remove every SA and policy in the test hosts (between tests on shared hosts)."""
    for h in hosts:
        sh("ip", "-n", h.name, "-batch", "-", input="xfrm state flush\nxfrm policy flush\n")
