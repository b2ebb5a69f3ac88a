"""Agents with the KERNEL dataplane in namespaces inside the QEMU guest (real ESP), keyed by
the reverse zones that knot signs (tests/interop/dnsfix.py's Knot), each agent asking its own
validating unbound on its loopback (dnsfix's Unbound, stubbing the zones to knot) and validating
the answers again from knot's DS (issue 5 acceptance 1: "with knot + unbound").

Built for the guest's cost model (python start ~1 s, CPU work 16-20x slower): agents, knotd
and the unbounds are the only processes; echo servers, probes and the wire sniffer are sockets
and threads of the test process itself (opened inside each namespace by setns), and the control
API is called in-process. The wire is read on the bridge side of every veth (AF_PACKET), so
each frame carries the host that sent it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import json
import os
import re
import selectors
import signal
import socket
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.hosts import Host, HostFactory
from tests.vm.wire import ETH_P_ALL, Frames, in_netns

DNS_V4, DNS_V6 = "192.0.2.53", "2001:db8::53"
ECHO_PORT = 7
GROUPS = ("clear", "clear-or-private", "private-or-clear", "private", "block")
INITIATES = {"private-or-clear", "private"}
ANSWERS = {"clear-or-private", "private-or-clear", "private"}
# IKE retransmits 1+2+4+8+16 s: the loaded guest (16-20x slower, all pairs at once) answers
# IKE_AUTH only after fetching and validating the peer's key; 0.5 s x 3 gave up before that.
# The hold shunt may last 120 s: with 25 pairs at once a negotiation took over the default 30 s,
# and private-or-clear then fell to its pass shunt and sent clear while the SA was coming up.
BASE_CONFIG = ("[ike]\nretransmit_timeout = 1.0\nretransmit_tries = 5\n"
               "[shunts.lifetimes]\nnegotiation = 120\n")


def oe(*argv: str) -> list[str]:
    return [sys.executable, "-m", "oe_agent", *argv]


def poll(pred, what: str, bound: float = 30.0, step: float = 0.2):
    """Bounded poll: the predicate's first truthy value, or AssertionError naming `what`."""
    deadline = time.monotonic() + bound
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {bound:g} s waiting for {what}")
        time.sleep(step)


def expected(g_src: str, k_src: bool, g_dst: str, k_dst: bool) -> str:
    """Outcome from both sides' groups (product.md §2): an SA needs an initiator facing an
    answerer and keys on both sides; otherwise `private` on either side drops, block drops."""
    if "block" in (g_src, g_dst):
        return "blocked"
    keys = k_src and k_dst
    if keys and ((g_src in INITIATES and g_dst in ANSWERS) or (g_dst in INITIATES and g_src in ANSWERS)):
        return "encrypted"
    if "private" in (g_src, g_dst):
        return "blocked"
    return "clear"


@dataclass
class Agent:
    """One agent host: its namespace, group and whether its key is in the zone."""

    host: Host
    group: str
    published: bool
    proc: object = None
    extra: str = ""
    v4s: list[str] = field(default_factory=list)   # every address it speaks from
    v6s: list[str] = field(default_factory=list)
    resolver: str = DNS_V4  # what its config names: 127.0.0.1 once its own unbound runs

    @property
    def name(self) -> str:
        return self.host.name

    sockdir: Path | None = None

    @property
    def sock(self) -> Path:
        """Control socket: in the guest's own /tmp, since a 9p share (vmrun --rw) cannot hold
        a unix socket (ENXIO)."""
        return (self.sockdir or self.host.workdir) / f"{self.name}.sock"

    def addr(self, v6: bool = False) -> str:
        return self.host.v6 if v6 else self.host.v4


