"""oe-agent's IKE engine against strongSwan's charon on the wire (issue 2, acceptance 5).

charon runs with kernel-libipsec (this kernel has no ESP), which means tunnel mode and
ESP-in-UDP on 4500 always: charon fakes a NAT, so both sides float (RFC 7296 §2.23). The engine
runs in its own namespace through its asyncio adapter (peers/engine_driver.py) with a static
peer: our raw key and charon's raw public key. Each test compares what charon lists over VICI
with the engine's events: IKE SPIs, Child SA SPIs (each side's inbound is the other's
outbound), algorithms, mode and encapsulation.
"""
from __future__ import annotations

import sys

import pytest

from tests.interop.peers.charon import child_keys, established, hold_half_open, host_conn, sole_child
from tests.interop.peers.engine import EnginePeer
from tests.interop.peers.wire import canary_seen, read_pcap

CANARY = b"oe-agent-canary!"  # 16 bytes: ping -p repeats it through the payload

# (charon IKE proposal, charon ESP proposal, expected engine/charon algorithm names)
SUITES = {
    "x25519-gcm": ("aes256gcm16-prfsha256-x25519", "aes128gcm16",
                   dict(dh="CURVE_25519", encr="AES_GCM_16", integ=None)),
    "x25519-cbc": ("aes128-sha256-x25519", "aes128-sha256",
                   dict(dh="CURVE_25519", encr="AES_CBC", integ="HMAC_SHA2_256_128")),
    "modp2048-gcm": ("aes256gcm16-prfsha256-modp2048", "aes256gcm16",
                     dict(dh="MODP_2048", encr="AES_GCM_16", integ=None)),
    "modp2048-cbc": ("aes128-sha256-modp2048", "aes128-sha256",
                     dict(dh="MODP_2048", encr="AES_CBC", integ="HMAC_SHA2_256_128")),
}
KINDS = ["ed25519", "rsa"]

# charon's names -> model.EspAlgorithm names
ESP_NAMES = {"AES_GCM_16": "aes-gcm-16", "AES_CBC": "aes-cbc", "CHACHA20_POLY1305": "chacha20-poly1305",
             "HMAC_SHA2_256_128": "hmac-sha2-256-128"}


def spi_hex(v) -> str:
    """SPIs as charon's VICI prints them: bare lowercase hex, 8 digits (ESP) or 16 (IKE)."""
    if isinstance(v, int):
        return f"{v:08x}"
    return str(v).lower().removeprefix("0x")


def setup_pair(hosts, charon, keypair, kind, suite, *, charon_opts=None, engine_opts=None):
    """Host 1 runs the engine, host 2 runs charon; both know the other's raw public key."""
    ike, esp, _ = SUITES[suite]
    e_host, c_host = hosts.pair()
    ke, kc = keypair(kind, 0), keypair(kind, 1)
    c = charon(c_host, **(charon_opts or {}))
    c.load_key(kc)
    c.load_conn("oe", host_conn(local=c_host.v4, remote=e_host.v4, local_key=kc,
                                remote_pub=ke.public_pem, child="oe-host",
                                proposals=ike, esp_proposals=esp))
    engine = EnginePeer.static(e_host, c_host, ke, kc.public_pem, ike_proposal=ike,
                               esp_proposal=esp, **(engine_opts or {}))
    return engine, c


def settled(c, what: str, pred=lambda sa, child: True, timeout: float = 20.0):
    """charon has exactly one IKE SA with one installed Child SA satisfying pred."""
    def ok(sas):
        got = sole_child(sas, "oe")
        return got is not None and pred(*got)
    return sole_child(c.wait_sas(ok, timeout=timeout, what=what), "oe")


