"""oe-agent's IKE engine against libreswan's pluto (IKE only on this kernel).

pluto 4.10 has no Ed25519 authentication (interop README, pitfall 14): RSA raw keys only.
Its Child SA install fails with ENOSYS here (no ESP), so what holds is the IKE SA, and the Child
SA as the engine negotiated it. As responder pluto then answers TS_UNACCEPTABLE and keeps the
IKE SA; as initiator it deletes the IKE SA without a notification and re-initiates (pitfall 11),
so each test ends by deleting pluto's conn.
"""
from __future__ import annotations

import re

import pytest

from tests.interop.peers.engine import EnginePeer
from tests.interop.peers.pluto import rsa_conn
from tests.interop.peers.wire import read_pcap

SUITES = {
    # pluto ike=, esp=; engine (strongSwan-style) proposals
    "modp2048-cbc": ("aes128-sha2_256-modp2048", "aes128-sha2_256",
                     "aes128-sha256-modp2048", "aes128-sha256"),
    "x25519-gcm": ("aes_gcm256-sha2_256-dh31", "aes_gcm128",
                   "aes256gcm16-prfsha256-x25519", "aes128gcm16"),
}


def setup_pair(hosts, pluto, keypair, suite):
    e_host, p_host = hosts.pair()
    ke = keypair("rsa", 0)
    lsw_ike, lsw_esp, ike, esp = SUITES[suite]
    p = pluto(p_host)
    p.add_conn("oe", rsa_conn(left=p_host.v4, right=e_host.v4, left_rsasigkey=p.rsasigkey,
                              right_rsasigkey=ke.rfc3110, ike=lsw_ike, esp=lsw_esp))
    engine = EnginePeer.static(e_host, p_host, ke, p.public_pem, ike_proposal=ike,
                               esp_proposal=esp)
    return engine, p


def esp_sas_in_pluto_log(text: str) -> set[tuple[str, str]]:
    """(SPI, destination) of the SAs pluto tried to install ("Add SA esp.<spi>@<dst>:")."""
    return {(spi.zfill(8), dst) for spi, dst in re.findall(r"Add SA esp\.([0-9a-f]+)@([^:\s]+)", text)}


@pytest.mark.parametrize("suite", SUITES)
def test_engine_initiates_to_pluto(hosts, pluto, keypair, suite):
    engine, p = setup_pair(hosts, pluto, keypair, suite)
    tcpdump, pcap = hosts.capture(p.host, "udp port 500 or udp port 4500", name="ike")
    engine.start()
    engine.send("initiate")

    ike_ev = engine.wait_event("IkeSaEstablished")
    p.wait_log(r"responder established IKE SA; authenticated peer .*RSA")
    assert ike_ev["initiator"] is True
    # pluto answered on the IKE SA the engine reports (its --showstates prints no SPIs)
    p.host.stop(tcpdump)
    assert (spi_hex(ike_ev["spi_i"], 16), spi_hex(ike_ev["spi_r"], 16)) in ike_spis_from(pcap, p.host.v4)
    outcome = engine.wait_event(("ChildSaEstablished", "NegotiationFailed"))
    if outcome["event"] == "NegotiationFailed":
        # no ESP in this kernel: pluto's install fails (ENOSYS for AES-GCM, EPROTONOSUPPORT
        # for AES-CBC), it refuses the Child SA with TS_UNACCEPTABLE and keeps the IKE SA
        # (pitfall 11)
        assert outcome["reason"] == "ts-unacceptable" and outcome["child"] is True
        assert re.search(r"Add SA esp\.\w+@\S+: (Function|Protocol) not (implemented|supported)",
                         p.log_text())
        assert "STATE_V2_ESTABLISHED_IKE_SA" in p.states()


@pytest.mark.parametrize("suite", SUITES)
def test_pluto_initiates_to_engine(hosts, pluto, keypair, suite):
    engine, p = setup_pair(hosts, pluto, keypair, suite)
    engine.start()
    try:
        p.initiate("oe")
        ike_ev = engine.wait_event("IkeSaEstablished")
        child_ev = engine.wait_event("ChildSaEstablished")
        m = p.wait_log(r"initiator established IKE SA; authenticated peer .*RSA")
        assert m
        assert ike_ev["initiator"] is False
        p.wait_log(r"Add SA esp\.|established Child SA")
        tried = esp_sas_in_pluto_log(p.log_text())
        if tried:
            # this kernel: pluto tried to install the SA towards the engine with the SPI the
            # engine receives on (then failed: no ESP)
            assert (spi_hex(child_ev["params"]["spi_in"], 8), engine.config.local) in tried, tried
    finally:
        p.delete("oe")  # ends pluto's revive loop


