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
def in_netns(host: Host):
    """Run the body in the host's network namespace (sockets made here stay there)."""
    _netns.pushns(host.name)
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
    """The UDP 4500 socket the kernel needs to decapsulate ESP-in-UDP (RFC 3948) on receive."""
    s = udp_socket(host, addr, NAT_T_PORT)
    s.setsockopt(SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
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


def xfrm_packets(host: Host, spi: int) -> int:
    """Packets counted by the kernel on the SA with this SPI (ip -s xfrm state), for the smoke
    test; the project's own tests read counters through the project's API."""
    out = host.run("ip", "-s", "xfrm", "state").stdout
    blocks = re.split(r"\n(?=src )", out)
    for b in blocks:
        if re.search(rf"spi 0x{spi:08x}\b", b):
            m = re.search(r"lifetime current:\s*\n\s*\d+\(bytes\), (\d+)\(packets\)", b)
            assert m, b
            return int(m.group(1))
    raise AssertionError(f"no SA with spi 0x{spi:08x} in {host.name}:\n{out}")


def kernel_has_esp() -> bool:
    subprocess.run(["modprobe", "-a", "esp4", "esp6"], capture_output=True)
    return Path("/sys/module/esp4").is_dir() and Path("/sys/module/esp6").is_dir()
