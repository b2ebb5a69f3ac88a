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
from tests.vm.oe_lab import Agent
from tests.vm.peers_vm import (D4, D6, P1, P2, UBSHIM, check_agent_side, peer_lab, peer_of,
                               pluto_child_up, start_oe_pluto)

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
            started.append(p)
            start_oe_pluto(p, {name: (oe_conn(addrs[i], p.rsasigkey), [d_addr])
                               for name, (i, d_addr) in CONNS.items()}, [D4, D6])
            pl.lab.echo.serve(p.host, list(addrs))
        yield pl
    finally:
        for p in started:
            p.stop()


def check(pl, pluto, src_ag, src, dst, canary, role):
    """Probe src -> dst until the SA carries it; the wire, the agent and pluto must agree."""
    lab, d = pl.lab, pl.d
    peer, agent = peer_of(d, src_ag, src, dst)
    sa, _ = check_agent_side(
        lab, d, src_ag, src, dst, canary, NEGOTIATION,
        lambda: f"--- pluto states:\n{pluto.states()}\n--- pluto log:\n{pluto.tail(60)}")
    # authenticated by keys from DNS on the agent's side: not AUTH_NULL, the peer's key secure
    assert "null" not in sa["auth"].lower() and "unauth" not in sa["auth"].lower(), sa
    dns = lab.explain(d, peer)["dns"]
    assert dns and dns["status"] == "secure-key" and dns["keys"] >= 1, dns
    # pluto authenticated the agent with the key it fetched (%dnsondemand is its only source)
    # and installed the Child SA in its kernel
    pluto.wait_log(rf"{role} established IKE SA; authenticated peer .*RSA", 30)
    pluto_child_up(pluto, peer, agent)
    return sa


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