def spi_hex(v, digits: int) -> str:
    return f"{v:0{digits}x}" if isinstance(v, int) else str(v).lower().removeprefix("0x")


def ike_spis_from(pcap, src: str) -> set[tuple[str, str]]:
    """(SPIi, SPIr) of the IKE messages `src` sent (RFC 7296 §3.1 header; non-ESP marker on 4500)."""
    out = set()
    for pkt in read_pcap(pcap):
        if pkt.src == src and pkt.is_ike:
            hdr = pkt.payload[4:] if 4500 in (pkt.sport, pkt.dport) else pkt.payload
            out.add((hdr[:8].hex(), hdr[8:16].hex()))
    return out


def test_ike_rekey_and_delete_from_engine(hosts, pluto, keypair):
    """pluto as responder keeps the IKE SA after refusing the Child SA here; the engine rekeys
    it (CREATE_CHILD_SA, RFC 7296 §1.3.2) and then deletes it (§1.4.1)."""
    engine, p = setup_pair(hosts, pluto, keypair, "modp2048-cbc")
    engine.start()
    engine.send("initiate")
    first = engine.wait_event("IkeSaEstablished")
    engine.wait_event(("ChildSaEstablished", "NegotiationFailed"))

    engine.send("rekey_ike")
    ev = engine.wait_event("IkeSaRekeyed")
    assert (ev["old_spi_i"], ev["old_spi_r"]) == (first["spi_i"], first["spi_r"])
    p.wait_log(r"responder rekeyed IKE SA #\d+")

    engine.send("delete_ike")
    deleted = engine.wait_event("IkeSaDeleted")
    assert (deleted["spi_i"], deleted["reason"]) == (ev["spi_i"], "local")
    p.wait_log(r"#\d+: deleting state \(STATE_V2_ESTABLISHED_IKE_SA\)[^\n]*\n(?:.*\n)*.*"
               r"#\d+: deleting state \(STATE_V2_ESTABLISHED_IKE_SA\)")  # the old one, then ours
    assert "STATE_V2_ESTABLISHED_IKE_SA" not in p.states()


def test_childless_ike_from_pluto_rekey_and_delete(hosts, pluto, keypair):
    """pluto's `omit-v2-ike-auth-child` impairment gives an IKE SA without a Child SA (the only
    way pluto keeps one up here, interop README); pluto then rekeys it and deletes it."""
    engine, p = setup_pair(hosts, pluto, keypair, "modp2048-cbc")
    engine.start()
    p.whack("--impair", "omit-v2-ike-auth-child")
    try:
        out = p.initiate("oe")
        assert "initiator established IKE SA" in out, out
        first = engine.wait_event("IkeSaEstablished")
        assert first["initiator"] is False
        assert not engine.events_named("ChildSaEstablished")

        p.whack("--rekey-ike", "--name", "oe")
        ev = engine.wait_event("IkeSaRekeyed")
        assert (ev["old_spi_i"], ev["old_spi_r"]) == (first["spi_i"], first["spi_r"])
        p.wait_log(r"initiator rekeyed IKE SA #\d+")
    finally:
        p.delete("oe")
    deleted = engine.wait_event("IkeSaDeleted", match=lambda e: e["spi_i"] == ev["spi_i"])
    assert deleted["reason"] == "peer"


def test_cookie_from_pluto(hosts, pluto, keypair):
    """pluto in DDoS 'busy' mode answers every IKE_SA_INIT with a COOKIE (RFC 7296 §2.6); the
    engine repeats its request with the cookie first and the IKE SA comes up."""
    engine, p = setup_pair(hosts, pluto, keypair, "x25519-gcm")
    tcpdump, pcap = hosts.capture(p.host, "udp port 500", name="cookie")
    p.whack("--ddos-busy")
    engine.start()
    engine.send("initiate")
    engine.wait_event("IkeSaEstablished")
    p.wait_log(r"responder established IKE SA")
    p.host.stop(tcpdump)
    # on the wire: pluto's first answer carries only N(COOKIE) (16390) and the engine's
    # second IKE_SA_INIT starts with that notify
    inits = [x for x in read_pcap(pcap) if x.dport == 500 and x.payload[18] == 34
             and x.src == engine.config.local]
    assert len(inits) >= 2
    first_payload = inits[-1].payload[16]
    notify_type = int.from_bytes(inits[-1].payload[28 + 6:28 + 8], "big")
    assert first_payload == 41 and notify_type == 16390  # N, COOKIE
