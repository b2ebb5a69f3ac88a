"""oe-agent's IKE engine + userspace ESP dataplane <-> strongSwan charon with kernel-libipsec
(tunnel mode, ESP-in-UDP): pings in both directions, each side initiating (issue 6, item 3).

The oe-agent side is a small driver (tests/netns/test_esp_ike.py, written into the test host): IkeAdapter owns UDP
500/4500 and hands ESP to the dataplane (`on_esp`), the dataplane sends through the adapter
(`attach_udp(send_esp)`), and each ChildSaEstablished is installed with `add_child_sa` — the
wiring the agent does, without the agent's policy logic.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.interop.peers.charon import host_conn, sole_child
from tests.interop.peers.wire import canary_seen, read_pcap
from tests.netns.test_esp_ike import DRIVER  # the same driver; tunnel mode here

CANARY = b"oe-agent-canary!"
ROOT = Path(__file__).resolve().parents[2]


def _wait_for(path: Path, what: bytes, proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and what in path.read_bytes():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{what!r} not in {path}: {path.read_bytes()[-3000:]!r}")


@pytest.mark.parametrize("oe_initiates", [True, False], ids=["oe-initiates", "charon-initiates"])
def test_ike_and_userspace_esp_with_charon(hosts, charon, keypair, oe_initiates):
    a, b = hosts.pair()  # a: oe-agent, b: charon
    ka, kb = keypair("ed25519", 0), keypair("ed25519", 1)
    cb = charon(b)
    cb.load_key(kb)
    cb.load_conn("peer", host_conn(local=b.v4, remote=a.v4, local_key=kb,
                                   remote_pub=ka.public_pem, child="host",
                                   proposals="aes256gcm16-prfsha256-x25519",
                                   esp_proposals="aes128gcm16"))
    priv, _ = ka.write(a.workdir, "local")
    pub = a.workdir / "peer.pub.pem"
    pub.write_bytes(kb.public_pem)
    (a.workdir / "driver.py").write_text(DRIVER)
    tcpdump, pcap = hosts.capture(b, "udp or esp", name="wire")
    drv = a.popen(sys.executable, str(a.workdir / "driver.py"), a.v4, b.v4, str(priv), str(pub),
                  "1" if oe_initiates else "0", "tunnel", log="driver.log", cwd=str(ROOT))
    log = a.workdir / "driver.log"
    _wait_for(log, b"READY", drv)
    if not oe_initiates:
        cb.initiate("host", "peer")
    _wait_for(log, b"CHILD_UP", drv)
    cb.wait_sas(lambda s: sole_child(s, "peer") is not None, what="Child SA installed")

    a.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "-p", CANARY.hex(), b.v4, timeout=20)
    b.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "-p", CANARY.hex(), a.v4, timeout=20)
    b.stop(tcpdump)
    a.stop(drv)
    _, child = sole_child(cb.list_sas(), "peer")
    assert int(child["packets-in"]) >= 6 and int(child["packets-out"]) >= 6, child
    assert "COUNTERS" in log.read_text()
    esp = [p for p in read_pcap(pcap) if p.is_esp_in_udp]
    assert {p.payload[:4].hex() for p in esp} == {child["spi-in"], child["spi-out"]}
    assert not canary_seen(pcap, CANARY)