def assert_agree(sa: dict, child: dict, ike_ev: dict, child_ev: dict, suite: str) -> None:
    """Both sides name the same SAs and algorithms."""
    _, _, names = SUITES[suite]
    # IKE SA: same SPI pair, charon's algorithms are the suite's
    assert spi_hex(ike_ev["spi_i"]) == sa["initiator-spi"]
    assert spi_hex(ike_ev["spi_r"]) == sa["responder-spi"]
    assert sa["dh-group"] == names["dh"]
    # Child SA: each side's inbound SPI is the other's outbound one
    p = child_ev["params"]
    assert spi_hex(p["spi_in"]) == child["spi-out"]
    assert spi_hex(p["spi_out"]) == child["spi-in"]
    assert child["encr-alg"] == names["encr"]
    assert p["alg"]["encr"] == ESP_NAMES[names["encr"]]
    assert p["alg"]["encr_key_bits"] == int(child["encr-keysize"])
    if names["integ"]:
        assert child["integ-alg"] == names["integ"]
        assert p["alg"]["integ"] == ESP_NAMES[names["integ"]]
    else:
        assert "integ-alg" not in child
        assert p["alg"]["integ"] is None
    assert p["mode"] == "tunnel" and child["mode"] == "TUNNEL"
    # both floated to 4500: charon (kernel-libipsec fakes a NAT) and the engine encapsulate
    assert sa["local-port"] == sa["remote-port"] == "4500"
    assert child.get("encap") == "yes"
    assert p["encap"] == [4500, 4500]
    assert len(p["encr_key_in"]) == len(p["encr_key_out"]) > 0


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("kind", KINDS)
def test_engine_initiates_to_charon(hosts, charon, keypair, kind, suite):
    engine, c = setup_pair(hosts, charon, keypair, kind, suite)
    engine.start()

    engine.send("initiate")

    ike_ev = engine.wait_event("IkeSaEstablished")
    child_ev = engine.wait_event("ChildSaEstablished")
    sa, child = settled(c, "IKE and Child SA from the engine")
    assert sa.get("initiator") != "yes" and ike_ev["initiator"] is True
    assert_agree(sa, child, ike_ev, child_ev, suite)
    assert f"authentication of '{engine.config.local}' with" in c.log_text()


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("kind", KINDS)
def test_charon_initiates_to_engine(hosts, charon, keypair, kind, suite):
    engine, c = setup_pair(hosts, charon, keypair, kind, suite)
    engine.start()

    c.initiate("oe-host", "oe")

    sa, child = settled(c, "IKE and Child SA with the engine")
    ike_ev = engine.wait_event("IkeSaEstablished")
    child_ev = engine.wait_event("ChildSaEstablished")
    assert sa.get("initiator") == "yes" and ike_ev["initiator"] is False
    assert_agree(sa, child, ike_ev, child_ev, suite)


@pytest.mark.parametrize("engine_initiates", [True, False], ids=["engine-init", "charon-init"])
@pytest.mark.parametrize("suite", ["x25519-cbc", "modp2048-gcm"])
def test_child_keys_match_charon(hosts, charon, keypair, suite, engine_initiates):
    """The engine's KEYMAT (RFC 7296 §2.17) is charon's: compared with the keys charon logs."""
    engine, c = setup_pair(hosts, charon, keypair, "ed25519", suite,
                           charon_opts={"log_keys": True})
    engine.start()
    if engine_initiates:
        engine.send("initiate")
    else:
        c.initiate("oe-host", "oe")
    p = engine.wait_event("ChildSaEstablished")["params"]
    settled(c, "established")
    (k,) = child_keys(c.log_text())
    out_key, in_key = ("_i", "_r") if engine_initiates else ("_r", "_i")
    assert bytes.fromhex(p["encr_key_out"]) == k["encr" + out_key]
    assert bytes.fromhex(p["encr_key_in"]) == k["encr" + in_key]
    if SUITES[suite][2]["integ"]:
        assert bytes.fromhex(p["integ_key_out"]) == k["integ" + out_key]
        assert bytes.fromhex(p["integ_key_in"]) == k["integ" + in_key]


@pytest.fixture
def up(hosts, charon, keypair):
    """An engine-initiated IKE SA + Child SA (Ed25519, X25519, AES-GCM), settled on both sides."""
    engine, c = setup_pair(hosts, charon, keypair, "ed25519", "x25519-gcm")
    engine.start()
    engine.send("initiate")
    ike_ev = engine.wait_event("IkeSaEstablished")
    child_ev = engine.wait_event("ChildSaEstablished")
    sa, child = settled(c, "established")
    return engine, c, ike_ev, child_ev, sa, child


