#!/usr/bin/env python3
"""The measuring half of setup_latency.py: runs INSIDE the QEMU guest (real ESP), started by
`bench/setup_latency.py` through tools/vmrun.py; not meant to be run by hand.

One boot, one knotd, every side at once (namespaces on one bridge, lab = oe_agent.lab):

    192.0.2.53    knotd: 2.0.192.in-addr.arpa, 100.51.198.in-addr.arpa, 113.0.203.in-addr.arpa,
                  signed by knot (ECDSA P-256 CSK, NSEC); DS of each zone = trust anchors
    192.0.2.1     oe-agent initiator (RSA-3072)  -> 198.51.100.1-121 (one oe-agent responder)
    192.0.2.2     pluto initiator (RSA-3072)     -> 203.0.113.1-121  (one pluto responder)
    192.0.2.3     oe-agent initiator (Ed25519)   -> 198.51.100.129-249 (one oe-agent responder)

A responder is one daemon holding all its side's peer addresses (as in the libreswan anchor
bench, shared/interop/vm/libreswan-oe-bench), each address its own IPSECKEY, IKE ID and IKE SA.
Both implementations: transport mode, private-or-clear for the peer range on the initiator and
for the initiator's /32 on the responder, peer keys looked up in DNS by both ends and
validated (DNSSEC) from the same anchors, default IKE/ESP proposals.

"SA installed" is the same for every side: the kernel's XFRM netlink SA notifications
(XFRMNLGRP_SA, NEWSA/UPDSA carrying an ESP cipher) in the initiator's namespace, both
directions present for the peer; latency = that notification's receipt - the sendto() of the
first datagram. Sides are interleaved peer by peer (the order rotates), after one untimed
warm-up peer each (the kernel's first rfc4106(gcm(aes)) SA costs ~1.7 s under TCG).
Writes guest.json (and the daemons' logs) into --work, the vmrun --rw directory.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import ipaddress
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from oe_agent.lab import Host, HostFactory  # noqa: E402

LIBRESWAN = ROOT / "tools" / ".cache" / "libreswan" / "usr" / "libexec" / "ipsec"
DNS_V4 = "192.0.2.53"
ZONES = ("2.0.192.in-addr.arpa", "100.51.198.in-addr.arpa", "113.0.203.in-addr.arpa")
DISCARD_PORT = 9

# XFRM netlink (include/uapi/linux/xfrm.h)
NETLINK_XFRM = 6
XFRM_MSG_NEWSA, XFRM_MSG_GETSA, XFRM_MSG_GETPOLICY, XFRM_MSG_UPDSA = 0x10, 0x12, 0x15, 0x1A
XFRMGRP_SA = 4                      # bind() bitmask of XFRMNLGRP_SA (3)
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
USERSA_INFO = 224                   # sizeof(struct xfrm_usersa_info)
XFRMA_ALG_CRYPT, XFRMA_ALG_AEAD = 2, 18
IPPROTO_ESP = 50

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def log(msg: str) -> None:
    print(f"[guest {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


T0 = time.monotonic()


@contextlib.contextmanager
def in_netns(name: str):
    """Sockets made in the block belong to namespace `name` (setns(2) of this thread)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(own)


def parse_sa(payload: bytes) -> tuple[str, str, int, bool] | None:
    """(src, dst, spi, keyed) of an ESP struct xfrm_usersa_info + attributes; keyed = it
    carries a cipher (a SPI-allocated or larval state has none)."""
    if len(payload) < USERSA_INFO or payload[76] != IPPROTO_ESP:
        return None
    fam = struct.unpack_from("=H", payload, 212)[0]
    n = 4 if fam == socket.AF_INET else 16
    dst = str(ipaddress.ip_address(payload[56:56 + n]))
    src = str(ipaddress.ip_address(payload[80:80 + n]))
    spi = struct.unpack_from("!I", payload, 72)[0]
    keyed, a = False, USERSA_INFO
    while a + 4 <= len(payload):
        alen, atype = struct.unpack_from("=HH", payload, a)
        if alen < 4:
            break
        if atype & 0x3FFF in (XFRMA_ALG_CRYPT, XFRMA_ALG_AEAD):
            keyed = True
        a += (alen + 3) & ~3
    return src, dst, spi, keyed


def netlink_messages(data: bytes):
    off = 0
    while off + 16 <= len(data):
        length, mtype = struct.unpack_from("=IH", data, off)
        if length < 16:
            return
        yield mtype, data[off + 16:off + length]
        off += (length + 3) & ~3


