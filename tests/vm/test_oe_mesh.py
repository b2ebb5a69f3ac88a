"""Issue 5 acceptance 4 (second half) on real kernel ESP: ten hosts initiating to each other at
once make 45 SA pairs, no duplicates.

Ten oe-agent daemons (kernel dataplane) in their own namespaces inside the guest, a lab of
their own (tests/vm/oe_lab.py's OeLab, apart from the tier's shared lab): keys in the reverse
zone knot signs, looked up through each host's validating unbound. Every host's group is
private-or-clear for the whole /24, so every host traps every other and initiates; all 90
ordered pairs send their first datagram at the same moment, so both ends of each of the 45
host pairs initiate (crossing IKE_SA_INITs, settled by the engine's tie-break).

Every ordered pair is answered and the wire between each pair carries ESP, never the canary
in clear. After it settles (bounded polls): each agent lists one Child SA per peer, the kernel
of each host holds one inbound and one outbound ESP SA per peer with the same SPIs, both ends
agree, the wire's liveness checks show one IKE SA per host pair (45 pairs across the mesh, no
duplicates), and steady traffic flows both ways on every pair. That every pair's FIRST datagram
arrives (hold) is asserted too, as a known failure of the kernel dataplane under a storm (see
its xfail reason). Figures (wall time per phase, guest memory) are printed and kept in
$OE_VM_LOGS/mesh-figures.txt.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import needs
from tests.hosts import HostFactory
from tests.vm.oe_lab import (OeLab, Sniffer, frames_from, ike_messages, pair_frames, poll,
                             probe, xfrm_states)
from tests.vm.wire import Frames

N = 10
PAIRS = N * (N - 1) // 2
LIVENESS = 10  # s: every established IKE SA shows itself on the wire this often when quiet
# Bound for one pair's first answer: 90 negotiations (45 crossing pairs) at once in TCG.
WAIT = 240.0
# The lab's 5 s DNS timeout is too short here: 90 lookups at once through ten validating
# unbounds while ten python daemons hold the guest's two TCG CPUs; one answer came after 7.7 s
# and its private-or-clear pair fell to the DNS-timeout pass shunt (clear), as designed. The
# IKE responder waits for the key, so this stays well under the peer's 31 s retransmissions.
MESH_CONFIG = f"[ike]\nliveness = {LIVENESS}\n[dns]\ntimeout = 20.0\n"


def meminfo() -> dict[str, int]:
    """/proc/meminfo in MiB (the guest's)."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":", 1)
        out[k] = int(v.split()[0]) // 1024
    return out


def rss_mib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


class Report:
    """Figures of the run (wall time per phase, guest memory): printed, and kept in
    $OE_VM_LOGS/mesh-figures.txt when that is set."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.lines: list[str] = []

    def note(self, what: str) -> None:
        m = meminfo()
        line = (f"mesh {time.monotonic() - self.t0:7.1f} s  {what}: guest MemAvailable "
                f"{m['MemAvailable']}/{m['MemTotal']} MiB")
        self.lines.append(line)
        print(line, flush=True)

    def add(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def keep(self) -> None:
        dest = os.environ.get("OE_VM_LOGS")
        if dest:
            Path(dest, "mesh-figures.txt").write_text("\n".join(self.lines) + "\n")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, esp_kernel):
    """Ten private-or-clear agents with published keys, started in parallel."""
    needs(os.geteuid() == 0, "needs root (network namespaces, XFRM)")
    report = Report()
    factory = HostFactory(tmp_path_factory.mktemp("oe-mesh"))
    # ten python daemons start at once on the guest's two TCG CPUs: ~320 s when the host is
    # idle, more under load
    lab = OeLab(factory, extra_config=MESH_CONFIG, up_bound=900.0)
    try:
        for _ in range(N):
            lab.add("private-or-clear")
        report.note("before start")
        lab.start()
        report.note(f"{N} agents, {N} unbounds and knotd up")
        report.add("mesh agent RSS MiB: " + " ".join(str(rss_mib(a.proc.pid)) for a in lab.agents))
        yield lab, report
    finally:
        report.keep()
        lab.keep_logs()
        lab.close()
        factory.close()


@dataclass
class Storm:
    """What the simultaneous start saw: each ordered pair's probe, and the wire of each host."""

    results: dict
    frames: dict  # host name -> Frames on its veth while the probes ran
    addr: dict    # host name -> its address


@pytest.fixture(scope="module")
def storm(mesh) -> Storm:
    """Every host sends to every other at the same moment (one barrier for all 90 probes)."""
    lab, report = mesh
    ags = lab.agents
    addr = {ag.name: ag.host.v4 for ag in ags}
    ordered = list(itertools.permutations(ags, 2))
    sniff = Sniffer(lab.factory, [ag.host for ag in ags])
    try:
        go = threading.Barrier(len(ordered))

        def send(a, b):
            go.wait()
            return probe(a, addr[a.name], addr[b.name], canary(a, b), WAIT)

        report.note("probes start")
        with ThreadPoolExecutor(len(ordered)) as pool:
            futs = {(a.name, b.name): pool.submit(send, a, b) for a, b in ordered}
            results = {k: f.result() for k, f in futs.items()}
        report.note("every probe answered or given up")
    finally:
        sniff.close()
    st = Storm(results, {ag.name: sniff.frames(ag.host) for ag in ags}, addr)
    report.add(f"mesh crossing initiations (both ends sent IKE_SA_INIT): "
               f"{crossing_pairs(st, ags)} of {PAIRS} host pairs")
    lost = sum(r.steady - r.steady_ok for r in results.values() if r.first)
    report.add(f"mesh steady datagrams lost while the crossings resolved: {lost} of "
               f"{sum(r.steady for r in results.values() if r.first)}")
    return st


def canary(a, b) -> str:
    return f"MESH{a.host.index:02d}TO{b.host.index:02d}"


def test_every_ordered_pair_gets_through_encrypted(mesh, storm):
    """All 90 answered; the wire between each pair carries ESP and never the canary in clear
    (both ends initiate, so both hold while negotiating)."""
    lab, _ = mesh
    addr = storm.addr
    by_name = {ag.name: ag for ag in lab.agents}
    failures = []
    for (an, bn), r in storm.results.items():
        wire = pair_frames(storm.frames[an], addr[an], addr[bn])
        c = r.canary.encode()
        problems = []
        if not r.first:
            problems.append("never answered")
        if not wire.esp():
            problems.append("no ESP on the wire")
        if wire.plaintext(c):
            problems.append(f"the canary in clear {len(wire.plaintext(c))}x")
        if problems:
            failures.append(f"{an} -> {bn} ({addr[an]} -> {addr[bn]}): {'; '.join(problems)} "
                            f"{summary(r)}\n"
                            + "".join(f"  clear: {d}\n" for d in wire.plaintext(c)[:4])
                            + f"{lab.why(by_name[an], addr[bn])}\n{lab.why(by_name[bn], addr[an])}")
    assert not failures, (f"{len(failures)} of {len(storm.results)} ordered pairs wrong:\n\n"
                          + "\n\n".join(failures))


def test_ten_hosts_make_45_sa_pairs_no_duplicates(mesh, storm):
    """Settled: one Child SA pair per host pair in every agent's /sas and /status and in every
    kernel, both ends agreeing; one IKE SA per host pair on the wire (liveness checks); then
    steady traffic both ways on every pair, encrypted."""
    lab, report = mesh
    ags = lab.agents
    addr = storm.addr
    state: dict = {}

    def settled():
        state.clear()
        state.update(snapshot(lab, ags, addr))
        return not state["problems"]

    try:
        poll(settled, "one Child SA pair per peer everywhere", 180.0, 2.0)
    except AssertionError as e:
        raise AssertionError(f"{e}:\n" + "\n".join(state["problems"]) + "\n\n"
                             + diagnose(lab, ags, addr, state["bad"])) from None
    assert len(state["pairs"]) == PAIRS, state["pairs"]
    report.note(f"settled: {len(state['pairs'])} SA pairs")

    # one IKE SA per host pair: each shows itself through its liveness checks
    sniff = Sniffer(lab.factory, [ag.host for ag in ags])
    try:
        quiet_from = time.monotonic()
        host_pairs = {frozenset((addr[a.name], addr[b.name]))
                      for a, b in itertools.combinations(ags, 2)}

        def seen():
            return {frozenset((m.src, m.dst)) for m in ike_messages(sent_frames(sniff, ags))
                    if m.exchange == "INFORMATIONAL"} >= host_pairs

        poll(seen, "a liveness check on every host pair's IKE SA", 6.0 * LIVENESS, 1.0)
        # one more interval: a second IKE SA on a pair would have checked by now too
        time.sleep(max(0.0, 1.5 * LIVENESS - (time.monotonic() - quiet_from)) + LIVENESS)
    finally:
        sniff.close()
    msgs = ike_messages(sent_frames(sniff, ags))
    report.note("liveness window over")
    ike_sas: dict[frozenset, set] = {p: set() for p in host_pairs}
    for m in msgs:
        ike_sas[frozenset((m.src, m.dst))].add((m.spi_i, m.spi_r))
    negotiating = sorted({(m.src, m.dst, m.exchange) for m in msgs
                          if m.exchange != "INFORMATIONAL"})
    dup = {tuple(sorted(p)): sorted(f"{i.hex()}/{r.hex()}" for i, r in s)
           for p, s in ike_sas.items() if len(s) != 1}
    bad = {frozenset(p) for p in dup} | {frozenset(n[:2]) for n in negotiating}
    assert not dup and not negotiating, (
        f"IKE SAs per host pair on the wire (want exactly one each): {dup}\n"
        f"still negotiating after settling: {negotiating}\n\n" + diagnose(lab, ags, addr, bad))
    report.add(f"mesh IKE SAs on the wire: {sum(len(s) for s in ike_sas.values())} "
               f"for {PAIRS} host pairs")

    # steady traffic both ways on the pairs that stay, all at once, never in clear
    ordered = list(itertools.permutations(ags, 2))
    sniff = Sniffer(lab.factory, [ag.host for ag in ags])
    try:
        with ThreadPoolExecutor(len(ordered)) as pool:
            futs = {(a.name, b.name): pool.submit(probe, a, addr[a.name], addr[b.name],
                                                  canary(a, b) + "S", 60.0, 5)
                    for a, b in ordered}
            results = {k: f.result() for k, f in futs.items()}
    finally:
        sniff.close()
    by_name = {ag.name: ag for ag in ags}
    failures = []
    for (an, bn), r in results.items():
        wire = pair_frames(sniff.frames(by_name[an].host), addr[an], addr[bn])
        if not (r.first and r.steady_ok == r.steady and wire.esp()
                and not wire.plaintext(r.canary.encode())):
            failures.append(f"{an} -> {bn}: {summary(r)}, ESP {len(wire.esp())}, clear "
                            f"{len(wire.plaintext(r.canary.encode()))}\n"
                            + lab.why(by_name[an], addr[bn]))
    assert not failures, "steady traffic on the settled pairs:\n\n" + "\n\n".join(failures)
    report.note("steady traffic on all 90 ordered pairs")

    # and nothing changed meanwhile: still the same 45 pairs
    final = snapshot(lab, ags, addr)
    assert not final["problems"] and final["pairs"] == state["pairs"], (
        "\n".join(final["problems"]) + "\n" + diagnose(lab, ags, addr, final["bad"]))


@pytest.mark.xfail(strict=True, reason=(
    "kernel dataplane hold under a storm: most first datagrams are lost (68 of 90 in one run, "
    "e.g. none of #0-#49 arrived, #50 did), while the one-peer hold case passes "
    "(test_oe_lifecycle). Likely cause: until the agent sets a peer's hold shunt, datagrams wait "
    "on the /24 trap's ONE larval queue, shared by every destination; once the first "
    "destination's SA is up the kernel flushes that queue and frees the datagrams of the "
    "others (xfrm_policy_queue_process looks them up without XFRM_LOOKUP_QUEUE: -EAGAIN)"))
def test_first_datagram_of_every_pair_arrives(mesh, storm):
    """Hold (issue 5 acceptance 3) under the storm: the first datagram of each ordered pair
    reaches the echo server."""
    lab, _ = mesh
    got: dict[str, list[int]] = {}
    for _, data in list(lab.echo.received):
        name, _, seq = data.decode(errors="replace").partition(":")
        if seq.isdigit():
            got.setdefault(name, []).append(int(seq))
    lost = []
    for (an, bn), r in storm.results.items():
        if 0 not in got.get(r.canary, []):
            lost.append(f"{an} -> {bn}: first datagram lost; the earliest that arrived was "
                        f"#{min(got.get(r.canary, [-1]))} of {r.sent}")
    print(f"mesh first datagrams lost: {len(lost)} of {len(storm.results)}", *lost[:12],
          sep="\n  ", flush=True)
    assert not lost, (f"{len(lost)} of {len(storm.results)} first datagrams lost:\n"
                      + "\n".join(lost))


def summary(r) -> str:
    return (f"[sent {r.sent}, answered {r.first}, refused {r.refused}, stalled {r.stalled}, "
            f"steady {r.steady_ok}/{r.steady}]")


def sent_frames(sniff: Sniffer, ags) -> Frames:
    """Every frame once: what each host sent (the bridge side sees each frame on two veths)."""
    out = []
    for ag in ags:
        out += frames_from(sniff.frames(ag.host), ag.host.v4).frames
    return Frames(out)


def crossing_pairs(st: Storm, ags) -> int:
    """Host pairs where both ends sent an IKE_SA_INIT request (a figure, not an assertion:
    which end's packet reaches the other first is up to the scheduler)."""
    addr = st.addr
    frames = Frames([f for ag in ags
                     for f in frames_from(st.frames[ag.name], addr[ag.name]).frames])
    starts = {(m.src, m.dst) for m in ike_messages(frames)
              if m.exchange == "IKE_SA_INIT" and not m.response}
    return sum(1 for a, b in itertools.combinations(ags, 2)
               if (addr[a.name], addr[b.name]) in starts and (addr[b.name], addr[a.name]) in starts)


def snapshot(lab: OeLab, ags, addr) -> dict:
    """Each agent's /status and /sas and each kernel's ESP SAs, checked against one SA pair
    per peer: {"problems": [...], "bad": {host pairs}, "pairs": {frozenset(spi_in, spi_out)}}."""
    problems, bad = [], set()
    sas, kernel = {}, {}
    for ag in ags:
        me = addr[ag.name]
        st = lab.api(ag, "/status")
        if st["peers"].get("up") != N - 1 or st["sas"] != N - 1:
            problems.append(f"{ag.name} /status: peers {st['peers']}, sas {st['sas']}")
        listed = lab.api(ag, "/sas")
        kernel[ag.name] = [s for s in xfrm_states(ag.host) if s.proto == "esp" and s.spi]
        for peer in ags:
            if peer is ag:
                continue
            them = addr[peer.name]
            mine = [s for s in listed if s["remote"] == them]
            k_out = {s.spi for s in kernel[ag.name] if (s.src, s.dst) == (me, them)}
            k_in = {s.spi for s in kernel[ag.name] if (s.src, s.dst) == (them, me)}
            wrong = []
            if len(mine) != 1:
                wrong.append(f"/sas lists {len(mine)} Child SAs")
            if len(k_out) != 1 or len(k_in) != 1:
                wrong.append(f"kernel ESP SAs out {sorted(map(hex, k_out))} in "
                             f"{sorted(map(hex, k_in))}")
            if len(mine) == 1 and not wrong:
                s = mine[0]
                if ({int(s["spi_in"], 16)}, {int(s["spi_out"], 16)}) != (k_in, k_out):
                    wrong.append(f"/sas in {s['spi_in']} out {s['spi_out']} is not the kernel's "
                                 f"in {sorted(map(hex, k_in))} out {sorted(map(hex, k_out))}")
                sas[ag.name, peer.name] = (int(s["spi_in"], 16), int(s["spi_out"], 16))
            if wrong:
                problems.append(f"{ag.name} ({me}) for {peer.name} ({them}): {'; '.join(wrong)}")
                bad.add(frozenset((me, them)))
    pairs = set()
    for a, b in itertools.combinations(ags, 2):
        x, y = sas.get((a.name, b.name)), sas.get((b.name, a.name))
        if x is None or y is None:
            continue
        if x != (y[1], y[0]):
            problems.append(f"{a.name} and {b.name} disagree: in/out {x[0]:08x}/{x[1]:08x} vs "
                            f"{y[0]:08x}/{y[1]:08x}")
            bad.add(frozenset((addr[a.name], addr[b.name])))
        else:
            pairs.add(frozenset(x))
    return {"problems": problems, "bad": bad, "pairs": pairs}


def diagnose(lab: OeLab, ags, addr, bad: set, most: int = 6) -> str:
    """lab.why on both ends of each failing host pair (its explain, log lines and kernel
    policies), the first few only."""
    by_addr = {addr[ag.name]: ag for ag in ags}
    out = []
    for p in sorted(bad, key=sorted)[:most]:
        x, y = sorted(p)
        if x in by_addr and y in by_addr:
            out.append(lab.why(by_addr[x], y) + "\n" + lab.why(by_addr[y], x))
    more = f"\n(and {len(bad) - most} more host pairs)" if len(bad) > most else ""
    return "\n\n".join(out) + more
