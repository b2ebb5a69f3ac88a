"""Issue 5 acceptance 6 (strongSwan part) on real kernel ESP: charon 5.9 with the kernel-netlink
backend, trap policies (`start_action = trap`) and static raw keys, against the agent's OE.

Debian's charon has no DNS keying (interop README, "Not in this kit"), so it holds the agent's
RSA public key as a raw `pubkeys` entry; the agent looks up charon's Ed25519 key in the signed
reverse zone, as for any OE peer. Charon C1 initiates from its trap policy's ACQUIRE; the agent
initiates to charon C2 from its own. Transport mode both ways (the agent's OE mode). The wire
is the proof: ESP between the pair, the steady canary never in clear, and charon's kernel
holds the Child SA it reports.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import needs
from tests.vm.oe_lab import Agent, Sniffer, frames_from, pair_frames, probe, xfrm_states
from tests.vm.peers_vm import C1, C2, D4, peer_lab, until

NEGOTIATION = 120.0  # the agent's DNS lookup and RSA signature in a loaded TCG guest
IKE = "aes256gcm16-prfsha256-x25519"
ESP = "aes256gcm16"


@pytest.fixture(scope="module")
def trap_charons(request, tmp_path_factory, esp_kernel):
    from tests.interop.peers.charon import CHARON_BIN, Charon, host_conn

    needs(os.geteuid() == 0, "needs root (network namespaces, XFRM)")
    needs(Path(CHARON_BIN).exists(), f"strongSwan's charon at {CHARON_BIN} (tools/install-deps.sh)")
    pl = peer_lab(request, tmp_path_factory)
    started = []
    try:
        for h, (v4, _v6) in zip(pl.charon_hosts, (C1, C2)):
            # retransmits up to ~40 s: the agent answers IKE_AUTH once it has charon's key
            c = Charon(h, backend="netlink", retransmit_tries=5)
            c.start(timeout=60)
            started.append(c)
            key = pl.charon_keys[h.name]
            c.load_key(key)
            c.load_conn("agent", host_conn(
                local=v4, remote=D4, local_key=key, remote_pub=pl.d_public_pem, child="oe",
                proposals=IKE, esp_proposals=ESP,
                child_extra={"mode": "transport", "start_action": "trap"}))
            until(lambda: D4 in h.run("ip", "xfrm", "policy").stdout,
                  f"charon's trap policy for {D4}: {c.tail(20)}")
            pl.lab.echo.serve(h, [v4])
        yield pl, started
    finally:
        for c in started:
            c.stop()


def check(pl, charon, src_ag, src, dst, canary, initiator: bool):
    lab, d = pl.lab, pl.d
    peer = charon.host.v4
    sniff = Sniffer(lab.factory, [d.host])
    try:
        r = probe(src_ag, src, dst, canary, NEGOTIATION)
    finally:
        sniff.close()
    why = (f"{lab.why(d, peer)}\n--- charon SAs:\n{charon.list_sas()}\n"
           f"--- charon log:\n{charon.tail(60)}")
    assert r.first and r.steady_ok == r.steady, f"{r}\n{why}"
    wire = pair_frames(sniff.frames(d.host), src, dst)
    assert wire.esp(), f"no ESP between {src} and {dst}\n{why}"
    assert not wire.plaintext((canary + ":s").encode()), f"steady traffic in clear\n{why}"
    assert not frames_from(wire, D4).plaintext(canary.encode()), f"the agent leaked\n{why}"
    sas = [s for s in lab.api(d, "/sas") if s["remote"] == peer]
    assert len(sas) == 1, f"{sas}\n{why}"
    dns = lab.explain(d, peer)["dns"]
    assert dns and dns["status"] == "secure-key", dns
    # charon: one IKE SA in the role we expect, its Child SA installed in transport mode, and
    # the ESP states in its namespace's kernel (kernel-netlink, not userspace ESP)
    ike = charon.wait_sas(lambda s: any(x.get("state") == "ESTABLISHED" and any(
        c.get("state") == "INSTALLED" for c in (x.get("child-sas") or {}).values()) for x in s),
        timeout=30, what="an established IKE SA with an installed Child SA")
    est = [x for x in ike if x.get("state") == "ESTABLISHED"]
    assert len(est) == 1, est
    assert (est[0].get("initiator") == "yes") == initiator, est[0]
    child = next(iter(est[0]["child-sas"].values()))
    assert child["mode"] == "TRANSPORT" and child["protocol"] == "ESP", child
    esp = {(s.src, s.dst) for s in xfrm_states(charon.host)
           if s.proto == "esp" and s.mode == "transport"}
    assert {(peer, D4), (D4, peer)} <= esp, esp


def test_charon_trap_initiates_to_agent(trap_charons):
    pl, (c1, _) = trap_charons
    check(pl, c1, Agent(c1.host, "charon", True), C1[0], D4, "CNRYCHINIT", True)


def test_agent_initiates_to_charon(trap_charons):
    pl, (_, c2) = trap_charons
    check(pl, c2, pl.d, D4, C2[0], "CNRYAGCHRN", False)