class Echo:
    """UDP echo on port 7 of every agent address, one thread in the test process. Remembers
    every payload it received (the hold test asks whether the first datagram arrived)."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.received: list[tuple[str, bytes]] = []
        self._stop = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def serve(self, host: Host, addrs: list[str]) -> None:
        for a in addrs:
            with in_netns(host):
                s = socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((a, ECHO_PORT))
            s.setblocking(False)
            with self._lock:
                self.sel.register(s, selectors.EVENT_READ, a)

    def _run(self):
        while not self._stop:
            with self._lock:
                ready = self.sel.select(0.05) if self.sel.get_map() else []
            if not ready:
                time.sleep(0.02)
            for key, _ in ready:
                try:
                    data, peer = key.fileobj.recvfrom(65535)
                    self.received.append((key.data, data))
                    key.fileobj.sendto(data, peer)
                except OSError:
                    pass

    def got(self, payload: bytes) -> bool:
        return any(d == payload for _, d in list(self.received))

    def close(self):
        self._stop = True
        self.thread.join(2)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()


@dataclass
class Probe:
    """What one UDP probe src -> dst:7 saw."""

    src: str
    dst: str
    canary: str
    sent: int = 0
    first: bool = False      # some echo came back
    steady_ok: int = 0       # of `steady` datagrams after the first answer
    steady: int = 0
    refused: int = 0         # sendto() got EPERM: an XFRM block policy (drop shunt, block)
    stalled: int = 0         # sendto() timed out: the socket's buffer full of held datagrams


def probe(src: Agent, src_addr: str, dst_addr: str, canary: str, wait: float = 20.0,
          steady: int = 3) -> Probe:
    """Send `canary:n` every 0.5 s until an echo comes back (bounded by `wait`), then `steady`
    more datagrams `canary:sI`, each waited for."""
    v6 = ":" in dst_addr
    with in_netns(src.host):
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    res = Probe(src_addr, dst_addr, canary, steady=steady)
    try:
        s.bind((src_addr, 0))
        s.settimeout(0.5)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not res.first:
            res.sent += 1
            try:
                s.sendto(f"{canary}:{res.sent - 1}".encode(), (dst_addr, ECHO_PORT))
            except PermissionError:  # the kernel drops it at a block policy: blocked here
                res.refused += 1
                time.sleep(0.5)
                continue
            except socket.timeout:  # held datagrams (a hold queue) still charge the socket
                res.stalled += 1
                continue
            try:
                while True:
                    data, _ = s.recvfrom(65535)
                    if data.startswith(canary.encode()):
                        res.first = True
                        break
            except socket.timeout:
                pass
        if res.first:
            s.settimeout(3.0)
            for i in range(steady):
                want = f"{canary}:s{i}".encode()
                try:
                    s.sendto(want, (dst_addr, ECHO_PORT))
                    while s.recvfrom(65535)[0] != want:
                        pass
                    res.steady_ok += 1
                except socket.timeout:
                    pass
                except PermissionError:
                    res.refused += 1
    finally:
        s.close()
    return res


class Sniffer:
    """Every frame on the bridge side of the agents' veths while active; a drain thread keeps
    the socket buffers empty. `frames(host)` = what that host's veth carried (both ways)."""

    def __init__(self, factory: HostFactory, hosts: list[Host]):
        self.socks = {}
        for h in hosts:
            with in_netns(factory.bridge_ns):
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            s.bind((f"p{h.index}", ETH_P_ALL))
            s.setblocking(False)
            self.socks[h.name] = s
        self.by_host: dict[str, list[bytes]] = {n: [] for n in self.socks}
        self.sel = selectors.DefaultSelector()
        for n, s in self.socks.items():
            self.sel.register(s, selectors.EVENT_READ, n)
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop:
            for key, _ in self.sel.select(0.1):
                while True:
                    try:
                        self.by_host[key.data].append(key.fileobj.recv(65535))
                    except BlockingIOError:
                        break

    def frames(self, host: Host) -> Frames:
        return Frames(list(self.by_host[host.name]))

    def clear(self):
        for v in self.by_host.values():
            v.clear()

    def close(self):
        time.sleep(0.2)
        self._stop = True
        self.thread.join(2)
        for s in self.socks.values():
            s.close()


def frames_from(frames: Frames, src_addr: str) -> Frames:
    """Only the frames whose IP source is src_addr."""
    ip = ipaddress.ip_address(src_addr)
    out = []
    for f in frames.frames:
        et = int.from_bytes(f[12:14], "big")
        if et == 0x0800 and ip.version == 4 and f[26:30] == ip.packed:
            out.append(f)
        elif et == 0x86DD and ip.version == 6 and f[22:38] == ip.packed:
            out.append(f)
    return Frames(out)


