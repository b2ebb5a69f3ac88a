"""Issue 5 acceptance 6 (DNS-keyed part) and 7 on real kernel ESP: libreswan pluto 4.10 OE
with mutual RSA authentication, every key from the DNSSEC-signed reverse zones (knot).

pluto's OE conns take the agent's key with `rightrsasigkey=%dnsondemand` (its libunbound
validates from the zones' DS; tests/vm/ubshim.c lets it ask for documentation prefixes);
the agent looks up and validates pluto's published IPSECKEY. Each side initiates, over IPv4
and over IPv6 (libreswan reads one address family per OE conn: a v4 and a v6 conn, each with
its policy group file). Transport mode, the agent's OE mode. The wire is the proof: ESP, the
canary never in clear from the agent, and no steady plaintext either way.
"""
from __future__ import annotations

import os

import pytest

from tests.conftest import needs
from tests.vm.oe_lab import Agent, Sniffer, frames_from, pair_frames, probe, xfrm_states
from tests.vm.peers_vm import D4, D6, P1, P2, UBSHIM, host_prefix, peer_lab, until

NEGOTIATION = 120.0  # pluto's and the agent's DNS lookups and RSA work in a loaded TCG guest


def oe_conn(me: str, rsasigkey: str) -> str:
    """libreswan's DNS-keyed OE conn (the interop kit's lsw-a/ipsec-oe-dns.conf), transport."""
    return (f"    type=transport\n    left={me}\n    leftid={me}\n    leftauth=rsasig\n"
            f"    leftrsasigkey=0s{rsasigkey}\n"
            "    right=%opportunisticgroup\n    rightauth=rsasig\n    rightrsasigkey=%dnsondemand\n"
            "    negotiationshunt=hold\n    failureshunt=passthrough\n    keyingtries=1\n"
            "    retransmit-timeout=20s\n    auto=ondemand\n")


# conn name (= its policy group file under ipsec.d/policies) -> (pluto's address index, D's)
CONNS = {"private-or-clear": (0, D4), "private-or-clear-6": (1, D6)}


@pytest.fixture(scope="module")
def dns_plutos(request, tmp_path_factory, esp_kernel):
    from tests.interop.peers.pluto import LIBRESWAN

    needs(os.geteuid() == 0, "needs root (network namespaces, XFRM)")
    needs((LIBRESWAN / "pluto").exists(),
          f"libreswan unpacked at {LIBRESWAN} (tools/install-deps.sh)")
    needs(UBSHIM.exists(), f"{UBSHIM} (tools/install-deps.sh builds it with gcc)")
    pl = peer_lab(request, tmp_path_factory)
    started = []
    try:
        for p, addrs in zip(pl.plutos, (P1, P2)):
            pol = p.dir / "ipsec.d" / "policies"
            pol.mkdir(parents=True, exist_ok=True)
            for name, (i, d_addr) in CONNS.items():
                (pol / name).write_text(host_prefix(d_addr) + "\n")
                p.add_conn(name, oe_conn(addrs[i], p.rsasigkey))
            p.start(timeout=60)
            started.append(p)
            # start() re-adds each conn by name, which leaves the OE groups unloaded: load the
            # policy group files and route them (trap policies for D's addresses)
            p.whack("--listen", check=False)
            for name in CONNS:
                p.whack("--route", "--name", name, check=False)
            for d_addr in (D4, D6):
                until(lambda: d_addr in p.host.run("ip", "xfrm", "policy").stdout,
                      f"pluto's trap policy for {d_addr}: {p.tail(20)}")
            pl.lab.echo.serve(p.host, list(addrs))
        yield pl
    finally:
        for p in started:
            p.stop()


def check(pl, pluto, src_ag, src, dst, canary, role):
    """Probe src -> dst until the SA carries it; the wire, the agent and pluto must agree."""
    lab, d = pl.lab, pl.d
    peer = dst if src_ag is d else src
    sniff = Sniffer(lab.factory, [d.host])
    try:
        r = probe(src_ag, src, dst, canary, NEGOTIATION)
    finally:
        sniff.close()
    why = (f"{lab.why(d, peer)}\n--- pluto states:\n{pluto.states()}\n"
           f"--- pluto log:\n{pluto.tail(60)}")
    assert r.first and r.steady_ok == r.steady, f"{r}\n{why}"
    wire = pair_frames(sniff.frames(d.host), src, dst)
    assert wire.esp(), f"no ESP between {src} and {dst}\n{why}"
    assert not wire.plaintext((canary + ":s").encode()), f"steady traffic in clear\n{why}"
    assert not frames_from(wire, src if src_ag is d else dst).plaintext(canary.encode()), \
        f"the agent sent the canary in clear\n{why}"
    sas = [s for s in lab.api(d, "/sas") if s["remote"] == peer]
    assert len(sas) == 1, f"{sas}\n{why}"
    # authenticated by keys from DNS on the agent's side: not AUTH_NULL, the peer's key secure
    assert "null" not in sas[0]["auth"].lower() and "unauth" not in sas[0]["auth"].lower(), sas
    dns = lab.explain(d, peer)["dns"]
    assert dns and dns["status"] == "secure-key" and dns["keys"] >= 1, dns
    # pluto authenticated the agent with the key it fetched (%dnsondemand is its only source)
    # and installed the Child SA in its kernel
    pluto.wait_log(rf"{role} established IKE SA; authenticated peer .*RSA", 30)
    until(lambda: "IPsec SA established" in pluto.states()
          or "established Child SA" in pluto.states(), f"pluto's Child SA with {peer}\n{why}")
    me, agent = (src, dst) if src_ag is not d else (dst, src)
    esp = {(s.src, s.dst) for s in xfrm_states(pluto.host)
           if s.proto == "esp" and s.mode == "transport"}
    assert {(me, agent), (agent, me)} <= esp, f"pluto's kernel ESP states: {esp}"
    return sas[0]


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_pluto_initiates_dns_keyed_oe(dns_plutos, v6):
    pl = dns_plutos
    p1 = pl.plutos[0]
    src, dst = (P1[1], D6) if v6 else (P1[0], D4)
    check(pl, p1, Agent(p1.host, "pluto", True), src, dst, f"CNRYPLDNS{6 if v6 else 4}",
          "initiator")


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_agent_initiates_dns_keyed_oe(dns_plutos, v6):
    pl = dns_plutos
    p2 = pl.plutos[1]
    src, dst = (D6, P2[1]) if v6 else (D4, P2[0])
    check(pl, p2, pl.d, src, dst, f"CNRYAGDNS{6 if v6 else 4}", "responder")
