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
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path

from tests.hosts import HostFactory
from tests.vm.oe_lab import DNS_V4, DNS_V6, Agent, Echo, OeLab, poll

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