def pair_frames(frames: Frames, a: str, b: str) -> Frames:
    """Frames between two addresses (either direction)."""
    pa, pb = ipaddress.ip_address(a).packed, ipaddress.ip_address(b).packed
    out = []
    for f in frames.frames:
        et = int.from_bytes(f[12:14], "big")
        if et == 0x0800:
            s, d = f[26:30], f[30:34]
        elif et == 0x86DD:
            s, d = f[22:38], f[38:54]
        else:
            continue
        if {s, d} == {pa, pb}:
            out.append(f)
    return Frames(out)


IKE_PORTS = (500, 4500)
IKE_EXCHANGES = {34: "IKE_SA_INIT", 35: "IKE_AUTH", 36: "CREATE_CHILD_SA", 37: "INFORMATIONAL"}


@dataclass(frozen=True)
class IkeMessage:
    """The clear header of one IKE message on the wire (RFC 7296 §3.1)."""

    src: str
    dst: str
    spi_i: bytes
    spi_r: bytes
    exchange: str
    response: bool


def ike_messages(frames: Frames) -> list[IkeMessage]:
    """IKE messages among the frames: UDP 500, or 4500 behind the non-ESP marker (RFC 3948
    §2.2); IPv4 and IPv6."""
    out = []
    for f in frames.frames:
        ip = Frames.parse(f)
        if ip is None or ip[1] != 17 or len(ip[2]) < 8 + 28:
            continue
        version, _, udp = ip
        ports = (int.from_bytes(udp[0:2], "big"), int.from_bytes(udp[2:4], "big"))
        if 500 in ports:
            ike = udp[8:]
        elif 4500 in ports and udp[8:12] == bytes(4) and len(udp) >= 12 + 28:
            ike = udp[12:]
        else:
            continue
        if version == 4:
            src, dst = ipaddress.ip_address(f[26:30]), ipaddress.ip_address(f[30:34])
        else:
            src, dst = ipaddress.ip_address(f[22:38]), ipaddress.ip_address(f[38:54])
        out.append(IkeMessage(str(src), str(dst), ike[0:8], ike[8:16],
                              IKE_EXCHANGES.get(ike[18], str(ike[18])), bool(ike[19] & 0x20)))
    return out


@dataclass
class XfrmSa:
    src: str
    dst: str
    proto: str
    spi: int
    mode: str


def xfrm_states(host: Host) -> list[XfrmSa]:
    """`ip xfrm state` of a host, parsed (the kernel's truth about its SAs)."""
    out = host.run("ip", "xfrm", "state").stdout
    sas = []
    for m in re.finditer(r"^src (\S+) dst (\S+)\n\s+proto (\S+) spi 0x([0-9a-f]+) reqid \d+ mode (\S+)",
                         out, re.M):
        sas.append(XfrmSa(m[1], m[2], m[3], int(m[4], 16), m[5]))
    return sas