def test_child_rekey_from_engine(up):
    engine, c, ike_ev, child_ev, sa, child = up
    engine.send("rekey_child")
    ev = engine.wait_event("ChildSaRekeyed")
    new = ev["new"]
    sa2, child2 = settled(c, "child rekeyed by the engine",
                          lambda s, ch: ch["spi-in"] != child["spi-in"])
    assert sa2["initiator-spi"] == sa["initiator-spi"]  # same IKE SA
    assert spi_hex(new["spi_in"]) == child2["spi-out"] and spi_hex(new["spi_out"]) == child2["spi-in"]
    assert spi_hex(ev["old"]["spi_in"]) == child["spi-out"]


def test_child_rekey_from_charon(up):
    engine, c, ike_ev, child_ev, sa, child = up
    c.rekey(child_id=child["uniqueid"])
    ev = engine.wait_event("ChildSaRekeyed")
    sa2, child2 = settled(c, "child rekeyed by charon",
                          lambda s, ch: ch["spi-in"] != child["spi-in"])
    new = ev["new"]
    assert spi_hex(new["spi_in"]) == child2["spi-out"] and spi_hex(new["spi_out"]) == child2["spi-in"]
    assert spi_hex(ev["old"]["spi_out"]) == child["spi-in"]


def test_ike_rekey_from_engine(up):
    engine, c, ike_ev, child_ev, sa, child = up
    engine.send("rekey_ike")
    ev = engine.wait_event("IkeSaRekeyed")
    sa2, child2 = settled(c, "IKE SA rekeyed by the engine",
                          lambda s, ch: s["initiator-spi"] != sa["initiator-spi"])
    assert spi_hex(ev["spi_i"]) == sa2["initiator-spi"]
    assert spi_hex(ev["spi_r"]) == sa2["responder-spi"]
    # the Child SA moves to the new IKE SA unchanged (RFC 7296 §2.8)
    assert child2["spi-in"] == child["spi-in"]
    assert sa2["dh-group"] == sa["dh-group"]


def test_ike_rekey_from_charon(up):
    engine, c, ike_ev, child_ev, sa, child = up
    c.rekey(ike_id=sa["uniqueid"])
    ev = engine.wait_event("IkeSaRekeyed")
    sa2, child2 = settled(c, "IKE SA rekeyed by charon",
                          lambda s, ch: s["initiator-spi"] != sa["initiator-spi"])
    assert spi_hex(ev["spi_i"]) == sa2["initiator-spi"]
    assert spi_hex(ev["spi_r"]) == sa2["responder-spi"]
    assert child2["spi-in"] == child["spi-in"]


def test_delete_child_from_engine(up):
    engine, c, ike_ev, child_ev, sa, child = up
    engine.send("delete_child")
    engine.wait_event("ChildSaDeleted")
    sas = c.wait_sas(lambda s: established(s, "oe") and not (established(s, "oe")[0].get("child-sas")),
                     what="Child SA deleted by the engine")
    assert established(sas, "oe")[0]["initiator-spi"] == sa["initiator-spi"]  # IKE SA stays


def test_delete_child_from_charon(up):
    engine, c, ike_ev, child_ev, sa, child = up
    c.terminate(child_id=child["uniqueid"])
    ev = engine.wait_event("ChildSaDeleted")
    assert spi_hex(ev["params"]["spi_out"]) == child["spi-in"]
    assert established(c.list_sas(), "oe")


def test_delete_ike_from_engine(up):
    engine, c, ike_ev, child_ev, sa, child = up
    engine.send("delete_ike")
    engine.wait_event("IkeSaDeleted")
    c.wait_sas(lambda s: not s, what="all SAs gone after the engine's delete")
    assert "received DELETE for IKE_SA" in c.log_text()


def test_delete_ike_from_charon(up):
    engine, c, ike_ev, child_ev, sa, child = up
    c.terminate(ike="oe")
    engine.wait_event("IkeSaDeleted")
    assert not c.list_sas()


