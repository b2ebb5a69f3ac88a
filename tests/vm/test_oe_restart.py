"""Issue 5 acceptance 1 on real kernel ESP: `private` never leaks plaintext while its agent
restarts. Host P (group `private` for Q) keeps sending datagrams to Q (clear-or-private for
P, so Q only answers) while P's agent is stopped with SIGTERM and started again; the bridge
side of P's veth, captured the whole time, never carries the canary in clear (neither P's
datagrams nor Q's echoes of them), and the traffic is ESP again afterwards.

Its own small lab (tests/vm/oe_lab.py: knot, an unbound per agent, two agents), so restarting
P disturbs no other test. By default the stopping agent deletes the SA pair and leaves a
bounded block on the host pair (KernelDataplane.seal), and the next start keeps the pair
blocked until the group's trap is back, then negotiates anew. With `keep_sas_on_stop` it
leaves the SA pair (P's traffic stays ESP, and answered, while no agent runs), and the next
start adopts it and renews it at once with a new IKE SA: no packet refused at any point.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest

from tests.conftest import needs
from tests.hosts import HostFactory
from tests.vm.oe_lab import ECHO_PORT, OeLab, Sniffer, frames_from, pair_frames, poll
from tests.vm.wire import in_netns

P4, Q4 = "192.0.2.41", "192.0.2.42"
P6, Q6 = "2001:db8::41", "2001:db8::42"
NEGOTIATION = 120.0  # bound for one negotiation or one agent start in the loaded guest
KEEP = "[agent]\nkeep_sas_on_stop = true\n"


@pytest.fixture(scope="module")
def restart_lab(tmp_path_factory, esp_kernel):
    needs(os.geteuid() == 0, "needs root (network namespaces, XFRM)")
    factory = HostFactory(tmp_path_factory.mktemp("restart"))
    lab = OeLab(factory)
    try:
        p = lab.add({"private": f"{Q4}/32\n{Q6}/128\n"}, v4s=[P4], v6s=[P6])
        q = lab.add({"clear-or-private": f"{P4}/32\n{P6}/128\n"}, v4s=[Q4], v6s=[Q6])
        lab.start()
        yield lab, p, q
    finally:
        lab.keep_logs()
        lab.close()
        factory.close()


class Sender:
    """Sends `CNRYRESTART:n` from P to Q's echo every 0.2 s in a thread, and notes which
    came back; sendto() refused by a block policy (EPERM) counts as not sent."""

    def __init__(self, host, src: str, dst: str):
        with in_netns(host):
            self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s.bind((src, 0))
        self.s.settimeout(0.2)
        self.dst = dst
        self.sent: dict[int, float] = {}   # n -> when it left
        self.refused = 0
        self.answered: dict[int, float] = {}
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        n = 0
        while not self._stop.is_set():
            try:
                self.s.sendto(f"CNRYRESTART:{n}".encode(), (self.dst, ECHO_PORT))
                self.sent[n] = time.monotonic()
            except PermissionError:
                self.refused += 1
            n += 1
            try:
                while True:
                    data = self.s.recv(2048)
                    if data.startswith(b"CNRYRESTART:"):
                        self.answered[int(data.split(b":")[1])] = time.monotonic()
            except (socket.timeout, ValueError):
                pass

    def answered_after(self, t: float) -> int:
        return sum(1 for n, sent in list(self.sent.items()) if sent > t and n in self.answered)

    def close(self):
        self._stop.set()
        self.t.join(5)
        self.s.close()


def sas_to(lab, ag, remote: str) -> list[dict]:
    return [s for s in lab.api(ag, "/sas") if s["remote"] == remote]


@pytest.mark.parametrize("extra", ["", KEEP], ids=["default", "keep_sas_on_stop"])
def test_private_never_leaks_while_its_agent_restarts(restart_lab, extra):
    """The stopping agent's config decides; the agent started again runs with
    keep_sas_on_stop (what the next case stops), so the cases need no extra restart."""
    lab, p, q = restart_lab
    if p.extra != extra:  # this case alone: an agent with its config first
        p.extra = extra
        lab.restart(p)
    sniff = Sniffer(lab.factory, [p.host])
    sender = Sender(p.host, P4, Q4)
    try:
        poll(lambda: sas_to(lab, p, Q4) and sender.answered,
             "P's first SA with Q and an echo through it", NEGOTIATION, 0.5)
        before = sas_to(lab, p, Q4)[0]
        assert lab.stop(p) == 0, lab.log(p)[-3000:]
        stopped = time.monotonic()
        time.sleep(2.0)  # no agent runs: P goes on sending
        launched = time.monotonic()
        shutil.copy(p.host.workdir / "agent.log",
                    p.host.workdir / f"agent.before-{'keep' if extra else 'default'}-restart.log")
        p.extra = KEEP
        lab.launch(p)
        lab.wait_up(p)
        poll(lambda: sender.answered_after(time.monotonic() - 1.0) and sas_to(lab, p, Q4),
             "P's traffic answered again through a new SA", NEGOTIATION, 0.5)
        after = sas_to(lab, p, Q4)
        time.sleep(1.0)
    finally:
        sender.close()
        sniff.close()
    why = lab.why(p, Q4) + "\n" + lab.why(q, P4)
    wire = pair_frames(sniff.frames(p.host), P4, Q4)
    clear = wire.plaintext(b"CNRYRESTART")
    assert not clear, (f"the canary crossed P's veth in clear {len(clear)}x (P sent "
                       f"{len(frames_from(wire, P4).plaintext(b'CNRYRESTART'))} of them):\n"
                       + "\n".join(clear[:8]) + "\n" + why)
    assert len(after) == 1 and after[0]["spi_in"] != before["spi_in"], (before, after, why)
    spis = {spi for _, spi in wire.esp()}
    assert {int(after[0]["spi_in"], 16), int(after[0]["spi_out"], 16)} <= spis, (spis, after)
    assert sender.answered_after(stopped), f"nothing answered after the restart\n{why}"
    if extra:
        down = [n for n, t in sender.sent.items() if stopped < t < launched and n in sender.answered]
        assert down, f"the kept SA pair carried nothing while no agent ran\n{why}"
        assert sender.refused == 0, f"{sender.refused} datagrams refused (a block)\n{why}"
        story = " ".join(h["event"] for h in lab.explain(p, Q4)["history"])
        assert "kept by the previous run: renewing" in story, story