@dataclass
class OeLab:
    """N agent hosts plus one DNS host on one bridge. `add` hosts, then `start()`."""

    factory: HostFactory
    extra_config: str = ""
    agents: list[Agent] = field(default_factory=list)
    dns: Host | None = None
    knot: object = None
    unbounds: list = field(default_factory=list)
    anchors: Path | None = None
    echo: Echo | None = None
    keys: dict = field(default_factory=dict)
    unpublished: set = field(default_factory=set)  # addresses left out of the zone
    sockdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="oe-ctl-")))
    up_bound: float = 300.0  # start(): bound for each agent to answer (all start at once)

    def add(self, group: str | dict, published: bool = True, extra: str = "",
            v4s: list[str] = (), v6s: list[str] = (), hostkey: bool = True) -> Agent:
        """An agent host whose policy groups cover 192.0.2.0/24 and 2001:db8::/64 with `group`
        (or a {group: lines} dict); v4s/v6s: its addresses (the first ones are its veth's).
        hostkey=False: no key file at all (anonymous OE: the agent speaks AUTH_NULL only)."""
        from oe_agent.dns.tools import generate_key, write_private_key

        h = self.factory.add(*(v4s[:1] or [None]), *(v6s[:1] or [None]))
        for a in [*v4s[1:], *v6s[1:]]:
            plen = "128" if ":" in a else "32"
            h.run("ip", "addr", "add", f"{a}/{plen}", "dev", "eth0", *(["nodad"] if ":" in a else []))
        key = generate_key("ed25519")
        if hostkey:
            write_private_key(h.workdir / "hostkey.pem", key)
        self.keys[h.name] = key
        ag = Agent(h, group if isinstance(group, str) else "mixed", published, extra=extra,
                   v4s=list(v4s) or [h.v4], v6s=list(v6s) or [h.v6], sockdir=self.sockdir)
        self.set_groups(ag, group if isinstance(group, dict)
                        else {group: "192.0.2.0/24\n2001:db8::/64\n"})
        self.agents.append(ag)
        return ag

    def set_groups(self, ag: Agent, groups: dict[str, str]) -> None:
        pol = ag.host.workdir / "policies"
        pol.mkdir(exist_ok=True)
        for g in GROUPS:
            (pol / g).write_text("# oe-agent vm test\n" + groups.get(g, ""))

    def _zones(self) -> dict:
        """origin -> dns.zone.Zone: the reverse zones with every published agent address's
        IPSECKEY, and oe.example (the NS name), all unsigned: knot signs them (dnsfix's
        AUTO_SIGNED; the ip6.arpa zone with NSEC3)."""
        import dns.name
        import dns.zone

        from oe_agent.dns.tools import ipseckey_lines
        from tests.interop.dnsfix import AUTO_SIGNED, TOP

        records = []
        for ag in self.agents:
            addrs = [a for a in ag.v4s + ag.v6s if a not in self.unpublished]
            if ag.published and addrs:
                records += [ln for ln in ipseckey_lines(self.keys[ag.name], addrs)
                            if not ln.startswith(";")]
        zones = {}
        for origin in AUTO_SIGNED:
            lines = ["$TTL 300",
                     "@ SOA ns.oe.example. hostmaster.oe.example. 1 3600 600 86400 300",
                     "@ NS ns.oe.example."]
            if origin == TOP:
                lines += [f"ns A {DNS_V4}", f"ns AAAA {DNS_V6}"]
            lines += [r for r in records if r.split()[0].endswith("." + origin)]
            o = dns.name.from_text(origin)
            zones[o] = dns.zone.from_text("\n".join(lines) + "\n", origin=o, relativize=False)
        return zones

    def _dns_in_clear(self, ag: Agent) -> None:
        """Its unbound reaches knot in clear: knot's addresses go to the `clear` group unless
        a group file names them already (a /24 private group would trap the lookups)."""
        pol = ag.host.workdir / "policies"
        named = " ".join((pol / g).read_text() for g in GROUPS)
        with open(pol / "clear", "a") as f:
            for a in (f"{DNS_V4}/32", f"{DNS_V6}/128"):
                if a not in named:
                    f.write(a + "\n")

    def config(self, ag: Agent) -> Path:
        h = ag.host
        cfg = h.workdir / "oe-agent.toml"
        addrs = ", ".join(f'"{a}"' for a in ag.v4s + ag.v6s)
        body = (f'[agent]\naddresses = [{addrs}]\npolicies = "{h.workdir / "policies"}"\n'
                f'socket = "{ag.sock}"\ndataplane = "kernel"\nlog_level = "debug"\n'
                f'[identity]\nkey = "{h.workdir / "hostkey.pem"}"\n'
                f'[dns]\nresolvers = ["{ag.resolver}"]\ntrust_anchors = "{self.anchors}"\n'
                f'dnssec = "validate"\ntimeout = 5.0\n')
        cfg.write_text(merge_toml(body, BASE_CONFIG, self.extra_config, ag.extra))
        return cfg

    def start(self) -> None:
        """knotd (signs the zones; its DS are the trust anchors), a validating unbound on each
        agent's loopback, then every agent (in parallel), then echo servers."""
        import types

        from tests.interop.dnsfix import AUTO_SIGNED, Knot, Unbound

        self.dns = self.factory.add(v4=DNS_V4, v6=DNS_V6)
        self.anchors = self.factory.workdir / "anchors"
        self.knot = Knot(self.dns, types.SimpleNamespace(zones=self._zones())).start()
        self.anchors.write_text(self.knot.anchors_text())
        for ag in self.agents:
            self._dns_in_clear(ag)
            self.unbounds.append(Unbound(ag.host, self.knot.anchors_text(),
                                         {z: DNS_V4 for z in AUTO_SIGNED}).start())
            ag.resolver = "127.0.0.1"
        for ag in self.agents:
            self.launch(ag)
        for ag in self.agents:
            self.wait_up(ag, self.up_bound)
        self.echo = Echo()
        for ag in self.agents:
            self.echo.serve(ag.host, ag.v4s + ag.v6s)

    def launch(self, ag: Agent) -> None:
        ag.proc = ag.host.popen(*oe("run", "-c", str(self.config(ag))), log="agent.log")

    def wait_up(self, ag: Agent, bound: float = 300) -> None:
        def up():
            if ag.proc.poll() is not None:
                return True
            try:
                return self.api(ag, "/status")["uptime"] >= 0
            except Exception:
                return False
        poll(up, f"agent {ag.name} to answer on its control socket", bound, 0.5)
        assert ag.proc.poll() is None, f"agent {ag.name} exited:\n{self.log(ag)[-3000:]}"

    def stop(self, ag: Agent, sig: int = signal.SIGTERM) -> int | None:
        ag.host.stop(ag.proc, sig, wait=60)
        return ag.proc.returncode

    def restart(self, ag: Agent) -> None:
        self.stop(ag)
        self.launch(ag)
        self.wait_up(ag)

    def log(self, ag: Agent) -> str:
        p = ag.host.workdir / "agent.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def api(self, ag: Agent, path: str, method: str = "GET", body: dict | None = None):
        """The control API, in-process (oe_agent.control.client.call)."""
        from oe_agent.control.client import call

        return call(argparse.Namespace(socket=str(ag.sock), timeout=20.0), method, path, body)

    def cli(self, ag: Agent, *argv: str) -> tuple[int, str, str]:
        """`oe-agent ARGV --socket SOCK` run in-process: (exit status, stdout, stderr)."""
        from oe_agent.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([*argv, "--socket", str(ag.sock)])
            except SystemExit as e:  # argparse
                rc = e.code if isinstance(e.code, int) else 2
        return rc, out.getvalue(), err.getvalue()

    def explain(self, ag: Agent, addr: str) -> dict:
        return self.api(ag, f"/peers/{addr}")

    def why(self, ag: Agent, addr: str) -> str:
        """Everything useful about one peer, for assertion messages."""
        try:
            ex = json.dumps(self.explain(ag, addr), indent=1)
        except Exception as e:  # the agent may be the broken part
            ex = f"(explain failed: {e})"
        # datagram traces (liveness every few seconds) would push the story out of the tail
        log = [ln for ln in self.log(ag).splitlines()
               if addr in ln and not re.search(r"IKE \d+ bytes (to|from) ", ln)][-25:]
        return (f"--- {ag.name} explain {addr}:\n{ex}\n--- its log lines about {addr}:\n"
                + "\n".join(log) + f"\n--- its kernel policies naming {addr}:\n"
                + self.kernel_policies(ag, addr))

    def kernel_policies(self, ag: Agent, addr: str) -> str:
        """`ip xfrm policy` blocks of the agent's host whose selector names addr."""
        try:
            out = ag.host.run("ip", "xfrm", "policy").stdout
        except Exception as e:
            return f"(ip xfrm policy failed: {e})"
        blocks = re.split(r"\n(?=src )", out)
        return "\n".join(b for b in blocks if addr in b.split("\n", 1)[0]) or "(none)"

    def close(self) -> None:
        if self.echo:
            self.echo.close()
        for ag in self.agents:
            if ag.proc is not None and ag.proc.poll() is None:
                self.stop(ag)
        for u in self.unbounds:
            u.stop()
        if self.knot is not None:
            self.knot.stop()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def keep_logs(self) -> None:
        """$OE_VM_LOGS set (a vmrun --rw dir): copy the lab's logs, configs and zones there."""
        dest = os.environ.get("OE_VM_LOGS")
        if not dest:
            return
        shutil.copytree(self.factory.workdir, Path(dest) / self.factory.workdir.name,
                        dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if not (
                            os.path.isdir(os.path.join(d, n)) or os.path.isfile(os.path.join(d, n)))
                            or n.endswith(".db") or n == "libexec-add"])