def test_cookie_from_charon(hosts, charon, keypair):
    """charon with cookie_threshold = 1 and one half-open IKE SA demands a COOKIE; the engine
    repeats IKE_SA_INIT with it first (RFC 7296 §2.6) and the SAs come up."""
    engine, c = setup_pair(hosts, charon, keypair, "ed25519", "x25519-gcm",
                           charon_opts={"cookie_threshold": 1})
    third = hosts.add()
    k3 = keypair("ed25519", 2)
    c.load_conn("half", host_conn(local=c.host.v4, remote=third.v4, local_key=keypair("ed25519", 1),
                                  remote_pub=k3.public_pem, child="half",
                                  proposals=SUITES["x25519-gcm"][0], esp_proposals="aes128gcm16"))
    hold_half_open(charon(third), c.host, key=k3, target_pub=keypair("ed25519", 1).public_pem)
    engine.start()

    engine.send("initiate")

    engine.wait_event("ChildSaEstablished")
    c.wait_sas(lambda s: established(s, "oe"), what="established after the cookie")
    log = c.log_text()
    assert f"sending COOKIE notify to {engine.config.local}" in log
    assert "parsed IKE_SA_INIT request 0 [ N(COOKIE) " in log


@pytest.mark.parametrize("engine_initiates", [True, False], ids=["engine-init", "charon-init"])
def test_float_to_4500_on_the_wire(hosts, charon, keypair, engine_initiates):
    """IKE_SA_INIT on 500, everything after it on 4500 behind the non-ESP marker, both ways
    (RFC 7296 §2.23; charon floats because kernel-libipsec fakes a NAT, the engine follows)."""
    engine, c = setup_pair(hosts, charon, keypair, "ed25519", "x25519-gcm")
    tcpdump, pcap = hosts.capture(engine.host, "udp port 500 or udp port 4500", name="float")
    engine.start()
    if engine_initiates:
        engine.send("initiate")
    else:
        c.initiate("oe-host", "oe")
    engine.wait_event("ChildSaEstablished")
    settled(c, "established")
    engine.host.stop(tcpdump)
    ike = [p for p in read_pcap(pcap) if p.is_ike]
    exchange = [(p.payload[4:] if p.dport == 4500 or p.sport == 4500 else p.payload)[18]
                for p in ike]
    sa_init = [p for p, x in zip(ike, exchange) if x == 34]
    later = [p for p, x in zip(ike, exchange) if x != 34]
    assert sa_init and all(p.sport == p.dport == 500 for p in sa_init)
    assert later and all(p.sport == p.dport == 4500 for p in later)
    senders = {p.src for p in later}
    assert senders == {engine.config.local, engine.config.remote}  # both sides floated


def test_engine_keys_decrypt_charons_esp(hosts, charon, keypair):
    """charon's ESP-in-UDP towards the engine opens with the engine's KEYMAT: the engine's key
    log (Wireshark esp_sa lines) + `oe-agent decrypt` show the plaintext canary."""
    engine, c = setup_pair(hosts, charon, keypair, "ed25519", "x25519-gcm")
    engine.start()
    engine.send("initiate")
    p = engine.wait_event("ChildSaEstablished")["params"]
    settled(c, "established")
    tcpdump, pcap = hosts.capture(engine.host, "udp port 4500", name="esp")
    # the engine has no dataplane here: charon's pings go unanswered, but they are on the wire
    c.host.run("ping", "-c", "2", "-i", "0.2", "-W", "1", "-p", CANARY.hex(), engine.config.local,
               check=False)
    engine.host.stop(tcpdump)
    esp = [x for x in read_pcap(pcap) if x.is_esp_in_udp]
    assert esp and {x.payload[:4].hex() for x in esp} == {spi_hex(p["spi_in"])}
    assert not canary_seen(pcap, CANARY)
    out = engine.host.run(sys.executable, "-m", "oe_agent", "decrypt", str(pcap),
                          "--keylog", engine.config.keylog, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert CANARY.decode() in out.stdout.replace("\n", "") or CANARY.hex() in out.stdout, out.stdout
