"""Two IkeAdapters in two namespaces establish an IKE SA and a Child SA over real UDP
(ports 500 -> 4500 with the non-ESP marker), and both report the same SPIs."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

ROOT = Path(__file__).resolve().parents[2]

DRIVER = r'''
import asyncio, ipaddress, json, sys
from cryptography.hazmat.primitives import serialization
from oe_agent.ike.adapter import IkeAdapter
from oe_agent.ike.auth import SignatureCredential
from oe_agent.ike.events import ChildSaEstablished, IkeSaEstablished, NegotiationFailed
from oe_agent.ike.payloads import IdInitiator
from oe_agent.ike.sa import IkeConfig

role, local, remote, key_path, peer_path, mode = sys.argv[1:7]
key = serialization.load_pem_private_key(open(key_path, "rb").read(), None)
peer = serialization.load_pem_public_key(open(peer_path, "rb").read())
cfg = IkeConfig(IdInitiator.from_address(local), SignatureCredential(key),
                peer_keys=(peer,), mode=__import__("oe_agent.model").model.Mode(mode))

def report(sa, ev):
    if isinstance(ev, IkeSaEstablished):
        out = {"event": "ike", "spi_i": ev.spi_i.hex(), "spi_r": ev.spi_r.hex(),
               "encap": ev.encap}
    elif isinstance(ev, ChildSaEstablished):
        p = ev.params
        out = {"event": "child", "spi_in": p.spi_in, "spi_out": p.spi_out,
               "mode": p.mode.value, "key_in": p.encr_key_in.hex(), "key_out": p.encr_key_out.hex()}
    elif isinstance(ev, NegotiationFailed):
        out = {"event": "failed", "reason": ev.reason, "detail": ev.detail}
    else:
        out = {"event": type(ev).__name__}
    print(json.dumps(out), flush=True)

async def main():
    async with IkeAdapter([local], lambda l, r: cfg, report) as ad:
        print(json.dumps({"event": "ready"}), flush=True)
        if role == "initiator":
            ad.connect(cfg, local, remote)
        await asyncio.sleep(60)

asyncio.run(main())
'''


def _events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def _wait(path: Path, name: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in _events(path):
            if e["event"] == name:
                return e
            if e["event"] == "failed":
                raise AssertionError(f"negotiation failed: {e}")
        time.sleep(0.05)
    raise AssertionError(f"no {name} event in {path}: {path.read_text() if path.exists() else ''}")


def _keys(d: Path, name: str):
    k = ed25519.Ed25519PrivateKey.generate()
    (d / f"{name}.key").write_bytes(k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (d / f"{name}.pub").write_bytes(k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.mark.parametrize("family,mode", [("v4", "transport"), ("v6", "tunnel")])
def test_ike_and_child_sa_over_udp(hosts, tmp_path, family, mode):
    a, b = hosts.pair()
    la, lb = getattr(a, family), getattr(b, family)
    _keys(tmp_path, "a")
    _keys(tmp_path, "b")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    pb = b.popen(sys.executable, str(script), "responder", lb, la, str(tmp_path / "b.key"),
                 str(tmp_path / "a.pub"), mode, log="b.log", cwd=ROOT)
    _wait(b.workdir / "b.log", "ready")
    pa = a.popen(sys.executable, str(script), "initiator", la, lb, str(tmp_path / "a.key"),
                 str(tmp_path / "b.pub"), mode, log="a.log", cwd=ROOT)
    try:
        ike_a = _wait(a.workdir / "a.log", "ike")
        ike_b = _wait(b.workdir / "b.log", "ike")
        child_a = _wait(a.workdir / "a.log", "child")
        child_b = _wait(b.workdir / "b.log", "child")
    finally:
        a.stop(pa)
        b.stop(pb)
    assert (ike_a["spi_i"], ike_a["spi_r"]) == (ike_b["spi_i"], ike_b["spi_r"])
    assert ike_a["encap"] == ike_b["encap"] == [4500, 4500]  # floated to the NAT-T port
    assert (child_a["spi_in"], child_a["spi_out"]) == (child_b["spi_out"], child_b["spi_in"])
    assert child_a["key_out"] == child_b["key_in"] and child_a["mode"] == mode
