"""Real IKE daemons against one agent on real kernel ESP: libreswan pluto keyed by DNS and
strongSwan charon with the kernel-netlink backend (issue 5, acceptance 6 and 7).

One lab for both test modules (tests/vm/test_oe_pluto_dns.py, test_oe_charon.py), built on
first use: its own bridge (tests.hosts.HostFactory), knotd serving the DNSSEC-signed reverse
zones (tests/interop/dnsfix.py: knot makes the keys and signs, the test takes its DS as the
trust anchor), and agent D with an RSA host key (pluto 4.10 has no Ed25519 auth: interop
README pitfall 14) and the kernel dataplane (tests/vm/oe_lab.py). Every peer address meets D
once, so each test case starts from no state: pluto P1 and charon C1 initiate, D initiates to
pluto P2 and charon C2. The zone holds the keys of D, P1, P2 (RFC 3110, IPSECKEY algorithm 2),
C1 and C2 (Ed25519): D validates every peer's key; pluto fetches D's (`%dnsondemand`); charon,
which Debian builds without DNS keying, gets D's as a static raw key.

The checks every daemon interop case shares (the agent's side of the wire and its /sas, the
daemon's kernel ESP pair, starting pluto with OE policy groups) are here too; the AUTH_NULL
pluto cases (test_oe_libreswan.py) use them with agents of the shared lab.
"""
from __future__ import annotations

import re
import types
from dataclasses import dataclass, field
from pathlib import Path

from tests.hosts import HostFactory
from tests.vm.oe_lab import (DNS_V4, DNS_V6, Agent, Echo, OeLab, Sniffer, frames_from, pair_frames,
                             poll, probe, xfrm_states)

ROOT = Path(__file__).resolve().parents[2]
# tools/install-deps.sh builds it from tests/vm/ubshim.c (why: that file's comment)
UBSHIM = ROOT / "tools" / ".cache" / "ubshim.so"

D4, D6 = "192.0.2.61", "2001:db8::61"
P1 = ("192.0.2.62", "2001:db8::62")   # pluto that initiates to D
P2 = ("192.0.2.63", "2001:db8::63")   # pluto that D initiates to
C1 = ("192.0.2.64", "2001:db8::64")   # charon that initiates to D (trap policy)
C2 = ("192.0.2.65", "2001:db8::65")   # charon that D initiates to
RSA_BITS = 2048                        # D's key: pluto takes 2048-bit peer keys, cheap to make


def host_prefix(addr: str) -> str:
    return f"{addr}/{128 if ':' in addr else 32}"


@dataclass
class PeerLab:
    lab: OeLab
    d: Agent
    knot: object
    anchors: Path
    plutos: list = field(default_factory=list)         # [P1's, P2's], not started
    charon_keys: dict = field(default_factory=dict)    # host name -> tests.interop KeyPair
    charon_hosts: list = field(default_factory=list)   # [C1's, C2's]

    @property
    def d_public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.lab.keys[self.d.name].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


_LAB: PeerLab | None = None


def _zones(records: list[str]) -> dict:
    """origin -> dns.zone.Zone for knot (tests.interop.dnsfix.AUTO_SIGNED: knot signs them)."""
    import dns.name
    import dns.zone

    from tests.interop.dnsfix import AUTO_SIGNED, TOP

    zones = {}
    for origin in AUTO_SIGNED:
        text = ["$TTL 60", "@ SOA ns.oe.example. hostmaster.oe.example. 1 3600 600 86400 30",
                "@ NS ns.oe.example."]
        if origin == TOP:
            text += [f"ns A {DNS_V4}", f"ns AAAA {DNS_V6}"]
        text += [r for r in records if r.split()[0].endswith("." + origin)]
        o = dns.name.from_text(origin)
        zones[o] = dns.zone.from_text("\n".join(text) + "\n", origin=o, relativize=False)
    return zones