class SaWatch:
    """The kernel's SA notifications in one namespace (the measuring instrument)."""

    def __init__(self, netns: str):
        with in_netns(netns):
            self.events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
            self.dumper = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
        self.events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.events.bind((0, XFRMGRP_SA))
        self.dumper.bind((0, 0))
        self.seq = 0
        self.overruns = 0
        self.states = 0

    def drain(self) -> None:
        while select.select([self.events], [], [], 0)[0]:
            try:
                self.events.recv(1 << 20)
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise

    def keyed_pairs(self) -> set[tuple[str, str]]:
        """(src, dst) of every keyed ESP SA now (an XFRM_MSG_GETSA dump); self.states = how
        many ESP states (keyed or not) the dump held."""
        self.seq += 1
        self.dumper.send(struct.pack("=IHHII", 16, XFRM_MSG_GETSA, NLM_F_REQUEST | NLM_F_DUMP,
                                     self.seq, 0))
        out = set()
        self.states = 0
        while True:
            for mtype, payload in netlink_messages(self.dumper.recv(1 << 20)):
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    raise OSError(-struct.unpack_from("=i", payload)[0], "XFRM dump")
                sa = parse_sa(payload)
                self.states += sa is not None
                if sa and sa[3]:
                    out.add((sa[0], sa[1]))

    def wait_pair(self, local: str, peer: str, deadline: float) -> dict:
        """Until keyed SAs local->peer and peer->local are notified (or the deadline): their
        receipt times (monotonic)."""
        got: dict[str, float] = {}
        while len(got) < 2:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.events], [], [], left)[0]:
                break
            try:
                data = self.events.recv(1 << 20)
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                # notifications were lost: read the table instead (same instant, one dump)
                self.overruns += 1
                now, pairs = time.monotonic(), self.keyed_pairs()
                for k, pair in (("out", (local, peer)), ("in", (peer, local))):
                    if pair in pairs:
                        got.setdefault(k, now)
                continue
            now = time.monotonic()
            for mtype, payload in netlink_messages(data):
                if mtype not in (XFRM_MSG_NEWSA, XFRM_MSG_UPDSA):
                    continue
                sa = parse_sa(payload)
                if not sa or not sa[3]:
                    continue
                if (sa[0], sa[1]) == (local, peer):
                    got.setdefault("out", now)
                elif (sa[0], sa[1]) == (peer, local):
                    got.setdefault("in", now)
        return got

    def close(self) -> None:
        self.events.close()
        self.dumper.close()


def sh(*cmd: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout, **kw)


def poll(pred, what: str, bound: float, step: float = 0.2):
    deadline = time.monotonic() + bound
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {bound:g} s waiting for {what}")
        time.sleep(step)


def tail(path: Path, n: int = 2000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path} missing)"


def policy_count(host: Host, dst: str) -> int:
    """Policies in the host's namespace whose selector's destination is the network `dst`
    (an XFRM_MSG_GETPOLICY dump in-process: an `ip` process costs ~1 s of guest CPU)."""
    want = ipaddress.ip_network(dst)
    with in_netns(host.name):
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    try:
        nl.bind((0, 0))
        nl.send(struct.pack("=IHHII", 16, XFRM_MSG_GETPOLICY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0))
        n = 0
        while True:
            for mtype, payload in netlink_messages(nl.recv(1 << 20)):
                if mtype == NLMSG_DONE:
                    return n
                if mtype == NLMSG_ERROR:
                    raise OSError(-struct.unpack_from("=i", payload)[0], "XFRM policy dump")
                if len(payload) < 56:
                    continue
                fam, plen = struct.unpack_from("=HB", payload, 40)
                if fam != socket.AF_INET:
                    continue
                net = ipaddress.ip_network(f"{ipaddress.ip_address(payload[:4])}/{plen}",
                                           strict=False)
                n += net == want
    finally:
        nl.close()


# --- knot -----------------------------------------------------------------------------------

KNOT_CONF = """\
server:
    rundir: "{d}/run"
    listen: [ "{addr}@53" ]
database:
    storage: "{d}/db"
log:
  - target: "{d}/knotd.log"
    any: notice
policy:
  - id: bench
    algorithm: ecdsap256sha256
    single-type-signing: on
    dnskey-ttl: 300
    zone-max-ttl: 300
    propagation-delay: 0
    ksk-lifetime: 0
    zsk-lifetime: 0
    nsec3: off
template:
  - id: default
    storage: "{d}/zones"
    file: "%s.zone"
    dnssec-signing: on
    dnssec-policy: bench
    zonefile-sync: -1
    zonefile-load: difference-no-serial
    journal-content: all
zone:
{zones}
"""


