"""oe-agent's userspace ESP against strongSwan's kernel-libipsec ESP (tunnel mode, ESP-in-UDP).

Two charons negotiate a Child SA (IKEv2, Ed25519); charon B is then killed without a delete and
oe-agent's dataplane takes over B's side with the same SPIs and keys (from charon's key log):
charon A's ESP is decrypted by oe-agent and the reverse, pings in both directions, and the veth
shows only ESP-in-UDP. (The IKE-driven interop, with oe-agent's own IKE engine, is the agent's.)
"""
from __future__ import annotations

import ipaddress
import json
import signal
import sys
import time
from pathlib import Path

from oe_agent.esp.static import params_to_json
from oe_agent.model import ChildSaParams, EspAlgorithm, Mode
from tests.interop.peers.charon import child_keys, host_conn, sole_child
from tests.interop.peers.wire import canary_seen, read_pcap

CANARY = b"oe-agent-canary!"
ROOT = Path(__file__).resolve().parents[2]


def _wait_for(path: Path, what: bytes, proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and what in path.read_bytes():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{what!r} not in {path}: {path.read_bytes()[-2000:]!r}")


def test_userspace_esp_talks_to_kernel_libipsec(hosts, charon, keypair):
    a, b = hosts.pair()
    ka, kb = keypair("ed25519", 0), keypair("ed25519", 1)
    ca, cb = charon(a), charon(b, log_keys=True)
    for c, me, peer, mine, theirs in ((ca, a, b, ka, kb), (cb, b, a, kb, ka)):
        c.load_key(mine)
        c.load_conn("peer", host_conn(local=me.v4, remote=peer.v4, local_key=mine,
                                      remote_pub=theirs.public_pem, child="host",
                                      proposals="aes256gcm16-prfsha256-x25519",
                                      esp_proposals="aes128gcm16"))
    ca.initiate("host", "peer")
    for c in (ca, cb):
        c.wait_sas(lambda s: sole_child(s, "peer") is not None, what="Child SA installed")
    _, child = sole_child(cb.list_sas(), "peer")
    (keys,) = child_keys(cb.log_text())
    assert child["mode"] == "TUNNEL" and child.get("encap") == "yes"

    # B's charon goes away without telling A; oe-agent's dataplane takes B's SAs over.
    # B is the responder: its inbound SA uses the initiator's keys (RFC 7296 §2.17)
    b.stop(cb.proc, sig=signal.SIGKILL)
    cb.proc = None
    local, remote = ipaddress.ip_address(b.v4), ipaddress.ip_address(a.v4)
    params = ChildSaParams(local=local, remote=remote, spi_in=int(child["spi-in"], 16),
                           spi_out=int(child["spi-out"], 16), mode=Mode.TUNNEL,
                           alg=EspAlgorithm("aes-gcm-16", 128), encr_key_in=keys["encr_i"],
                           encr_key_out=keys["encr_r"], encap=(4500, 4500))
    cfg = b.workdir / "esp.json"
    cfg.write_text(json.dumps({"child_sas": [params_to_json(params)]}))
    esp = b.popen(sys.executable, "-m", "oe_agent.esp", str(cfg), log="esp.log", cwd=str(ROOT))
    _wait_for(b.workdir / "esp.log", b"oe_agent.esp ready", esp)

    tcpdump, pcap = hosts.capture(b, "udp", name="esp")
    a.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "-p", CANARY.hex(), b.v4, timeout=20)
    b.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "-p", CANARY.hex(), a.v4, timeout=20)
    b.stop(tcpdump)
    b.stop(esp)
    stats = json.loads((b.workdir / "esp.log").read_text().splitlines()[-1])
    sa = stats["sas"][f"{params.spi_in:#010x}"]
    assert sa["in"]["packets"] >= 6 and sa["out"]["packets"] >= 6, stats
    wire = [p for p in read_pcap(pcap) if p.is_esp_in_udp]
    assert {p.payload[:4].hex() for p in wire} == {child["spi-in"], child["spi-out"]}
    assert len(wire) >= 12
    assert not canary_seen(pcap, CANARY)
    _, child_a = sole_child(ca.list_sas(), "peer")
    assert int(child_a["packets-in"]) >= 6  # charon A accepted what oe-agent sent
