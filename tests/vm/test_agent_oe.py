"""The agent end to end on real kernel ESP (the project's XFRM dataplane), inside the guest:
three agent hosts and the embedded DNS server in namespaces, one lab for the whole file (every
process start costs seconds here). Outcomes follow the groups (product.md §2); a capture on the
responder's veth proves ESP and no plaintext canary; `private` never leaks.
"""
from __future__ import annotations

import json
import re
import signal
import time

import pytest

from tests.netns.test_agent_oe import OeLab, poll, wire


@pytest.fixture
def lab3(hosts, esp_kernel):
    """a: private, b: clear-or-private, c: clear — all with published keys."""
    lab = OeLab(hosts, "kernel")
    lab.bound = 300.0
    a, b, c = lab.build([("private", True), ("clear-or-private", True), ("clear", True)])
    lab.start(a, b, c)
    yield lab, a, b, c
    for h in (a, b, c):
        if h.name in lab.agents:
            assert lab.stop(h) == 0, lab.log(h)
        assert "Traceback" not in lab.log(h), lab.log(h)


def captured(lab, src, dst, canary, v6=False, wait=60.0):
    cap, pcap = lab.f.capture(dst, "udp or esp", name=f"wire-{canary}")
    try:
        answers = lab.probe(src, dst, canary, wait=wait, v6=v6)
    finally:
        time.sleep(0.5)
        dst.stop(cap, signal.SIGINT)
    esp, plain = wire(pcap, canary)
    return answers, esp, plain


def test_agent_on_kernel_esp(lab3):
    """One lab (process starts are expensive here): outcomes, then reload, then clean stop."""
    lab, a, b, c = lab3
    st = lab.ctl(a, "status")
    assert "KernelDataplane" in st and "full ESP" in st, st
    # private -> clear-or-private: encrypted, IPv4 and IPv6, DNSSEC-authenticated
    for v6, canary in ((False, "CANARYVM4"), (True, "CANARYVM6")):
        answers, esp, plain = captured(lab, a, b, canary, v6=v6)
        assert answers >= 2 and esp > 0 and plain == 0, (v6, answers, esp, plain,
                                                          lab.ctl(a, "explain", b.v6 if v6 else b.v4))
    traffic = lab.ctl(a, "trafficstatus")
    assert traffic.count("authenticated (DNSSEC key)") == 2, traffic
    assert "inBytes=0" not in traffic, traffic  # kernel counters moved both ways
    # private -> clear: dropped, and the canary never leaves in the clear
    answers, esp, plain = captured(lab, a, c, "CANARYVMDROP", wait=20.0)
    assert answers == 0 and plain == 0, (answers, esp, plain, lab.ctl(a, "explain", c.v4))
    ex = json.loads(lab.ctl(a, "explain", c.v4, "--json"))  # the shunt may have expired by now
    assert any(h["event"].startswith("failure shunt drop") and "silent" in h["event"]
               for h in ex["history"]), ex
    # clear -> private: a drops its reply, nothing answers
    answers, esp, plain = captured(lab, c, a, "CANARYVMBACK", wait=10.0)
    assert answers == 0

    # reload by difference: IPv6 becomes clear, the IPv4 trap and its SA stay
    lab.set_groups(a, {"private": "192.0.2.0/24\n", "clear": "2001:db8::/64\n"})
    out = lab.ctl(a, "reload")
    assert out.startswith("reloaded: ") and "+ pass 2001:db8::/64" in out, out
    pol = a.run("ip", "xfrm", "policy", "list").stdout
    assert "dst 192.0.2.0/24" in pol
    traffic = lab.ctl(a, "trafficstatus")
    assert traffic.count("ESP in=") == 1 and b.v4 in traffic, traffic  # the v6 SA went

    # clean stop: no SAs stay (larval states expire by themselves), and of the policies only
    # the seal of the private peer it had an SA with: an out block on that host pair that the
    # kernel removes within 120 s, so that peer is not sent to in clear while no agent runs
    assert lab.stop(a) == 0, lab.log(a)
    pol = a.run("ip", "-s", "xfrm", "policy", "list").stdout
    blocks = [b for b in re.split(r"\n(?=src )", pol.strip()) if b]
    sas = [l for l in a.run("ip", "xfrm", "state", "list").stdout.splitlines()
           if l.startswith("\tproto esp spi") and "spi 0x00000000" not in l]
    assert sas == [], sas
    assert len(blocks) == 1, pol
    (seal,) = blocks
    hard = re.search(r"expire add: soft \d+\(sec\), hard (\d+)\(sec\)", seal)
    assert (seal.startswith(f"src {a.v4}/32 dst {b.v4}/32") and "dir out action block" in seal
            and hard and 0 < int(hard[1]) <= 120), pol