def peer_lab(request, tmp_path_factory) -> PeerLab:
    """The session's peer lab (built on first use, torn down when the session ends)."""
    global _LAB
    if _LAB is not None:
        return _LAB
    from oe_agent.dns import ipseckey
    from oe_agent.dns.tools import generate_key, ipseckey_lines, write_private_key
    from tests.interop.dnsfix import Knot
    from tests.interop.peers.keys import generate
    from tests.interop.peers.pluto import Pluto

    factory = HostFactory(tmp_path_factory.mktemp("peers"))
    lab = OeLab(factory)
    request.config.add_cleanup(factory.close)
    request.config.add_cleanup(lab.keep_logs)
    request.config.add_cleanup(lab.close)
    peers = [*P1, *P2, *C1, *C2]
    d = lab.add({"private-or-clear": "".join(host_prefix(a) + "\n" for a in peers)},
                hostkey=False, v4s=[D4], v6s=[D6])
    key = generate_key("rsa", RSA_BITS)
    write_private_key(d.host.workdir / "hostkey.pem", key)
    lab.keys[d.name] = key
    records = [r for r in ipseckey_lines(key, [D4, D6]) if not r.startswith(";")]

    pl = PeerLab(lab, d, None, factory.workdir / "anchors")
    template = None
    for v4, v6 in (P1, P2):
        p = Pluto(factory.add(v4=v4, v6=v6), name="pluto", debug="base", nss_template=template,
                  dns=(DNS_V4, pl.anchors), preload=UBSHIM, listen="")
        p.make_key()  # RSA in NSS is the slow part: P2 gets a copy of P1's db (same key)
        template = p.nss
        records += [f"{ipseckey.owner_name(a).to_text()} IN IPSECKEY 10 0 2 . {p.rsasigkey}"
                    for a in (v4, v6)]
        pl.plutos.append(p)
    for v4, v6 in (C1, C2):
        h = factory.add(v4=v4, v6=v6)
        kp = generate("ed25519")
        pl.charon_keys[h.name] = kp
        pl.charon_hosts.append(h)
        records += [r for r in ipseckey_lines(kp.private, [v4, v6]) if not r.startswith(";")]

    dns_host = factory.add(v4=DNS_V4, v6=DNS_V6)
    pl.knot = Knot(dns_host, types.SimpleNamespace(zones=_zones(records))).start()
    request.config.add_cleanup(pl.knot.stop)
    pl.anchors.write_text(pl.knot.anchors_text())
    lab.anchors = pl.anchors
    lab.dns = dns_host
    lab.launch(d)
    lab.wait_up(d)
    lab.echo = Echo()
    lab.echo.serve(d.host, [D4, D6])
    _LAB = pl
    return pl


def until(pred, what: str, bound: float = 30.0):
    return poll(pred, what, bound, 0.5)


def peer_of(d: Agent, src_ag: Agent, src: str, dst: str) -> tuple[str, str]:
    """(the peer's address, the agent's) of a probe src -> dst sent by src_ag."""
    return (dst, src) if src_ag is d else (src, dst)


def check_agent_side(lab: OeLab, d: Agent, src_ag: Agent, src: str, dst: str, canary: str,
                     bound: float, story) -> tuple[dict, str]:
    """Probe src -> dst (src_ag sends; d is the agent, the other side a real daemon) with d's
    veth sniffed, then what every interop case asks of the agent's side: the steady datagrams
    answered, ESP between the pair, the steady canary never in clear, the agent never the
    canary in clear, one SA with the peer in its /sas. `story()`: the daemon's side, for the
    messages. Returns (that SA, the whole story)."""
    peer, agent = peer_of(d, src_ag, src, dst)
    sniff = Sniffer(lab.factory, [d.host])
    try:
        r = probe(src_ag, src, dst, canary, bound)
    finally:
        sniff.close()
    why = f"{lab.why(d, peer)}\n{story()}"
    assert r.first and r.steady_ok == r.steady, f"{r}\n{why}"
    wire = pair_frames(sniff.frames(d.host), src, dst)
    assert wire.esp(), f"no ESP between {src} and {dst}\n{why}"
    assert not wire.plaintext((canary + ":s").encode()), f"steady traffic in clear\n{why}"
    assert not frames_from(wire, agent).plaintext(canary.encode()), \
        f"the agent sent the canary in clear\n{why}"
    sas = [s for s in lab.api(d, "/sas") if s["remote"] == peer]
    assert len(sas) == 1, f"{sas}\n{why}"
    return sas[0], why