def merge_toml(*parts: str) -> str:
    """Concatenate TOML fragments, merging repeated [tables] (TOML allows each once); a key
    given again in a later fragment overrides."""
    tables: dict[str, dict[str, str]] = {}
    order: list[str] = []
    current = ""
    for part in parts:
        for line in part.splitlines():
            m = re.match(r"^\s*\[([^\]]+)\]\s*$", line)
            if m:
                current = m[1].strip()
                continue
            if not line.strip():
                continue
            if current not in tables:
                tables[current] = {}
                order.append(current)
            tables[current][line.split("=")[0].strip()] = line  # a later fragment wins
    out = []
    for t in order:
        if t:
            out.append(f"[{t}]")
        out += tables[t].values()
    return "\n".join(out) + "\n"


# --- the tier's one shared lab -----------------------------------------------------------------
# Three agents and a DNS host, built once per session (each python start costs tens of seconds
# of guest CPU). Peers are keyed by remote address, so every pair of addresses below meets only
# once: one address pair per case, on both sides.
#
#   A  matrix addresses MA[g1, g2] (192.0.2.100-124, 2001:db8::1:0-24), plus L1 .11, L2 .12
#   B  matrix addresses MB[g1, g2] (192.0.2.150-174, 2001:db8::2:0-24)
#   C  C1 .31, C2 .32 (keys published), C3 .33, C4 .34 (no key published)
#
# A's group for MB[g1, g2] is g1, B's group for MA[g1, g2] is g2: MA -> MB probes the ordered
# pair (sender's group g1, receiver's group g2), all 25 at once, each between fresh peers.
# A's groups for C: C1, C2, C3 private-or-clear, C4 private. C's: L1 clear-or-private (so
# L1 -> C1 is poc -> cop, the hold case), L2 private-or-clear (both trap: mutual initiation).
# C has short Child SA lifetimes (rekey), A and C short liveness (a killed C is detected).

