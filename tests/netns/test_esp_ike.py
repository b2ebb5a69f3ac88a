"""Two hosts, each with oe-agent's IKE engine and the userspace ESP dataplane, static Ed25519
keys (no DNS: the agent adds that): IKEv2 sets up a transport-mode Child SA, ESP runs in
userspace (raw protocol 50: no NAT between them), ping and UDP go through, the veth shows only
IKE and ESP. The driver below is the agent's wiring without its policy logic."""
from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from oe_agent.esp import packet
from tests.conftest import have, needs

ROOT = Path(__file__).resolve().parents[2]
CANARY = b"oe-agent-canary!"

DRIVER = r'''
import asyncio, ipaddress, json, signal, sys
from cryptography.hazmat.primitives import serialization
from oe_agent.esp.dataplane import UserspaceDataplane
from oe_agent.ike import auth
from oe_agent.ike.adapter import IkeAdapter
from oe_agent.ike.events import ChildSaEstablished
from oe_agent.ike.payloads import IdInitiator
from oe_agent.ike.sa import IkeConfig
from oe_agent.model import Mode

async def main(local, remote, key, peer, initiate, mode, late_attach=False):
    cfg = IkeConfig(
        local_id=IdInitiator.from_address(local),
        credential=auth.SignatureCredential(
            serialization.load_pem_private_key(open(key, "rb").read(), None)),
        peer_keys=(serialization.load_pem_public_key(open(peer, "rb").read()),),
        ike_proposals=("aes256gcm16-prfsha256-x25519",), esp_proposals=("aes128gcm16",),
        mode=Mode(mode))
    dp = UserspaceDataplane(own_udp=late_attach)
    pending = []

    def on_event(sa, ev):
        print("EVENT", type(ev).__name__, flush=True)
        if isinstance(ev, ChildSaEstablished):
            pending.append(asyncio.ensure_future(dp.add_child_sa(ev.params)))
            pending[-1].add_done_callback(lambda f: print("CHILD_UP", ev.params.encap,
                                                          f.exception(), flush=True))

    ike = IkeAdapter([local], lambda l, r: cfg, on_event, on_esp=dp.on_esp)
    if late_attach:  # the daemon's order: the dataplane starts (binding 4500), IKE takes over
        await dp.start()
        await ike.start()
        dp.attach_udp(ike.send_esp)
    else:
        dp.attach_udp(ike.send_esp)
        await ike.start()
        await dp.start()
    stop = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(s, stop.set)
    print("READY", flush=True)
    if initiate:
        ike.connect(cfg, ipaddress.ip_address(local), ipaddress.ip_address(remote))
    await stop.wait()
    sas = [(c.spi, c.packets) for c in await dp.counters()]
    await dp.stop()
    ike.close()
    print("COUNTERS", json.dumps(sas), json.dumps(dict(dp.stats)), flush=True)

asyncio.run(main(*sys.argv[1:5], sys.argv[5] == "1", sys.argv[6], sys.argv[7:] == ["late"]))
'''


def _wait_for(path: Path, what: bytes, proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and what in path.read_bytes():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{what!r} not in {path}: {path.read_bytes()[-3000:]!r}")


def _keys(host, mine, theirs):
    priv = host.workdir / "local.key.pem"
    priv.write_bytes(mine.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    pub = host.workdir / "peer.pub.pem"
    pub.write_bytes(theirs.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def test_ike_negotiated_transport_sa_over_userspace_esp(hosts):
    needs(have("tcpdump"), "tcpdump")
    h1, h2 = hosts.pair()
    k1, k2 = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    wire, pcap = hosts.capture(h2, "not arp", name="wire")
    drivers = []
    for h, peer, mine, theirs, init in ((h2, h1, k2, k1, "0"), (h1, h2, k1, k2, "1")):
        priv, pub = _keys(h, mine, theirs)
        (h.workdir / "driver.py").write_text(DRIVER)
        p = h.popen(sys.executable, str(h.workdir / "driver.py"), h.v4, peer.v4, str(priv),
                    str(pub), init, "transport", *(["late"] if init == "1" else []),
                    log="driver.log", cwd=str(ROOT))
        _wait_for(h.workdir / "driver.log", b"READY", p)
        drivers.append((h, p))
    for h, p in drivers:
        _wait_for(h.workdir / "driver.log", b"CHILD_UP", p)
        assert b"CHILD_UP None None" in (h.workdir / "driver.log").read_bytes()  # raw ESP

    h1.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "-p", CANARY.hex(), h2.v4, timeout=20)
    h2.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "-p", CANARY.hex(), h1.v4, timeout=20)
    time.sleep(0.3)  # let tcpdump write the last packets (bounded, not a timing assertion)
    h2.stop(wire)
    for h, p in drivers:
        h.stop(p)
        assert b"COUNTERS" in (h.workdir / "driver.log").read_bytes()

    esp = ike = 0
    data = pcap.read_bytes()
    off = 24
    while off + 16 <= len(data):
        incl = struct.unpack_from("<I", data, off + 8)[0]
        frame = data[off + 16:off + 16 + incl]
        off += 16 + incl
        assert CANARY not in frame
        if struct.unpack_from("!H", frame, 12)[0] != 0x0800:
            continue
        info = packet.parse(frame[14:])
        if {str(info.src), str(info.dst)} != {h1.v4, h2.v4}:
            continue  # IGMP and other link chatter
        if info.proto == packet.PROTO_ESP:
            esp += 1
        else:
            assert info.proto == packet.PROTO_UDP and {info.sport, info.dport} & {500, 4500}, info
            ike += 1
    assert esp >= 12 and ike >= 4, (esp, ike)