def start_knot(host: Host, records: dict[str, list[str]]) -> tuple[object, Path]:
    """knotd serving and signing ZONES; returns (process, anchors file with each zone's DS)."""
    d = host.workdir / "knot"
    for sub in ("zones", "db", "run"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for z in ZONES:
        (d / "zones" / f"{z}.zone").write_text("\n".join(
            [f"$ORIGIN {z}.", "$TTL 300",
             "@ SOA ns.oe.example. hostmaster.oe.example. 1 3600 600 86400 300",
             "@ NS ns.oe.example.", *records.get(z, [])]) + "\n")
    conf = d / "knot.conf"
    conf.write_text(KNOT_CONF.format(d=d, addr=host.v4,
                                     zones="\n".join(f"  - domain: {z}" for z in ZONES)))
    proc = host.popen("knotd", "-c", str(conf), log="knotd.stdout")
    anchors = []
    for z in ZONES:
        poll(lambda: proc.poll() is not None or "re-sign" in subprocess.run(
            ["knotc", "-c", str(conf), "zone-status", z], capture_output=True,
            text=True).stdout, f"knot to sign {z}", 120)
        if proc.poll() is not None:
            raise RuntimeError(f"knotd exited: {tail(host.workdir / 'knotd.stdout')}"
                               f"{tail(d / 'knotd.log')}")
        ds = sh("keymgr", "-c", str(conf), z, "ds").stdout
        anchors += [ln for ln in ds.splitlines() if " DS " in ln]
    path = d / "anchors.ds"
    path.write_text("\n".join(anchors) + "\n")
    return proc, path


# --- the sides ------------------------------------------------------------------------------

@dataclass
class Side:
    name: str            # as printed
    impl: str            # "oe-agent" | "libreswan"
    auth: str            # key type, as printed
    local: str           # the initiator's address
    peers: list[str]     # [warm-up, measured...]
    init: Host | None = None
    resp: Host | None = None
    procs: list = field(default_factory=list)
    watch: SaWatch | None = None
    sender: socket.socket | None = None
    results: list[dict] = field(default_factory=list)


def side_plan(n: int, kinds: list[str]) -> list[Side]:
    sides = []
    for kind in kinds:
        if kind == "oe-agent-rsa":
            sides.append(Side("oe-agent", "oe-agent", "RSA-3072", "192.0.2.1",
                              [f"198.51.100.{1 + i}" for i in range(n + 1)]))
        elif kind == "libreswan":
            sides.append(Side("libreswan", "libreswan", "RSA-3072", "192.0.2.2",
                              [f"203.0.113.{1 + i}" for i in range(n + 1)]))
        elif kind == "oe-agent-ed25519":
            sides.append(Side("oe-agent (Ed25519)", "oe-agent", "Ed25519", "192.0.2.3",
                              [f"198.51.100.{129 + i}" for i in range(n + 1)]))
    return sides


def add_hosts(factory: HostFactory, side: Side, idx: int) -> None:
    side.init = factory.add(v4=side.local, v6=f"2001:db8::{idx + 1:x}")
    side.resp = factory.add(v4=side.peers[0], v6=f"2001:db8::{0x100 + idx:x}")
    # one `ip` per host (each process costs ~1 s in the guest); one L2 segment, so the
    # other documentation prefixes are on-link
    batch(side.resp, [f"address add {a}/32 dev eth0" for a in side.peers[1:]]
          + ["route add 192.0.2.0/24 dev eth0"])
    batch(side.init, ONLINK)


ONLINK = ["route add 198.51.100.0/24 dev eth0", "route add 203.0.113.0/24 dev eth0"]


def batch(host: Host, commands: list[str]) -> None:
    host.run("ip", "-batch", "-", input="\n".join(commands) + "\n", timeout=120)


def peer_range(side: Side) -> str:
    """The smallest network holding every peer address of the side."""
    first, last = (ipaddress.ip_address(side.peers[0]), ipaddress.ip_address(side.peers[-1]))
    net = ipaddress.ip_network(f"{first}/32")
    while last not in net:
        net = net.supernet()
    return str(net)


def zone_of(addr: str) -> str:
    return ".".join(reversed(addr.split(".")[:3])) + ".in-addr.arpa"


# oe-agent

AGENT_CONF = """\
[agent]
addresses = [{addrs}]
policies = "{d}/policies"
socket = "{d}/ctl.sock"
dataplane = "kernel"
log_level = "warning"
[identity]
key = "{key}"
[dns]
resolvers = ["{dns}"]
trust_anchors = "{anchors}"
dnssec = "validate"
timeout = 5.0
[ike]
retransmit_tries = 6
liveness = 3600
"""


def agent_records(side: Side, keys: Path) -> list[tuple[str, str]]:
    from oe_agent.dns.tools import ipseckey_lines, load_private_key
    out = []
    for role, addrs in (("init", [side.local]), ("resp", side.peers)):
        key = load_private_key(keys / f"{side.auth.lower()}-{role}.pem")
        lines = [x for x in ipseckey_lines(key, addrs) if not x.startswith(";")]
        out += [(zone_of(a), ln) for a, ln in zip(addrs, lines)]
    return out


def start_agent(side: Side, host: Host, keyfile: Path, addrs: list[str], group: str,
                anchors: Path) -> None:
    d = host.workdir
    (d / "policies").mkdir(exist_ok=True)
    for g in ("clear", "clear-or-private", "private-or-clear", "private", "block"):
        (d / "policies" / g).write_text(group + "\n" if g == "private-or-clear" else "")
    shutil.copy(keyfile, d / "hostkey.pem")
    os.chmod(d / "hostkey.pem", 0o600)
    cfg = d / "oe-agent.toml"
    cfg.write_text(AGENT_CONF.format(addrs=", ".join(f'"{a}"' for a in addrs), d=d,
                                     key=d / "hostkey.pem", dns=DNS_V4, anchors=anchors))
    side.procs.append((host, host.popen(sys.executable, "-m", "oe_agent", "run", "-c", str(cfg),
                                        log="agent.log", cwd=str(ROOT))))


def agent_ready(host: Host, proc, match: str, count: int) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"the agent in {host.v4} exited: {tail(host.workdir / 'agent.log')}")
    return (host.workdir / "ctl.sock").is_socket() and policy_count(host, match) >= count


