"""Issue 5 acceptance 1 and 7 on real kernel ESP: the group matrix over IPv4 and IPv6.

Agents A and B with the kernel dataplane (tests/vm/oe_lab.py's shared lab), keys in the
reverse zones knot signs, looked up through each agent's validating unbound. Each ordered group pair (g1 on the sender, g2 on the receiver) has its own
address pair, so all 25 (both directions of every pair of the five groups, same-group pairs
included) run at once, each between peers that never met. The bridge side of the veth is the
wire: encrypted pairs carry ESP and their steady traffic is never in clear; a side whose group
initiates (private-or-clear, private) never sends the canary in clear in an encrypted pair,
not even while the negotiation runs (hold); `private` never leaks; blocked pairs get no answer.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import needs
from tests.vm.oe_lab import (INITIATES, MA4, MA6, MB4, MB6, PAIRS, Sniffer, expected,
                             frames_from, pair_frames, probe, shared_lab, xfrm_states)

WAIT = 90.0  # bound for one pair's first answer (all pairs negotiate at once in the guest)
SHORT = {"clear": "clr", "clear-or-private": "cop", "private-or-clear": "poc", "private": "prv",
         "block": "blk"}


@pytest.fixture
def lab(request, tmp_path_factory, esp_kernel):
    needs(os.geteuid() == 0, "needs root (network namespaces, XFRM)")
    return shared_lab(request, tmp_path_factory)


def run_matrix(sl, v6: bool) -> list[str]:
    """Probe every ordered group pair at once; the failures (empty = all as product.md §2)."""
    ma, mb = (MA6, MB6) if v6 else (MA4, MB4)
    lab, a, b = sl.lab, sl.a, sl.b
    sniff = Sniffer(lab.factory, [a.host, b.host])
    try:
        with ThreadPoolExecutor(len(PAIRS)) as pool:
            futs = {p: pool.submit(probe, a, ma[p], mb[p],
                                   f"CNRY{SHORT[p[0]]}{SHORT[p[1]]}{6 if v6 else 4}", WAIT)
                    for p in PAIRS}
            results = {p: f.result() for p, f in futs.items()}
    finally:
        sniff.close()
    failures = []
    for (g1, g2), r in results.items():
        src, dst = ma[g1, g2], mb[g1, g2]
        want = expected(g1, True, g2, True)
        wire = pair_frames(sniff.frames(a.host), src, dst)
        esp = len(wire.esp())
        canary = r.canary.encode()
        clear_all = len(wire.plaintext(canary))
        clear_steady = len(wire.plaintext(canary + b":s"))
        got = ("blocked" if not r.first else
               "encrypted" if esp and not clear_steady and r.steady_ok == r.steady else
               "clear" if clear_steady and not esp else "mixed")
        problems = []
        if got != want:
            problems.append(f"outcome {got}, want {want}")
        if r.first and r.steady_ok != r.steady:
            problems.append(f"lost {r.steady - r.steady_ok} of {r.steady} steady datagrams")
        for side, group in ((src, g1), (dst, g2)):
            leak = len(frames_from(wire, side).plaintext(canary))
            # an initiating group holds its packets until the SA is up or the failure shunt
            # decides: in an encrypted pair it never sends plaintext; private never does
            if leak and (group == "private" or (want == "encrypted" and group in INITIATES)):
                problems.append(f"the {group} side {side} sent the canary in clear {leak}x")
        if problems:
            failures.append(
                f"{g1} -> {g2} ({src} -> {dst}): {'; '.join(problems)} "
                f"[sent {r.sent}, answered {r.first}, steady {r.steady_ok}/{r.steady}, ESP {esp}, "
                f"plaintext {clear_all}]\n"
                + "".join(f"  clear: {d}\n" for d in wire.plaintext(canary)[:8])
                + f"{lab.why(a, dst)}\n{lab.why(b, src)}")
    return failures


def test_group_matrix_ipv4(lab):
    failures = run_matrix(lab, v6=False)
    assert not failures, f"{len(failures)} of 25 group pairs wrong:\n\n" + "\n\n".join(failures)


def test_group_matrix_ipv6(lab):
    failures = run_matrix(lab, v6=True)
    assert not failures, f"{len(failures)} of 25 group pairs wrong:\n\n" + "\n\n".join(failures)


def test_matrix_sas_are_kernel_sas(lab):
    """Every encrypted pair is one kernel SA pair (ip xfrm state) matching the agent's /sas and
    `trafficstatus`; a clear or blocked pair has no SA."""
    a = lab.a
    kernel = xfrm_states(a.host)
    sas = {s["remote"]: s for s in lab.lab.api(a, "/sas")}
    rc, out, err = lab.lab.cli(a, "trafficstatus")
    assert rc == 0, err
    for p in PAIRS:
        for ma, mb in ((MA4, MB4), (MA6, MB6)):
            # SPI 0 = a larval (ACQUIRE) state: a negotiation in flight, not an SA
            esp = {s.spi for s in kernel
                   if s.proto == "esp" and s.spi and {s.src, s.dst} == {ma[p], mb[p]}}
            if expected(p[0], True, p[1], True) == "encrypted":
                s = sas.get(mb[p])
                assert s is not None, f"{p}: no SA to {mb[p]} in /sas: {sorted(sas)}"
                assert esp == {int(s["spi_in"], 16), int(s["spi_out"], 16)}, (p, esp, s)
                assert f"{mb[p]}: ESP in={s['spi_in']} out={s['spi_out']}" in out, out
            else:
                assert not esp and mb[p] not in sas, (p, esp, sas.get(mb[p]))
