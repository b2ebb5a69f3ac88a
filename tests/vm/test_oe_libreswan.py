"""Issue 5 acceptance 6 (AUTH_NULL part) and 7 on real kernel ESP: libreswan pluto 4.10 OE
with RFC 7619 NULL authentication, private-or-clear on both sides, each side initiating, over
IPv4 and over IPv6.

Agent D (shared lab's DNS, kernel dataplane, no host key and `ike.auth_null = true`: anonymous
OE as libreswan's authby=null hosts have it; private-or-clear for P1 and P2) and two plutos,
P1 and P2, each with D in its policy groups (libreswan's own OE conns: right=
%opportunisticgroup, authby=null, ID_NULL both ways; one conn per address family, each with
its group file under ipsec.d/policies). P1 -> D: pluto's trap and ACQUIRE start it; D -> P2:
the agent's. Transport mode (the agent's OE mode). The wire between them is the proof: ESP,
and no steady plaintext. Over IPv6 both sides' traps are on whole /128 hosts, so each must
keep neighbour discovery out of them (pluto and the agent install ND pass policies at start).

Agent K is the same with a host key (unpublished) and `ike.auth_null = true`: toward pluto,
which publishes no key, it must authenticate with ID_NULL/AUTH_NULL (pluto's authby=null
refuses a signature), and answer pluto's AUTH_NULL in kind; P1 -> K and K -> P2.
"""
from __future__ import annotations

import os

import pytest

from tests.conftest import needs
from tests.vm.oe_lab import Agent, shared_lab
from tests.vm.peers_vm import (check_agent_side, nd_outside_ipsec, peer_of, pluto_child_up,
                               start_oe_pluto)

# (IPv4, IPv6) of each host
D = ("192.0.2.41", "2001:db8::41")
P1 = ("192.0.2.42", "2001:db8::42")   # pluto that initiates to D and K
P2 = ("192.0.2.44", "2001:db8::44")   # pluto that D and K initiate to
K = ("192.0.2.46", "2001:db8::46")
NEGOTIATION = 90.0
AGENT_CONFIG = "[ike]\nauth_null = true\n"

PRIVATE_OR_CLEAR = ("    type=transport\n    authby=null\n    left={me}\n    leftid=%null\n"
                    "    right=%opportunisticgroup\n    rightid=%null\n"
                    "    negotiationshunt=hold\n    failureshunt=passthrough\n"
                    "    keyingtries=1\n    retransmit-timeout=10s\n    auto=ondemand\n")
CLEAR = ("    type=passthrough\n    authby=never\n    left={me}\n    right=%group\n"
         "    auto=ondemand\n")


def oe_conns(me: tuple[str, str]) -> dict[str, tuple[str, list[str]]]:
    """pluto's OE conns (start_oe_pluto): libreswan reads one address family per OE conn."""
    return {"clear": (CLEAR.format(me=me[0]), ["192.0.2.53"]),
            "private-or-clear": (PRIVATE_OR_CLEAR.format(me=me[0]), [D[0], K[0]]),
            "private-or-clear-6": (PRIVATE_OR_CLEAR.format(me=me[1]), [D[1], K[1]])}


@pytest.fixture(scope="module")
def oe_pluto(request, tmp_path_factory, esp_kernel):
    from tests.interop.peers.pluto import LIBRESWAN, Pluto

    needs(os.geteuid() == 0, "needs root (network namespaces, XFRM)")
    needs((LIBRESWAN / "pluto").exists(),
          f"libreswan unpacked at {LIBRESWAN} (tools/install-deps.sh)")
    sl = shared_lab(request, tmp_path_factory)
    lab = sl.lab
    groups = {"private-or-clear": "".join(f"{a}/{128 if ':' in a else 32}\n" for a in P1 + P2)}
    d = lab.add(groups, published=False, hostkey=False, extra=AGENT_CONFIG,
                v4s=[D[0]], v6s=[D[1]])
    k = lab.add(groups, published=False, hostkey=True, extra=AGENT_CONFIG, v4s=[K[0]], v6s=[K[1]])
    plutos = []
    try:
        lab.launch(d)
        lab.launch(k)
        for addrs in (P1, P2):
            # listen="": every address, so that IKE also runs over IPv6
            p = Pluto(lab.factory.add(v4=addrs[0], v6=addrs[1]), name="pluto", debug="all",
                      listen="")
            plutos.append(p)
            start_oe_pluto(p, oe_conns(addrs), [*D, *K])
        lab.wait_up(d)
        lab.wait_up(k)
        lab.echo.serve(d.host, list(D))
        lab.echo.serve(k.host, list(K))
        for p, addrs in zip(plutos, (P1, P2)):
            lab.echo.serve(p.host, list(addrs))
        yield lab, d, plutos, k
    finally:
        for p in plutos:
            p.stop()
        for ag in (d, k):
            if ag.proc is not None and ag.proc.poll() is None:
                lab.stop(ag)


def check(lab, agent, pluto, src_ag, src, dst, canary):
    """Probe src -> dst until the SA carries it: the wire, the agent (AUTH_NULL) and pluto
    (an established Child SA, ESP in its kernel) agree; over IPv6 both keep neighbour
    discovery out of their traps and SA policies."""
    pluto_addr, agent_addr = peer_of(agent, src_ag, src, dst)
    sa, _ = check_agent_side(
        lab, agent, src_ag, src, dst, canary, NEGOTIATION,
        lambda: f"--- pluto states:\n{pluto.states()}\n--- pluto log:\n{pluto.tail(40)}")
    assert "null" in sa["auth"].lower() or "unauth" in sa["auth"].lower(), sa
    pluto_child_up(pluto, pluto_addr, agent_addr)
    if ":" in agent_addr:
        nd_outside_ipsec(pluto.host, [agent_addr])
        nd_outside_ipsec(agent.host, [pluto_addr])


# case -> (the agent: D anonymous or K keyed, whether pluto initiates (P1) or the agent (to P2),
# the canary)
CASES = {
    "pluto-to-anonymous": ("d", True, "CNRYPLUTOINIT"),
    "anonymous-to-pluto": ("d", False, "CNRYAGENTINIT"),
    "pluto-to-keyed": ("k", True, "CNRYPLUTOKEYED"),
    "keyed-to-pluto": ("k", False, "CNRYKEYEDINIT"),
}


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("case", list(CASES))
def test_auth_null_oe(oe_pluto, case, v6):
    lab, d, (p1, p2), k = oe_pluto
    which, pluto_starts, canary = CASES[case]
    agent, addrs = (d, D) if which == "d" else (k, K)
    canary += "6" if v6 else "4"
    if pluto_starts:
        check(lab, agent, p1, Agent(p1.host, "pluto", False), P1[v6], addrs[v6], canary)
    else:
        check(lab, agent, p2, agent, addrs[v6], P2[v6], canary)