# libreswan

PLUTO_SETUP = """\
config setup
    logfile={d}/pluto.log
    logappend=no
    plutodebug=none
    ikev1-policy=drop
    protostack=xfrm
    dnssec-enable=yes
    dnssec-rootkey-file=""
    dnssec-anchors={anchors}
{listen}
conn %default
    ikev2=insist
    leftupdown=%disabled
    rightupdown=%disabled
    type=transport
    leftauth=rsasig
    leftrsasigkey=0s{rsasigkey}
    right=%opportunisticgroup
    rightauth=rsasig
    rightrsasigkey=%dnsondemand
    negotiationshunt=hold
    failureshunt=passthrough
    keyingtries=1
    retransmit-timeout=30s
    auto=ondemand
"""


def start_pluto(side: Side, host: Host, nss: Path, rsasigkey: str, addrs: list[str],
                group: str, anchors: Path, ubshim: Path, role: str) -> None:
    d = host.workdir
    pol = d / "ipsec.d" / "policies"
    pol.mkdir(parents=True, exist_ok=True)
    (d / "run").mkdir(exist_ok=True)
    (d / "libexec-add").mkdir(exist_ok=True)
    (d / "libexec-add" / "ipsec").symlink_to(LIBRESWAN)
    shutil.copytree(nss, d / "nss")
    (d / "ipsec.secrets").touch()
    (d / "resolv.conf").write_text(f"nameserver {DNS_V4}\n")
    text = PLUTO_SETUP.format(d=d, anchors=anchors, rsasigkey=rsasigkey,
                              listen=f"    listen={addrs[0]}\n" if role == "init" else "")
    # pluto needs one conn per local address (left=that address); each conn's group is the
    # file of its name in ipsec.d/policies
    for i, a in enumerate(addrs):
        name = "private-or-clear" if role == "init" else f"private-or-clear-{i}"
        text += f"\nconn {name}\n    left={a}\n    leftid={a}\n"
        (pol / name).write_text(group + "\n")
    (d / "ipsec.conf").write_text(text)
    # pluto 4.10 exec()s /usr/libexec/ipsec/addconn: an overlay in a private mount namespace;
    # its libunbound reads /etc/resolv.conf and serves the documentation reverse zones itself
    # unless ubshim.so tells it not to (shared/interop README, pitfalls 1 and 10)
    script = (f"mount -t overlay overlay -o 'lowerdir={d}/libexec-add:/usr/libexec' /usr/libexec"
              f" && mount --bind '{d}/resolv.conf' /etc/resolv.conf"
              f" && exec env LD_PRELOAD='{ubshim}' '{LIBRESWAN}/pluto' --config '{d}/ipsec.conf'"
              f" --rundir '{d}/run' --nssdir '{d}/nss' --ipsecdir '{d}/ipsec.d'"
              f" --secretsfile '{d}/ipsec.secrets' --nofork")
    side.procs.append((host, host.popen("unshare", "--mount", "--propagation", "private",
                                        "sh", "-c", script, log="pluto.stdout", cwd=str(d))))