def transport_esp_pair(host, a: str, b: str) -> None:
    """The host's kernel holds ESP states a -> b and b -> a in transport mode (the daemon
    installed the Child SA it reports, no userspace ESP)."""
    esp = {(s.src, s.dst) for s in xfrm_states(host) if s.proto == "esp" and s.mode == "transport"}
    assert {(a, b), (b, a)} <= esp, f"{host.name}'s kernel ESP states: {esp}"


def nd_outside_ipsec(host, peers: list[str]) -> None:
    """IPv6 neighbour discovery stays outside IPsec on `host`: NS and NA (ICMPv6 135, 136;
    RFC 4861 §4.3, §4.4), in and out, have an allow policy on ::/0 that ranks before (lower
    priority value) every policy naming one of `peers`, so that no trap or SA policy on a peer
    holds the advertisement that resolves it."""
    policies = []
    for block in re.split(r"\n(?=src )", host.run("ip", "xfrm", "policy").stdout.strip()):
        head, _, rest = block.partition("\n")
        m = re.search(r"dir (\w+)\b.*?priority (\d+)", rest)
        if m:
            policies.append((head, m[1], int(m[2]), rest))
    for t in (135, 136):
        for d in ("out", "in"):
            nd = [prio for head, dd, prio, rest in policies
                  if dd == d and re.match(rf"src ::/0 dst ::/0 proto ipv6-icmp type {t}\b", head)
                  and "action block" not in rest and "tmpl" not in rest]
            named = [prio for head, dd, prio, _ in policies
                     if dd == d and any(p in head.split() or f"{p}/128" in head.split()
                                        for p in peers)]
            assert nd and all(min(nd) < prio for prio in named), (
                f"{host.name}: ICMPv6 type {t} dir {d}: pass {nd}, policies naming {peers}: "
                f"{named}\n{host.run('ip', 'xfrm', 'policy').stdout}")


def start_oe_pluto(p, conns: dict[str, tuple[str, list[str]]], traps: list[str]) -> None:
    """pluto with libreswan OE conns, name -> (conn body, the addresses of its policy group:
    ipsec.d/policies/<name>), started with its groups loaded and routed, once its kernel holds
    a policy for each address in `traps`."""
    pol = p.dir / "ipsec.d" / "policies"
    pol.mkdir(parents=True, exist_ok=True)
    for name, (body, group) in conns.items():
        (pol / name).write_text("".join(host_prefix(a) + "\n" for a in group))
        p.add_conn(name, body)
    p.start(timeout=60)
    # start() re-adds each conn by name, which leaves the OE groups unloaded: load the policy
    # group files and route them (trap policies, pass for a clear group)
    p.whack("--listen", check=False)
    for name in conns:
        p.whack("--route", "--name", name, check=False)
    for a in traps:
        until(lambda: a in p.host.run("ip", "xfrm", "policy").stdout,
              f"pluto's trap policy for {a}: {p.tail(20)}")


def pluto_child_up(p, me: str, agent: str) -> None:
    """pluto lists an established Child SA with `agent` and its kernel holds the ESP pair."""
    def up():
        return any(agent in ln and ("established Child SA" in ln or "IPsec SA established" in ln)
                   for ln in p.states().splitlines())
    until(up, f"pluto's established Child SA with {agent}:\n{p.states()}")
    transport_esp_pair(p.host, me, agent)
