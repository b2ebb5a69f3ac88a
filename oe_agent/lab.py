"""Lab hosts: network namespaces joined by a bridge namespace, on documentation prefixes.

Used by the test tiers, `oe-agent mesh` and the benchmarks.

Each run gets its own name prefix, so parallel and crashed runs never collide. Everything is
created inside namespaces; the host namespace is only read (its XFRM dumps, for comparison).
Processes started through a Host are killed by PID when the factory closes.
"""
from __future__ import annotations

import ipaddress
import itertools
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

_run_ids = itertools.count()


def sh(*cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout, **kw)


def xfrm_snapshot() -> tuple[str, str]:
    """The host namespace's XFRM state and policies, to prove a test left them alone."""
    if os.geteuid() != 0:
        return ("", "")
    state = sh("ip", "xfrm", "state", "list", check=False).stdout
    policy = sh("ip", "xfrm", "policy", "list", check=False).stdout
    return (state, policy)


@dataclass
class Host:
    """One network namespace with an address on the test LAN."""

    name: str
    index: int
    v4: str
    v6: str
    ifname: str
    workdir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def ns(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 30, **kw):
        return sh(*self.ns(*cmd), check=check, timeout=timeout, **kw)

    def popen(self, *cmd: str, log: str | None = None, **kw) -> subprocess.Popen:
        """Start a process in this namespace; its own group, so cleanup kills its children too."""
        out = open(self.workdir / (log or f"{Path(cmd[0]).name}.{len(self.procs)}.log"), "wb")
        p = subprocess.Popen(self.ns(*cmd), stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 5.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


class HostFactory:
    """Creates hosts on one bridge (in its own namespace), 192.0.2.0/24 and 2001:db8::/64."""

    def __init__(self, workdir: Path, prefix: str | None = None):
        self.workdir = workdir
        self.prefix = prefix or f"oe{os.getpid() % 100000}x{next(_run_ids)}"
        self.hosts: list[Host] = []
        self.extra_ns: list[str] = []
        self._bridge_ns: str | None = None

    @property
    def bridge_ns(self) -> str:
        if self._bridge_ns is None:
            name = f"{self.prefix}-br"
            sh("ip", "netns", "add", name)
            self._bridge_ns = name
            sh("ip", "-n", name, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", name, "link", "set", "br0", "up")
        return self._bridge_ns

    def add(self, v4: str | None = None, v6: str | None = None) -> Host:
        """A host at 192.0.2.<n>/24 and 2001:db8::<n>/64 (n = 1, 2, ... unless given)."""
        n = len(self.hosts) + 1
        v4 = v4 or f"192.0.2.{n}"
        v6 = v6 or f"2001:db8::{n:x}"
        for a in (v4, v6):
            ip = ipaddress.ip_address(a)
            assert any(ip in ipaddress.ip_network(p) for p in (
                "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")), a
        name = f"{self.prefix}-h{n}"
        sh("ip", "netns", "add", name)
        wd = self.workdir / f"h{n}"
        wd.mkdir(parents=True, exist_ok=True)
        host = Host(name=name, index=n, v4=v4, v6=v6, ifname="eth0", workdir=wd)
        self.hosts.append(host)
        br = self.bridge_ns
        peer = f"p{n}"
        sh("ip", "-n", br, "link", "add", peer, "type", "veth", "peer", "name", "eth0",
           "netns", name)
        sh("ip", "-n", br, "link", "set", peer, "master", "br0", "up")
        host.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
        host.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        host.run("sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0")
        host.run("ip", "link", "set", "lo", "up")
        host.run("ip", "addr", "add", f"{v4}/24", "dev", "eth0")
        host.run("ip", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
        host.run("ip", "link", "set", "eth0", "up")
        return host

    def pair(self) -> tuple[Host, Host]:
        return self.add(), self.add()

    def capture(self, host: Host, filt: str, name: str = "cap") -> tuple[subprocess.Popen, Path]:
        """tcpdump on the host's veth into a pcap file (immediate mode, so nothing is lost)."""
        path = host.workdir / f"{name}.pcap"
        p = host.popen("tcpdump", "--immediate-mode", "-U", "-n", "-i", "eth0", "-w", str(path),
                       filt, log=f"{name}.tcpdump.log")
        deadline = time.monotonic() + 5
        log = host.workdir / f"{name}.tcpdump.log"
        while time.monotonic() < deadline and b"listening" not in log.read_bytes():
            time.sleep(0.05)
        return p, path

    def close(self) -> None:
        for h in self.hosts:
            for p in reversed(h.procs):
                h.stop(p)
        for h in self.hosts:
            sh("ip", "-n", h.name, "xfrm", "state", "flush", check=False)
            sh("ip", "-n", h.name, "xfrm", "policy", "flush", check=False)
            sh("ip", "netns", "del", h.name, check=False)
        for name in self.extra_ns + ([self._bridge_ns] if self._bridge_ns else []):
            sh("ip", "netns", "del", name, check=False)
        self.hosts.clear()