def pluto_ready(host: Host, proc, match: str, count: int) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"pluto in {host.v4} exited: {tail(host.workdir / 'pluto.stdout')}"
                           f"{tail(host.workdir / 'pluto.log')}")
    return (host.workdir / "run" / "pluto.ctl").is_socket() and policy_count(host, match) >= count


def stop_side(side: Side) -> None:
    for host, proc in reversed(side.procs):
        if proc.poll() is None and (host.workdir / "run" / "pluto.ctl").exists():
            subprocess.run([str(LIBRESWAN / "whack"), "--rundir", str(host.workdir / "run"),
                            "--shutdown"], capture_output=True, timeout=30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        host.stop(proc)
    side.procs.clear()


# --- the run --------------------------------------------------------------------------------

def measure(side: Side, peer: str, timeout: float) -> dict:
    side.watch.drain()
    t0 = time.monotonic()
    err = None
    try:
        side.sender.sendto(b"oe setup latency: first packet", (peer, DISCARD_PORT))
    except OSError as e:  # a larval/hold state may refuse it; the ACQUIRE happened anyway
        err = e.strerror
    got = side.watch.wait_pair(side.local, peer, t0 + timeout)
    r = {"peer": peer, "sendto_error": err}
    for k in ("in", "out"):
        r[f"{k}_ms"] = round((got[k] - t0) * 1000, 2) if k in got else None
    r["ms"] = round((max(got.values()) - t0) * 1000, 2) if len(got) == 2 else None
    return r


def run(args) -> dict:
    work = Path(args.work)
    keys = work / "keys"
    lsw = json.loads((keys / "libreswan.json").read_text())
    sides = side_plan(args.n, args.sides.split(","))
    report: dict = {"n": args.n, "sides": {}, "kernel": os.uname().release,
                    "cpus": os.cpu_count(), "timeout_s": args.timeout}
    tmp = Path(tempfile.mkdtemp(prefix="slat."))
    factory = HostFactory(tmp, prefix=f"sl{os.getpid() % 10000}")
    ubshim = tmp / "ubshim.so"  # preloaded from the guest's tmpfs, not from the 9p share
    shutil.copy(args.ubshim, ubshim)
    try:
        dns = factory.add(v4=DNS_V4, v6="2001:db8::53")
        batch(dns, ONLINK)  # the responders query from their peer addresses
        for i, s in enumerate(sides):
            add_hosts(factory, s, i)
        records: dict[str, list[str]] = {}
        for s in sides:
            if s.impl == "oe-agent":
                for z, ln in agent_records(s, keys):
                    records.setdefault(z, []).append(ln)
            else:
                for role, addrs in (("init", [s.local]), ("resp", s.peers)):
                    for a in addrs:
                        owner = ".".join(reversed(a.split("."))) + ".in-addr.arpa."
                        records.setdefault(zone_of(a), []).append(
                            f"{owner} 300 IN IPSECKEY 10 0 2 . {lsw[role]['rsasigkey']}")
        knot, anchors = start_knot(dns, records)
        log(f"knotd signed {len(ZONES)} zones ({sum(map(len, records.values()))} IPSECKEYs)")
        waits = []
        for s in sides:
            if s.impl == "oe-agent":
                kname = s.auth.lower()
                start_agent(s, s.resp, keys / f"{kname}-resp.pem", s.peers, f"{s.local}/32",
                            anchors)
                start_agent(s, s.init, keys / f"{kname}-init.pem", [s.local], peer_range(s),
                            anchors)
                ready = agent_ready
            else:
                start_pluto(s, s.resp, keys / "nss-resp", lsw["resp"]["rsasigkey"], s.peers,
                            f"{s.local}/32", anchors, ubshim, "resp")
                start_pluto(s, s.init, keys / "nss-init", lsw["init"]["rsasigkey"], [s.local],
                            peer_range(s), anchors, ubshim, "init")
                ready = pluto_ready
            (rh, rp), (ih, ip_) = s.procs
            # the agent traps a destination network with one policy; pluto one per conn
            traps = 1 if s.impl == "oe-agent" else len(s.peers)
            waits += [(f"{s.name} responder", lambda rh=rh, rp=rp, r=ready, s=s, t=traps:
                       r(rh, rp, f"{s.local}/32", t)),
                      (f"{s.name} initiator", lambda ih=ih, ip_=ip_, r=ready, s=s:
                       r(ih, ip_, peer_range(s), 1))]
        for what, pred in waits:
            # start-up shares the guest's budget (under TCG on a loaded host it took 3-5 min)
            bound = max(30.0, T0 + args.budget - 60 - time.monotonic())
            poll(pred, f"{what} (control socket and trap policies) within the budget", bound, 1.0)
        log("all daemons up, trap policies in place: " + ", ".join(s.name for s in sides))
        for s in sides:
            s.watch = SaWatch(s.init.name)
            with in_netns(s.init.name):
                s.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sender.bind((s.local, 0))
        for s in sides:  # untimed: the first SA of a boot instantiates the kernel's crypto
            w = measure(s, s.peers[0], args.timeout)
            log(f"warm-up {s.name} -> {s.peers[0]}: "
                + (f"{w['ms']:.0f} ms" if w["ms"] is not None else "no SA"))
            report["sides"].setdefault(s.name, {})["warmup"] = w
        deadline = T0 + args.budget
        measured = 0
        for i in range(args.n):
            if time.monotonic() > deadline:
                log(f"measuring budget ({args.budget:.0f} s of guest time) spent after {i} "
                    "peers per side")
                report["budget_hit_after"] = i
                break
            order = sides[i % len(sides):] + sides[:i % len(sides)]
            line = []
            for s in order:
                r = measure(s, s.peers[i + 1], args.timeout)
                s.results.append(r)
                line.append(f"{s.name} {r['ms']:.0f} ms" if r["ms"] is not None
                            else f"{s.name} FAILED")
                time.sleep(args.gap)
            measured = i + 1
            if measured % 5 == 0 or measured == args.n:
                log(f"peer {measured}/{args.n}: " + ", ".join(line))
        for s in sides:
            pairs = s.watch.keyed_pairs()
            up = [p for p in s.peers if (s.local, p) in pairs and (p, s.local) in pairs]
            report["sides"][s.name].update({
                "impl": s.impl, "auth": s.auth, "initiator": s.local,
                "responder_addresses": s.peers, "results": s.results,
                "sa_pairs_at_end": len(up), "esp_states_at_end": s.watch.states,
                "netlink_overruns": s.watch.overruns})
        report["measured_per_side"] = measured
        return report
    finally:
        for s in sides:
            if s.watch:
                s.watch.close()
            if s.sender:
                s.sender.close()
        for s in sides:
            stop_side(s)
        keep = work / "logs"
        for h in factory.hosts:
            for f in ("agent.log", "pluto.log", "pluto.stdout", "knotd.stdout", "ipsec.conf",
                      "oe-agent.toml", "knot/knotd.log"):
                if (h.workdir / f).is_file():
                    dest = keep / h.v4 / f
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes((h.workdir / f).read_bytes()[-2_000_000:])
        factory.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--ubshim", required=True)
    ap.add_argument("-n", type=int, required=True)
    ap.add_argument("--sides", default="oe-agent-rsa,libreswan")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--budget", type=float, default=600.0)
    ap.add_argument("--gap", type=float, default=0.2)
    args = ap.parse_args()
    if os.environ.get("OE_IN_VM") != "1":
        print("setup_latency_guest.py runs inside the QEMU guest; run bench/setup_latency.py",
              file=sys.stderr)
        return 2
    out = Path(args.work) / "guest.json"
    try:
        report = run(args)
    except Exception as e:  # reported to the host in one piece, logs are in work/logs
        out.write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        log(f"FAILED: {type(e).__name__}: {e}")
        return 1
    out.write_text(json.dumps(report, indent=1) + "\n")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
