"""`oe-agent mesh`: the demo. N hosts in namespaces, a signed zone, agents, every pair tried.

Hosts get keys and policy groups in a fixed rotation (one `private`, one `clear`, one without a
published key, the rest `private-or-clear`), an embedded authoritative server in its own
namespace serves the signed reverse zones, and each agent validates from the zone's DS. Every
ordered pair exchanges UDP probes carrying a canary; one capture on the bridge is the proof:
ESP present and the canary absent (encrypted), the canary present (clear), or no answer
(blocked). The expected outcome follows from both sides' groups (product.md §2).
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from oe_agent.errors import UserError

ECHO_PORT = 7
MAX_HOSTS = 12  # all N*(N-1) pairs probe at once on 2 cores; beyond this the demo drowns
DNS_V4, DNS_V6 = "192.0.2.53", "2001:db8::53"
INITIATES = {"private-or-clear", "private"}
ANSWERS = {"clear-or-private", "private-or-clear", "private"}
# (group, key published) per host, in rotation; the first four are the spec's mix.
ROTATION = [("private-or-clear", True), ("private", True), ("clear", True),
            ("private-or-clear", False), ("clear-or-private", True), ("block", True)]


@dataclass
class MeshHost:
    index: int
    group: str
    has_key: bool
    v4: str
    v6: str
    lab: object = None  # oe_agent.lab.Host
    agent: object = None  # its Popen
    dir: Path = field(default_factory=Path)

    @property
    def name(self) -> str:
        return f"h{self.index}"

    def addr(self, ipv6: bool) -> str:
        return self.v6 if ipv6 else self.v4


def expected(src: MeshHost, dst: MeshHost) -> str:
    """What both sides' groups give (product.md §2): an SA needs an initiator facing an
    answerer and a published key on both sides; without one, `private` on either side drops."""
    if "block" in (src.group, dst.group):
        return "blocked"
    keys = src.has_key and dst.has_key
    if keys and ((src.group in INITIATES and dst.group in ANSWERS)
                 or (dst.group in INITIATES and src.group in ANSWERS)):
        return "encrypted"
    if "private" in (src.group, dst.group):
        return "blocked"
    return "clear"


# --- the probe programs, run inside the namespaces -------------------------------------------

def _echo_main(addrs: list[str]) -> None:
    """UDP echo on port 7 of each address (one process per host)."""
    socks = []
    for a in addrs:
        fam = socket.AF_INET6 if ":" in a else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((a, ECHO_PORT))
        socks.append(s)
    print("ready", flush=True)
    import selectors
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            data, peer = key.fileobj.recvfrom(65535)
            key.fileobj.sendto(data, peer)


def _probe_main(src: str, dst: str, canary: str, wait: float, steady: int) -> None:
    """Probe until the first echo (setup time), then `steady` more; print one JSON line."""
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.settimeout(0.25)
    t0 = time.monotonic()
    first = None
    n = 0
    while time.monotonic() - t0 < wait and first is None:
        s.sendto(f"{canary}:{n}".encode(), (dst, ECHO_PORT))
        n += 1
        try:
            while True:
                data, _ = s.recvfrom(65535)
                if data.startswith(canary.encode()):
                    first = time.monotonic() - t0
                    break
        except socket.timeout:
            pass
    ok = 0
    s.settimeout(1.0)  # a loaded machine answers late; late is not blocked
    if first is not None:
        for i in range(steady):
            want = f"{canary}:s{i}".encode()
            s.sendto(want, (dst, ECHO_PORT))
            try:  # held replies of earlier probes may come first: read past them
                while s.recvfrom(65535)[0] != want:
                    pass
                ok += 1
            except socket.timeout:
                pass
    print(json.dumps({"setup": first, "sent": n, "steady_ok": ok, "steady": steady}), flush=True)


# --- capture analysis --------------------------------------------------------------------------

def _wire_summary(pcap: Path) -> dict[tuple[str, str], dict]:
    """Per unordered address pair: ESP packets (raw or in UDP 4500), SPIs, canary sightings."""
    from oe_agent.ike.pcap import ip_of, read_frames

    out: dict[tuple[str, str], dict] = {}
    with open(pcap, "rb") as f:
        packets = [p for p in map(ip_of, read_frames(f)) if p is not None]
    for pkt in packets:
        key = tuple(sorted((str(pkt.src), str(pkt.dst))))
        rec = out.setdefault(key, {"esp": 0, "spis": set(), "canaries": [], "first_esp": None})
        payload = pkt.payload
        esp_spi = None
        if pkt.proto == 50 and len(payload) >= 8:
            esp_spi = struct.unpack("!I", payload[:4])[0]
        elif pkt.proto == 17 and len(payload) >= 16:
            sport, dport = struct.unpack("!HH", payload[:4])
            body = payload[8:]
            if 4500 in (sport, dport) and body[:4] != b"\0\0\0\0" and len(body) >= 8:
                esp_spi = struct.unpack("!I", body[:4])[0]
            elif ECHO_PORT in (sport, dport):
                rec["canaries"].append(body.decode(errors="replace"))
        if esp_spi is not None:
            rec["esp"] += 1
            rec["spis"].add(esp_spi)
            if rec["first_esp"] is None:
                rec["first_esp"] = f"{pkt.src} > {pkt.dst} ESP spi 0x{esp_spi:08x}"
    return out


# --- the mesh ----------------------------------------------------------------------------------

class Mesh:
    def __init__(self, n: int, ipv6: bool, workdir: Path, wait: float):
        from oe_agent.lab import HostFactory

        self.n, self.ipv6, self.workdir, self.wait = n, ipv6, workdir, wait
        self.lab = HostFactory(workdir, prefix=f"oemesh{os.getpid() % 10000}")
        self.hosts: list[MeshHost] = []
        self.dns = None
        self.procs: list = []

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def build(self) -> None:
        from oe_agent.dns.tools import generate_key, ipseckey_lines, write_private_key

        self.dns = self.lab.add(v4=DNS_V4, v6=DNS_V6)
        records: list[str] = []
        for i in range(1, self.n + 1):
            group, has_key = ROTATION[(i - 1) % len(ROTATION)]
            h = MeshHost(i, group, has_key, f"192.0.2.{i}", f"2001:db8::{i:x}")
            h.lab = self.lab.add(v4=h.v4, v6=h.v6)
            h.dir = h.lab.workdir
            key = generate_key("ed25519")
            write_private_key(h.dir / "hostkey.pem", key)
            if has_key:
                records += [ln for ln in ipseckey_lines(key, [h.v4, h.v6]) if not ln.startswith(";")]
            pol = h.dir / "policies"
            pol.mkdir()
            for g in ("clear", "clear-or-private", "private-or-clear", "private", "block"):
                nets = ["192.0.2.0/24", "2001:db8::/64"] if g == group else []
                (pol / g).write_text("# oe-agent mesh demo\n" + "".join(f"{c}\n" for c in nets))
            self.hosts.append(h)
        self._write_zones(records)

    def _write_zones(self, records: list[str]) -> None:
        """The demo's zones: the SOA/NS of zones/'s reverse zones, plus this mesh's keys."""
        import dns.name
        import dns.rdatatype
        import dns.zone

        src = Path(__file__).resolve().parent.parent / "zones"
        zdir = self.workdir / "zones"
        zdir.mkdir()
        for origin in ("2.0.192.in-addr.arpa", "8.b.d.0.1.0.0.2.ip6.arpa"):
            path = src / f"{origin}.zone"
            if path.exists():
                z = dns.zone.from_file(str(path), origin=origin, relativize=False)
                soa = z.find_rdataset(z.origin, dns.rdatatype.SOA)
                soa_text = soa[0].to_text()
            else:  # an installed package without the example zones
                soa_text = "ns.oe.example. hostmaster.oe.example. 1 3600 600 86400 300"
            lines = [f"$ORIGIN {origin}.", "$TTL 300", f"@ SOA {soa_text}", "@ NS ns.oe.example."]
            suffix = f".{origin}."
            lines += [r for r in records if r.split()[0].endswith(suffix)]
            (zdir / f"{origin}.zone").write_text("\n".join(lines) + "\n")

    def _oe(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "oe_agent", *args]

    def _wait_file(self, path: Path, what: str, proc, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and path.stat().st_size:
                return
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise UserError(f"{what} did not start within {timeout:g}s (logs in {self.workdir})")

    def start(self) -> None:
        anchors = self.workdir / "anchors"
        dnsp = self.dns.popen(*self._oe("serve-zones", "--zones", str(self.workdir / "zones"),
                                        "--listen", DNS_V4, "--listen", DNS_V6, "--port", "53",
                                        "--anchors-out", str(anchors)), log="dns.log")
        self._wait_file(anchors, "the embedded DNS server", dnsp)
        for h in self.hosts:
            cfg = h.dir / "oe-agent.toml"
            cfg.write_text(
                f'[agent]\naddresses = ["{h.v4}", "{h.v6}"]\npolicies = "{h.dir / "policies"}"\n'
                f'socket = "{h.dir / "ctl.sock"}"\ndataplane = "auto"\n'
                f'[identity]\nkey = "{h.dir / "hostkey.pem"}"\n'
                f'[dns]\nresolvers = ["{DNS_V4}"]\ntrust_anchors = "{anchors}"\n'
                f'dnssec = "validate"\ntimeout = 2.0\n')
            h.agent = h.lab.popen(*self._oe("run", "-c", str(cfg)), log="agent.log")
            h.lab.popen(sys.executable, "-m", "oe_agent.mesh", "--echo", h.v4, h.v6, log="echo.log")
        for h in self.hosts:
            deadline = time.monotonic() + 20
            while not (h.dir / "ctl.sock").exists():
                if h.agent.poll() is not None or time.monotonic() > deadline:
                    tail = (h.dir / "agent.log").read_text(errors="replace").strip().splitlines()
                    raise UserError(f"agent on {h.name} did not start: "
                                    f"{tail[-1] if tail else 'no output'}")
                time.sleep(0.05)

    def dataplane_in_use(self) -> str:
        from oe_agent.control.client import call

        try:
            st = call(argparse.Namespace(socket=str(self.hosts[0].dir / "ctl.sock")), "GET", "/status")
            return str(st.get("dataplane", "unknown"))
        except UserError as e:
            return f"unknown ({e})"

    async def _probe(self, s: MeshHost, d: MeshHost) -> dict:
        canary = f"oe-canary-{s.name}-{d.name}"
        cmd = s.lab.ns(sys.executable, "-m", "oe_agent.mesh", "--probe", s.addr(self.ipv6),
                       d.addr(self.ipv6), canary, str(self.wait))
        p = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(p.communicate(), self.wait + 30)
        res = json.loads(out.decode().strip().splitlines()[-1])
        res["canary"] = canary
        return res

    def run_pairs(self) -> list[dict]:
        pcap = self.workdir / "bridge.pcap"
        cap = self._capture(pcap)
        pairs = [(s, d) for s in self.hosts for d in self.hosts if s is not d]

        async def all_pairs():
            return await asyncio.gather(*(self._probe(s, d) for s, d in pairs))

        results = asyncio.run(all_pairs())
        time.sleep(0.5)
        cap.send_signal(signal.SIGINT)
        cap.wait(10)
        wire = _wire_summary(pcap)
        rows = []
        for (s, d), r in zip(pairs, results):
            key = tuple(sorted((s.addr(self.ipv6), d.addr(self.ipv6))))
            w = wire.get(key, {"esp": 0, "spis": set(), "canaries": [], "first_esp": None})
            steady_clear = any(c.startswith(r["canary"] + ":s") for c in w["canaries"])
            if r["setup"] is None or r["steady_ok"] == 0:
                seen = "blocked"
            elif steady_clear:
                seen = "clear"
            elif w["esp"]:
                seen = "encrypted"
            else:
                seen = "clear"
            leaked = sum(c.startswith(r["canary"]) for c in w["canaries"])
            proof = (f"{w['esp']} ESP pkts, {leaked} plaintext; {w['first_esp']}" if w["esp"]
                     else f"{leaked} plaintext canaries, no ESP")
            rows.append({"pair": f"{s.name}->{d.name}", "groups": f"{s.group} -> {d.group}",
                         "keys": f"{'key' if s.has_key else 'no key'}/{'key' if d.has_key else 'no key'}",
                         "expected": expected(s, d), "outcome": seen,
                         "setup_ms": None if r["setup"] is None else round(r["setup"] * 1000),
                         "proof": proof})
        return rows

    def _capture(self, pcap: Path):
        import subprocess

        br = self.lab.bridge_ns
        p = subprocess.Popen(["ip", "netns", "exec", br, "tcpdump", "--immediate-mode", "-U",
                              "-n", "-i", "br0", "-w", str(pcap), "udp or esp"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
        self.procs.append(p)
        line = p.stderr.readline()
        if b"listening" not in line:
            raise UserError(f"tcpdump on the bridge did not start: {line.decode().strip()}")
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(5)
                except (ProcessLookupError, Exception):
                    pass
        self.lab.close()


def print_table(rows: list[dict], dataplane: str) -> None:
    cols = ["pair", "groups", "keys", "expected", "outcome", "setup_ms", "proof"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print()
    print("  ".join(c.ljust(width[c]) for c in cols))
    print("  ".join("-" * width[c] for c in cols))
    for r in rows:
        mark = "" if r["expected"] == r["outcome"] else "   <-- MISMATCH"
        print("  ".join(str(r[c] if r[c] is not None else "-").ljust(width[c]) for c in cols) + mark)
    ok = sum(r["expected"] == r["outcome"] for r in rows)
    print(f"\n{ok} of {len(rows)} pairs as their groups say; dataplane: {dataplane}")


def check_environment(n: int) -> None:
    """Every refusal happens here, before anything is created."""
    if not 2 <= n <= MAX_HOSTS:
        raise UserError(f"--hosts {n}: between 2 and {MAX_HOSTS} (every pair probes at once "
                        f"on this machine's {os.cpu_count()} cores)")
    if os.geteuid() != 0:
        raise UserError("mesh needs root (it creates network namespaces)")
    for tool in ("ip", "tcpdump"):
        if shutil.which(tool) is None:
            raise UserError(f"mesh needs `{tool}` (run `make test` once, or apt-get install it)")
    if not Path("/dev/net/tun").exists():
        raise UserError("mesh needs /dev/net/tun for the userspace dataplane")


def cmd_mesh(args) -> int:
    check_environment(args.hosts)
    workdir = Path(tempfile.mkdtemp(prefix="oe-mesh."))
    mesh = Mesh(args.hosts, args.ipv6, workdir, args.wait)
    t0 = time.monotonic()

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupted)
    try:
        mesh.say(f"mesh: {args.hosts} hosts in namespaces, work dir {workdir}")
        mesh.build()
        for h in mesh.hosts:
            mesh.say(f"  {h.name} {h.addr(args.ipv6):<16} group {h.group:<17} "
                     f"{'key published' if h.has_key else 'no key published'}")
        mesh.start()
        dp = mesh.dataplane_in_use()
        mesh.say(f"agents up ({time.monotonic() - t0:.1f}s); dataplane: {dp}; probing "
                 f"{args.hosts * (args.hosts - 1)} pairs over IPv{6 if args.ipv6 else 4}")
        rows = mesh.run_pairs()
        print_table(rows, dp)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        if args.keep:
            mesh.say(f"\n--keep: hosts stay up. Try:  ip netns exec {mesh.hosts[0].lab.name} "
                     f"oe-agent status --socket {mesh.hosts[0].dir / 'ctl.sock'}\n"
                     "Press Ctrl-C to tear everything down.")
            signal.pause()
        return 0 if all(r["expected"] == r["outcome"] for r in rows) else 1
    except KeyboardInterrupt:
        mesh.say("\ninterrupted: tearing down")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
        mesh.close()
        mesh.say(f"mesh: cleaned up ({time.monotonic() - t0:.1f}s in all)")


def register(sub) -> None:
    p = sub.add_parser("mesh", help="the demo: hosts in namespaces, OE between every pair")
    p.add_argument("--hosts", type=int, default=4, help=f"2..{MAX_HOSTS} (default 4)")
    p.add_argument("--ipv6", action="store_true", help="probe over 2001:db8::/64")
    p.add_argument("--keep", action="store_true", help="leave it running until Ctrl-C")
    p.add_argument("--wait", type=float, default=10.0, help="seconds a pair may take to answer")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.set_defaults(func=cmd_mesh)


if __name__ == "__main__":  # the probe programs the mesh runs inside its namespaces
    if sys.argv[1] == "--echo":
        _echo_main(sys.argv[2:])
    elif sys.argv[1] == "--probe":
        _probe_main(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), steady=3)