PAIRS = [(g1, g2) for g1 in GROUPS for g2 in GROUPS]
MA4 = {p: f"192.0.2.{100 + k}" for k, p in enumerate(PAIRS)}
MB4 = {p: f"192.0.2.{150 + k}" for k, p in enumerate(PAIRS)}
MA6 = {p: f"2001:db8::1:{k:x}" for k, p in enumerate(PAIRS)}
MB6 = {p: f"2001:db8::2:{k:x}" for k, p in enumerate(PAIRS)}
L1, L2 = "192.0.2.11", "192.0.2.12"
C1, C2, C3, C4 = "192.0.2.31", "192.0.2.32", "192.0.2.33", "192.0.2.34"
A_EXTRA = "[ike]\nliveness = 5\n"
C_EXTRA = "[ike]\nchild_lifetime = 40\nrekey_margin = 25\nliveness = 5\n"


def _lines(groups: dict[str, list[str]]) -> dict[str, str]:
    return {g: "".join(f"{a}/{128 if ':' in a else 32}\n" for a in addrs)
            for g, addrs in groups.items()}


@dataclass
class SharedLab:
    lab: OeLab
    a: Agent
    b: Agent
    c: Agent


_SHARED: SharedLab | None = None


def shared_lab(request, tmp_path_factory) -> SharedLab:
    """The session's lab (built on first use, torn down when the session ends)."""
    global _SHARED
    if _SHARED is not None:
        return _SHARED
    factory = HostFactory(tmp_path_factory.mktemp("oe-lab"))
    lab = OeLab(factory)
    request.config.add_cleanup(factory.close)
    request.config.add_cleanup(lab.keep_logs)
    request.config.add_cleanup(lab.close)
    a_groups = {g: [] for g in GROUPS}
    b_groups = {g: [] for g in GROUPS}
    for (g1, g2) in PAIRS:
        a_groups[g1] += [MB4[g1, g2], MB6[g1, g2]]
        b_groups[g2] += [MA4[g1, g2], MA6[g1, g2]]
    a_groups["private-or-clear"] += [C1, C2, C3]
    a_groups["private"] += [C4]
    a = lab.add(_lines(a_groups), extra=A_EXTRA, v4s=[L1, L2, *MA4.values()], v6s=list(MA6.values()))
    b = lab.add(_lines(b_groups), v4s=list(MB4.values()), v6s=list(MB6.values()))
    c = lab.add(_lines({"clear-or-private": [L1], "private-or-clear": [L2]}), extra=C_EXTRA,
                v4s=[C1, C2, C3, C4], v6s=["2001:db8::31"])
    lab.unpublished |= {C3, C4}
    lab.start()
    _SHARED = SharedLab(lab, a, b, c)
    return _SHARED
