"""Issue 5 acceptance 6 (strongSwan part) on real kernel ESP: charon 5.9 with the kernel-netlink
backend, trap policies (`start_action = trap`) and static raw keys, against the agent's OE.

Debian's charon has no DNS keying (interop README, "Not in this kit"), so it holds the agent's
RSA public key as a raw `pubkeys` entry; the agent looks up charon's Ed25519 key in the signed
reverse zone, as for any OE peer. Charon C1 initiates from its trap policy's ACQUIRE; the agent
initiates to charon C2 from its own; each over IPv4 and IPv6 (one conn per family). Transport
mode (the agent's OE mode). The wire is the proof: ESP between the pair, the steady canary
never in clear, and charon's kernel holds the Child SA it reports.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import needs
from tests.vm.oe_lab import Agent
from tests.vm.peers_vm import (C1, C2, D4, D6, check_agent_side, peer_lab, peer_of,
                               transport_esp_pair, until)

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
        for h, (v4, v6) in zip(pl.charon_hosts, (C1, C2)):
            # retransmits up to ~40 s: the agent answers IKE_AUTH once it has charon's key
            c = Charon(h, backend="netlink", retransmit_tries=5)
            c.start(timeout=60)
            started.append(c)
            key = pl.charon_keys[h.name]
            c.load_key(key)
            for conn, local, remote in (("agent", v4, D4), ("agent6", v6, D6)):
                c.load_conn(conn, host_conn(
                    local=local, remote=remote, local_key=key, remote_pub=pl.d_public_pem,
                    child=f"{conn}-oe", proposals=IKE, esp_proposals=ESP,
                    child_extra={"mode": "transport", "start_action": "trap"}))
            # IPv6 neighbour discovery stays outside IPsec (as libreswan and the agent do):
            # the host-pair trap would otherwise catch the NA/NS and the peers never resolve
            c.load_conn("nd", {"version": 2, "children": {f"nd{t}": {
                "mode": "pass", "start_action": "trap", "local_ts": [f"::/0[ipv6-icmp/{t}]"],
                "remote_ts": [f"::/0[ipv6-icmp/{t}]"]} for t in (135, 136)}})
            for remote in (D4, D6):
                until(lambda: remote in h.run("ip", "xfrm", "policy").stdout,
                      f"charon's trap policy for {remote}: {c.tail(20)}")
            pl.lab.echo.serve(h, [v4, v6])
        yield pl, started
    finally:
        for c in started:
            c.stop()


def check(pl, charon, src_ag, src, dst, canary, initiator: bool):
    lab, d = pl.lab, pl.d
    peer, agent = peer_of(d, src_ag, src, dst)
    conn = "agent6" if ":" in peer else "agent"
    check_agent_side(lab, d, src_ag, src, dst, canary, NEGOTIATION,
                     lambda: f"--- charon SAs:\n{charon.list_sas()}\n"
                             f"--- charon log:\n{charon.tail(60)}")
    dns = lab.explain(d, peer)["dns"]
    assert dns and dns["status"] == "secure-key", dns
    # charon: one IKE SA in the role we expect, its Child SA installed in transport mode, and
    # the ESP states in its namespace's kernel (kernel-netlink, not userspace ESP)
    def up(x):
        return x["name"] == conn and x.get("state") == "ESTABLISHED" and any(
            c.get("state") == "INSTALLED" for c in (x.get("child-sas") or {}).values())

    ike = charon.wait_sas(lambda s: any(up(x) for x in s), timeout=30,
                          what=f"an established IKE SA of {conn} with an installed Child SA")
    est = [x for x in ike if x["name"] == conn and x.get("state") == "ESTABLISHED"]
    assert len(est) == 1, est
    assert (est[0].get("initiator") == "yes") == initiator, est[0]
    child = next(iter(est[0]["child-sas"].values()))
    assert child["mode"] == "TRANSPORT" and child["protocol"] == "ESP", child
    transport_esp_pair(charon.host, peer, agent)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_charon_trap_initiates_to_agent(trap_charons, v6):
    pl, (c1, _) = trap_charons
    src, dst = (C1[1], D6) if v6 else (C1[0], D4)
    check(pl, c1, Agent(c1.host, "charon", True), src, dst, f"CNRYCHINIT{6 if v6 else 4}", True)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_agent_initiates_to_charon(trap_charons, v6):
    pl, (_, c2) = trap_charons
    src, dst = (D6, C2[1]) if v6 else (D4, C2[0])
    check(pl, c2, pl.d, src, dst, f"CNRYAGCHRN{6 if v6 else 4}", False)
