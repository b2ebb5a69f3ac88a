"""Issue 5 acceptance 6 (AUTH_NULL part) on real kernel ESP: libreswan pluto 4.10 OE with
RFC 7619 NULL authentication, private-or-clear on both sides, each side initiating.

Agent D (shared lab's DNS, kernel dataplane, no host key and `ike.auth_null = true`: anonymous
OE as libreswan's authby=null hosts have it; private-or-clear for
P1 and P2) and two plutos, P1 and P2, each with D in its `policies/private-or-clear`
(libreswan's own OE conns: right=%opportunisticgroup, authby=null, ID_NULL both ways).
P1 -> D: pluto's trap and ACQUIRE start it; D -> P2: the agent's. Transport mode (the
agent's OE mode). The wire between them is the proof: ESP, and no steady plaintext.

Agent K is the same with a host key (unpublished) and `ike.auth_null = true`: toward pluto,
which publishes no key, it must authenticate with ID_NULL/AUTH_NULL (pluto's authby=null
refuses a signature), and answer pluto's AUTH_NULL in kind; P1 -> K and K -> P2.
"""
from __future__ import annotations

import os

import pytest

from tests.conftest import needs
from tests.vm.oe_lab import Agent, frames_from, pair_frames, poll, probe, shared_lab, Sniffer

D4, P1, P2, K4 = "192.0.2.41", "192.0.2.42", "192.0.2.44", "192.0.2.46"
NEGOTIATION = 90.0

OE_CONNS = {
    "clear": ("    type=passthrough\n    authby=never\n    left={me}\n    right=%group\n"
              "    auto=ondemand\n"),
    "private-or-clear": ("    type=transport\n    authby=null\n    left={me}\n    leftid=%null\n"
                         "    right=%opportunisticgroup\n    rightid=%null\n"
                         "    negotiationshunt=hold\n    failureshunt=passthrough\n"
                         "    keyingtries=1\n    retransmit-timeout=10s\n    auto=ondemand\n"),
}


@pytest.fixture(scope="module")
def oe_pluto(request, tmp_path_factory, esp_kernel):
    from tests.interop.peers.pluto import LIBRESWAN, Pluto

    needs(os.geteuid() == 0, "needs root (network namespaces, XFRM)")
    needs((LIBRESWAN / "pluto").exists(), f"libreswan unpacked at {LIBRESWAN} (tools/install-deps.sh)")
    sl = shared_lab(request, tmp_path_factory)
    lab = sl.lab
    d = lab.add({"private-or-clear": f"{P1}/32\n{P2}/32\n"}, published=False, hostkey=False,
                extra="[ike]\nauth_null = true\n", v4s=[D4], v6s=["2001:db8::41"])
    k = lab.add({"private-or-clear": f"{P1}/32\n{P2}/32\n"}, published=False, hostkey=True,
                extra="[ike]\nauth_null = true\n", v4s=[K4], v6s=["2001:db8::46"])
    plutos = []
    try:
        for addr in (P1, P2):
            h = lab.factory.add(v4=addr, v6=f"2001:db8::{addr.split('.')[-1]}")
            p = Pluto(h, name="pluto", debug="all")
            pol = p.dir / "ipsec.d" / "policies"
            pol.mkdir(parents=True, exist_ok=True)
            (pol / "private-or-clear").write_text(f"{D4}/32\n{K4}/32\n")
            (pol / "clear").write_text("192.0.2.53/32\n")
            for name, body in OE_CONNS.items():
                p.add_conn(name, body.format(me=addr))
            plutos.append(p)
        lab.launch(d)
        lab.launch(k)
        for p in plutos:
            p.start(timeout=60)
            # start() re-adds each conn by name, which leaves the OE group unrouted: load the
            # policy groups and route them (trap policies for D, pass for the DNS server)
            p.whack("--listen", check=False)
            for name in OE_CONNS:
                p.whack("--route", "--name", name, check=False)
            poll(lambda: all(a in p.host.run("ip", "xfrm", "policy").stdout for a in (D4, K4)),
                 f"pluto's trap policies for {D4} and {K4}: {p.tail(20)}", 30)
        lab.wait_up(d)
        lab.wait_up(k)
        lab.echo.serve(d.host, [D4])
        lab.echo.serve(k.host, [K4])
        for p in plutos:
            lab.echo.serve(p.host, [p.host.v4])
        yield sl, d, plutos, k
    finally:
        for p in plutos:
            p.stop()
        for ag in (d, k):
            if ag.proc is not None and ag.proc.poll() is None:
                lab.stop(ag)


def check_encrypted(sl, d, pluto, src_ag, src, dst, canary, agent_addr=D4):
    lab = sl.lab
    sniff = Sniffer(lab.factory, [d.host])
    try:
        r = probe(src_ag, src, dst, canary, NEGOTIATION)
    finally:
        sniff.close()
    why = f"{lab.why(d, pluto.host.v4)}\n--- pluto states:\n{pluto.states()}\n--- pluto log:\n{pluto.tail(40)}"
    assert r.first and r.steady_ok == r.steady, f"{r}\n{why}"
    wire = pair_frames(sniff.frames(d.host), src, dst)
    assert wire.esp(), f"no ESP between {src} and {dst}\n{why}"
    assert not wire.plaintext((canary + ":s").encode()), f"steady traffic in clear\n{why}"
    assert not frames_from(wire, agent_addr).plaintext(canary.encode()), f"the agent leaked\n{why}"
    sas = [s for s in lab.api(d, "/sas") if s["remote"] == pluto.host.v4]
    assert len(sas) == 1, f"{sas}\n{why}"
    # pluto agrees: an established Child SA with the agent, and ESP states in its kernel
    poll(lambda: "established Child SA" in pluto.states() or "IPsec SA established" in pluto.states(),
         "pluto to list an established Child SA", 20)
    return sas[0]


def test_pluto_initiates_auth_null_oe(oe_pluto):
    sl, d, (p1, _), _ = oe_pluto
    sa = check_encrypted(sl, d, p1, Agent(p1.host, "pluto", False), P1, D4, "CNRYPLUTOINIT")
    assert "null" in sa["auth"].lower() or "unauth" in sa["auth"].lower(), sa


def test_agent_initiates_auth_null_oe(oe_pluto):
    sl, d, (_, p2), _ = oe_pluto
    sa = check_encrypted(sl, d, p2, d, D4, P2, "CNRYAGENTINIT")
    assert "null" in sa["auth"].lower() or "unauth" in sa["auth"].lower(), sa


def test_pluto_initiates_to_a_keyed_auth_null_agent(oe_pluto):
    sl, _, (p1, _), k = oe_pluto
    sa = check_encrypted(sl, k, p1, Agent(p1.host, "pluto", False), P1, K4, "CNRYPLUTOKEYED",
                         agent_addr=K4)
    assert "null" in sa["auth"].lower() or "unauth" in sa["auth"].lower(), sa


def test_keyed_auth_null_agent_initiates(oe_pluto):
    sl, _, (_, p2), k = oe_pluto
    sa = check_encrypted(sl, k, p2, k, K4, P2, "CNRYKEYEDINIT", agent_addr=K4)
    assert "null" in sa["auth"].lower() or "unauth" in sa["auth"].lower(), sa
